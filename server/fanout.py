"""Configure fan-out: which configure commands to create, supersede and start (pure decisions).

DESIGN.md "Lifecycle semantics": configure runs are coalesced. Per instance at most one configure
runs and at most one waits; a newer cluster version supersedes the waiting one (recorded as
`superseded`, never dropped); every command carries the cluster version it was computed from, and
an instance never runs a configure older than its last one.

The fan-out job reads each instance's configure state under the stack's row lock, calls
`plan_configure`, and applies one instance's supersede and create together in one transaction.
Planning again from the state the plan left behind yields an empty plan, so a job that crashed
half-way and is retried finishes the work without doubling it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigureRef:
    """A configure command as the fan-out sees it: its id and its cluster version."""

    id: str
    version: int


@dataclass(frozen=True)
class InstanceConfigureState:
    """One instance's configure commands, as read from the database."""

    instance_id: str
    online: bool
    running: ConfigureRef | None = None
    waiting: ConfigureRef | None = None
    # Highest cluster version of a configure it has run (whatever the outcome) or is running;
    # None when it never ran one.
    last_version: int | None = None

    @property
    def floor(self) -> int | None:
        """The version a new configure must exceed: the newest one run or running."""
        versions = [v for v in (self.last_version, _version(self.running)) if v is not None]
        return max(versions) if versions else None


class SkipReason(enum.StrEnum):
    """Why an instance gets no new configure command from a plan."""

    OFFLINE = "offline"  # configure runs on online instances only
    UP_TO_DATE = "up_to_date"  # it runs or ran this version or a newer one
    ALREADY_WAITING = "already_waiting"  # a waiting command carries this version or a newer one


@dataclass(frozen=True)
class NewConfigure:
    """A configure command to create (queued) on one instance."""

    instance_id: str
    version: int


@dataclass(frozen=True)
class Supersede:
    """A waiting configure command to mark `superseded`, and the version that replaced it."""

    command_id: str
    instance_id: str
    version: int
    by_version: int


@dataclass(frozen=True)
class Skip:
    """An instance the plan leaves alone, and why."""

    instance_id: str
    reason: SkipReason


@dataclass(frozen=True)
class FanoutPlan:
    """What one fan-out for one cluster version does."""

    cluster_version: int
    create: tuple[NewConfigure, ...] = ()
    supersede: tuple[Supersede, ...] = ()
    skipped: tuple[Skip, ...] = ()

    @property
    def empty(self) -> bool:
        """True when applying the plan changes nothing."""
        return not self.create and not self.supersede


@dataclass(frozen=True)
class NextConfigure:
    """Which waiting configure an idle instance starts next, and which ones it retires."""

    run: ConfigureRef | None
    supersede: tuple[Supersede, ...] = ()


def _version(ref: ConfigureRef | None) -> int | None:
    return None if ref is None else ref.version


def plan_instance(cluster_version: int, state: InstanceConfigureState) -> FanoutPlan:
    """The fan-out plan for one instance (see plan_configure)."""
    waiting = state.waiting
    floor = state.floor
    supersede: list[Supersede] = []
    if waiting is not None and not state.online:
        # An instance that left `online` (stopping, re-running setup, lost) has no use for the
        # picture it was waiting for; the next fan-out after it returns brings a fresh one.
        supersede.append(Supersede(waiting.id, state.instance_id, waiting.version, cluster_version))
        waiting = None
    elif waiting is not None and floor is not None and waiting.version <= floor:
        # Never run an older picture than the last one: such a command can only be retired.
        supersede.append(Supersede(waiting.id, state.instance_id, waiting.version, floor))
        waiting = None
    if not state.online:
        return FanoutPlan(
            cluster_version, (), tuple(supersede), (Skip(state.instance_id, SkipReason.OFFLINE),)
        )
    if waiting is not None and waiting.version >= cluster_version:
        skip = Skip(state.instance_id, SkipReason.ALREADY_WAITING)
        return FanoutPlan(cluster_version, (), tuple(supersede), (skip,))
    if waiting is None and floor is not None and floor >= cluster_version:
        skip = Skip(state.instance_id, SkipReason.UP_TO_DATE)
        return FanoutPlan(cluster_version, (), tuple(supersede), (skip,))
    if waiting is not None:
        supersede.append(Supersede(waiting.id, state.instance_id, waiting.version, cluster_version))
    create = (NewConfigure(state.instance_id, cluster_version),)
    return FanoutPlan(cluster_version, create, tuple(supersede))


def plan_configure(cluster_version: int, instances: Sequence[InstanceConfigureState]) -> FanoutPlan:
    """Which configure commands one fan-out creates, supersedes and skips, per instance."""
    create: list[NewConfigure] = []
    supersede: list[Supersede] = []
    skipped: list[Skip] = []
    for state in sorted(instances, key=lambda s: s.instance_id):
        one = plan_instance(cluster_version, state)
        create.extend(one.create)
        supersede.extend(one.supersede)
        skipped.extend(one.skipped)
    return FanoutPlan(cluster_version, tuple(create), tuple(supersede), tuple(skipped))


def next_to_run(
    instance_id: str, last_version: int | None, waiting: Sequence[ConfigureRef]
) -> NextConfigure:
    """The configure an idle instance starts next: the newest newer than its last, if any.

    Normally at most one is waiting; should races leave several, the newest runs and the rest
    are superseded by it, and any that is not newer than the last one run is superseded too.
    """
    newer = [ref for ref in waiting if last_version is None or ref.version > last_version]
    # Equal versions are duplicates: the lowest id wins so every caller picks the same one.
    run = min(newer, key=lambda ref: (-ref.version, ref.id), default=None)
    by = run.version if run is not None else last_version
    retired = tuple(
        Supersede(ref.id, instance_id, ref.version, by if by is not None else ref.version)
        for ref in sorted(waiting, key=lambda ref: (ref.version, ref.id))
        if ref != run
    )
    return NextConfigure(run, retired)
