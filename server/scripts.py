"""Lua scripts on the hottest path, run on connections kept for them.

A heartbeat's one Redis round trip went through redis-py's general machinery: the Script
wrapper, argument-deprecation checks on every connection checkout, retries and timing hooks.
That machinery cost more CPU than the round trip itself (py-spy on the signed-request bench).
A HotScript keeps a few connections of the client's own pool (same address, credentials,
protocol and timeouts) and talks to them directly: EVALSHA, and EVAL once when the server
does not know the script yet (a restart or SCRIPT FLUSH). A connection that fails is closed,
never reused; a kept connection that the server closed meanwhile is replaced once (as redis-py
retries); any other error reaches the caller.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.connection import ConnectionInterface

# Connections kept idle per pool; more are made under load and closed after it.
IDLE_LIMIT = 32


class HotScript:
    """A Lua script, run through `client`'s pool without redis-py's per-command layers."""

    def __init__(self, source: str, idle_limit: int = IDLE_LIMIT) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self.idle_limit = idle_limit
        self._idle: weakref.WeakKeyDictionary[Any, list[ConnectionInterface]] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self, client: redis.Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the script; its reply, or the Redis error raised."""
        pool = client.connection_pool
        idle = self._idle.get(pool)
        if idle is None:
            idle = self._idle.setdefault(pool, [])
        # list.pop/append are atomic: threads and greenlets never share a connection.
        if idle:
            try:
                return self._run(idle, idle.pop(), keys, args)
            except redis.exceptions.ConnectionError:
                # A kept connection the server closed meanwhile (a restart, a client kill, an
                # idle timeout): the command never ran there; once more on a new connection.
                pass
        return self._run(idle, pool.make_connection(), keys, args)

    def _run(
        self,
        idle: list[ConnectionInterface],
        connection: ConnectionInterface,
        keys: Sequence[str],
        args: Sequence[Any],
    ) -> Any:
        try:
            try:
                connection.send_command("EVALSHA", self.sha, len(keys), *keys, *args)
                answer = connection.read_response()
            except redis.exceptions.NoScriptError:
                connection.send_command("EVAL", self.source, len(keys), *keys, *args)
                answer = connection.read_response()
        except redis.exceptions.ResponseError:
            idle.append(connection)  # an error reply leaves the connection in step
            raise
        except BaseException:
            connection.disconnect()
            raise
        if len(idle) < self.idle_limit:
            idle.append(connection)
        else:
            connection.disconnect()
        return answer

    def close(self) -> None:
        """Close every kept connection (tests, shutdown)."""
        for idle in list(self._idle.values()):
            while idle:
                idle.pop().disconnect()
