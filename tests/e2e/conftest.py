"""Fixtures for the end-to-end tests: namespace hosts and a real TLS server the hosts reach.

``e2e_net`` makes two network-namespace hosts (see tests/e2e/netns.py); ``e2e_server`` starts a
real ``scalarium server`` (gunicorn) bound to the root side of that network on a free port,
serving HTTPS itself with ``SCALARIUM_PUBLIC_URL=https://server:PORT`` (every host resolves
``server`` to the root side), on SQLite in the test's tmp dir and the test Redis database.
``tls_server`` is the same server as a context manager, for tests that bind it elsewhere
(tests/test_vagrantfile.py runs it on loopback).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_URL
from tests.e2e.netns import TestNet, hosts

STARTUP_TIMEOUT = 60.0
STOP_GRACE = 3.0


def free_port_on(address: str) -> int:
    """A TCP port free on ``address`` right now."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@dataclass
class E2EServer:
    """A running TLS server: its public URL (for hosts) and root-side URL (for the test)."""

    public_url: str
    url: str
    token: str
    data_dir: Path
    ca_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str] | None = None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server process (SIGKILL for a crash)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def start(self) -> None:
        """Start the server process again, same port, same data (after stop())."""
        assert self.env is not None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "server"],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _wait_ready(self, STARTUP_TIMEOUT)

    def context(self) -> ssl.SSLContext:
        """A TLS context that trusts only the installation CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One /api/v1 request as admin; (status, decoded JSON)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "/api/v1" + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, context=self.context(), timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer of a request that must succeed."""
        status, answer = self.call(method, path, body)
        assert 200 <= status < 300, (method, path, status, answer)
        return answer


def _wait_ready(server: E2EServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log = server.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{log}")
        # The server creates its CA and TLS material on first start: wait for them too.
        if server.ca_path.is_file() and (server.data_dir / "admin-token").is_file():
            try:
                with urllib.request.urlopen(
                    server.url + "/api/v1/health", context=server.context(), timeout=2
                ) as response:
                    if response.status == 200:
                        server.token = (server.data_dir / "admin-token").read_text().strip()
                        return
            except (OSError, ssl.SSLError):
                pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become healthy in time")


@pytest.fixture
def e2e_net(tmp_path: Path) -> Iterator[TestNet]:
    """Two namespace hosts with their own roots under tmp; removed afterwards."""
    with hosts(2, prefix="scle2e", workdir=tmp_path / "hosts") as net:
        yield net


@contextmanager
def tls_server(address: str, public_host: str, tmp_path: Path) -> Iterator[E2EServer]:
    """`scalarium server` over HTTPS bound to ``address`` on a free port, public as
    ``https://PUBLIC_HOST:PORT``, on SQLite under ``tmp_path`` and the test Redis; stopped after.
    """
    port = free_port_on(address)
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALARIUM_")}
    env.update(
        {
            "SCALARIUM_DATA_DIR": str(data_dir),
            "SCALARIUM_REDIS_URL": REDIS_URL,
            "SCALARIUM_BIND": f"{address}:{port}",
            "SCALARIUM_PUBLIC_URL": f"https://{public_host}:{port}",
            "SCALARIUM_WEB_WORKERS": "1",
            # INFO, not WARNING: the "token in no log" check needs a server that logs.
            "SCALARIUM_LOG_LEVEL": "INFO",
        }
    )
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "server"],
            env=env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = E2EServer(
        public_url=f"https://{public_host}:{port}",
        url=f"https://{address}:{port}",
        token="",
        data_dir=data_dir,
        ca_path=data_dir / "pki" / "ca.pem",
        log_path=log_path,
        process=process,
        env=env,
    )
    try:
        _wait_ready(server, STARTUP_TIMEOUT)
        yield server
    finally:
        # Short grace: a worker holding a long poll (up to 30 s) would otherwise be waited for
        # until gunicorn's graceful timeout, and nothing here needs a clean exit.
        server.stop()


@pytest.fixture
def e2e_server(e2e_net: TestNet, tmp_path: Path, redis_client: Any) -> Iterator[E2EServer]:
    """The TLS server on the namespace network's root side, public as https://server:PORT."""
    with tls_server(e2e_net.server_address, "server", tmp_path) as server:
        yield server
