"""Failures that must lose nothing: a worker killed mid fan-out, Redis flushed mid deployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
from flask import Flask
from rq import Queue
from rq.registry import StartedJobRegistry
from sqlalchemy import create_engine, select, text

from server import jobs
from server.db import get_database
from server.models import Command, Instance
from tests.conftest import REDIS_URL, Api
from tests.server.nodes import bring_online, enroll


@pytest.mark.parametrize("settings", ["postgresql"], indirect=True)
def test_a_worker_killed_mid_fanout_still_gives_every_instance_one_latest_configure(
    app: Flask,
    admin: Api,
    cluster: dict[str, Any],
    worker: Any,
    settings: Any,
    redis_client: redis.Redis,
) -> None:
    nodes = [enroll(app, admin, cluster, f"web{i}", "app", 40 + i) for i in range(3)]
    for node in nodes:
        bring_online(admin, node)
    assert Queue("default", connection=redis_client).count == 1
    stack_id = cluster["stack"]["id"]
    # Hold the stack's row lock so the fan-out job blocks inside its transaction.
    blocker = create_engine(settings.database_url.replace("postgresql://", "postgresql+psycopg://"))
    holder = blocker.connect()
    transaction = holder.begin()
    holder.execute(text("SELECT id FROM stacks WHERE id = :id FOR UPDATE"), {"id": stack_id})
    env = dict(
        os.environ,
        SCALARIUM_DATABASE_URL=settings.database_url,
        SCALARIUM_REDIS_URL=REDIS_URL,
        SCALARIUM_DATA_DIR=str(settings.data_dir),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "worker"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        registry = StartedJobRegistry("default", connection=redis_client)
        deadline = time.monotonic() + 30
        while registry.count == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert registry.count == 1, "the fan-out job never started"
        time.sleep(0.5)  # the job is now waiting on the lock, mid-transaction
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        transaction.rollback()
        holder.close()
        blocker.dispose()
    with get_database(app).session() as session:
        assert session.scalars(select(Command).where(Command.type == "configure")).all() == []
    # The reconciler sees the stack behind and re-creates the fan-out; it runs once.
    assert jobs.reconcile() == [stack_id]
    worker()
    assert jobs.reconcile() == []
    latest = admin.ok("GET", f"/stacks/{stack_id}")["cluster_version"]
    with get_database(app).session() as session:
        configures = session.scalars(select(Command).where(Command.type == "configure")).all()
        online = session.scalars(select(Instance.id).where(Instance.status == "online")).all()
    assert sorted(c.instance_id for c in configures) == sorted(online)
    assert {c.cluster_version for c in configures} == {latest}


def test_redis_flushed_while_a_deployment_runs_loses_nothing(
    app: Flask,
    admin: Api,
    cluster: dict[str, Any],
    worker: Any,
    redis_client: redis.Redis,
) -> None:
    a = enroll(app, admin, cluster, "web1", "app", 50)
    b = enroll(app, admin, cluster, "web2", "app", 51)
    bring_online(admin, a)
    bring_online(admin, b)
    worker()
    for node in (a, b):
        (configure,) = node.poll()
        node.run(configure)
    deployment = admin.ok(
        "POST",
        f"/stacks/{cluster['stack']['id']}/deployments",
        {"command": "execute_recipes", "recipes": ["app::hotfix"]},
    )
    (first,) = a.poll()
    a.signed("POST", f"/agent/v1/commands/{first['id']}/start", {})
    redis_client.flushdb()  # wake-ups, queues, replay cache: all gone
    assert a.run(first).status_code == 200
    (second,) = b.poll()  # delivery reads the database, not Redis
    assert b.node_json(second["id"])["run_list"] == ["recipe[app::hotfix]"]
    assert b.run(second).status_code == 200
    shown = admin.ok("GET", f"/deployments/{deployment['id']}")
    assert shown["status"] == "successful"
    assert {c["status"] for c in shown["commands"]} == {"successful"}
    assert jobs.reconcile() == []
