"""Dependency resolution over plain CookbookMetadata, plus run-list parsing and source merging."""

from __future__ import annotations

import time

import pytest

from chef_bridge.metadata import CookbookMetadata
from chef_bridge.resolver import (
    ResolutionError,
    cookbooks_in_run_list,
    merge_sources,
    resolve,
    roles_in_run_list,
    run_list_requirements,
)
from chef_bridge.versions import Constraint, Version


def cb(spec: str, *depends: str, source: str = "") -> CookbookMetadata:
    """``cb("a 1.0.0", "b ~> 1.0", "c")`` -> cookbook a 1.0.0 depending on b (~> 1.0) and c."""
    name, version = spec.split(" ", 1)
    dependencies = {}
    for dep in depends:
        dep_name, _, constraint = dep.partition(" ")
        dependencies[dep_name] = Constraint.parse(constraint or None)
    return CookbookMetadata(
        name=name,
        version=Version.parse(version),
        dependencies=dependencies,
        source_file=source,
    )


def universe(*cookbooks: CookbookMetadata) -> dict[str, list[CookbookMetadata]]:
    """Group cookbooks by name, as ``available`` expects."""
    grouped: dict[str, list[CookbookMetadata]] = {}
    for cookbook in cookbooks:
        grouped.setdefault(cookbook.name, []).append(cookbook)
    return grouped


def picked(result: dict[str, CookbookMetadata]) -> dict[str, str]:
    return {name: str(meta.version) for name, meta in result.items()}


# (run list, available, expected choice)
SOLVABLE = [
    pytest.param(["a"], [cb("a 1.0.0"), cb("a 2.0.0"), cb("a 1.5.0")], {"a": "2.0.0"}, id="newest"),
    pytest.param(
        [("a", Constraint.parse("~> 1.0"))],
        [cb("a 1.0.0"), cb("a 2.0.0"), cb("a 1.5.0")],
        {"a": "1.5.0"},
        id="run-list-constraint",
    ),
    pytest.param(
        ["app"],
        [
            cb("app 1.0.0", "apache2 ~> 2.1", "apt"),
            cb("apache2 2.1.0"),
            cb("apache2 2.9.1"),
            cb("apache2 3.0.0"),
            cb("apt 7.0.0"),
            cb("unused 1.0.0"),
        ],
        {"app": "1.0.0", "apache2": "2.9.1", "apt": "7.0.0"},
        id="closure-only",
    ),
    pytest.param(
        ["top"],
        [
            cb("top 1.0.0", "left", "right"),
            cb("left 1.0.0", "base >= 1.2"),
            cb("right 1.0.0", "base < 2.0"),
            cb("base 1.0.0"),
            cb("base 1.9.0"),
            cb("base 2.0.0"),
        ],
        {"top": "1.0.0", "left": "1.0.0", "right": "1.0.0", "base": "1.9.0"},
        id="diamond",
    ),
    pytest.param(
        ["a"],
        [cb("a 2.0.0", "b"), cb("a 1.0.0"), cb("c 1.0.0")],
        {"a": "1.0.0"},
        id="backtrack-when-newest-needs-missing-cookbook",
    ),
    pytest.param(
        ["a", "b"],
        [
            cb("a 2.0.0", "c ~> 2.0"),
            cb("a 1.0.0", "c ~> 1.0"),
            cb("b 1.0.0", "c < 2.0"),
            cb("c 1.0.0"),
            cb("c 2.0.0"),
        ],
        {"a": "1.0.0", "b": "1.0.0", "c": "1.0.0"},
        id="backtrack-on-conflict",
    ),
    pytest.param(
        ["a"],
        [cb("a 1.0.0", "b"), cb("b 1.0.0", "a")],
        {"a": "1.0.0", "b": "1.0.0"},
        id="cycle",
    ),
    pytest.param(
        ["a"],
        [
            cb("a 1.0.0", "b"),
            cb("b 1.0.0", "c"),
            cb("c 1.0.0", "a ~> 1.0"),
            cb("a 2.0.0", "b"),
            cb("c 2.0.0", "a = 1.0.0"),
        ],
        # Every c refuses a 2.0.0, so the search has to come back round the cycle to a.
        {"a": "1.0.0", "b": "1.0.0", "c": "2.0.0"},
        id="cycle-with-constraints-back",
    ),
    pytest.param(
        ["apache2", "recipe-less"],
        [cb("apache2 1.0.0"), cb("recipe-less 0.0.0")],
        {"apache2": "1.0.0", "recipe-less": "0.0.0"},
        id="several-roots",
    ),
    pytest.param(
        [("a", Constraint.parse(">= 1.0")), ("a", Constraint.parse("< 2.0"))],
        [cb("a 1.0.0"), cb("a 1.2.0"), cb("a 2.0.0")],
        {"a": "1.2.0"},
        id="root-named-twice",
    ),
]


@pytest.mark.parametrize(("run_list", "available", "expected"), SOLVABLE)
def test_resolve_picks_the_newest_versions_that_satisfy_everything(
    run_list: list[str], available: list[CookbookMetadata], expected: dict[str, str]
) -> None:
    assert picked(resolve(run_list, universe(*available))) == expected


def test_resolve_returns_the_metadata_objects_sorted_by_name() -> None:
    b = cb("b 1.0.0")
    a = cb("a 1.0.0", "b")
    result = resolve(["a"], universe(a, b))
    assert list(result) == ["a", "b"]
    assert result["b"] is b


def test_overrides_constrain_cookbooks_in_the_closure_only() -> None:
    available = universe(cb("a 1.0.0", "b"), cb("b 1.0.0"), cb("b 2.0.0"), cb("z 1.0.0"))
    result = resolve(["a"], available, overrides={"b": "~> 1.0", "z": "= 9.9.9"})
    assert picked(result) == {"a": "1.0.0", "b": "1.0.0"}


def test_missing_run_list_cookbook_names_the_run_list() -> None:
    with pytest.raises(ResolutionError) as caught:
        resolve(["nope"], universe(cb("a 1.0.0")))
    assert caught.value.code == "cookbook_missing"
    assert caught.value.details == {"cookbook": "nope", "requested_by": ["run list"]}


def test_missing_dependency_names_who_needs_it() -> None:
    available = universe(cb("app 1.0.0", "nginx ~> 12.0"), cb("other 1.0.0", "nginx"))
    with pytest.raises(ResolutionError) as caught:
        resolve(["app", "other"], available)
    error = caught.value
    assert error.code == "cookbook_missing"
    assert error.details["cookbook"] == "nginx"
    assert "app 1.0.0" in error.details["requested_by"]
    assert "nginx" in str(error) and "app 1.0.0" in str(error)


def test_conflict_lists_every_constraint_and_who_asked() -> None:
    available = universe(
        cb("web 1.0.0", "openssl ~> 1.0"),
        cb("db 1.0.0", "openssl >= 2.0"),
        cb("openssl 1.0.0"),
        cb("openssl 2.0.0"),
    )
    with pytest.raises(ResolutionError) as caught:
        resolve(["web", "db"], available)
    error = caught.value
    assert error.code == "constraint_conflict"
    assert error.details["cookbook"] == "openssl"
    constraints = {(c["constraint"], c["requested_by"]) for c in error.details["constraints"]}
    assert {("~> 1.0", "web 1.0.0"), (">= 2.0", "db 1.0.0")} <= constraints
    assert error.details["available_versions"] == ["2.0.0", "1.0.0"]
    assert "~> 1.0 from web 1.0.0" in str(error) and ">= 2.0 from db 1.0.0" in str(error)


def test_conflict_with_the_run_list_constraint_names_the_run_list() -> None:
    with pytest.raises(ResolutionError) as caught:
        resolve([("a", "~> 3.0")], universe(cb("a 1.0.0"), cb("a 2.0.0")))
    assert caught.value.code == "constraint_conflict"
    assert caught.value.details["constraints"] == [
        {"constraint": "~> 3.0", "requested_by": "run list"}
    ]


def test_conflict_with_an_override_names_the_override() -> None:
    with pytest.raises(ResolutionError) as caught:
        resolve(["a"], universe(cb("a 1.0.0", "b >= 2.0"), cb("b 2.0.0")), overrides={"b": "< 2.0"})
    requesters = {c["requested_by"] for c in caught.value.details["constraints"]}
    assert requesters == {"overrides", "a 1.0.0"}


def test_resolution_is_not_exponential_on_a_wide_unsatisfiable_graph() -> None:
    # 12 cookbooks with 10 versions each, all of which need a version of "base" that does not
    # exist: naive backtracking would try 10**12 combinations.
    layers = [f"l{i}" for i in range(12)]
    cookbooks = [cb(f"{name} {v}.0.0", "base >= 5.0") for name in layers for v in range(1, 11)]
    cookbooks.append(cb("base 1.0.0"))
    started = time.monotonic()
    with pytest.raises(ResolutionError) as caught:
        resolve(layers, universe(*cookbooks))
    assert time.monotonic() - started < 2
    assert caught.value.code == "constraint_conflict"
    assert caught.value.details["cookbook"] == "base"


def test_resolution_backtracks_through_a_chain_quickly() -> None:
    # Every version of a_i but the oldest needs a_{i+1} at a version that does not exist.
    cookbooks = []
    for i in range(15):
        cookbooks.append(cb(f"a{i} 1.0.0", f"a{i + 1}" if i < 14 else "leaf"))
        for v in range(2, 8):
            cookbooks.append(cb(f"a{i} {v}.0.0", f"a{i + 1} >= 100.0" if i < 14 else "gone"))
    cookbooks.append(cb("leaf 1.0.0"))
    started = time.monotonic()
    result = resolve(["a0"], universe(*cookbooks))
    assert time.monotonic() - started < 2
    assert all(str(result[f"a{i}"].version) == "1.0.0" for i in range(15))


def test_merge_sources_custom_cookbook_replaces_every_builtin_version() -> None:
    builtin = universe(cb("apache2 1.0.0"), cb("apache2 2.0.0"), cb("nginx 1.0.0"))
    custom = universe(cb("apache2 0.5.0", source="custom"), cb("myapp 1.0.0", "apache2"))
    merged = merge_sources(builtin, custom)
    assert sorted(merged) == ["apache2", "myapp", "nginx"]
    assert [str(m.version) for m in merged["apache2"]] == ["0.5.0"]
    assert picked(resolve(["myapp"], merged)) == {"apache2": "0.5.0", "myapp": "1.0.0"}
    # The inputs are left alone.
    assert len(builtin["apache2"]) == 2


@pytest.mark.parametrize(
    ("run_list", "cookbooks", "roles"),
    [
        (["recipe[apache2::mod_ssl]"], ["apache2"], []),
        (["apache2::mod_ssl"], ["apache2"], []),
        (["apache2"], ["apache2"], []),
        (
            ["recipe[apache2]", "apache2::mod_ssl", "recipe[deploy::rails]"],
            ["apache2", "deploy"],
            [],
        ),
        (["role[webserver]", "recipe[nginx]", "role[base]"], ["nginx"], ["webserver", "base"]),
        (["recipe[opsworks_commons@1.0.0]"], ["opsworks_commons"], []),
        ([" recipe[apt] "], ["apt"], []),
        ([], [], []),
    ],
)
def test_run_list_items_map_to_cookbooks_and_roles(
    run_list: list[str], cookbooks: list[str], roles: list[str]
) -> None:
    assert cookbooks_in_run_list(run_list) == cookbooks
    assert roles_in_run_list(run_list) == roles


def test_pinned_recipe_becomes_an_exact_constraint() -> None:
    requirements = run_list_requirements(["recipe[apt@2.6]", "nginx::default", "nginx"])
    assert requirements == [("apt", Constraint.parse("= 2.6")), "nginx"]
    available = universe(cb("apt 2.6.0"), cb("apt 7.0.0"), cb("nginx 1.0.0"))
    assert picked(resolve(requirements, available)) == {"apt": "2.6.0", "nginx": "1.0.0"}


@pytest.mark.parametrize("item", ["recipe[]", "recipe[apache2", "foo[bar]", "", "::mod_ssl", "a b"])
def test_malformed_run_list_items_are_refused(item: str) -> None:
    with pytest.raises(ResolutionError) as caught:
        cookbooks_in_run_list([item])
    assert caught.value.code == "invalid_run_list_item"


def test_conflict_between_every_pair_of_siblings_is_reported_on_the_shared_cookbook() -> None:
    # Any b needs openssl >= 2, any c needs openssl < 2: no choice of versions can work, and
    # the search has to try b x c before it knows. It stays bounded and names openssl.
    cookbooks = [cb(f"app {v}.0.0", "b", "c") for v in range(1, 4)]
    cookbooks += [cb(f"b {v}.0.0", "openssl >= 2.0") for v in range(1, 11)]
    cookbooks += [cb(f"c {v}.0.0", "openssl < 2.0") for v in range(1, 11)]
    cookbooks += [cb("openssl 1.0.0"), cb("openssl 2.0.0")]
    started = time.monotonic()
    with pytest.raises(ResolutionError) as caught:
        resolve(["app"], universe(*cookbooks))
    assert time.monotonic() - started < 2
    assert caught.value.code == "constraint_conflict"
    assert caught.value.details["cookbook"] == "openssl"
    constraints = {c["constraint"] for c in caught.value.details["constraints"]}
    assert constraints == {">= 2.0", "< 2.0"}
