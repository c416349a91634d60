"""Node JSON: run lists, the cluster view, one instance's document, search nodes, serialising."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from chef_bridge.node_json import (
    ClusterInput,
    DeploymentInput,
    LayerInput,
    NodeJsonError,
    build_cluster,
    dumps,
    node_json,
    normalise_entry,
    run_list,
    search_nodes,
)

FIXTURES = Path(__file__).parent / "fixtures" / "node_json"
SENT_AT = "2024-03-01T12:00:00+00:00"


def load_cluster() -> ClusterInput:
    cluster: ClusterInput = json.loads((FIXTURES / "cluster.json").read_text())
    return cluster


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Every path where `actual` differs from `expected`, missing and extra keys included."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key in expected.keys() | actual.keys():
            where = f"{path}.{key}"
            if key not in actual:
                found.append(f"{where}: missing")
            elif key not in expected:
                found.append(f"{where}: unexpected {actual[key]!r}")
            else:
                found.extend(differences(expected[key], actual[key], where))
        return sorted(found)
    if expected != actual or type(expected) is not type(actual):
        return [f"{path}: expected {expected!r}, got {actual!r}"]
    return []


# --- run lists ----------------------------------------------------------------------------------


def layer(layer_id: str, **recipes: list[str]) -> LayerInput:
    return {
        "id": layer_id,
        "shortname": layer_id,
        "name": layer_id,
        "type": "custom",
        "recipes": dict(recipes),
        "custom_json": {},
        "packages": [],
        "auto_healing": False,
    }


LAYERS = [
    layer("lb", setup=["haproxy::install"], configure=["haproxy::configure", "common::hosts"]),
    layer(
        "app",
        setup=["php", "common::hosts"],
        configure=["common::hosts", "recipe[php::configure]", "role[monitored]"],
        deploy=["deploy::php"],
    ),
    layer("db", setup=["mysql::server"], configure=["mysql::configure", "php::default"]),
]

RUN_LIST_CASES: list[tuple[str, list[str], str, list[str] | None, list[str], list[str]]] = [
    # (name, instance layer ids, event, extra, base, expected)
    (
        "one layer's configure recipes, normalised",
        ["lb"],
        "configure",
        None,
        [],
        ["recipe[haproxy::configure]", "recipe[common::hosts]"],
    ),
    (
        "layers in stack order whatever the instance's order, first occurrence wins",
        ["db", "app", "lb"],
        "configure",
        None,
        [],
        [
            "recipe[haproxy::configure]",
            "recipe[common::hosts]",
            "recipe[php::configure]",
            "role[monitored]",
            "recipe[mysql::configure]",
            "recipe[php::default]",
        ],
    ),
    (
        "setup puts the base recipes first and drops later duplicates",
        ["app"],
        "setup",
        None,
        ["scalarium_agent::default", "common::hosts"],
        ["recipe[scalarium_agent::default]", "recipe[common::hosts]", "recipe[php]"],
    ),
    (
        "base recipes are for setup only",
        ["app"],
        "deploy",
        None,
        ["scalarium_agent::default"],
        ["recipe[deploy::php]"],
    ),
    (
        "`cb` and `cb::default` are the same recipe",
        ["app", "db"],
        "setup",
        ["php::default"],
        [],
        ["recipe[php]", "recipe[common::hosts]", "recipe[mysql::server]"],
    ),
    (
        "execute_recipes runs only the command's recipes",
        ["app"],
        "execute_recipes",
        ["ops::rotate_logs", "recipe[ops::cleanup]", "ops::rotate_logs"],
        [],
        ["recipe[ops::rotate_logs]", "recipe[ops::cleanup]"],
    ),
    ("an event without recipes gives an empty run list", ["lb"], "undeploy", None, [], []),
    ("rollback runs the deploy recipes", ["app"], "rollback", None, [], ["recipe[deploy::php]"]),
    (
        "extra recipes follow the layers' recipes",
        ["lb"],
        "configure",
        ["custom::after"],
        [],
        ["recipe[haproxy::configure]", "recipe[common::hosts]", "recipe[custom::after]"],
    ),
]


@pytest.mark.parametrize(
    ("layer_ids", "event", "extra", "base", "expected"),
    [case[1:] for case in RUN_LIST_CASES],
    ids=[case[0] for case in RUN_LIST_CASES],
)
def test_run_list(
    layer_ids: list[str], event: str, extra: list[str] | None, base: list[str], expected: list[str]
) -> None:
    assert run_list(LAYERS, layer_ids, event, extra, base=base) == expected


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("apache2", "recipe[apache2]"),
        ("apache2::mod_ssl", "recipe[apache2::mod_ssl]"),
        (" recipe[apache2::mod_ssl] ", "recipe[apache2::mod_ssl]"),
        ("apache2::mod_ssl@1.2.0", "recipe[apache2::mod_ssl@1.2.0]"),
        ("role[web-server]", "role[web-server]"),
        ("opsworks_cookbook_demo::configure", "recipe[opsworks_cookbook_demo::configure]"),
    ],
)
def test_run_list_entries_are_normalised(entry: str, expected: str) -> None:
    assert normalise_entry(entry) == expected


@pytest.mark.parametrize(
    "entry",
    ["", "   ", "recipe[]", "role[]", "foo[bar]", "a::b::c", "cb:::r", "recipe[a b]", "x;rm -rf"],
)
def test_invalid_run_list_entries_are_refused(entry: str) -> None:
    with pytest.raises(NodeJsonError) as caught:
        normalise_entry(entry)
    assert caught.value.code == "invalid_run_list_entry"


# --- the reference stack: 3 layers, 6 instances, one not online ---------------------------------


def test_configure_node_json_matches_the_opsworks_reference_key_by_key() -> None:
    expected = json.loads((FIXTURES / "configure_php-app1.expected.json").read_text())
    expected.pop("_comment")
    view = build_cluster(load_cluster())
    actual = node_json(view, "inst-php-app1", "configure", command_id="cmd-1", sent_at=SENT_AT)
    assert differences(expected, actual) == []
    # Order matters in a run list and in opsworks.applications, not only content.
    assert actual["run_list"] == expected["run_list"]
    assert list(actual["opsworks"]["layers"]) == ["lb", "php-app", "db-master"]


def test_an_instance_that_is_not_online_is_listed_nowhere() -> None:
    view = build_cluster(load_cluster())
    doc = node_json(view, "inst-lb1", "configure", command_id="cmd-2")
    app_layer = doc["opsworks"]["layers"]["php-app"]["instances"]
    assert sorted(app_layer) == ["php-app1", "php-app2", "util1"]
    assert "php-app3" not in doc["scalarium"]["layers"]["php-app"]["instances"]
    assert "php-app3" not in search_nodes(view)
    assert "php-app3" not in dumps(view, doc)


def test_setup_of_an_instance_not_yet_online_describes_that_instance() -> None:
    view = build_cluster(load_cluster(), base_recipes=["scalarium_agent::default"])
    doc = node_json(view, "inst-php-app3", "setup", command_id="cmd-3", sent_at=SENT_AT)
    assert doc["opsworks"]["instance"]["hostname"] == "php-app3"
    assert doc["opsworks"]["instance"]["layers"] == ["php-app"]
    assert doc["scalarium"]["instance"]["status"] == "running_setup"
    assert doc["opsworks"]["activity"] == doc["scalarium"]["activity"] == "setup"
    assert doc["run_list"] == ["recipe[scalarium_agent::default]", "recipe[php::install]"]
    # Setup is followed by a deploy of every app of its layers, so it gets all of them.
    assert list(doc["deploy"]) == ["shop", "docs"]


def test_instance_in_two_layers_lists_both_in_stack_layer_order() -> None:
    view = build_cluster(load_cluster())
    doc = node_json(view, "inst-util1", "configure", command_id="cmd-4")
    assert doc["opsworks"]["instance"]["layers"] == ["php-app", "db-master"]
    assert doc["opsworks"]["instance"]["aws_instance_id"] is None
    assert doc["run_list"] == [
        "recipe[php::configure]",
        "recipe[shop::configure]",
        "recipe[mysql::configure]",
    ]
    # Layer custom JSON merges in layer order: php-app's, then db-master's.
    assert doc["php"] == {"memory_limit": "256M"} and doc["mysql"] == {"port": 3306}


def test_an_instance_gets_only_the_apps_of_its_layers_outside_deployments() -> None:
    view = build_cluster(load_cluster())
    doc = node_json(view, "inst-lb1", "configure", command_id="cmd-5")
    assert list(doc["deploy"]) == ["docs"]  # docs has no layer_ids: it is on every layer


# --- deploy ---------------------------------------------------------------------------------


def deployment(**changes: Any) -> DeploymentInput:
    base: DeploymentInput = {
        "id": "dep-7",
        "command": "deploy",
        "custom_json": {},
        "app_ids": ["app-shop"],
    }
    return {**base, **changes}  # type: ignore[typeddict-item]


def test_deploy_of_a_git_app_carries_what_a_deploy_needs() -> None:
    view = build_cluster(load_cluster())
    doc = node_json(
        view,
        "inst-php-app2",
        "deploy",
        command_id="cmd-6",
        deployment=deployment(),
        sent_at=SENT_AT,
    )
    assert list(doc["deploy"]) == ["shop"]  # only the deployment's apps, as OpsWorks did
    shop = doc["deploy"]["shop"]
    assert shop["scm"] == {
        "scm_type": "git",
        "repository": "git@github.com:example/shop.git",
        "revision": "v1.2.0",
        "ssh_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
        "user": None,
        "password": None,
    }
    assert shop["deploy_to"] == "/srv/www/shop"
    assert shop["domains"] == ["shop.example.com", "www.shop.example.com"]
    # Secure variables are included: node JSON only goes to the node itself.
    assert shop["environment_variables"] == {"APP_ENV": "production", "DB_PASSWORD": "s3cret"}
    assert shop["environment"] == shop["environment_variables"]
    assert shop["migrate"] is True and shop["document_root"] == "public"
    assert shop["application"] == "shop" and shop["application_type"] == "php"
    assert shop["user"] == "deploy"
    assert doc["opsworks"]["deployment"] == doc["scalarium"]["deployment_id"] == "dep-7"
    assert doc["run_list"] == ["recipe[deploy::php]"]


def test_deployment_custom_json_can_pin_a_revision_for_one_deploy() -> None:
    view = build_cluster(load_cluster())
    pinned = deployment(custom_json={"deploy": {"shop": {"scm": {"revision": "abc123"}}}})
    doc = node_json(view, "inst-php-app1", "deploy", command_id="c", deployment=pinned)
    assert doc["deploy"]["shop"]["scm"]["revision"] == "abc123"
    assert doc["deploy"]["shop"]["scm"]["repository"] == "git@github.com:example/shop.git"
    assert view.deploy_by_app_id["app-shop"]["scm"]["revision"] == "v1.2.0"


def test_deploy_without_app_ids_deploys_every_app_of_the_instance_layers() -> None:
    view = build_cluster(load_cluster())
    doc = node_json(
        view, "inst-php-app1", "deploy", command_id="c", deployment=deployment(app_ids=None)
    )
    assert list(doc["deploy"]) == ["shop", "docs"]


def test_configure_has_no_opsworks_deployment_id() -> None:
    view = build_cluster(load_cluster())
    doc = node_json(
        view,
        "inst-php-app1",
        "configure",
        command_id="c",
        deployment=deployment(command="configure"),
    )
    assert doc["opsworks"]["deployment"] is None
    assert doc["scalarium"]["deployment_id"] == "dep-7"


def test_execute_recipes_takes_its_run_list_from_the_deployment() -> None:
    view = build_cluster(load_cluster())
    run = deployment(command="execute_recipes", app_ids=None, recipes=["ops::rotate_logs"])
    doc = node_json(view, "inst-lb1", "execute_recipes", command_id="c", deployment=run)
    assert doc["run_list"] == ["recipe[ops::rotate_logs]"]
    assert doc["opsworks_custom_cookbooks"]["recipes"] == ["ops::rotate_logs"]


# --- precedence -----------------------------------------------------------------------------


def test_node_json_applies_all_five_levels_in_order() -> None:
    cluster = load_cluster()
    cluster["stack"]["custom_json"] = {"tune": {"w": "stack", "s": 1}}
    cluster["layers"][1]["custom_json"] = {"tune": {"w": "layer", "l": 1}}
    cluster["instances"][1]["attributes"] = {"tune": {"w": "instance", "i": 1}}
    view = build_cluster(cluster, defaults={"tune": {"w": "defaults", "d": 1}})
    dep = deployment(command="configure", custom_json={"tune": {"w": "deployment", "dep": 1}})
    doc = node_json(view, "inst-php-app1", "configure", command_id="c", deployment=dep)
    assert doc["tune"] == {"w": "deployment", "d": 1, "s": 1, "l": 1, "i": 1, "dep": 1}
    without = node_json(view, "inst-php-app1", "configure", command_id="c")
    assert without["tune"]["w"] == "instance"


def test_custom_json_overrides_opsworks_and_deploy_but_not_scalarium() -> None:
    cluster = load_cluster()
    cluster["stack"]["custom_json"] = {
        "deploy": {"shop": {"environment_variables": {"FEATURE_X": "on"}}},
        "opsworks": {"deploy_chef_provider": "Branch"},
        "scalarium": {"stack": {"name": "spoofed"}},
        "run_list": ["recipe[evil]"],
    }
    view = build_cluster(cluster)
    doc = node_json(view, "inst-php-app1", "configure", command_id="c")
    assert doc["deploy"]["shop"]["environment_variables"] == {
        "APP_ENV": "production",
        "DB_PASSWORD": "s3cret",
        "FEATURE_X": "on",
    }
    assert doc["opsworks"]["deploy_chef_provider"] == "Branch"
    assert doc["scalarium"]["stack"]["name"] == "shop-production"
    assert doc["run_list"] == ["recipe[php::configure]", "recipe[shop::configure]"]


# --- sharing without mutation ---------------------------------------------------------------


def snapshot(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def view_snapshot(view: Any) -> str:
    return snapshot(
        [view.scalarium, view.opsworks, view.deploy_by_app_id, view.defaults, list(view.layers)]
    )


def test_node_json_does_not_mutate_the_view_and_outputs_are_independent() -> None:
    cluster = load_cluster()
    cluster_before = copy.deepcopy(cluster)
    cluster["instances"][1]["attributes"] = {"opsworks": {"layers": {"lb": {"extra": 1}}}}
    view = build_cluster(cluster)
    before = view_snapshot(view)
    dep = deployment(custom_json={"deploy": {"shop": {"migrate": False}}})
    first = node_json(view, "inst-php-app1", "deploy", command_id="a", deployment=dep)
    first_text = snapshot(first)
    second = node_json(view, "inst-php-app2", "configure", command_id="b", sent_at=SENT_AT)
    assert view_snapshot(view) == before
    assert snapshot(first) == first_text
    assert first["opsworks"]["instance"]["hostname"] == "php-app1"
    assert second["opsworks"]["instance"]["hostname"] == "php-app2"
    assert first["opsworks"]["layers"]["lb"]["extra"] == 1
    assert "extra" not in second["opsworks"]["layers"]["lb"]
    assert first["deploy"]["shop"]["migrate"] is False
    assert second["deploy"]["shop"]["migrate"] is True
    cluster["instances"][1]["attributes"] = cluster_before["instances"][1]["attributes"]
    assert cluster == cluster_before  # build_cluster left its input alone


def test_node_json_shares_the_cluster_parts_instead_of_copying_them() -> None:
    view = build_cluster(load_cluster())
    doc = node_json(view, "inst-php-app1", "configure", command_id="c")
    assert doc["opsworks"]["layers"] is view.opsworks["layers"]
    assert doc["scalarium"]["layers"] is view.scalarium["layers"]
    assert doc["deploy"]["shop"] is view.deploy_by_app_id["app-shop"]
    # One member entry per instance, shared by both of its layers.
    layers = view.opsworks["layers"]
    assert layers["php-app"]["instances"]["util1"] is layers["db-master"]["instances"]["util1"]


# --- search nodes ---------------------------------------------------------------------------


def test_search_nodes_lists_online_instances_with_layers_as_roles() -> None:
    nodes = search_nodes(build_cluster(load_cluster()))
    assert sorted(nodes) == ["db-master1", "lb1", "php-app1", "php-app2", "util1"]
    util = nodes["util1"]
    assert util["name"] == "util1"
    assert util["json_class"] == "Chef::Node" and util["chef_type"] == "node"
    assert util["chef_environment"] == "_default"
    assert util["run_list"] == ["role[php-app]", "role[db-master]"]
    assert util["automatic"]["roles"] == ["php-app", "db-master"]
    assert util["automatic"]["ipaddress"] == "192.168.10.5"
    assert util["automatic"]["hostname"] == "util1"
    assert util["automatic"]["fqdn"] == "util1.internal.example.com"
    assert util["normal"]["opsworks"]["instance"]["layers"] == ["php-app", "db-master"]
    assert "s3cret" not in json.dumps(nodes)


# --- serialising ----------------------------------------------------------------------------


def test_dumps_gives_the_same_text_as_json_dumps() -> None:
    cluster = load_cluster()
    cluster["instances"][2]["attributes"] = {
        "opsworks": {"layers": {"php-app": {"instances": {"php-app1": {"note": "é ✓"}}}}},
        "tuple_like": [1, 2.5, None, True, {"k": '"quoted"'}],
    }
    view = build_cluster(cluster)
    for instance_id in ("inst-php-app1", "inst-php-app2", "inst-php-app3", "inst-util1"):
        for _ in range(2):  # the second round uses the cached fragments
            doc = node_json(view, instance_id, "configure", command_id="c", sent_at=SENT_AT)
            assert dumps(view, doc) == json.dumps(doc, separators=(",", ":"))


# --- bad input ------------------------------------------------------------------------------


def broken(change: str) -> ClusterInput:
    cluster = load_cluster()
    if change == "duplicate_hostname":
        cluster["instances"][2]["hostname"] = "php-app1"
    elif change == "unknown_layer":
        cluster["instances"][0]["layer_ids"] = ["layer-gone"]
    elif change == "duplicate_layer":
        cluster["layers"][2]["shortname"] = "lb"
    elif change == "duplicate_app":
        cluster["apps"][1]["shortname"] = "shop"
    elif change == "duplicate_instance":
        cluster["instances"][1]["id"] = "inst-lb1"
    return cluster


@pytest.mark.parametrize(
    "code",
    [
        "duplicate_hostname",
        "unknown_layer",
        "duplicate_layer",
        "duplicate_app",
        "duplicate_instance",
    ],
)
def test_build_cluster_refuses_inconsistent_input(code: str) -> None:
    with pytest.raises(NodeJsonError) as caught:
        build_cluster(broken(code))
    assert caught.value.code == code


def test_a_hostname_reused_by_an_instance_that_is_not_online_is_allowed() -> None:
    cluster = load_cluster()
    cluster["instances"][3]["hostname"] = "php-app1"  # php-app3 is running_setup
    build_cluster(cluster)


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (dict(instance_id="inst-gone", event="configure"), "unknown_instance"),
        (dict(instance_id="inst-lb1", event="configure", sent_at="yesterday"), "invalid_sent_at"),
        (
            dict(instance_id="inst-lb1", event="deploy", deployment=deployment(app_ids=["app-x"])),
            "unknown_app",
        ),
    ],
)
def test_node_json_refuses_bad_arguments(call: dict[str, Any], code: str) -> None:
    view = build_cluster(load_cluster())
    with pytest.raises(NodeJsonError) as caught:
        node_json(view, command_id="c", **call)
    assert caught.value.code == code
