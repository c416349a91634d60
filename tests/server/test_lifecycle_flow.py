"""The lifecycle through the real app: enrollment, setup, configure fan-out, stop, timeouts.

Nodes are simulated with real keys, CSRs and request signatures; fan-out jobs run in an RQ
worker in burst mode on the test Redis. Nothing of ours is replaced.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from flask import Flask
from sqlalchemy import select, update

from server import jobs
from server.db import get_database
from server.models import Command, Instance
from tests.conftest import Api
from tests.server.nodes import bring_online, enroll, members, run_configures, status


def test_setup_then_configure_on_every_online_instance_as_the_cluster_grows_and_shrinks(
    app: Flask, admin: Api, cluster: dict[str, Any], worker: Any
) -> None:
    lb = enroll(app, admin, cluster, "lb1", "lb", 1)
    web1 = enroll(app, admin, cluster, "web1", "app", 2)
    web2 = enroll(app, admin, cluster, "web2", "app", 3)

    setup_doc = bring_online(admin, web1)
    # Setup runs the layer's setup recipes, then a deploy of the layer's apps.
    assert setup_doc["run_list"] == [
        "recipe[scalarium_base]",
        "recipe[app::setup]",
        "recipe[app::deploy]",
    ]
    assert "store" in setup_doc["deploy"]
    bring_online(admin, lb)
    bring_online(admin, web2)
    assert worker() >= 1
    docs = run_configures([lb, web1, web2])
    assert set(docs) == {lb.instance_id, web1.instance_id, web2.instance_id}
    for document in docs.values():
        assert members(document) == {"app": ["web1", "web2"], "lb": ["lb1"]}
        assert document["scalarium"]["activity"] == "configure"
    assert docs[lb.instance_id]["run_list"] == ["recipe[haproxy::configure]"]

    # A fourth instance joins: once online, all four configure and see it.
    web3 = enroll(app, admin, cluster, "web3", "app", 4)
    bring_online(admin, web3)
    worker()
    docs = run_configures([lb, web1, web2, web3])
    assert set(docs) == {n.instance_id for n in (lb, web1, web2, web3)}
    assert all(members(d)["app"] == ["web1", "web2", "web3"] for d in docs.values())

    # Stopping one: its shutdown recipes run first, then the others configure without it.
    admin.ok("POST", f"/instances/{web2.instance_id}/stop", status=200)
    assert status(admin, web2) == "stopping"
    (shutdown,) = web2.poll()
    assert shutdown["type"] == "shutdown"
    assert web2.node_json(shutdown["id"])["run_list"] == []
    assert web2.run(shutdown).status_code == 200
    assert status(admin, web2) == "stopped"  # a manual machine is left alone
    worker()
    docs = run_configures([lb, web1, web3])
    assert all(members(d)["app"] == ["web1", "web3"] for d in docs.values())
    assert web2.poll() == []

    events = admin.ok("GET", f"/stacks/{cluster['stack']['id']}/events?limit=500")["items"]
    kinds = [e["kind"] for e in reversed(events)]
    assert kinds.count("stack.configure") == 3


def test_a_burst_of_changes_is_coalesced_into_one_configure_per_instance(
    app: Flask, admin: Api, cluster: dict[str, Any], worker: Any
) -> None:
    nodes = [enroll(app, admin, cluster, f"web{i}", "app", 10 + i) for i in range(4)]
    for node in nodes:
        bring_online(admin, node)
    # Four joins, one pending fan-out: each instance gets exactly one configure, the latest.
    assert worker() == 1
    with get_database(app).session() as session:
        configures = session.scalars(select(Command).where(Command.type == "configure")).all()
    assert len(configures) == 4
    stack = admin.ok("GET", f"/stacks/{cluster['stack']['id']}")
    assert {c.cluster_version for c in configures} == {stack["cluster_version"]}


def test_a_newer_change_supersedes_the_waiting_configure(
    app: Flask, admin: Api, cluster: dict[str, Any], worker: Any
) -> None:
    web1 = enroll(app, admin, cluster, "web1", "app", 20)
    web2 = enroll(app, admin, cluster, "web2", "app", 21)
    bring_online(admin, web1)
    worker()
    bring_online(admin, web2)
    worker()
    # web1 never polled: its first configure was superseded by the second, never dropped.
    with get_database(app).session() as session:
        rows = session.scalars(
            select(Command)
            .where(Command.instance_id == web1.instance_id, Command.type == "configure")
            .order_by(Command.cluster_version)
        ).all()
    assert [r.status for r in rows] == ["superseded", "queued"]
    assert rows[0].reason and "superseded by cluster version" in rows[0].reason
    (command,) = web1.poll()
    assert command["id"] == rows[1].id


def test_command_reports_are_idempotent_and_contradictions_refused(
    app: Flask, admin: Api, cluster: dict[str, Any]
) -> None:
    node = enroll(app, admin, cluster, "web1", "app", 30)
    node.heartbeat()
    (setup,) = node.poll()
    cid = setup["id"]
    assert node.signed("POST", f"/agent/v1/commands/{cid}/start", {}).status_code == 200
    assert node.signed("POST", f"/agent/v1/commands/{cid}/start", {}).status_code == 200
    first = node.signed("POST", f"/agent/v1/commands/{cid}/log", {"offset": 0, "data": "abc"})
    assert first.get_json() == {"offset": 3}
    again = node.signed("POST", f"/agent/v1/commands/{cid}/log", {"offset": 0, "data": "abcdé"})
    assert again.get_json() == {"offset": 6}
    gap = node.signed("POST", f"/agent/v1/commands/{cid}/log", {"offset": 99, "data": "x"})
    assert gap.status_code == 409 and gap.get_json()["error"]["code"] == "log_offset_gap"
    finish = {"status": "failed", "exit_code": 1, "duration": 2.0, "reason": None}
    assert node.signed("POST", f"/agent/v1/commands/{cid}/finish", finish).status_code == 200
    assert node.signed("POST", f"/agent/v1/commands/{cid}/finish", finish).status_code == 200
    contradiction = node.signed(
        "POST", f"/agent/v1/commands/{cid}/finish", dict(finish, status="successful", exit_code=0)
    )
    assert contradiction.status_code == 409
    assert contradiction.get_json()["error"]["code"] == "conflicting_result"
    late_start = node.signed("POST", f"/agent/v1/commands/{cid}/start", {})
    assert late_start.get_json()["error"]["code"] == "command_finished"
    log = admin.ok("GET", f"/commands/{cid}/log")
    assert log["log"] == "abcdé" and log["status"] == "failed"
    assert status(admin, node) == "setup_failed"
    deployment = admin.ok("GET", f"/deployments/{setup['deployment_id']}")
    assert deployment["status"] == "failed"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"status": "great"}, "invalid_status"),
        ({"status": "failed", "exit_code": "1"}, "invalid_exit_code"),
        ({"status": "failed", "duration": -1}, "invalid_duration"),
        ({"status": "failed", "reason": 5}, "invalid_reason"),
    ],
)
def test_bad_finish_reports_are_refused(
    app: Flask, admin: Api, cluster: dict[str, Any], body: dict[str, Any], code: str
) -> None:
    node = enroll(app, admin, cluster, "web1", "app", 31)
    node.heartbeat()
    (setup,) = node.poll()
    response = node.signed("POST", f"/agent/v1/commands/{setup['id']}/finish", body)
    assert response.status_code == 400 and response.get_json()["error"]["code"] == code
    assert admin.ok("GET", f"/commands/{setup['id']}")["status"] == "queued"


def test_another_instances_command_is_not_found(
    app: Flask, admin: Api, cluster: dict[str, Any]
) -> None:
    a = enroll(app, admin, cluster, "web1", "app", 32)
    b = enroll(app, admin, cluster, "web2", "app", 33)
    a.heartbeat()
    (setup,) = a.poll()
    for path in (f"/agent/v1/commands/{setup['id']}/node.json",):
        assert b.signed("GET", path).status_code == 404
    response = b.signed("POST", f"/agent/v1/commands/{setup['id']}/start", {})
    assert response.status_code == 404


def test_overdue_commands_time_out_and_fail_the_setup(
    app: Flask, admin: Api, cluster: dict[str, Any], worker: Any
) -> None:
    node = enroll(app, admin, cluster, "web1", "app", 34)
    node.heartbeat()
    (setup,) = node.poll()
    with get_database(app).session() as session:
        session.execute(
            update(Command)
            .where(Command.id == setup["id"])
            .values(created_at=datetime.now(UTC) - timedelta(hours=2))
        )
    assert jobs.check_commands() == 1
    assert admin.ok("GET", f"/commands/{setup['id']}")["status"] == "timed_out"
    assert status(admin, node) == "setup_failed"
    # A late result from the agent loses the race quietly.
    late = node.signed(
        "POST",
        f"/agent/v1/commands/{setup['id']}/finish",
        {"status": "successful", "exit_code": 0, "duration": 1},
    )
    assert late.status_code == 200
    assert admin.ok("GET", f"/commands/{setup['id']}")["status"] == "timed_out"


def test_a_silent_instance_loses_its_connection_and_the_rest_reconfigure(
    app: Flask, admin: Api, cluster: dict[str, Any], worker: Any
) -> None:
    a = enroll(app, admin, cluster, "web1", "app", 35)
    b = enroll(app, admin, cluster, "web2", "app", 36)
    bring_online(admin, a)
    bring_online(admin, b)
    worker()
    run_configures([a, b])
    with get_database(app).session() as session:
        session.execute(
            update(Instance)
            .where(Instance.id == b.instance_id)
            .values(last_heartbeat_at=datetime.now(UTC) - timedelta(hours=1))
        )
    assert jobs.check_heartbeats() == 1
    assert status(admin, b) == "connection_lost"
    worker()
    docs = run_configures([a])
    assert members(docs[a.instance_id])["app"] == ["web1"]
    # It comes back: online again, and everyone configures with it.
    assert b.heartbeat().status_code == 200
    assert status(admin, b) == "online"
    worker()
    docs = run_configures([a, b])
    assert all(members(d)["app"] == ["web1", "web2"] for d in docs.values())


def test_the_reconciler_repairs_a_lost_fanout(
    app: Flask, admin: Api, cluster: dict[str, Any], worker: Any, redis_client: redis.Redis
) -> None:
    node = enroll(app, admin, cluster, "web1", "app", 37)
    bring_online(admin, node)
    redis_client.flushdb()  # the queued fan-out job and its pending marker are gone
    assert worker() == 0
    assert node.poll() == []
    assert jobs.reconcile() == [cluster["stack"]["id"]]
    assert worker() == 1
    (command,) = node.poll()
    assert command["type"] == "configure"
    assert jobs.reconcile() == []


def test_heartbeats_reach_the_database_at_most_every_fifteen_seconds(
    app: Flask, admin: Api, cluster: dict[str, Any]
) -> None:
    node = enroll(app, admin, cluster, "web1", "app", 38)
    bring_online(admin, node)
    with get_database(app).session() as session:
        first = session.get(Instance, node.instance_id)
        assert first is not None
        seen = first.last_heartbeat_at
    for _ in range(3):
        assert node.heartbeat().status_code == 200
    with get_database(app).session() as session:
        row = session.get(Instance, node.instance_id)
        assert row is not None and row.last_heartbeat_at == seen
    app.extensions["scalarium.redis"].delete(
        app.extensions["scalarium.keys"].heartbeat_persisted(node.instance_id)
    )
    assert node.heartbeat().status_code == 200
    with get_database(app).session() as session:
        row = session.get(Instance, node.instance_id)
        assert row is not None and seen is not None and row.last_heartbeat_at > seen


def test_search_nodes_list_every_online_instance_once_and_this_one_by_its_node_name(
    app: Flask, admin: Api, cluster: dict[str, Any], worker: Any
) -> None:
    lb = enroll(app, admin, cluster, "lb1", "lb", 60)
    web = enroll(app, admin, cluster, "web1", "app", 61)
    late = enroll(app, admin, cluster, "web2", "app", 62)  # enrolled, never online
    bring_online(admin, lb)
    bring_online(admin, web)
    late.heartbeat()
    worker()
    (configure,) = web.poll()
    response = web.signed("GET", configure["search_nodes_url"])
    assert response.status_code == 200
    nodes = response.get_json()["nodes"]
    assert sorted(nodes) == sorted(["lb1", web.instance_id])
    assert nodes["lb1"]["run_list"] == ["role[lb]"]
    assert nodes["lb1"]["automatic"]["ipaddress"] == "10.0.0.60"
    assert nodes[web.instance_id]["name"] == web.instance_id
    assert nodes[web.instance_id]["automatic"]["roles"] == ["app"]
    # Another instance's command is not this node's to read.
    assert lb.signed("GET", configure["search_nodes_url"]).status_code == 404


def test_a_layer_or_app_change_reconfigures_the_online_instances_with_the_new_picture(
    app: Flask, admin: Api, cluster: dict[str, Any], worker: Any
) -> None:
    web = enroll(app, admin, cluster, "web1", "app", 63)
    bring_online(admin, web)
    worker()
    run_configures([web])
    store = admin.ok("GET", f"/stacks/{cluster['stack']['id']}/apps")["items"][0]
    admin.ok(
        "PATCH", f"/apps/{store['id']}", {"environment": {"MODE": {"value": "blue"}}}, status=200
    )
    assert worker() == 1
    docs = run_configures([web])
    assert docs[web.instance_id]["deploy"]["store"]["environment_variables"] == {"MODE": "blue"}
    admin.ok(
        "PATCH",
        f"/layers/{cluster['app']['id']}",
        {"custom_json": {"tuning": {"workers": 4}}},
        status=200,
    )
    worker()
    docs = run_configures([web])
    assert docs[web.instance_id]["tuning"] == {"workers": 4}


def test_heartbeats_do_not_invalidate_the_cached_cluster_picture(
    app: Flask, admin: Api, cluster: dict[str, Any]
) -> None:
    from server.cluster import cluster_fingerprint

    web = enroll(app, admin, cluster, "web1", "app", 64)
    bring_online(admin, web)
    with get_database(app).session() as session:
        before = cluster_fingerprint(session, cluster["stack"]["id"])
    app.extensions["scalarium.redis"].delete(
        app.extensions["scalarium.keys"].heartbeat_persisted(web.instance_id)
    )
    assert web.heartbeat().status_code == 200  # persisted to the database this time
    with get_database(app).session() as session:
        assert cluster_fingerprint(session, cluster["stack"]["id"]) == before
        admin.ok("PATCH", f"/instances/{web.instance_id}", {"attributes": {"x": 1}}, status=200)
    with get_database(app).session() as session:
        assert cluster_fingerprint(session, cluster["stack"]["id"]) != before


def test_editing_an_instance_reconfigures_the_cluster_only_when_it_is_online(
    app: Flask, admin: Api, cluster: dict[str, Any]
) -> None:
    web = enroll(app, admin, cluster, "web1", "app", 65)
    spare = admin.ok(
        "POST",
        f"/stacks/{cluster['stack']['id']}/instances",
        {"hostname": "spare", "layer_ids": [cluster["app"]["id"]]},
    )

    def version() -> int:
        return int(admin.ok("GET", f"/stacks/{cluster['stack']['id']}")["cluster_version"])

    before = version()
    admin.ok("PATCH", f"/instances/{spare['id']}", {"attributes": {"a": 1}}, status=200)
    assert version() == before
    bring_online(admin, web)
    online = version()
    admin.ok("PATCH", f"/instances/{web.instance_id}", {"attributes": {"a": 1}}, status=200)
    assert version() == online + 1
