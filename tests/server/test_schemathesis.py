"""Schemathesis fuzzes every operation of /api/v1/openapi.json against a live server: no 5xx."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import REDIS_URL
from tests.server.live import live_server

# Bounded: a few hundred requests in all, a fixed seed so a failure reproduces.
MAX_EXAMPLES = 12
SEED = 20261125


def test_fuzzing_the_openapi_document_finds_no_server_error(tmp_path: Path) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    try:
        with live_server(tmp_path, REDIS_URL) as server:
            env = dict(os.environ, SCHEMATHESIS_HOOKS="", NO_COLOR="1")
            result = subprocess.run(
                [
                    str(Path(sys.executable).with_name("schemathesis")),
                    "run",
                    f"{server.url}/api/v1/openapi.json",
                    "--checks",
                    "not_a_server_error",
                    "--max-examples",
                    str(MAX_EXAMPLES),
                    "--seed",
                    str(SEED),
                    "--workers",
                    "1",
                    "--request-timeout",
                    "20",
                    "-H",
                    f"Authorization: Bearer {server.token}",
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=900,
                check=False,
            )
            server_log = (tmp_path / "server.log").read_text(errors="replace")
    finally:
        client.flushdb()
        client.close()
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert result.returncode == 0, output[-6000:] + "\n--- server log ---\n" + server_log[-4000:]
    assert "Traceback" not in server_log, server_log[-4000:]
