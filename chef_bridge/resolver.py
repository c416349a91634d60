"""Cookbook dependency resolution: one version per cookbook for a run list's closure.

The resolver prefers the highest version of every cookbook that satisfies every constraint on
it, and backtracks when a choice leads nowhere (the newest ``A`` needs a ``B`` nobody has, but an
older ``A`` does not). It decides the most constrained cookbook first, checks each choice against
the constraints already known (forward checking) and remembers the sets of choices that failed,
so the search stays small on real cookbook graphs. Circular dependencies, which Chef allows, are
fine: a cookbook is decided once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chef_bridge.metadata import CookbookMetadata
from chef_bridge.versions import Constraint, CookbookError, Version, parse_constraint

RUN_LIST = "run list"
OVERRIDES = "overrides"
# A guard against pathological inputs; real stacks need a few dozen steps.
MAX_STEPS = 100_000


class ResolutionError(CookbookError):
    """No set of cookbook versions satisfies the run list (or the run list is malformed)."""

    code = "constraint_conflict"


RunListCookbook = str | tuple[str, Constraint | str]


@dataclass(frozen=True)
class _Demand:
    """One constraint on a cookbook and who asked for it ("run list", "overrides", "a 1.0.0")."""

    constraint: Constraint
    requested_by: str


@dataclass(frozen=True)
class _Failure:
    depth: int
    error: ResolutionError


def merge_sources(
    builtin: Mapping[str, Sequence[CookbookMetadata]],
    custom: Mapping[str, Sequence[CookbookMetadata]],
) -> dict[str, list[CookbookMetadata]]:
    """Combine built-in and custom cookbooks; a custom cookbook replaces every built-in version."""
    merged = {name: list(versions) for name, versions in builtin.items() if name not in custom}
    merged.update({name: list(versions) for name, versions in custom.items()})
    return merged


_QUALIFIED_RECIPE = re.compile(r"recipe\[([^\]@]+)(?:@(\d+\.\d+(?:\.\d+)?))?\]")
_QUALIFIED_ROLE = re.compile(r"role\[([^\]]+)\]")
_UNQUALIFIED_RECIPE = re.compile(r"([^\[\]@\s]+)(?:@(\d+\.\d+(?:\.\d+)?))?")


def _parse_run_list_item(item: str) -> tuple[str, str, str | None]:
    """Return ("recipe" | "role", name, pinned version or None), as Chef's RunListItem reads it."""
    text = item.strip()
    role = _QUALIFIED_ROLE.fullmatch(text)
    if role:
        return "role", role.group(1), None
    recipe = _QUALIFIED_RECIPE.fullmatch(text) or _UNQUALIFIED_RECIPE.fullmatch(text)
    if recipe is None or not recipe.group(1).split("::")[0]:
        raise ResolutionError(
            f"run list item {item!r} is neither recipe[...], role[...] nor cookbook::recipe",
            code="invalid_run_list_item",
            details={"item": item},
        )
    return "recipe", recipe.group(1), recipe.group(2)


def run_list_requirements(run_list: Sequence[str]) -> list[RunListCookbook]:
    """Cookbooks a run list needs, with a ``= x.y.z`` pin for ``recipe[name@x.y.z]``; no roles."""
    needed: list[RunListCookbook] = []
    seen: set[RunListCookbook] = set()
    for item in run_list:
        kind, name, pinned = _parse_run_list_item(item)
        if kind == "role":
            continue
        cookbook = name.split("::")[0]
        requirement: RunListCookbook = (
            (cookbook, Constraint.parse(f"= {pinned}")) if pinned else cookbook
        )
        if requirement not in seen:
            seen.add(requirement)
            needed.append(requirement)
    return needed


def cookbooks_in_run_list(run_list: Sequence[str]) -> list[str]:
    """Cookbook names of a run list's recipes, in order, once each.

    ``recipe[apache2::mod_ssl]``, ``apache2::mod_ssl`` and ``apache2`` all name ``apache2``.
    Roles (``role[x]``) are skipped: expanding them needs the role's own run list, which is
    not here; use ``roles_in_run_list`` to get them.
    """
    names: list[str] = []
    for requirement in run_list_requirements(run_list):
        name = requirement if isinstance(requirement, str) else requirement[0]
        if name not in names:
            names.append(name)
    return names


def roles_in_run_list(run_list: Sequence[str]) -> list[str]:
    """Role names of a run list (``role[webserver]`` -> ``webserver``), in order, once each."""
    roles: list[str] = []
    for item in run_list:
        kind, name, _ = _parse_run_list_item(item)
        if kind == "role" and name not in roles:
            roles.append(name)
    return roles


def resolve(
    run_list_cookbooks: Iterable[RunListCookbook],
    available: Mapping[str, Sequence[CookbookMetadata]],
    overrides: Mapping[str, Constraint | str] | None = None,
) -> dict[str, CookbookMetadata]:
    """Pick one version of every cookbook the run list needs, newest first, or raise.

    ``overrides`` are extra constraints, like a Chef environment's ``cookbook_versions``: they
    bind a cookbook only if something needs it. The result maps cookbook name to the chosen
    metadata, sorted by name. Raises ResolutionError with code ``cookbook_missing`` (a cookbook
    nobody has, and who asked for it) or ``constraint_conflict`` (the constraints on one
    cookbook and who asked for each); ``details`` carries the same as data.
    """
    search = _Search(available, overrides or {})
    roots: list[str] = []
    demands: dict[str, tuple[_Demand, ...]] = {}
    for item in run_list_cookbooks:
        if isinstance(item, str):
            name, constraint = item, Constraint.any()
        else:
            name, constraint = item[0], parse_constraint(item[1])
        if name not in roots:
            roots.append(name)
        demands[name] = (*demands.get(name, ()), _Demand(constraint, RUN_LIST))
    for name, constraint in search.overrides.items():
        demands[name] = (*demands.get(name, ()), _Demand(constraint, OVERRIDES))
    for name in roots:
        failure = search.check(name, demands[name], None, depth=0)
        if failure is not None:
            raise failure.error
    chosen = search.run({}, demands, tuple(roots))
    if chosen is None:
        raise search.best_failure()
    return {name: chosen[name] for name in sorted(chosen)}


class _Search:
    def __init__(
        self,
        available: Mapping[str, Sequence[CookbookMetadata]],
        overrides: Mapping[str, Constraint | str],
    ) -> None:
        # Newest first, so the first solution found prefers the highest versions.
        self.available = {
            name: sorted(versions, key=lambda m: m.version, reverse=True)
            for name, versions in available.items()
        }
        self.overrides = {name: parse_constraint(c) for name, c in overrides.items()}
        self.failed: set[frozenset[tuple[str, Version]]] = set()
        self.failure: _Failure | None = None
        self.steps = 0

    def candidates(self, name: str, demands: Sequence[_Demand]) -> list[CookbookMetadata]:
        return [
            m
            for m in self.available.get(name, ())
            if all(d.constraint.satisfied_by(m.version) for d in demands)
        ]

    def check(
        self,
        name: str,
        demands: Sequence[_Demand],
        chosen: CookbookMetadata | None,
        depth: int,
    ) -> _Failure | None:
        """Return why ``name`` can no longer be satisfied, or None if it still can."""
        if chosen is not None:
            if all(d.constraint.satisfied_by(chosen.version) for d in demands):
                return None
        elif self.candidates(name, demands):
            return None
        failure = _Failure(depth, self.explain(name, demands, chosen))
        # The failure that got deepest into the search is the most useful one to report:
        # it is the one closest to a working set of versions.
        if self.failure is None or failure.depth > self.failure.depth:
            self.failure = failure
        return failure

    def explain(
        self, name: str, demands: Sequence[_Demand], chosen: CookbookMetadata | None
    ) -> ResolutionError:
        requesters = sorted({d.requested_by for d in demands if d.requested_by != OVERRIDES})
        if name not in self.available or not self.available[name]:
            return ResolutionError(
                f"cookbook {name} is not available (needed by {', '.join(requesters)})",
                code="cookbook_missing",
                details={"cookbook": name, "requested_by": requesters},
            )
        constraints: list[dict[str, Any]] = [
            {"constraint": str(d.constraint), "requested_by": d.requested_by} for d in demands
        ]
        versions = [str(m.version) for m in self.available[name]]
        wanted = "; ".join(f"{c['constraint']} from {c['requested_by']}" for c in constraints)
        details: dict[str, Any] = {
            "cookbook": name,
            "constraints": constraints,
            "available_versions": versions,
        }
        if chosen is not None:
            details["chosen_version"] = str(chosen.version)
        return ResolutionError(
            f"no version of cookbook {name} satisfies {wanted} (available: {', '.join(versions)})",
            code="constraint_conflict",
            details=details,
        )

    def best_failure(self) -> ResolutionError:
        assert self.failure is not None  # a failed search always records why
        return self.failure.error

    def run(
        self,
        chosen: dict[str, CookbookMetadata],
        demands: dict[str, tuple[_Demand, ...]],
        pending: tuple[str, ...],
    ) -> dict[str, CookbookMetadata] | None:
        """Depth-first search; ``pending`` are needed cookbooks not yet decided, in order."""
        if not pending:
            return chosen
        key = frozenset((n, m.version) for n, m in chosen.items())
        # Everything below depends only on the set of choices so far: the demands and the
        # pending list are functions of it. A set that failed once fails again.
        if key in self.failed:
            return None
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ResolutionError(
                f"dependency resolution gave up after {MAX_STEPS} steps",
                code="resolution_too_complex",
                details={"steps": MAX_STEPS},
            )
        # Most constrained first: a cookbook with one candidate left cannot be deferred.
        name = min(pending, key=lambda n: len(self.candidates(n, demands[n])))
        rest = tuple(n for n in pending if n != name)
        for candidate in self.candidates(name, demands[name]):
            result = self.choose(name, candidate, chosen, demands, rest)
            if result is not None:
                return result
        self.failed.add(key)
        return None

    def choose(
        self,
        name: str,
        candidate: CookbookMetadata,
        chosen: dict[str, CookbookMetadata],
        demands: dict[str, tuple[_Demand, ...]],
        pending: tuple[str, ...],
    ) -> dict[str, CookbookMetadata] | None:
        # ``name`` is the key in ``available``, which wins over the metadata's own name.
        now_chosen = {**chosen, name: candidate}
        now_demands = dict(demands)
        now_pending = list(pending)
        requester = f"{name} {candidate.version}"
        for dependency, constraint in candidate.dependencies.items():
            if dependency == name:
                continue  # metadata refuses self-dependencies; be safe with hand-made data
            now_demands[dependency] = (
                *now_demands.get(dependency, ()),
                _Demand(constraint, requester),
            )
            if dependency not in now_chosen and dependency not in now_pending:
                now_pending.append(dependency)
            failure = self.check(
                dependency,
                now_demands[dependency],
                now_chosen.get(dependency),
                depth=len(now_chosen),
            )
            if failure is not None:
                return None
        return self.run(now_chosen, now_demands, tuple(now_pending))
