"""Fixtures for the server tests: a burst worker on the test Redis and a two-layer stack."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from flask import Flask
from rq import Queue, SimpleWorker

from server import runtime
from tests.conftest import Api


@pytest.fixture
def worker(
    app: Flask, redis_client: redis.Redis, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Drain the queue in-process: fan-out jobs run against the same database and Redis."""
    monkeypatch.setenv("SCALARIUM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SCALARIUM_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("SCALARIUM_DATA_DIR", str(settings.data_dir))
    runtime.reset()

    def drain() -> int:
        queue = Queue("default", connection=redis_client)
        count = queue.count
        SimpleWorker([queue], connection=redis_client).work(burst=True)
        # The jobs re-installed hooks bound to the worker's runtime; the app's own are equivalent.
        return count

    yield drain
    runtime.database().dispose()
    runtime.redis_connection().close()
    runtime.reset()
    from server.app import _install_orchestrator_hooks

    _install_orchestrator_hooks(app)


@pytest.fixture
def cluster(admin: Api) -> dict[str, Any]:
    stack = admin.ok("POST", "/stacks", {"shortname": "shop"})
    lb = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/layers",
        {
            "shortname": "lb",
            "recipes": {
                "setup": ["haproxy"],
                "configure": ["haproxy::configure"],
                "shutdown": ["haproxy::drain"],
            },
        },
    )
    app_layer = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/layers",
        {
            "shortname": "app",
            "recipes": {
                "setup": ["app::setup"],
                "configure": ["app::configure"],
                "deploy": ["app::deploy"],
            },
        },
    )
    admin.ok(
        "POST",
        f"/stacks/{stack['id']}/apps",
        {
            "shortname": "store",
            "layer_ids": [app_layer["id"]],
            "source": {"type": "git", "url": "https://git.example/store.git", "revision": "main"},
        },
    )
    return {"stack": stack, "lb": lb, "app": app_layer}
