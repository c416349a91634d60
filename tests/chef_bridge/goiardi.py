"""A throw-away goiardi Chef server on loopback, with authentication on, for interoperability tests.

Import the fixture into a test module (no conftest needed)::

    from tests.chef_bridge import goiardi

    goiardi_server = goiardi.goiardi_server

goiardi comes from Debian (``apt-get install goiardi``); ``make test`` installs it. A missing
binary fails the tests rather than skipping them, so interoperability is never silently untested.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from chef_bridge import auth

STARTUP_TIMEOUT = 20.0  # seconds; goiardi generates three RSA keys on first start
STOP_TIMEOUT = 5.0
ADMIN_NAME = "admin"  # goiardi creates this user and writes its key to <conf-root>/admin.pem
CHEF_VERSION = "11.1.7"  # the Chef server version goiardi 0.11 aims to be compatible with
NOT_INSTALLED = (
    "goiardi is not installed: the Chef interoperability tests need it. "
    "`make test` installs it (Debian package `goiardi`: apt-get install -y goiardi)."
)


@dataclass(frozen=True)
class Goiardi:
    """A running goiardi: where it listens and the admin credentials it generated."""

    url: str
    conf_root: Path
    admin_name: str
    admin_key: bytes
    log_file: Path

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of goiardi's log, to explain a failure."""
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class Response:
    """What goiardi answered to one request."""

    status: int
    body: bytes


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def send(url: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
    """Send one HTTP request and return its status and body, error statuses included."""
    request = urllib.request.Request(
        url + path, data=body if body else None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return Response(answer.status, answer.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read())


def signed_request(
    server: Goiardi,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    version: str = "1.3",
    key: bytes | None = None,
    user_id: str | None = None,
) -> Response:
    """Send a request to goiardi signed by chef_bridge.auth, as a Chef client would."""
    headers = auth.sign_request(
        key if key is not None else server.admin_key,
        user_id or server.admin_name,
        method,
        path,
        body,
        version=version,
    )
    headers |= {"Accept": "application/json", "X-Chef-Version": CHEF_VERSION}
    if body:
        headers["Content-Type"] = "application/json"
    return send(server.url, method, path, body, headers)


def _answers(url: str) -> bool:
    try:
        send(url, "GET", "/", b"", {"Accept": "application/json"})
    except OSError:
        return False
    return True


@contextmanager
def run_goiardi(workdir: Path) -> Iterator[Goiardi]:
    """Run goiardi with authentication on a free loopback port until the block exits."""
    binary = shutil.which("goiardi")
    if binary is None:
        pytest.fail(NOT_INSTALLED, pytrace=False)
    port = free_loopback_port()
    log_file = workdir / "goiardi.log"
    # In-memory store, keys generated under conf-root; no config file so /etc/goiardi is ignored.
    command = [
        binary,
        "--use-auth",
        f"--conf-root={workdir}",
        "--ipaddress=127.0.0.1",
        f"--port={port}",
        "--hostname=127.0.0.1",
        f"--log-file={log_file}",
        "--log-level=info",
    ]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GOIARDI_")}
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    server = Goiardi(
        url=f"http://127.0.0.1:{port}",
        conf_root=workdir,
        admin_name=ADMIN_NAME,
        admin_key=b"",
        log_file=log_file,
    )
    try:
        admin_pem = workdir / "admin.pem"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (admin_pem.exists() and _answers(server.url)):
            if process.poll() is not None:
                pytest.fail(
                    f"goiardi exited with {process.returncode} on start:\n{server.log_tail()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"goiardi did not answer within {STARTUP_TIMEOUT}s:\n{server.log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.05)
        yield Goiardi(
            url=server.url,
            conf_root=workdir,
            admin_name=ADMIN_NAME,
            admin_key=admin_pem.read_bytes(),
            log_file=log_file,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def goiardi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Goiardi]:
    """A goiardi server with authentication on, shared by one test module."""
    with run_goiardi(tmp_path_factory.mktemp("goiardi")) as server:
        yield server
