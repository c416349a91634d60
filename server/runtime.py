"""Process-wide handles for code that runs outside a request (RQ jobs, the scheduler)."""

from __future__ import annotations

import functools
from typing import Any

import redis

from server import queue
from server.config import Settings, load_settings
from server.db import Database
from server.keys import Keys

# A pending fan-out marker outlives a lost job by at most this long; the reconciler repairs.
FANOUT_PENDING_TTL = 60


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
    keys.cache_clear()


@functools.cache
def keys() -> Keys:
    """This process's Redis key templates."""
    return Keys(settings().queue_prefix)


def enqueue_fanout(connection: redis.Redis, keyset: Keys, stack_id: str) -> None:
    """Enqueue one configure fan-out for a stack unless one is already waiting to run."""
    from server import jobs
    from server.queue import enqueue

    # One pending fan-out per stack: changes that arrive before it runs ride along with it.
    if connection.set(keyset.fanout_pending(stack_id), "1", nx=True, ex=FANOUT_PENDING_TTL):
        enqueue(connection, jobs.fanout_configure, stack_id)


def hooks_for(connection: redis.Redis, keyset: Keys) -> Any:
    """Orchestrator hooks that reach agents, the queue and providers through this Redis."""
    from server import orchestrator, providers
    from server.api.agent import wake, wake_many
    from server.queue import enqueue

    return orchestrator.Hooks(
        wake=lambda instance_id: wake(connection, instance_id, keyset),
        enqueue_fanout=lambda stack_id: enqueue_fanout(connection, keyset, stack_id),
        machine_action=lambda instance_id, action: enqueue(
            connection, providers.provider_action, instance_id, action
        ),
        wake_many=lambda instance_ids: wake_many(connection, instance_ids, keyset),
    )


def publish_credentials_changed(
    connection: redis.Redis, keyset: Keys, instance_ids: list[str]
) -> None:
    """Tell every server process that these instances' status or certificates changed."""
    connection.publish(keyset.credentials_channel(), ",".join(instance_ids))


def install_hooks(connection: redis.Redis, keyset: Keys) -> None:
    """Connect the orchestrator and the credentials notices of this process to this Redis."""
    from server import credentials, orchestrator

    orchestrator.install_hooks(hooks_for(connection, keyset))
    credentials.install_publisher(
        lambda instance_ids: publish_credentials_changed(connection, keyset, instance_ids)
    )


def install_orchestrator_hooks() -> None:
    """Connect the orchestrator to this process's Redis (for workers and the scheduler)."""
    install_hooks(redis_connection(), keys())
