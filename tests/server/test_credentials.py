"""Agent credentials kept per process: used only while changes are heard, never stale after one."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from sqlalchemy import select

from server.api.agent import get_wakeups
from server.credentials import CredentialsCache, forget_in_process
from server.db import get_database
from server.keys import Keys
from server.models import Instance, InstanceState
from server.wakeups import WakeupHub
from tests.conftest import REDIS_URL, Api
from tests.server.test_agent_api import (
    Node,
    assert_refused,
    enroll_body,
    expire_certificates,
    new_instance,
    revoke,
    rsa_key,
    set_instance,
    user_data_token,
)
from tests.server.test_wakeups import eventually

# --- the cache on its own ---------------------------------------------------------------------


class Reads:
    """A stand-in database read that counts how often it ran."""

    def __init__(self, value: Any = "row") -> None:
        self.value = value
        self.count = 0

    def __call__(self) -> Any:
        self.count += 1
        return self.value


def test_kept_while_live_and_read_again_after_a_notice() -> None:
    cache: CredentialsCache[str] = CredentialsCache()
    read = Reads()
    assert cache.load("i-1", read) == "row" and cache.load("i-1", read) == "row"
    assert read.count == 1 and cache.hits == 1
    cache.forget(["i-1"])
    cache.load("i-1", read)
    assert read.count == 2


def test_nothing_is_kept_while_changes_cannot_be_heard() -> None:
    live = [False]
    cache: CredentialsCache[str] = CredentialsCache(lambda: live[0])
    read = Reads()
    cache.load("i-1", read)
    cache.load("i-1", read)
    assert read.count == 2 and len(cache) == 0
    live[0] = True
    cache.load("i-1", read)
    live[0] = False  # the subscription dropped: what is kept may be stale
    cache.load("i-1", read)
    assert read.count == 4


def test_unknown_instances_are_never_kept() -> None:
    cache: CredentialsCache[str] = CredentialsCache()
    read = Reads(None)
    assert cache.load("i-x", read) is None and cache.load("i-x", read) is None
    assert read.count == 2


def test_a_read_that_overlapped_a_notice_is_not_kept() -> None:
    cache: CredentialsCache[str] = CredentialsCache()

    def read_while_it_changes() -> str:
        cache.forget(["i-1"])  # the notice arrives while the old row is being read
        return "old row"

    assert cache.load("i-1", read_while_it_changes) == "old row"
    read = Reads("new row")
    assert cache.load("i-1", read) == "new row" and read.count == 1


def test_entries_are_read_again_after_max_age() -> None:
    cache: CredentialsCache[str] = CredentialsCache(max_age=0.0)
    read = Reads()
    cache.load("i-1", read)
    cache.load("i-1", read)
    assert read.count == 2


def test_a_notice_reaches_every_cache_of_the_process() -> None:
    caches = [CredentialsCache[str]() for _ in range(3)]
    for cache in caches:
        cache.load("i-1", Reads())
    forget_in_process(["i-1"])
    assert [len(cache) for cache in caches] == [0, 0, 0]


def test_the_size_is_bounded() -> None:
    cache: CredentialsCache[str] = CredentialsCache(limit=10)
    for n in range(25):
        cache.load(f"i-{n}", Reads())
    assert len(cache) <= 10


# --- notices through Redis --------------------------------------------------------------------


@pytest.fixture
def hub_and_cache() -> Iterator[tuple[WakeupHub, CredentialsCache[str], Keys]]:
    keys = Keys(f"test-{uuid.uuid4().hex[:12]}")
    name = f"credentials-{uuid.uuid4().hex[:12]}"
    hub = WakeupHub(lambda: redis.Redis.from_url(REDIS_URL, client_name=name), keys)
    cache: CredentialsCache[str] = CredentialsCache(hub.keep)
    hub.listen(keys.credentials_channel(), lambda data: cache.forget(data.split(",")), cache.clear)
    hub.client_name = name  # type: ignore[attr-defined]  # for the test that kills it
    yield hub, cache, keys
    hub.close()


def test_a_notice_from_another_process_drops_the_entries_it_names(
    hub_and_cache: tuple[WakeupHub, CredentialsCache[str], Keys],
) -> None:
    hub, cache, keys = hub_and_cache
    assert not hub.keep()  # the first use starts the subscription; nothing kept before
    assert hub.wait_subscribed(5)
    for name in ("i-1", "i-2", "i-3"):
        cache.load(name, Reads())
    assert len(cache) == 3
    with redis.Redis.from_url(REDIS_URL) as other_process:
        other_process.publish(keys.credentials_channel(), "i-1,i-3")
    assert eventually(lambda: len(cache) == 1)
    read = Reads()
    cache.load("i-2", read)
    assert read.count == 0


def test_a_new_subscription_forgets_everything(
    hub_and_cache: tuple[WakeupHub, CredentialsCache[str], Keys],
) -> None:
    hub, cache, _keys = hub_and_cache
    hub.keep()
    assert hub.wait_subscribed(5)
    cache.load("i-1", Reads())
    assert len(cache) == 1
    subscriptions = hub.subscriptions
    with redis.Redis.from_url(REDIS_URL) as admin:
        for client in admin.client_list():
            if client.get("name") == hub.client_name:  # type: ignore[attr-defined]
                admin.client_kill_filter(_id=client["id"])
    assert eventually(lambda: hub.subscriptions > subscriptions, timeout=10)
    assert len(cache) == 0


def test_the_subscription_is_kept_while_the_cache_is_used() -> None:
    keys = Keys(f"test-{uuid.uuid4().hex[:12]}")
    hub = WakeupHub(lambda: redis.Redis.from_url(REDIS_URL), keys, idle_seconds=0.3)
    cache: CredentialsCache[str] = CredentialsCache(hub.keep)
    hub.listen(keys.credentials_channel(), lambda data: cache.forget(data.split(",")), cache.clear)
    try:
        hub.keep()
        assert hub.wait_subscribed(5)
        stop = threading.Event()

        def use() -> None:
            while not stop.is_set():
                cache.load("i-1", Reads())
                stop.wait(0.05)

        user = threading.Thread(target=use)
        user.start()
        try:
            assert not eventually(lambda: not hub.wait_subscribed(0), timeout=1.0)
        finally:
            stop.set()
            user.join()
        # Unused, it lets go; and forgets what it kept.
        assert eventually(lambda: not hub.wait_subscribed(0), timeout=5)
        assert len(cache) == 0
    finally:
        hub.close()


# --- through the app: every change that matters is heard ------------------------------------


@pytest.fixture
def node(app: Flask, admin: Api) -> Node:
    """An enrolled node."""
    stack = admin.ok("POST", "/stacks", {"shortname": "prod"})
    layer = admin.ok("POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})
    instance_id = new_instance(admin, stack | {"layer_id": layer["id"]}, "web1")
    token = user_data_token(admin, instance_id)
    client = app.test_client()
    response = client.post("/agent/v1/enroll", json=enroll_body(token, instance_id, rsa_key(1)))
    assert response.status_code == 201, response.get_json()
    return Node(client, instance_id, rsa_key(1))


def credentials(app: Flask) -> CredentialsCache[Any]:
    cache: CredentialsCache[Any] = app.extensions["scalarium.credentials"]
    return cache


def heartbeat_from_the_cache(app: Flask, node: Node) -> None:
    """Heartbeat until the instance's credentials are kept, then once more from them."""
    # Distinct bodies: the same body signed within one second would be a replay.
    assert node.heartbeat({"seq": 1}).status_code == 200
    assert get_wakeups(app).wait_subscribed(5)
    assert node.heartbeat({"seq": 2}).status_code == 200
    hits = credentials(app).hits
    assert node.heartbeat({"seq": 3}).status_code == 200
    assert credentials(app).hits == hits + 1


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ("revoke", 403, "certificate_revoked"),
        ("terminate", 403, "instance_terminated"),
        ("expire", 401, "certificate_expired"),
        ("delete", 401, "unknown_instance"),
    ],
)
def test_a_change_is_refused_at_once_though_credentials_were_kept(
    app: Flask, node: Node, change: str, status: int, code: str
) -> None:
    heartbeat_from_the_cache(app, node)
    if change == "revoke":
        revoke(app, node.instance_id)  # a bulk UPDATE: announced by hand
    elif change == "terminate":
        set_instance(app, node.instance_id, status=InstanceState.TERMINATED.value)
    elif change == "expire":
        expire_certificates(app, node.instance_id)
    else:
        with get_database(app).session() as session:
            session.delete(session.get(Instance, node.instance_id))
    known = node.instance_id if change != "delete" else None
    assert_refused(app, node.heartbeat, status, code, known)


def test_a_rolled_back_change_keeps_the_credentials(app: Flask, node: Node) -> None:
    heartbeat_from_the_cache(app, node)
    kept = len(credentials(app))
    session = get_database(app).sessionmaker()
    row = session.get(Instance, node.instance_id)
    assert row is not None
    row.status = InstanceState.TERMINATED.value
    session.flush()
    session.rollback()
    session.close()
    assert len(credentials(app)) == kept


def test_a_change_is_published_to_the_other_processes(app: Flask, admin: Api, node: Node) -> None:
    keys: Keys = app.extensions["scalarium.keys"]
    with redis.Redis.from_url(REDIS_URL) as listener:
        pubsub = listener.pubsub()
        pubsub.subscribe(keys.credentials_channel())
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
        set_instance(app, node.instance_id, status=InstanceState.TERMINATED.value)
        heard: list[str] = []
        for _ in range(50):
            message = pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                heard.extend(message["data"].decode().split(","))
                if node.instance_id in heard:
                    break
        pubsub.close()
    assert node.instance_id in heard
    with get_database(app).session() as session:
        assert session.scalar(select(Instance.status).where(Instance.id == node.instance_id)) == (
            InstanceState.TERMINATED.value
        )
