"""Every Redis key Scalarium uses comes from here."""

from __future__ import annotations


class Keys:
    """Key templates under one prefix, so installations can share a Redis."""

    def __init__(self, prefix: str = "scalarium") -> None:
        self.prefix = prefix

    def periodic(self, job: str, slot: int) -> str:
        """Claimed by the scheduler that enqueues a periodic job for a time slot."""
        return f"{self.prefix}:periodic:{job}:{slot}"

    def scheduler_alive(self) -> str:
        """Set by a running scheduler, with an expiry."""
        return f"{self.prefix}:scheduler:alive"

    def health(self) -> str:
        """Written by the health check to prove Redis accepts writes."""
        return f"{self.prefix}:health"

    def seen_signature(self, signature_id: str) -> str:
        """Set once per accepted signed request, until its timestamp leaves the skew window."""
        return f"{self.prefix}:agent:sig:{signature_id}"

    def fanout_pending(self, stack_id: str) -> str:
        """Set while a configure fan-out job for the stack waits in the queue."""
        return f"{self.prefix}:fanout:pending:{stack_id}"

    def metrics(self, instance_id: str) -> str:
        """The latest heartbeat metrics of an instance (JSON)."""
        return f"{self.prefix}:metrics:{instance_id}"

    def heartbeat_persisted(self, instance_id: str) -> str:
        """Set (with an expiry) when a heartbeat was last written to the database."""
        return f"{self.prefix}:heartbeat:persisted:{instance_id}"

    def agent_version(self, instance_id: str) -> str:
        """The agent version an instance reported last."""
        return f"{self.prefix}:agent-version:{instance_id}"

    def credentials_channel(self) -> str:
        """Pub/sub: instance ids (comma-separated) whose status or certificates changed."""
        return f"{self.prefix}:agent:credentials"

    def wake_channel(self) -> str:
        """The pub/sub channel every server process listens on for agent wake-ups."""
        return f"{self.prefix}:agent:wakeups"
