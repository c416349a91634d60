"""Periodic jobs: a table of data, enqueued with deterministic ids so two schedulers never
enqueue the same slot twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from server import jobs
from server.keys import Keys
from server.queue import enqueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Periodic:
    """A job run every `interval` seconds."""

    name: str
    func: Callable[..., Any]
    interval: int


PERIODIC = (
    Periodic("check_commands", jobs.check_commands, 15),
    Periodic("check_heartbeats", jobs.check_heartbeats, 30),
    Periodic("reconcile", jobs.reconcile, 30),
    Periodic("prune_events", jobs.prune_events, 3600),
)


def slot_of(now: float, interval: int) -> int:
    """The time slot a moment falls in."""
    return int(now // interval)


def tick(
    connection: redis.Redis, keys: Keys, now: float, table: tuple[Periodic, ...] = PERIODIC
) -> list[str]:
    """Enqueue every periodic job whose current slot nobody claimed yet; returns the job ids."""
    enqueued = []
    for job in table:
        slot = slot_of(now, job.interval)
        # SET NX makes the claim atomic across schedulers; the job id repeats the claim.
        if connection.set(keys.periodic(job.name, slot), "1", nx=True, ex=job.interval * 2):
            job_id = f"periodic-{job.name}-{slot}"
            enqueue(connection, job.func, job_id=job_id)
            enqueued.append(job_id)
            log.info("scheduler: enqueued %s", job_id)
    connection.set(keys.scheduler_alive(), str(now), ex=30)
    return enqueued


class Stop(Protocol):
    """What stops the loop: a threading.Event, or processes.StopFlag under signals."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


def run(connection: redis.Redis, keys: Keys, stop: Stop, period: float = 1.0) -> None:
    """Tick until stopped; a failed tick is logged and retried on the next one."""
    while not stop.is_set():
        try:
            tick(connection, keys, time.time())
        except redis.RedisError as exc:
            log.warning("scheduler: redis unavailable (%s); retrying", exc)
        stop.wait(period)
