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
