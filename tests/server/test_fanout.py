"""Configure coalescing (server/fanout.py): plan cases, next-to-run cases, burst simulations."""

from __future__ import annotations

import pytest

from server.fanout import (
    ConfigureRef,
    FanoutPlan,
    InstanceConfigureState,
    NewConfigure,
    NextConfigure,
    Skip,
    SkipReason,
    Supersede,
    next_to_run,
    plan_configure,
)
from tests.server.fanout_simulation import BurstConfig, simulate

Ref = ConfigureRef
State = InstanceConfigureState

# (instance state, cluster version, expected creates, supersedes, skip reason)
PLAN_CASES = [
    pytest.param(
        State("i1", online=True),
        3,
        [NewConfigure("i1", 3)],
        [],
        None,
        id="idle-never-configured-gets-one",
    ),
    pytest.param(
        State("i1", online=True, last_version=2),
        3,
        [NewConfigure("i1", 3)],
        [],
        None,
        id="idle-behind-gets-one",
    ),
    pytest.param(
        State("i1", online=True, running=Ref("c1", 2), last_version=2),
        3,
        [NewConfigure("i1", 3)],
        [],
        None,
        id="running-older-gets-one-waiting",
    ),
    pytest.param(
        State("i1", online=True, running=Ref("c1", 2), waiting=Ref("c2", 3), last_version=2),
        5,
        [NewConfigure("i1", 5)],
        [Supersede("c2", "i1", 3, 5)],
        None,
        id="newer-version-supersedes-the-waiting-one",
    ),
    pytest.param(
        State("i1", online=True, running=Ref("c1", 2), waiting=Ref("c2", 5), last_version=2),
        5,
        [],
        [],
        SkipReason.ALREADY_WAITING,
        id="same-version-twice-is-idempotent",
    ),
    pytest.param(
        State("i1", online=True, running=Ref("c1", 2), waiting=Ref("c2", 6), last_version=2),
        5,
        [],
        [],
        SkipReason.ALREADY_WAITING,
        id="late-job-for-an-older-version-does-nothing",
    ),
    pytest.param(
        State("i1", online=True, running=Ref("c1", 5), last_version=5),
        5,
        [],
        [],
        SkipReason.UP_TO_DATE,
        id="running-this-version",
    ),
    pytest.param(
        State("i1", online=True, last_version=7),
        5,
        [],
        [],
        SkipReason.UP_TO_DATE,
        id="already-ran-a-newer-version",
    ),
    pytest.param(
        State("i1", online=True, running=Ref("c1", 4), last_version=None),
        3,
        [],
        [],
        SkipReason.UP_TO_DATE,
        id="running-counts-even-without-last-version",
    ),
    pytest.param(
        State("i1", online=True, running=Ref("c1", 4), waiting=Ref("c2", 4), last_version=4),
        6,
        [NewConfigure("i1", 6)],
        [Supersede("c2", "i1", 4, 4)],
        None,
        id="stale-waiting-one-is-retired-never-run",
    ),
    pytest.param(
        State("i1", online=True, waiting=Ref("c2", 3), last_version=4),
        4,
        [],
        [Supersede("c2", "i1", 3, 4)],
        SkipReason.UP_TO_DATE,
        id="stale-waiting-one-retired-and-nothing-new",
    ),
    pytest.param(
        State("i1", online=False, running=Ref("c1", 2), waiting=Ref("c2", 3), last_version=2),
        4,
        [],
        [Supersede("c2", "i1", 3, 4)],
        SkipReason.OFFLINE,
        id="left-online-its-waiting-one-is-superseded",
    ),
    pytest.param(
        State("i1", online=False, last_version=1),
        4,
        [],
        [],
        SkipReason.OFFLINE,
        id="offline-gets-nothing",
    ),
]


@pytest.mark.parametrize(("state", "version", "create", "supersede", "skip"), PLAN_CASES)
def test_plan_for_one_instance(
    state: State,
    version: int,
    create: list[NewConfigure],
    supersede: list[Supersede],
    skip: SkipReason | None,
) -> None:
    plan = plan_configure(version, [state])
    assert list(plan.create) == create
    assert list(plan.supersede) == supersede
    assert list(plan.skipped) == ([Skip("i1", skip)] if skip else [])
    assert plan.cluster_version == version


def _apply(plan: FanoutPlan, states: list[State]) -> list[State]:
    """What the database holds after a plan is applied (commands get ids from the version)."""
    retired = {s.command_id for s in plan.supersede}
    created = {c.instance_id: Ref(f"{c.instance_id}-v{c.version}", c.version) for c in plan.create}
    after = []
    for state in states:
        waiting = state.waiting if state.waiting and state.waiting.id not in retired else None
        waiting = created.get(state.instance_id, waiting)
        after.append(
            State(state.instance_id, state.online, state.running, waiting, state.last_version)
        )
    return after


def test_plan_covers_every_instance_and_planning_again_after_applying_is_empty() -> None:
    states = [
        State("a", online=True),
        State("b", online=True, running=Ref("b1", 1), last_version=1),
        State("c", online=True, running=Ref("c1", 1), waiting=Ref("c2", 2), last_version=1),
        State("d", online=True, last_version=3),
        State("e", online=False, waiting=Ref("e1", 2)),
    ]
    plan = plan_configure(3, list(reversed(states)))
    assert [c.instance_id for c in plan.create] == ["a", "b", "c"]
    assert [(s.command_id, s.by_version) for s in plan.supersede] == [("c2", 3), ("e1", 3)]
    assert [(s.instance_id, s.reason) for s in plan.skipped] == [
        ("d", SkipReason.UP_TO_DATE),
        ("e", SkipReason.OFFLINE),
    ]
    after = _apply(plan, states)
    # A worker that crashed after applying and is retried creates nothing new.
    assert plan_configure(3, after).empty
    assert plan_configure(2, after).empty  # nor does a late job for an older version


@pytest.mark.parametrize(
    ("last", "waiting", "expected"),
    [
        pytest.param(3, [], NextConfigure(None), id="nothing-waiting"),
        pytest.param(3, [Ref("c5", 5)], NextConfigure(Ref("c5", 5)), id="one-newer"),
        pytest.param(None, [Ref("c1", 1)], NextConfigure(Ref("c1", 1)), id="first-ever"),
        pytest.param(
            5,
            [Ref("c4", 4)],
            NextConfigure(None, (Supersede("c4", "i1", 4, 5),)),
            id="older-than-last-is-retired-not-run",
        ),
        pytest.param(
            5,
            [Ref("c5", 5)],
            NextConfigure(None, (Supersede("c5", "i1", 5, 5),)),
            id="same-as-last-is-retired-not-run",
        ),
        pytest.param(
            2,
            [Ref("c7", 7), Ref("c4", 4), Ref("c1", 1)],
            NextConfigure(Ref("c7", 7), (Supersede("c1", "i1", 1, 7), Supersede("c4", "i1", 4, 7))),
            id="after-a-race-the-newest-runs-the-rest-are-superseded",
        ),
        pytest.param(
            2,
            [Ref("z", 6), Ref("a", 6)],
            NextConfigure(Ref("a", 6), (Supersede("z", "i1", 6, 6),)),
            id="duplicates-of-one-version-lowest-id-wins",
        ),
    ],
)
def test_next_to_run_never_goes_back_in_version(
    last: int | None, waiting: list[ConfigureRef], expected: NextConfigure
) -> None:
    assert next_to_run("i1", last, waiting) == expected


# --- burst simulations ----------------------------------------------------------------------

SEEDS = range(6)


def _assert_converged(result_violations: list[str]) -> None:
    assert result_violations == []


@pytest.mark.parametrize("seed", SEEDS)
def test_burst_within_one_run_costs_each_instance_at_most_three_configures(seed: int) -> None:
    # 100 changes land within 4 s, while 50 instances are mid-way through configure runs that
    # take 5-20 s each, and a fifth of the fan-out jobs crash part-way and are retried.
    config = BurstConfig(
        existing=50,
        joins=90,
        leaves=10,
        window=4.0,
        busy_at_start=True,
        crash_probability=0.2,
    )
    result = simulate(config, seed)
    _assert_converged(result.violations)
    assert result.cluster_version == 100
    assert max(result.runs(existing=True)) <= 3
    assert max(result.runs(existing=False)) <= 3
    assert result.retries_that_created == 0
    # Coalescing happened, and every dropped configure is on record as superseded.
    assert result.superseded > 0
    runs = sum(result.runs(existing=True)) + sum(result.runs(existing=False))
    busy_at_start = config.existing  # the runs under way at t=0 are rows too
    assert result.created == busy_at_start + runs + result.superseded
    assert {c.status for c in result.commands} <= {"successful", "superseded"}
    assert all(c.superseded_by is not None for c in result.commands if c.status == "superseded")


@pytest.mark.parametrize("seed", SEEDS)
def test_every_online_instance_ends_on_the_latest_version_with_increasing_versions(
    seed: int,
) -> None:
    # The benchmark's scenario (100 join within 10 s a stack of 50); the simulation itself
    # records a violation for a version run out of order, two waiting configures on one
    # instance, an unfinished command, or an instance that did not end on the latest version.
    result = simulate(BurstConfig(crash_probability=0.1), seed)
    _assert_converged(result.violations)
    for instance in result.instances.values():
        runs = instance.versions_run
        assert runs == sorted(set(runs))
        assert runs[-1] == result.cluster_version
    assert max(result.runs(existing=True)) <= 4


def test_one_pending_fanout_job_per_stack_cuts_jobs_and_commands_not_freshness() -> None:
    per_change = simulate(BurstConfig(), 3)
    one_pending = simulate(BurstConfig(one_pending_job=True), 3)
    _assert_converged(one_pending.violations)
    assert per_change.fanout_jobs == 100
    assert one_pending.fanout_jobs < per_change.fanout_jobs / 2
    assert one_pending.created < per_change.created
    assert max(one_pending.runs(existing=True)) <= 3


def test_simulation_is_reproducible_from_its_seed() -> None:
    first = simulate(BurstConfig(existing=10, joins=20, crash_probability=0.3), 7).summary()
    again = simulate(BurstConfig(existing=10, joins=20, crash_probability=0.3), 7).summary()
    assert first == again


def test_without_coalescing_the_same_burst_would_cost_one_run_per_change() -> None:
    # Guard against a vacuous simulation: slow fan-out after every change (each job lands after
    # the previous run ended) must give every instance one run per change.
    config = BurstConfig(
        existing=5, joins=5, window=0.001, run_seconds=(0.1, 0.1), fanout_delay=(0, 0)
    )
    spaced = simulate(config, 1)
    _assert_converged(spaced.violations)
    assert max(spaced.runs(existing=True)) <= 2
    slow = BurstConfig(existing=5, joins=5, window=50.0, run_seconds=(0.1, 0.1))
    spread = simulate(slow, 1)
    _assert_converged(spread.violations)
    assert spread.runs(existing=True) == [5] * 5
