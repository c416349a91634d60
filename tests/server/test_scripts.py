"""HotScript: a Lua script on kept connections, with redis-py's answers and errors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from server.scripts import HotScript
from tests.conftest import REDIS_URL

INCREMENT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(REDIS_URL)
    yield connection
    connection.close()


@pytest.fixture
def key(client: redis.Redis) -> Iterator[str]:
    name = f"test-scripts-{uuid.uuid4().hex[:12]}"
    yield name
    client.delete(name)


def test_runs_the_script_and_reuses_its_connection(client: redis.Redis, key: str) -> None:
    script = HotScript(INCREMENT)
    assert [script(client, [key], [2]) for _ in range(3)] == [2, 4, 6]
    assert len(script._idle[client.connection_pool]) == 1
    script.close()


def test_a_flushed_script_cache_is_refilled(client: redis.Redis, key: str) -> None:
    script = HotScript(INCREMENT)
    assert script(client, [key], [1]) == 1
    client.script_flush()
    assert script(client, [key], [1]) == 2  # NOSCRIPT, then EVAL
    assert script(client, [key], [1]) == 3
    script.close()


def test_an_error_reply_is_raised_and_the_connection_stays_usable(
    client: redis.Redis, key: str
) -> None:
    script = HotScript(INCREMENT)
    client.set(key, "not a number")
    with pytest.raises(redis.exceptions.ResponseError):
        script(client, [key], [1])
    client.set(key, "41")
    assert script(client, [key], [1]) == 42
    script.close()


def test_an_unreachable_server_raises_a_connection_error() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    script = HotScript(INCREMENT)
    with pytest.raises(redis.exceptions.ConnectionError):
        script(dead, ["k"], [1])
    assert not script._idle.get(dead.connection_pool)  # nothing broken is kept
    dead.close()


def test_a_kept_connection_the_server_closed_is_replaced(client: redis.Redis, key: str) -> None:
    script = HotScript(INCREMENT)
    assert script(client, [key], [1]) == 1
    kept = script._idle[client.connection_pool][0]
    kept.send_command("CLIENT", "ID")
    client.client_kill_filter(_id=str(kept.read_response()))  # a Redis restart, as it looks
    assert script(client, [key], [1]) == 2  # once more, on a new connection
    assert script._idle[client.connection_pool][0] is not kept
    script.close()


def test_idle_connections_are_bounded(client: redis.Redis, key: str) -> None:
    script = HotScript(INCREMENT, idle_limit=2)
    pool = client.connection_pool
    taken = [pool.make_connection() for _ in range(5)]
    script._idle[pool] = taken
    for _ in range(5):
        script(client, [key], [1])
    assert len(script._idle[pool]) <= 2
    script.close()
    for connection in taken:
        connection.disconnect()
