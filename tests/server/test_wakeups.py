"""The per-process wake-up hub: one subscription, many waiters, no lost wake-ups."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from server.api.agent import get_wakeups, wake
from server.config import load_settings
from server.db import get_database
from server.keys import Keys
from server.models import Command
from server.processes import worker_options
from server.wakeups import WakeupHub, publish_wake
from tests.conftest import PG_ADMIN_URL, REDIS_URL, Api
from tests.server.test_agent_api import (
    Node,
    enroll_body,
    new_instance,
    rsa_key,
    user_data_token,
)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition until it holds or the time passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


@pytest.fixture
def keys() -> Keys:
    # A prefix of our own: channels are shared by every Redis database and every test run.
    return Keys(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def hub_name() -> str:
    return f"wakeups-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def hub(keys: Keys, hub_name: str) -> Iterator[WakeupHub]:
    """A hub on the test Redis whose connection carries a name we can find and kill."""
    hub = WakeupHub(lambda: redis.Redis.from_url(REDIS_URL, client_name=hub_name), keys)
    yield hub
    hub.close()


@pytest.fixture
def publisher() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def test_a_wake_up_sent_before_the_wait_is_kept_when_registration_came_first(
    hub: WakeupHub, publisher: redis.Redis, keys: Keys
) -> None:
    with hub.waiter("i-1") as waiter:
        assert hub.wait_subscribed(5)
        waiter.event.clear()  # the wake-up every waiter gets when the subscription starts
        # The poll is still "reading the database" when the command's wake-up arrives...
        publish_wake(publisher, "i-1", keys)
        assert eventually(lambda: hub.delivered == 1)
        # ...and its wait that starts afterwards returns at once.
        started = time.monotonic()
        assert waiter.wait(10) is True
        assert time.monotonic() - started < 0.5
        # The wake-up is consumed: the next wait waits.
        assert waiter.wait(0.2) is False


def test_a_wake_up_sent_before_registration_does_not_cut_a_later_poll_short(
    hub: WakeupHub, publisher: redis.Redis, keys: Keys
) -> None:
    with hub.waiter("other"):
        assert hub.wait_subscribed(5)
    publish_wake(publisher, "i-1", keys)
    time.sleep(0.2)
    with hub.waiter("i-1") as waiter:
        assert waiter.wait(0.3) is False


def test_many_waiters_for_many_instances_wake_exactly_the_named_ones(
    hub: WakeupHub, publisher: redis.Redis, keys: Keys
) -> None:
    instances = [f"i-{n}" for n in range(200)]
    with_waiters = []
    try:
        for instance_id in instances:
            for _ in range(3):
                context = hub.waiter(instance_id)
                with_waiters.append((context, context.__enter__()))
        assert hub.wait_subscribed(5) and hub.waiting() == 600
        for _, waiter in with_waiters:
            waiter.event.clear()
        woken = set(instances[::2])
        pipe = publisher.pipeline(transaction=False)
        for instance_id in woken:
            publish_wake(pipe, instance_id, keys)
        pipe.execute()
        assert eventually(lambda: hub.delivered == 300)
        for _, waiter in with_waiters:
            assert waiter.event.is_set() == (waiter.instance_id in woken), waiter.instance_id
    finally:
        for context, _ in with_waiters:
            context.__exit__(None, None, None)
    assert hub.waiting() == 0


def kill_connection(client: redis.Redis, name: str) -> None:
    ids = [c["id"] for c in client.client_list() if c.get("name") == name]
    assert len(ids) == 1, ids
    client.client_kill_filter(_id=ids[0])


def test_the_hub_subscribes_again_after_client_kill_and_wakes_every_waiter(
    hub: WakeupHub, publisher: redis.Redis, keys: Keys, hub_name: str
) -> None:
    with hub.waiter("i-1") as first, hub.waiter("i-2") as second:
        assert hub.wait_subscribed(5)
        assert eventually(lambda: hub.subscriptions == 1)
        first.event.clear()
        second.event.clear()
        kill_connection(publisher, hub_name)
        # Wake-ups published while it was down may be lost: everyone re-reads the database.
        assert eventually(lambda: hub.subscriptions == 2, timeout=10)
        assert first.event.is_set() and second.event.is_set()
        first.event.clear()
        second.event.clear()
        publish_wake(publisher, "i-2", keys)
        assert eventually(lambda: second.event.is_set())
        assert not first.event.is_set()


def test_an_idle_hub_lets_its_subscription_go_and_takes_it_back_for_the_next_poll(
    keys: Keys, hub_name: str, publisher: redis.Redis
) -> None:
    hub = WakeupHub(
        lambda: redis.Redis.from_url(REDIS_URL, client_name=hub_name), keys, idle_seconds=0.2
    )
    try:
        with hub.waiter("i-1"):
            assert hub.wait_subscribed(5)
        assert eventually(lambda: not hub.wait_subscribed(0), timeout=5)
        names = [c.get("name") for c in publisher.client_list()]
        assert hub_name not in names
        with hub.waiter("i-1") as waiter:
            assert hub.wait_subscribed(5)
            waiter.event.clear()
            publish_wake(publisher, "i-1", keys)
            assert waiter.wait(5)
        assert hub.subscriptions == 2
    finally:
        hub.close()


# --- through the endpoint ---------------------------------------------------------------------


@pytest.fixture
def polling_node(app: Flask, admin: Api) -> Node:
    stack: dict[str, Any] = admin.ok("POST", "/stacks", {"shortname": "poll"})
    stack["layer_id"] = admin.ok("POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})[
        "id"
    ]
    instance_id = new_instance(admin, stack, "web1")
    client = app.test_client()
    token = user_data_token(admin, instance_id)
    response = client.post("/agent/v1/enroll", json=enroll_body(token, instance_id, rsa_key(1)))
    assert response.status_code == 201, response.get_json()
    return Node(client, instance_id, rsa_key(1))


def queue_command(app: Flask, instance_id: str) -> str:
    with get_database(app).session() as session:
        command = Command(instance_id=instance_id, type="configure", timeout_seconds=900)
        session.add(command)
        session.flush()
        return command.id


def test_a_woken_poll_returns_the_command_committed_while_it_waited(
    app: Flask, polling_node: Node
) -> None:
    hub = get_wakeups(app)
    answers: list[Any] = []
    poll = threading.Thread(
        target=lambda: answers.append(polling_node.signed("GET", "/agent/v1/commands?wait=20"))
    )
    started = time.monotonic()
    poll.start()
    try:
        assert eventually(lambda: hub.waiting() == 1 and hub.wait_subscribed(0))
        time.sleep(0.1)  # past the resync wake-up of the first subscription
        command_id = queue_command(app, polling_node.instance_id)
        wake(
            app.extensions["scalarium.redis"],
            polling_node.instance_id,
            app.extensions["scalarium.keys"],
        )
    finally:
        poll.join(25)
    took = time.monotonic() - started
    assert answers and answers[0].status_code == 200
    assert [c["id"] for c in answers[0].get_json()["commands"]] == [command_id]
    assert took < 5
    assert hub.waiting() == 0
    hub.close()


def test_a_wake_up_that_finds_nothing_does_not_end_the_poll_early(
    app: Flask, polling_node: Node
) -> None:
    hub = get_wakeups(app)
    answers: list[Any] = []
    poll = threading.Thread(
        target=lambda: answers.append(polling_node.signed("GET", "/agent/v1/commands?wait=2"))
    )
    started = time.monotonic()
    poll.start()
    assert eventually(lambda: hub.waiting() == 1)
    hub.wake_everyone()
    poll.join(10)
    assert answers[0].get_json() == {"commands": []}
    assert time.monotonic() - started >= 1.9
    hub.close()


# --- the gevent server ------------------------------------------------------------------------

GEVENT_QUERIES = """
import sys, time
from server.db import make_engine
from sqlalchemy import text
engine = make_engine(sys.argv[1])          # psycopg imported before the patch, as in gunicorn
with engine.connect() as c:
    c.execute(text("SELECT 1"))
from gevent import monkey
monkey.patch_all()
import gevent
from server.processes import cooperative_psycopg
if sys.argv[2] == "fix":
    assert cooperative_psycopg()
def sleep():
    with engine.connect() as c:
        c.execute(text("SELECT pg_sleep(0.5)"))
started = time.monotonic()
gevent.joinall([gevent.spawn(sleep) for _ in range(4)])
print(round(time.monotonic() - started, 2))
"""


@pytest.mark.parametrize(("mode", "concurrent"), [("fix", True), ("as-imported", False)])
def test_psycopg_queries_run_concurrently_under_gevent_once_made_cooperative(
    mode: str, concurrent: bool
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", GEVENT_QUERIES, PG_ADMIN_URL, mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    took = float(done.stdout.split()[-1])
    # Four 0.5 s queries: about 0.5 s when they overlap, 2 s when each blocks the event loop.
    assert (took < 1.2) == concurrent, took


@pytest.mark.parametrize(
    ("worker_class", "expected"),
    [
        ("gevent", {"worker_class": "gevent", "worker_connections": 10000}),
        ("gthread", {"worker_class": "gthread", "threads": 8}),
    ],
)
def test_the_server_runs_the_configured_worker_class(
    worker_class: str, expected: dict[str, Any]
) -> None:
    settings = load_settings({"SCALARIUM_WEB_WORKER_CLASS": worker_class})
    assert worker_options(settings) == expected


def test_an_unknown_worker_class_is_refused() -> None:
    with pytest.raises(ValueError, match="SCALARIUM_WEB_WORKER_CLASS"):
        load_settings({"SCALARIUM_WEB_WORKER_CLASS": "eventlet"})
