"""Agent wake-ups: one Redis pub/sub subscription per server process, many local waiters.

A long poll must not hold a Redis connection while it waits (10,000 waiting agents would be
10,000 connections blocked in BLPOP). Instead each server process keeps ONE subscription to the
installation's wake-up channel, and every waiting poll registers a local event under its
instance id. ``publish_wake`` (called after a command is committed) sends the instance id on the
channel; every server process receives it and sets the events of that instance's waiters, if it
has any.

Pub/sub keeps no state, and it does not need to: commands live in the database. The race rule
that makes this safe: a poll registers its waiter BEFORE it reads the database, so a command
committed after that read publishes a wake-up that finds the waiter (its event stays set even
if the poll has not started waiting yet). A wake-up for an instance with no registered waiter is
dropped: the next poll reads the database first.

What Redis failures cost: while the subscription is down, wake-ups are missed. Whenever the
subscription becomes active (first start, or after a reconnect, ours or redis-py's), every
registered waiter is woken once, so it re-reads the database and goes back to waiting when it
finds nothing; no command waits longer than the reconnect. If Redis stays away, polls simply
time out and the agents poll again.

The same subscription carries other per-process notices (``listen``): the agent credentials cache
(server/agent_auth.py) hears of changed instances on a second channel, and is told to forget
everything whenever the subscription starts or drops, since notices may have been missed.

Works the same with OS threads (gunicorn gthread, the Flask test client) and under gevent's
monkey patching (threading.Thread, Lock and Event become cooperative).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from server.keys import Keys

log = logging.getLogger(__name__)

# How long the listener blocks on the socket before it checks whether it should stop.
LISTEN_SLICE_SECONDS = 1.0
# Reconnect backoff after a Redis failure: doubled from the first to the cap.
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 5.0
# A process with nobody waiting lets its subscription go after this long (it comes back on the
# next poll); it keeps idle processes and short-lived test apps from holding a connection.
IDLE_SECONDS = 60.0


def wake_channel(keys: Keys) -> str:
    """The pub/sub channel every server process listens on for agent wake-ups."""
    return keys.wake_channel()


def publish_wake(connection: Any, instance_id: str, keys: Keys) -> None:
    """Tell every server process that the instance has something to run (one PUBLISH)."""
    connection.publish(wake_channel(keys), instance_id)


class Waiter:
    """One waiting long poll: an event the hub sets when its instance is woken."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.event = threading.Event()

    def wait(self, seconds: float) -> bool:
        """Block until woken (or already woken) or the time passes; consume the wake-up."""
        woken = self.event.wait(max(seconds, 0.0))
        if woken:
            # Cleared before the caller reads the database: a wake-up after that read sets it
            # again, so none is lost.
            self.event.clear()
        return woken


@dataclass(frozen=True)
class Listener:
    """Another channel on the hub's subscription: its messages, and a reset when any may be lost."""

    channel: str
    on_message: Callable[[str], None]
    on_reset: Callable[[], None]


class WakeupHub:
    """Per-process dispatcher from one Redis subscription to the local waiters."""

    def __init__(
        self,
        connect: Callable[[], redis.Redis],
        keys: Keys,
        *,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._connect = connect
        self.channel = wake_channel(keys)
        self.idle_seconds = idle_seconds
        self._waiters: dict[str, set[Waiter]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._listeners: dict[str, Listener] = {}
        self._confirmed = 0
        # Until then the subscription stays even with nobody waiting (a listener is in use).
        self._kept_until = 0.0
        # Counts how often the subscription became active (tests and metrics read it).
        self.subscriptions = 0
        self.delivered = 0

    # --- other channels -----------------------------------------------------------------------

    def listen(
        self, channel: str, on_message: Callable[[str], None], on_reset: Callable[[], None]
    ) -> None:
        """Also subscribe to `channel` (from the next subscription on; call before first use)."""
        with self._lock:
            self._listeners[channel] = Listener(channel, on_message, on_reset)

    def keep(self) -> bool:
        """Hold (or start) the subscription for another idle period; whether it is live now."""
        until = time.monotonic() + self.idle_seconds
        # On the hot path of every signed request: the lock only about once a second.
        if until - self._kept_until > min(1.0, self.idle_seconds / 4) or self._thread is None:
            with self._lock:
                self._kept_until = until
                self._ensure_listener()
        return self._subscribed.is_set()

    def _reset_listeners(self) -> None:
        for listener in list(self._listeners.values()):
            try:
                listener.on_reset()
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                log.exception("wakeups %s: reset of %s failed", self.channel, listener.channel)

    # --- waiters ------------------------------------------------------------------------------

    @contextmanager
    def waiter(self, instance_id: str) -> Iterator[Waiter]:
        """Register a waiter for the instance (before reading the database), unregister after."""
        waiter = Waiter(instance_id)
        with self._lock:
            self._waiters.setdefault(instance_id, set()).add(waiter)
            self._ensure_listener()
        try:
            yield waiter
        finally:
            with self._lock:
                found = self._waiters.get(instance_id)
                if found is not None:
                    found.discard(waiter)
                    if not found:
                        del self._waiters[instance_id]

    def waiting(self) -> int:
        """How many polls wait in this process right now."""
        with self._lock:
            return sum(len(found) for found in self._waiters.values())

    def wake_local(self, instance_id: str) -> int:
        """Set the events of the instance's local waiters; how many there were."""
        with self._lock:
            found = list(self._waiters.get(instance_id, ()))
        for waiter in found:
            waiter.event.set()
        return len(found)

    def wake_everyone(self) -> int:
        """Wake every local waiter (wake-ups may have been missed); how many there were."""
        with self._lock:
            everyone = [w for found in self._waiters.values() for w in found]
        for waiter in everyone:
            waiter.event.set()
        return len(everyone)

    # --- the listener -------------------------------------------------------------------------

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until the subscription is active (tests, readiness checks)."""
        return self._subscribed.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the listener and drop the subscription."""
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _ensure_listener(self) -> None:
        # Called with the lock held.
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"wakeups {self.channel}", daemon=True
        )
        self._thread.start()

    def _idle(self) -> bool:
        # Called with the lock held: the listener may only go when nobody can miss it.
        return not self._waiters and time.monotonic() >= self._kept_until

    def _run(self) -> None:
        backoff = RETRY_FIRST_SECONDS
        while not self._stopping.is_set():
            try:
                if self._listen():
                    return
                backoff = RETRY_FIRST_SECONDS
            except (redis.RedisError, OSError) as exc:
                self._subscribed.clear()
                self._reset_listeners()
                log.warning(
                    "wakeups %s: subscription lost (%s); retrying in %.1f s",
                    self.channel,
                    type(exc).__name__,
                    backoff,
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS)
        self._subscribed.clear()
        self._reset_listeners()

    def _listen(self) -> bool:
        """Subscribe and dispatch until stopped or idle (True) or until Redis fails (raises)."""
        client = self._connect()
        pubsub = client.pubsub()
        try:
            self._confirmed = 0
            pubsub.subscribe(self.channel, *self._listeners)
            idle_since: float | None = None
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=LISTEN_SLICE_SECONDS)
                if message is not None:
                    self._dispatch(message)
                with self._lock:
                    if not self._idle():
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= self.idle_seconds:
                        # Deciding under the lock: a waiter registering now starts a new listener.
                        self._thread = None
                        self._subscribed.clear()
                        self._reset_listeners()
                        log.debug("wakeups %s: idle, unsubscribed", self.channel)
                        return True
            return True
        finally:
            # Whatever ends the subscription, nothing kept on its strength may outlive it.
            self._subscribed.clear()
            self._reset_listeners()
            try:
                pubsub.close()
            finally:
                client.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        channel = _text(message.get("channel"))
        if kind == "subscribe":
            # Active again (first start, our reconnect or redis-py's own): anything published
            # while we were not subscribed is lost, so every waiter re-reads the database and
            # every listener forgets what it kept.
            self._reset_listeners()
            self._confirmed += 1
            if self._confirmed < 1 + len(self._listeners):
                return
            self._confirmed = 0
            self.subscriptions += 1
            self._subscribed.set()
            woken = self.wake_everyone()
            if self.subscriptions > 1:
                log.info("wakeups %s: subscribed again, %s waiter(s) woken", self.channel, woken)
        elif kind == "message":
            data = _text(message.get("data"))
            listener = self._listeners.get(channel)
            if listener is not None:
                listener.on_message(data)
            else:
                self.delivered += self.wake_local(data)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
