"""Attribute merging for node JSON: Chef-style deep merge across precedence levels.

Precedence, lowest first (DESIGN.md "Node JSON"): built-in defaults < stack custom JSON <
layer custom JSON (in layer order) < instance attributes < deployment custom JSON.

Merging is *structural sharing*, not copying: a nested value that only one level supplies is
placed in the result by reference. That is what keeps one node JSON per instance cheap when the
lowest level holds the whole cluster picture. Inputs are never mutated; callers must treat the
result as read-only too (serialise it, or ``copy.deepcopy`` it before editing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def deep_merge(*levels: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge attribute levels, lowest precedence first; hashes merge, anything else replaces."""
    return _merge_all([level for level in levels if level])


def merge_precedence(
    defaults: Mapping[str, Any] | None,
    stack: Mapping[str, Any] | None,
    layers: Iterable[Mapping[str, Any] | None],
    instance: Mapping[str, Any] | None,
    deployment: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Merge the five node-JSON levels in DESIGN.md order (layers in layer order)."""
    return deep_merge(defaults, stack, *layers, instance, deployment)


def _merge_all(levels: list[Mapping[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = dict(levels[0]) if levels else {}
    for level in levels[1:]:
        result = _merge_two(result, level)
    return result


def _merge_two(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: `top` over `base`; only the paths `top` touches are copied."""
    result = dict(base)
    for key, value in top.items():
        current = result.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            result[key] = _merge_two(current, value)
        else:
            # Scalars, arrays and null replace: an operator can reset a list or unset a value.
            result[key] = value
    return result
