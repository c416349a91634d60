"""A throw-away moto S3 server on loopback, so S3 code paths run against a real HTTP endpoint.

Import the fixtures into a test module (no conftest needed)::

    from tests.chef_bridge import moto

    moto_server = moto.moto_server
    aws_test_env = moto.aws_test_env

moto comes from PyPI (``pip install 'moto[server]'``, which provides ``moto_server``). A missing
command fails the tests rather than skipping them. :func:`aws_test_env` points boto3 at dummy
credentials and no configuration files, so nothing can reach real AWS by accident.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 30.0  # seconds; moto imports every service model on start
STOP_TIMEOUT = 5.0
REGION = "us-east-1"
NOT_INSTALLED = (
    "moto_server is not installed: the S3 tests need it. "
    "Install it into the virtualenv: pip install 'moto[server]'."
)
# Dummy credentials: moto accepts any; real AWS would refuse them.
ACCESS_KEY_ID = "AKIATESTTESTTESTTEST"
SECRET_ACCESS_KEY = "moto-secret-not-a-real-key"


@dataclass(frozen=True)
class MotoServer:
    """A running moto server: its endpoint and where its output goes."""

    endpoint_url: str
    log_file: Path

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of moto's output, to explain a failure."""
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _moto_command() -> str | None:
    # The virtualenv's bin directory is not on PATH when pytest runs as .venv/bin/python -m pytest.
    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.exists() else shutil.which("moto_server")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/moto-api/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def isolated_aws_environment() -> dict[str, str]:
    """Environment variables that pin boto3 to dummy credentials and no config files."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextmanager
def run_moto(workdir: Path) -> Iterator[MotoServer]:
    """Run ``moto_server`` on a free loopback port until the block exits."""
    command = _moto_command()
    if command is None:
        pytest.fail(NOT_INSTALLED, pytrace=False)
    port = free_loopback_port()
    server = MotoServer(endpoint_url=f"http://127.0.0.1:{port}", log_file=workdir / "moto.log")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environment |= isolated_aws_environment()
    with server.log_file.open("wb") as log:
        process = subprocess.Popen(
            [command, "-H", "127.0.0.1", "-p", str(port)],
            cwd=workdir,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers(server.endpoint_url):
            if process.poll() is not None:
                pytest.fail(
                    f"moto_server exited with {process.returncode}:\n{server.log_tail()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"moto_server did not answer within {STARTUP_TIMEOUT}s:\n{server.log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto server shared by one test module."""
    with run_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def aws_test_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy AWS credentials and region for boto3 in this test, and no AWS config files."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    environment = isolated_aws_environment()
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return environment
