"""A real `scalarium server` (gunicorn) on a free loopback port, for CLI and HTTP tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    """A running server: its URL, admin token and data dir."""

    url: str
    token: str
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait for /api/v1/health to answer 200, failing early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/api/v1/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not become healthy in time")


@contextmanager
def live_server(
    tmp_path: Path,
    redis_url: str,
    database_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[LiveServer]:
    """Start `scalarium server`, yield it, stop it."""
    port = free_port()
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALARIUM_")}
    env.update(
        {
            "SCALARIUM_DATA_DIR": str(data_dir),
            "SCALARIUM_REDIS_URL": redis_url,
            "SCALARIUM_BIND": f"127.0.0.1:{port}",
            "SCALARIUM_WEB_WORKERS": "1",
            "SCALARIUM_LOG_LEVEL": "WARNING",
        }
    )
    if database_url:
        env["SCALARIUM_DATABASE_URL"] = database_url
    env.update(extra_env or {})
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "server"],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        token = (data_dir / "admin-token").read_text().strip()
        yield LiveServer(url, token, data_dir, env, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()
