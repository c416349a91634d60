"""Redis and the RQ queues: one connection per app, one helper to enqueue jobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from flask import Flask
from rq import Queue

from server.config import Settings
from server.keys import Keys

QUEUE_NAMES = ("default",)


def connect(settings: Settings) -> redis.Redis:
    """A Redis client for the configured (or embedded) server."""
    from server import embedded

    url = settings.redis_url or embedded.embedded_url(settings)
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5)


def init_app(app: Flask) -> None:
    """Attach a lazily-connecting Redis client and the key templates to the app."""
    settings: Settings = app.config["SCALARIUM"]
    app.extensions["scalarium.redis"] = connect(settings)
    app.extensions["scalarium.keys"] = Keys(settings.queue_prefix)


def get_redis(app: Flask) -> redis.Redis:
    """The app's Redis client."""
    client: redis.Redis = app.extensions["scalarium.redis"]
    return client


def queue(connection: redis.Redis, name: str = "default") -> Queue:
    """An RQ queue bound explicitly to the connection (RQ 2 has no implicit one)."""
    return Queue(name, connection=connection)


def enqueue(
    connection: redis.Redis,
    func: Callable[..., Any],
    *args: Any,
    job_id: str | None = None,
    queue_name: str = "default",
    **kwargs: Any,
) -> Any:
    """Enqueue a module-level job function with plain-data arguments (ids, not objects)."""
    return queue(connection, queue_name).enqueue(func, *args, job_id=job_id, **kwargs)
