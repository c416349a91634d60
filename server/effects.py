"""Work that must happen only once a transaction has committed (wake-ups, enqueues).

A worker woken before the rows it should read are committed would find nothing, and a job
enqueued for a change that rolled back would act on a state that never existed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

_KEY = "scalarium.after_commit"


def after_commit(session: Session, action: Callable[[], Any]) -> None:
    """Run `action` after the session's current transaction commits (dropped on rollback)."""
    session.info.setdefault(_KEY, []).append(action)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    actions = session.info.pop(_KEY, [])
    for action in actions:
        try:
            action()
        except Exception:  # noqa: BLE001 - the commit stands; the reconciler repairs
            log.exception("after-commit action %r failed", action)


@event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop(_KEY, None)
