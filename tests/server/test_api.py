"""The REST API: resources, validation, auth and roles, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from server.db import get_database
from server.models import Event, Instance, InstanceState, Role
from tests.conftest import Api


def counts(app: Flask) -> dict[str, int]:
    """Rows per table, to prove that a refused request changed nothing."""
    from server.db import Base

    with get_database(app).session() as session:
        return {
            t.name: session.scalar(select(func.count()).select_from(t)) or 0
            for t in Base.metadata.sorted_tables
            if t.name not in ("api_tokens",)
        }


def set_status(app: Flask, instance_id: str, status: InstanceState) -> None:
    """Put an instance in a state directly (the lifecycle is not under test here)."""
    with get_database(app).session() as session:
        instance = session.get(Instance, instance_id)
        assert instance is not None
        instance.status = status.value


@pytest.fixture
def stack(admin: Api) -> dict[str, Any]:
    return admin.ok("POST", "/stacks", {"shortname": "prod", "name": "Production"})  # type: ignore[no-any-return]


@pytest.fixture
def layers(admin: Api, stack: dict[str, Any]) -> dict[str, dict[str, Any]]:
    lb = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/layers",
        {"shortname": "lb", "recipes": {"configure": ["haproxy::configure"]}},
    )
    app_layer = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/layers",
        {"shortname": "app", "recipes": {"deploy": ["deploy::default"]}},
    )
    return {"lb": lb, "app": app_layer}


def test_stack_crud_round_trip(admin: Api) -> None:
    created = admin.ok("POST", "/stacks", {"shortname": "staging", "custom_json": {"a": {"b": 1}}})
    assert created["name"] == "staging"
    assert created["region"] == "us-east-1"
    assert created["custom_json"] == {"a": {"b": 1}}
    shown = admin.ok("GET", f"/stacks/{created['id']}")
    assert shown == created
    updated = admin.ok("PATCH", f"/stacks/{created['id']}", {"region": "eu-west-1"})
    assert updated["region"] == "eu-west-1"
    assert updated["custom_json"] == {"a": {"b": 1}}
    listing = admin.ok("GET", "/stacks")
    assert [s["shortname"] for s in listing["items"]] == ["staging"]
    assert listing["total"] == 1
    admin.ok("DELETE", f"/stacks/{created['id']}")
    admin.error("GET", f"/stacks/{created['id']}", None, 404, "stack_not_found")


def test_layers_instances_and_apps_belong_to_their_stack(
    admin: Api, stack: dict[str, Any], layers: dict[str, dict[str, Any]]
) -> None:
    sid = stack["id"]
    instance = admin.ok(
        "POST",
        f"/stacks/{sid}/instances",
        {"hostname": "web1", "layer_ids": [layers["app"]["id"], layers["lb"]["id"]]},
    )
    assert instance["status"] == "requested"
    assert instance["layer_ids"] == [layers["app"]["id"], layers["lb"]["id"]]
    assert instance["instance_type"] == "t3.small"  # the stack default
    app = admin.ok(
        "POST",
        f"/stacks/{sid}/apps",
        {
            "shortname": "shop",
            "source": {
                "type": "git",
                "url": "https://git.example/shop.git",
                "revision": "main",
                "ssh_key": "-----BEGIN KEY-----secret",
            },
            "environment": {
                "DB_PASSWORD": {"value": "hunter2", "secure": True},
                "RAILS_ENV": {"value": "production"},
            },
            "layer_ids": [layers["app"]["id"]],
        },
    )
    assert app["environment"]["DB_PASSWORD"] == {"value": "*****", "secure": True}
    assert app["environment"]["RAILS_ENV"] == {"value": "production", "secure": False}
    assert app["source"]["ssh_key"] == "*****"
    listed = admin.ok("GET", f"/stacks/{sid}/instances")["items"]
    assert [i["hostname"] for i in listed] == ["web1"]
    patched = admin.ok("PATCH", f"/instances/{instance['id']}", {"layer_ids": [layers["lb"]["id"]]})
    assert patched["layer_ids"] == [layers["lb"]["id"]]
    admin.ok("DELETE", f"/instances/{instance['id']}")
    admin.ok("DELETE", f"/layers/{layers['app']['id']}")
    assert admin.ok("GET", f"/apps/{app['id']}")["layer_ids"] == []


def test_secrets_are_encrypted_at_rest_and_masked_updates_keep_them(
    app: Flask, admin: Api, stack: dict[str, Any]
) -> None:
    created = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/apps",
        {
            "shortname": "api",
            "environment": {"TOKEN": {"value": "s3cret-value", "secure": True}},
        },
    )
    from server.models import App

    with get_database(app).session() as session:
        row = session.get(App, created["id"])
        assert row is not None
        stored = row.environment["TOKEN"]["value"]
    assert "s3cret-value" not in stored
    assert app.extensions["scalarium.vault"].decrypt(stored) == "s3cret-value"
    # Sending back the masked value keeps the secret; a new value replaces it.
    admin.ok(
        "PATCH",
        f"/apps/{created['id']}",
        {"environment": {"TOKEN": {"value": "*****", "secure": True}}},
    )
    with get_database(app).session() as session:
        row = session.get(App, created["id"])
        assert row is not None
        assert app.extensions["scalarium.vault"].decrypt(row.environment["TOKEN"]["value"]) == (
            "s3cret-value"
        )


def test_clone_copies_settings_layers_and_apps_but_not_instances(
    admin: Api, stack: dict[str, Any], layers: dict[str, dict[str, Any]]
) -> None:
    sid = stack["id"]
    admin.ok("PATCH", f"/stacks/{sid}", {"custom_json": {"x": 1}, "region": "eu-central-1"})
    admin.ok(
        "POST", f"/stacks/{sid}/instances", {"hostname": "web1", "layer_ids": [layers["app"]["id"]]}
    )
    admin.ok(
        "POST", f"/stacks/{sid}/apps", {"shortname": "shop", "layer_ids": [layers["app"]["id"]]}
    )
    clone = admin.ok("POST", f"/stacks/{sid}/clone", {"shortname": "prod-copy"})
    assert clone["region"] == "eu-central-1"
    assert clone["custom_json"] == {"x": 1}
    cloned_layers = admin.ok("GET", f"/stacks/{clone['id']}/layers")["items"]
    assert sorted(x["shortname"] for x in cloned_layers) == ["app", "lb"]
    assert {x["id"] for x in cloned_layers}.isdisjoint({x["id"] for x in layers.values()})
    assert admin.ok("GET", f"/stacks/{clone['id']}/instances")["total"] == 0
    cloned_apps = admin.ok("GET", f"/stacks/{clone['id']}/apps")["items"]
    new_app_layer = next(x["id"] for x in cloned_layers if x["shortname"] == "app")
    assert cloned_apps[0]["layer_ids"] == [new_app_layer]


def test_every_change_is_recorded_in_the_stack_events(
    admin: Api, stack: dict[str, Any], layers: dict[str, dict[str, Any]]
) -> None:
    kinds = [e["kind"] for e in admin.ok("GET", f"/stacks/{stack['id']}/events")["items"]]
    assert kinds == ["layer.created", "layer.created", "stack.created"]
    only = admin.ok("GET", f"/stacks/{stack['id']}/events?kind=stack.created")["items"]
    assert [e["kind"] for e in only] == ["stack.created"]


def test_listings_paginate(admin: Api) -> None:
    for n in range(7):
        admin.ok("POST", "/stacks", {"shortname": f"s{n}"})
    first = admin.ok("GET", "/stacks?limit=3")
    second = admin.ok("GET", "/stacks?limit=3&offset=3")
    last = admin.ok("GET", "/stacks?limit=3&offset=6")
    names = [s["shortname"] for page in (first, second, last) for s in page["items"]]
    assert names == [f"s{n}" for n in range(7)]
    assert first["total"] == 7


# ---------------------------------------------------------------- bad input

BAD_STACK_BODIES = [
    ({"shortname": "Prod"}, "invalid_format"),
    ({"shortname": "x" * 33}, "too_long"),
    ({"shortname": ""}, "too_long" if False else "invalid_format"),
    ({"shortname": 5}, "invalid_type"),
    ({"name": "no shortname"}, "missing_field"),
    ({"shortname": "ok", "colour": "blue"}, "unknown_field"),
    ({"shortname": "ok", "custom_json": []}, "invalid_type"),
    ({"shortname": "ok", "use_custom_cookbooks": "yes"}, "invalid_type"),
    ({"shortname": "ok", "chef_binary": "ruby"}, "invalid_choice"),
    ({"shortname": "ok", "name": "n" * 129}, "too_long"),
    ({"shortname": "ok", "custom_cookbooks_source": {"type": "git"}}, "missing_field"),
    ({"shortname": "ok", "id": "chosen-id"}, "unknown_field"),
    (["shortname", "ok"], "invalid_type"),
]


@pytest.mark.parametrize(("body", "code"), BAD_STACK_BODIES)
def test_bad_stack_bodies_are_refused_and_change_nothing(
    app: Flask, admin: Api, body: Any, code: str
) -> None:
    before = counts(app)
    admin.error("POST", "/stacks", body, 400, code)
    assert counts(app) == before


def test_malformed_json_is_refused(app: Flask, admin: Api) -> None:
    before = counts(app)
    for raw in (b"{", b"{'a': 1}", b"\xff\xfe"):
        response = admin.client.post(
            "/api/v1/stacks",
            data=raw,
            content_type="application/json",
            headers={"Authorization": f"Bearer {admin.token}"},
        )
        assert response.status_code == 400
        assert response.get_json()["error"]["code"] == "malformed_json"
    response = admin.client.post(
        "/api/v1/stacks",
        data=b"shortname=x",
        content_type="application/x-www-form-urlencoded",
        headers={"Authorization": f"Bearer {admin.token}"},
    )
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_media_type"
    response = admin.client.post(
        "/api/v1/stacks",
        data=b"",
        content_type="application/json",
        headers={"Authorization": f"Bearer {admin.token}"},
    )
    assert response.get_json()["error"]["code"] == "missing_body"
    assert counts(app) == before


def test_oversized_bodies_are_refused(admin: Api) -> None:
    big = {"shortname": "big", "custom_json": {"k": "v" * (2 * 1024 * 1024)}}
    response = admin.call("POST", "/stacks", big)
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"


def test_duplicate_names_are_conflicts(
    app: Flask, admin: Api, stack: dict[str, Any], layers: dict[str, dict[str, Any]]
) -> None:
    sid = stack["id"]
    admin.ok(
        "POST", f"/stacks/{sid}/instances", {"hostname": "web1", "layer_ids": [layers["app"]["id"]]}
    )
    admin.ok("POST", f"/stacks/{sid}/apps", {"shortname": "shop"})
    before = counts(app)
    admin.error("POST", "/stacks", {"shortname": "prod"}, 409, "duplicate_shortname")
    admin.error("POST", f"/stacks/{sid}/layers", {"shortname": "lb"}, 409, "duplicate_shortname")
    admin.error("POST", f"/stacks/{sid}/apps", {"shortname": "shop"}, 409, "duplicate_shortname")
    admin.error(
        "POST",
        f"/stacks/{sid}/instances",
        {"hostname": "web1", "layer_ids": [layers["lb"]["id"]]},
        409,
        "duplicate_hostname",
    )
    admin.error(
        "PATCH", f"/layers/{layers['app']['id']}", {"shortname": "lb"}, 409, "duplicate_shortname"
    )
    assert counts(app) == before


def test_references_to_another_stacks_layer_are_refused(
    app: Flask, admin: Api, stack: dict[str, Any], layers: dict[str, dict[str, Any]]
) -> None:
    other = admin.ok("POST", "/stacks", {"shortname": "other"})
    foreign = admin.ok("POST", f"/stacks/{other['id']}/layers", {"shortname": "db"})
    before = counts(app)
    error = admin.error(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "web9", "layer_ids": [foreign["id"]]},
        400,
        "layer_not_in_stack",
    )
    assert error["details"]["layer_ids"] == [foreign["id"]]
    admin.error(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "web9", "layer_ids": ["no-such-layer"]},
        400,
        "layer_not_in_stack",
    )
    admin.error(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "web9", "layer_ids": []},
        400,
        "layer_required",
    )
    admin.error(
        "POST",
        f"/stacks/{stack['id']}/apps",
        {"shortname": "x", "layer_ids": [foreign["id"]]},
        400,
        "layer_not_in_stack",
    )
    assert counts(app) == before


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"hostname": "Web_1", "layer_ids": []}, "invalid_format"),
        ({"hostname": "-web", "layer_ids": []}, "invalid_format"),
        ({"hostname": "w" * 64, "layer_ids": []}, "too_long"),
        ({"hostname": "web1"}, "missing_field"),
        ({"hostname": "web1", "layer_ids": "lb"}, "invalid_type"),
        ({"hostname": "web1", "layer_ids": [], "provider": "gcp"}, "invalid_choice"),
        ({"hostname": "web1", "layer_ids": [], "status": "online"}, "unknown_field"),
    ],
)
def test_bad_instance_bodies_are_refused(
    app: Flask, admin: Api, stack: dict[str, Any], body: dict[str, Any], code: str
) -> None:
    before = counts(app)
    admin.error("POST", f"/stacks/{stack['id']}/instances", body, 400, code)
    assert counts(app) == before


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"shortname": "a", "environment": {"1BAD": {"value": "x"}}}, "invalid_env_name"),
        ({"shortname": "a", "environment": {"OK": {"secure": True}}}, "missing_field"),
        ({"shortname": "a", "environment": {"OK": "plain"}}, "invalid_type"),
        ({"shortname": "a", "source": {"type": "svn", "url": "x"}}, "invalid_choice"),
        ({"shortname": "a", "domains": ["bad domain"]}, "invalid_format"),
    ],
)
def test_bad_app_bodies_are_refused(
    app: Flask, admin: Api, stack: dict[str, Any], body: dict[str, Any], code: str
) -> None:
    before = counts(app)
    admin.error("POST", f"/stacks/{stack['id']}/apps", body, 400, code)
    assert counts(app) == before


def test_bad_layer_recipes_are_refused(admin: Api, stack: dict[str, Any]) -> None:
    admin.error(
        "POST",
        f"/stacks/{stack['id']}/layers",
        {"shortname": "x", "recipes": {"boot": ["a"]}},
        400,
        "unknown_field",
    )
    admin.error(
        "POST",
        f"/stacks/{stack['id']}/layers",
        {"shortname": "x", "recipes": {"setup": ["bad recipe!"]}},
        400,
        "invalid_format",
    )


def test_bad_pagination_is_refused(admin: Api) -> None:
    for query in ("limit=0", "limit=501", "limit=x", "offset=-1"):
        admin.error("GET", f"/stacks?{query}", None, 400, "invalid_query")


def test_a_stack_with_running_instances_cannot_be_deleted(
    app: Flask, admin: Api, stack: dict[str, Any], layers: dict[str, dict[str, Any]]
) -> None:
    instance = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "web1", "layer_ids": [layers["app"]["id"]]},
    )
    set_status(app, instance["id"], InstanceState.ONLINE)
    before = counts(app)
    error = admin.error("DELETE", f"/stacks/{stack['id']}", None, 409, "stack_has_instances")
    assert error["details"]["instances"][0]["hostname"] == "web1"
    admin.error("DELETE", f"/instances/{instance['id']}", None, 409, "instance_not_stopped")
    admin.error("DELETE", f"/layers/{layers['app']['id']}", None, 409, "layer_has_instances")
    admin.error(
        "PATCH", f"/instances/{instance['id']}", {"provider": "ec2"}, 409, "instance_not_stopped"
    )
    assert counts(app) == before
    set_status(app, instance["id"], InstanceState.STOPPED)
    admin.ok("DELETE", f"/stacks/{stack['id']}")


def test_unknown_ids_and_routes_are_404_with_a_code(admin: Api) -> None:
    admin.error("GET", "/layers/nope", None, 404, "layer_not_found")
    admin.error("GET", "/instances/nope", None, 404, "instance_not_found")
    admin.error("GET", "/apps/nope", None, 404, "app_not_found")
    admin.error("GET", "/deployments/nope", None, 404, "deployment_not_found")
    admin.error("GET", "/commands/nope", None, 404, "command_not_found")
    admin.error("GET", "/nothing-here", None, 404, "not_found")
    admin.error("PUT", "/stacks", None, 405, "method_not_allowed")


# ---------------------------------------------------------------- auth


def test_requests_without_or_with_a_bad_token_get_401(app: Flask, admin: Api) -> None:
    anonymous = Api(app.test_client(), "")
    anonymous.error("GET", "/stacks", None, 401, "missing_token")
    Api(app.test_client(), "scl_not-a-token").error("GET", "/stacks", None, 401, "bad_token")
    response = app.test_client().get("/api/v1/stacks", headers={"Authorization": "Basic abc"})
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "bad_token"


def test_revoked_tokens_are_refused(app: Flask, admin: Api) -> None:
    from server.access import hash_token
    from server.db import utcnow
    from server.models import ApiToken

    with get_database(app).session() as session:
        token = session.scalar(
            select(ApiToken).where(ApiToken.token_hash == hash_token(admin.token))
        )
        assert token is not None
        token.revoked_at = utcnow()
    admin.error("GET", "/stacks", None, 401, "bad_token")


def test_tokens_are_stored_hashed(app: Flask, admin: Api) -> None:
    from server.models import ApiToken

    with get_database(app).session() as session:
        hashes = session.scalars(select(ApiToken.token_hash)).all()
    assert admin.token not in hashes
    assert all(len(h) == 64 for h in hashes)


ROLE_MATRIX = [
    # (role, method, path template, body, allowed)
    (Role.VIEWER, "GET", "/stacks/{sid}", None, True),
    (Role.VIEWER, "GET", "/stacks/{sid}/events", None, True),
    (Role.VIEWER, "PATCH", "/stacks/{sid}", {"description": "x"}, False),
    (Role.VIEWER, "POST", "/stacks/{sid}/layers", {"shortname": "new"}, False),
    (Role.DEPLOYER, "POST", "/stacks/{sid}/layers", {"shortname": "new"}, False),
    (
        Role.DEPLOYER,
        "POST",
        "/stacks/{sid}/deployments",
        {"command": "execute_recipes", "recipes": ["x"]},
        True,
    ),
    (
        Role.VIEWER,
        "POST",
        "/stacks/{sid}/deployments",
        {"command": "execute_recipes", "recipes": ["x"]},
        False,
    ),
    (Role.DEPLOYER, "POST", "/stacks/{sid}/deployments", {"command": "setup"}, False),
    (Role.MANAGER, "POST", "/stacks/{sid}/deployments", {"command": "setup"}, True),
    (Role.MANAGER, "POST", "/stacks/{sid}/layers", {"shortname": "new"}, True),
    (Role.MANAGER, "PATCH", "/stacks/{sid}", {"description": "x"}, True),
    (Role.MANAGER, "DELETE", "/stacks/{sid}", None, False),
    (Role.MANAGER, "POST", "/stacks", {"shortname": "mine"}, False),
]


@pytest.mark.parametrize(("role", "method", "path", "body", "allowed"), ROLE_MATRIX)
def test_roles_gate_what_a_token_may_do(
    app: Flask,
    admin: Api,
    as_role: Any,
    stack: dict[str, Any],
    layers: dict[str, dict[str, Any]],
    role: Role,
    method: str,
    path: str,
    body: Any,
    allowed: bool,
) -> None:
    instance = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "web1", "layer_ids": [layers["app"]["id"]]},
    )
    set_status(app, instance["id"], InstanceState.ONLINE)
    api = as_role(stack["id"], role)
    response = api.call(method, path.format(sid=stack["id"]), body)
    if allowed:
        assert response.status_code in (200, 201), response.get_json()
    else:
        assert response.status_code == 403, response.get_json()
        assert response.get_json()["error"]["code"] in ("role_too_low", "admin_required")


def test_a_token_sees_only_its_stacks(admin: Api, as_role: Any, stack: dict[str, Any]) -> None:
    other = admin.ok("POST", "/stacks", {"shortname": "other"})
    viewer = as_role(stack["id"], Role.VIEWER)
    assert [s["id"] for s in viewer.ok("GET", "/stacks")["items"]] == [stack["id"]]
    viewer.error("GET", f"/stacks/{other['id']}", None, 404, "stack_not_found")
    nobody = as_role(stack["id"], None)
    assert nobody.ok("GET", "/stacks")["items"] == []


# ---------------------------------------------------------------- deployments


def test_a_deployment_creates_one_queued_command_per_online_instance(
    app: Flask, admin: Api, stack: dict[str, Any], layers: dict[str, dict[str, Any]]
) -> None:
    sid = stack["id"]
    ids = []
    for n, layer in enumerate(["app", "app", "lb"]):
        instance = admin.ok(
            "POST",
            f"/stacks/{sid}/instances",
            {"hostname": f"h{n}", "layer_ids": [layers[layer]["id"]]},
        )
        ids.append(instance["id"])
    set_status(app, ids[0], InstanceState.ONLINE)
    set_status(app, ids[2], InstanceState.ONLINE)
    shop = admin.ok(
        "POST", f"/stacks/{sid}/apps", {"shortname": "shop", "layer_ids": [layers["app"]["id"]]}
    )
    deployment = admin.ok(
        "POST",
        f"/stacks/{sid}/deployments",
        {"command": "deploy", "app_id": shop["id"], "comment": "v2"},
    )
    assert deployment["status"] == "running"
    assert [c["instance_id"] for c in deployment["commands"]] == [ids[0]]
    assert deployment["commands"][0]["status"] == "queued"
    configure = admin.ok("POST", f"/stacks/{sid}/deployments", {"command": "configure"})
    assert sorted(c["instance_id"] for c in configure["commands"]) == sorted([ids[0], ids[2]])
    shown = admin.ok("GET", f"/deployments/{deployment['id']}")
    assert shown["commands"] == deployment["commands"]
    listing = admin.ok("GET", f"/stacks/{sid}/deployments")
    assert [d["id"] for d in listing["items"]] == [configure["id"], deployment["id"]]
    command_id = deployment["commands"][0]["id"]
    assert admin.ok("GET", f"/commands/{command_id}")["type"] == "deploy"
    log = admin.ok("GET", f"/commands/{command_id}/log")
    assert log == {
        "command_id": command_id,
        "status": "queued",
        "offset": 0,
        "next_offset": 0,
        "truncated": False,
        "log": "",
    }


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"command": "deploy"}, 400, "app_required"),
        ({"command": "deploy", "app_id": "nope"}, 400, "app_not_in_stack"),
        ({"command": "configure", "app_id": "x"}, 400, "app_not_allowed"),
        ({"command": "execute_recipes"}, 400, "recipes_required"),
        ({"command": "configure", "recipes": ["a"]}, 400, "recipes_not_allowed"),
        ({"command": "reboot"}, 400, "invalid_choice"),
        ({"command": "configure", "instance_ids": ["nope"]}, 400, "instance_not_in_stack"),
        ({"command": "configure", "instance_ids": ["{offline}"]}, 409, "instance_not_online"),
    ],
)
def test_bad_deployments_are_refused_and_create_nothing(
    app: Flask,
    admin: Api,
    stack: dict[str, Any],
    layers: dict[str, dict[str, Any]],
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    online = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "on", "layer_ids": [layers["app"]["id"]]},
    )
    offline = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "off", "layer_ids": [layers["app"]["id"]]},
    )
    set_status(app, online["id"], InstanceState.ONLINE)
    body = copy.deepcopy(body)
    if "instance_ids" in body:
        body["instance_ids"] = [
            offline["id"] if i == "{offline}" else i for i in body["instance_ids"]
        ]
    before = counts(app)
    admin.error("POST", f"/stacks/{stack['id']}/deployments", body, status, code)
    assert counts(app) == before


def test_a_deployment_with_no_online_instance_is_a_conflict(
    admin: Api, stack: dict[str, Any]
) -> None:
    admin.error(
        "POST",
        f"/stacks/{stack['id']}/deployments",
        {"command": "configure"},
        409,
        "no_online_instances",
    )


# ---------------------------------------------------------------- system


def test_health_reports_database_and_redis(app: Flask) -> None:
    response = app.test_client().get("/api/v1/health")
    assert response.status_code == 200
    assert response.get_json()["database"] == "ok"
    assert response.get_json()["redis"] == "ok"


def test_health_is_503_when_redis_is_down(settings: Any) -> None:
    from server.app import create_app
    from server.config import with_overrides

    broken = create_app(with_overrides(settings, redis_url="redis://127.0.0.1:1/0"))
    response = broken.test_client().get("/api/v1/health")
    get_database(broken).dispose()
    assert response.status_code == 503
    assert response.get_json()["redis"].startswith("error")
    assert response.get_json()["database"] == "ok"


def test_openapi_document_describes_every_route(app: Flask) -> None:
    document = app.test_client().get("/api/v1/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    routes = {
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1")
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    import re

    documented = {
        (re.sub(r"{([a-z_]+)}", r"<\1>", path), method.upper())
        for path, item in document["paths"].items()
        for method in item
    }
    assert routes == documented
    stack_schema = document["components"]["schemas"]["Stack"]
    assert stack_schema["properties"]["shortname"]["pattern"] == "^[a-z0-9-]{1,32}$"
    assert stack_schema["required"] == ["shortname"]


def test_events_are_written_in_the_same_transaction(app: Flask, admin: Api) -> None:
    admin.ok("POST", "/stacks", {"shortname": "evt"})
    with get_database(app).session() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 1


def test_processes_starting_together_share_one_secret_key(tmp_path: Any) -> None:
    import threading

    from server.vault import load_or_create_key

    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        keys.append(load_or_create_key(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert (tmp_path / "secret.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]
