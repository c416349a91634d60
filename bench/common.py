"""Helpers the benchmarks share (the bench scripts' own folder is on sys.path)."""

from __future__ import annotations

import socket
from typing import Any

from server.client import Client


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def api(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    """One REST call as the admin, through the project's own API client."""
    return Client(base, token, timeout=60).request(method, path, body)
