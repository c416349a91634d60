"""The audit trail: every change to a stack is recorded as an event row."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from server.models import Event

log = logging.getLogger(__name__)


def record(
    db: Session,
    kind: str,
    message: str,
    *,
    stack_id: str | None = None,
    instance_id: str | None = None,
    data: dict[str, Any] | None = None,
    actor: str | None = None,
) -> Event:
    """Add an event to the session (committed with the change it describes)."""
    event = Event(
        kind=kind,
        message=message,
        stack_id=stack_id,
        instance_id=instance_id,
        data=data or {},
        actor=actor,
    )
    db.add(event)
    log.info("stack %s: %s: %s", stack_id or "-", kind, message)
    return event
