"""Agent credentials kept per process, and the notices that keep them true.

Every signed agent request needs its instance's status and newest certificate
(server/agent_auth.py). Reading them from the database each time was the largest cost of a
heartbeat, and they rarely change: at enrollment, on a state change, a revocation or a
deletion. Every commit that changes them announces it after it commits: at once to every cache
of this process, and through Redis (a pub/sub channel that each server process's wake-up hub,
server/wakeups.py, listens on) to the others. The ORM hook below catches status changes,
certificates and deletions made through the ORM; a bulk UPDATE or DELETE of them must call
``credentials_changed`` itself.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session

from server.models import Instance, InstanceCertificate

log = logging.getLogger(__name__)

T = TypeVar("T")


class CredentialsCache(Generic[T]):
    """Credentials of the instances this process has seen, kept while it hears of changes.

    Reading the instance and its certificate was the largest cost of a signed request, and they
    rarely change. A cache answers only while ``is_live()`` (the process's Redis subscription
    to change notices is up); it is emptied whenever that subscription starts or drops, since a
    notice may have been missed. A load that overlapped a notice is not kept (the epoch check),
    unknown instances are never kept, and an entry older than ``max_age`` is read again: a
    backstop for a notice lost while the subscription stayed up. So a revocation, termination
    or state change reaches every server within the notice's delivery (milliseconds), and
    within ``max_age`` at worst.
    """

    def __init__(
        self,
        is_live: Callable[[], bool] = lambda: True,
        *,
        max_age: float = 30.0,
        limit: int = 100_000,
    ) -> None:
        self.is_live = is_live
        self.max_age = max_age
        self.limit = limit
        self._entries: dict[str, tuple[float, T]] = {}
        self._lock = threading.Lock()
        self._epoch = 0
        self.hits = 0
        self.misses = 0
        _CACHES.add(self)

    def load(self, instance_id: str, read: Callable[[], T | None]) -> T | None:
        """The instance's credentials: kept ones while live and fresh, else `read()` (kept)."""
        entry = self._entries.get(instance_id)
        live = self.is_live()
        if entry is not None and live and time.monotonic() - entry[0] < self.max_age:
            self.hits += 1
            return entry[1]
        self.misses += 1
        epoch = self._epoch
        found = read()
        if found is not None and live:
            with self._lock:
                if self._epoch == epoch:  # no notice arrived while we read
                    if len(self._entries) >= self.limit:
                        self._entries.clear()
                    self._entries[instance_id] = (time.monotonic(), found)
        return found

    def forget(self, instance_ids: Iterable[str]) -> None:
        """Drop what is kept of these instances (a notice of their change)."""
        with self._lock:
            self._epoch += 1
            for instance_id in instance_ids:
                self._entries.pop(instance_id, None)

    def clear(self) -> None:
        """Drop everything (the notices may have been missed)."""
        with self._lock:
            self._epoch += 1
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# Every cache of this process, so that a commit here reaches them all before its response.
_CACHES: weakref.WeakSet[CredentialsCache[Any]] = weakref.WeakSet()


def forget_in_process(instance_ids: Iterable[str]) -> None:
    """Tell every credentials cache of this process that these instances changed."""
    ids = list(instance_ids)
    for cache in list(_CACHES):
        cache.forget(ids)


def credentials_changed(session: Session, instance_ids: Iterable[str]) -> None:
    """Announce, after the commit, that these instances' credentials changed.

    Called by the ORM hook below for status changes, certificates and deletions; code that
    changes them with a bulk UPDATE or DELETE must call it itself.
    """
    pending: set[str] = session.info.setdefault(_CHANGED_KEY, set())
    pending.update(instance_ids)


_CHANGED_KEY = "scalarium.credentials_changed"
# Set by the app (server/runtime.py): sends a notice to the other server processes.
_publish: Callable[[list[str]], None] | None = None


def install_publisher(publish: Callable[[list[str]], None]) -> None:
    """How this process tells the others that instances' credentials changed."""
    global _publish
    _publish = publish


@event.listens_for(Session, "after_flush")
def _collect_changes(session: Session, _context: Any) -> None:
    changed: set[str] = set()
    for obj in session.new:
        if isinstance(obj, InstanceCertificate):
            changed.add(obj.instance_id)
    for obj in session.dirty:
        if isinstance(obj, Instance) and inspect(obj).attrs.status.history.has_changes():
            changed.add(obj.id)
        elif isinstance(obj, InstanceCertificate):
            changed.add(obj.instance_id)
    for obj in session.deleted:
        if isinstance(obj, Instance):
            changed.add(obj.id)
        elif isinstance(obj, InstanceCertificate):
            changed.add(obj.instance_id)
    if changed:
        credentials_changed(session, changed)


@event.listens_for(Session, "after_commit")
def _announce_changes(session: Session) -> None:
    changed = session.info.pop(_CHANGED_KEY, None)
    if not changed:
        return
    forget_in_process(changed)
    if _publish is not None:
        try:
            _publish(sorted(changed))
        except Exception:  # noqa: BLE001 - the commit stands; other caches expire by max_age
            log.exception("could not announce changed credentials of %s", sorted(changed))


@event.listens_for(Session, "after_rollback")
def _drop_changes(session: Session) -> None:
    session.info.pop(_CHANGED_KEY, None)
