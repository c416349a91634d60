"""RQ job functions: module-level, taking plain ids, thin shells over the pure core."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete

from server import runtime
from server.db import utcnow
from server.models import Event

log = logging.getLogger(__name__)


def prune_events(retention_days: int | None = None) -> int:
    """Delete events older than the retention period; returns how many went."""
    days = retention_days if retention_days is not None else runtime.settings().event_retention_days
    cutoff = utcnow() - timedelta(days=days)
    with runtime.database().session() as session:
        result = session.execute(delete(Event).where(Event.created_at < cutoff))
        removed = int(result.rowcount or 0)  # type: ignore[attr-defined]
    log.info("events: pruned %s older than %s days", removed, days)
    return removed


def fanout_configure(stack_id: str) -> dict[str, object]:
    """RQ job: send configure for the stack's current cluster version (idempotent)."""
    from server import orchestrator

    runtime.install_orchestrator_hooks()
    connection = runtime.redis_connection()
    connection.delete(runtime.keys().fanout_pending(stack_id))
    with runtime.database().session() as session:
        result = orchestrator.fanout_configure(session, stack_id)
    log.info("stack %s: fan-out %s", stack_id, result)
    return result


def check_commands(now: float | None = None) -> int:
    """Periodic: time out commands past their deadline; returns how many."""
    from sqlalchemy import select

    from server import orchestrator
    from server.lifecycle import CommandTrigger, command_overdue
    from server.models import Command, CommandStatus

    runtime.install_orchestrator_hooks()
    current = utcnow()
    timed_out = 0
    with runtime.database().session() as session:
        rows = session.scalars(
            select(Command).where(
                Command.status.in_([CommandStatus.QUEUED.value, CommandStatus.RUNNING.value])
            )
        ).all()
        for command in rows:
            since_created = (current - command.created_at).total_seconds()
            since_started = (
                (current - command.started_at).total_seconds() if command.started_at else None
            )
            if command_overdue(
                command.status, since_created, since_started, command.timeout_seconds
            ):
                orchestrator.command_finished(
                    session,
                    command,
                    CommandTrigger.TIMED_OUT,
                    reason=f"no result within {command.timeout_seconds} s",
                )
                timed_out += 1
    return timed_out


def check_heartbeats() -> int:
    """Periodic: instances silent past the heartbeat limit lose their connection."""
    from sqlalchemy import select

    from server import orchestrator
    from server.lifecycle import Trigger, heartbeat_lost
    from server.models import Instance, InstanceState

    runtime.install_orchestrator_hooks()
    limit = runtime.settings().heartbeat_limit
    current = utcnow()
    lost = 0
    with runtime.database().session() as session:
        rows = session.scalars(
            select(Instance).where(Instance.status == InstanceState.ONLINE.value)
        ).all()
        for instance in rows:
            seen = instance.last_heartbeat_at or instance.updated_at
            silent = (current - seen).total_seconds() if seen else None
            if heartbeat_lost(instance.status, silent, limit):
                orchestrator.instance_trigger(
                    session,
                    instance,
                    Trigger.HEARTBEAT_LOST,
                    reason=f"no heartbeat for {int(silent or 0)} s",
                )
                lost += 1
    return lost


def reconcile() -> list[str]:
    """Periodic: re-create fan-outs that a lost job or a flushed Redis left undone."""
    from sqlalchemy import select

    from server.models import Stack

    runtime.install_orchestrator_hooks()
    with runtime.database().session() as session:
        behind = session.scalars(
            select(Stack.id).where(Stack.fanout_version < Stack.cluster_version)
        ).all()
    for stack_id in behind:
        runtime.enqueue_fanout(runtime.redis_connection(), runtime.keys(), stack_id)
    return list(behind)
