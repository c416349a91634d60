"""Process-wide handles for code that runs outside a request (RQ jobs, the scheduler)."""

from __future__ import annotations

import functools

import redis

from server import queue
from server.config import Settings, load_settings
from server.db import Database


@functools.cache
def settings() -> Settings:
    """This process's settings, read from the environment on first use."""
    return load_settings()


@functools.cache
def database() -> Database:
    """This process's Database."""
    return Database(settings().database_url)


@functools.cache
def redis_connection() -> redis.Redis:
    """This process's Redis client."""
    return queue.connect(settings())


def reset() -> None:
    """Forget the cached handles (tests, and after a fork)."""
    settings.cache_clear()
    database.cache_clear()
    redis_connection.cache_clear()
