"""Attribute merging: Chef-style deep merge and the node-JSON precedence order."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from chef_bridge.attributes import deep_merge, merge_precedence

MERGE_CASES: list[tuple[str, list[dict[str, Any] | None], dict[str, Any]]] = [
    ("no levels give an empty hash", [], {}),
    ("one level is returned as is", [{"a": 1}], {"a": 1}),
    ("disjoint keys are united", [{"a": 1}, {"b": 2}], {"a": 1, "b": 2}),
    ("a higher scalar replaces a lower one", [{"a": 1}, {"a": 2}], {"a": 2}),
    (
        "hashes merge recursively",
        [{"a": {"x": 1, "y": {"p": 1}}}, {"a": {"y": {"q": 2}, "z": 3}}],
        {"a": {"x": 1, "y": {"p": 1, "q": 2}, "z": 3}},
    ),
    ("a higher array replaces a lower one", [{"a": [1, 2, 3]}, {"a": [4]}], {"a": [4]}),
    ("an empty higher array empties the list", [{"a": [1, 2]}, {"a": []}], {"a": []}),
    ("a higher null replaces a value", [{"a": {"x": 1}}, {"a": None}], {"a": None}),
    ("a higher hash replaces a lower scalar", [{"a": 1}, {"a": {"x": 1}}], {"a": {"x": 1}}),
    ("a higher scalar replaces a lower hash", [{"a": {"x": 1}}, {"a": "flat"}], {"a": "flat"}),
    ("a higher array replaces a lower hash", [{"a": {"x": 1}}, {"a": [1]}], {"a": [1]}),
    ("an empty higher hash changes nothing", [{"a": {"x": 1}}, {"a": {}}], {"a": {"x": 1}}),
    ("missing levels are skipped", [None, {"a": 1}, None, {"b": 2}], {"a": 1, "b": 2}),
    ("false is a value, not absence", [{"a": True}, {"a": False}], {"a": False}),
    (
        "three levels: the highest wins key by key",
        [{"a": {"x": 1, "y": 1, "z": 1}}, {"a": {"y": 2, "z": 2}}, {"a": {"z": 3}}],
        {"a": {"x": 1, "y": 2, "z": 3}},
    ),
    (
        "a hash reset by a scalar can be rebuilt by a higher hash",
        [{"a": {"x": 1}}, {"a": 0}, {"a": {"y": 2}}],
        {"a": {"y": 2}},
    ),
]


@pytest.mark.parametrize(
    ("levels", "expected"),
    [(levels, expected) for _, levels, expected in MERGE_CASES],
    ids=[name for name, _, _ in MERGE_CASES],
)
def test_deep_merge(levels: list[dict[str, Any] | None], expected: dict[str, Any]) -> None:
    assert deep_merge(*levels) == expected


@pytest.mark.parametrize(
    "levels",
    [levels for _, levels, _ in MERGE_CASES],
    ids=[name for name, _, _ in MERGE_CASES],
)
def test_deep_merge_never_mutates_its_inputs(levels: list[dict[str, Any] | None]) -> None:
    before = copy.deepcopy(levels)
    deep_merge(*levels)
    assert levels == before


def test_deep_merge_shares_untouched_subtrees_instead_of_copying_them() -> None:
    big = {"cluster": {"layers": {"web": {"instances": {"web1": {}}}}}, "x": {"y": 1}}
    merged = deep_merge(big, {"x": {"z": 2}})
    assert merged["cluster"] is big["cluster"]
    assert merged["x"] is not big["x"]
    assert big["x"] == {"y": 1}


def test_deep_merge_result_top_level_is_a_new_dict() -> None:
    level = {"a": 1}
    merged = deep_merge(level)
    merged["b"] = 2
    assert level == {"a": 1}


def test_merge_precedence_orders_all_five_levels() -> None:
    # Each level sets `winner` and its own key; `seen_by` keys prove every level contributes.
    defaults = {"app": {"winner": "defaults", "d": 1, "port": 80}, "list": [1]}
    stack = {"app": {"winner": "stack", "s": 1, "port": 8080}}
    layer_a = {"app": {"winner": "layer_a", "la": 1, "port": 8081}, "list": [2]}
    layer_b = {"app": {"winner": "layer_b", "lb": 1}}
    instance = {"app": {"winner": "instance", "i": 1}}
    deployment = {"app": {"winner": "deployment", "dep": 1}}
    merged = merge_precedence(defaults, stack, [layer_a, layer_b], instance, deployment)
    assert merged == {
        "app": {
            "winner": "deployment",
            "d": 1,
            "s": 1,
            "la": 1,
            "lb": 1,
            "i": 1,
            "dep": 1,
            "port": 8081,
        },
        "list": [2],
    }


FALLBACK_CASES = [
    ("deployment", dict(deployment=None), "instance"),
    ("instance and deployment", dict(instance=None, deployment=None), "layer_b"),
    ("layers and above", dict(layers=[], instance=None, deployment=None), "stack"),
    ("all but defaults", dict(stack=None, layers=[], instance=None, deployment=None), "defaults"),
    ("only the layers", dict(layers=[{"w": "layer_a"}], deployment=None, instance=None), "layer_a"),
]


@pytest.mark.parametrize(
    ("removed", "winner"),
    [(removed, winner) for _, removed, winner in FALLBACK_CASES],
    ids=[name for name, _, _ in FALLBACK_CASES],
)
def test_merge_precedence_falls_back_to_the_next_lower_level(
    removed: dict[str, Any], winner: str
) -> None:
    levels: dict[str, Any] = {
        "defaults": {"w": "defaults"},
        "stack": {"w": "stack"},
        "layers": [{"w": "layer_a"}, {"w": "layer_b"}],
        "instance": {"w": "instance"},
        "deployment": {"w": "deployment"},
    }
    assert merge_precedence(**{**levels, **removed})["w"] == winner


def test_layer_levels_apply_in_the_order_given() -> None:
    merged = merge_precedence(None, None, [{"w": "first"}, {"w": "second"}], None, None)
    assert merged == {"w": "second"}
