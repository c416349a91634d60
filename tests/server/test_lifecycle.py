"""The instance and command state machines (server/lifecycle.py), table-driven, no I/O."""

from __future__ import annotations

from collections import deque

import pytest

from server.lifecycle import (
    HEARTBEAT_LIMIT_SECONDS,
    IllegalTransition,
    MachineAction,
    Outcome,
    Transition,
    Trigger,
    allowed_triggers,
    command_overdue,
    command_transition,
    health_trigger,
    heartbeat_lost,
    instance_trigger_for,
    online_set_changed,
    should_auto_heal,
    transition,
)
from server.models import CommandStatus, CommandType, InstanceState, LifecycleEvent, Provider

S = InstanceState
T = Trigger
M = MachineAction
SETUP = ("setup", "deploy")
SHUTDOWN = ("shutdown",)

# (state, trigger, new state, events run on the instance, machine action, configure the stack)
# for a provider that owns the machine (ec2, local). Written out by hand, not derived.
MACHINE_CASES = [
    (S.REQUESTED, T.START_REQUESTED, S.PENDING, (), M.START, False),
    (S.REQUESTED, T.TERMINATE_REQUESTED, S.TERMINATED, (), None, False),
    (S.PENDING, T.PROVISIONED, S.BOOTING, (), None, False),
    (S.PENDING, T.ENROLLED, S.BOOTING, (), None, False),
    (S.PENDING, T.AGENT_CONNECTED, S.RUNNING_SETUP, SETUP, None, False),
    (S.PENDING, T.BOOT_FAILED, S.START_FAILED, (), None, False),
    (S.PENDING, T.STOP_REQUESTED, S.SHUTTING_DOWN, (), M.STOP, False),
    (S.BOOTING, T.AGENT_CONNECTED, S.RUNNING_SETUP, SETUP, None, False),
    (S.BOOTING, T.BOOT_FAILED, S.START_FAILED, (), None, False),
    (S.BOOTING, T.STOP_REQUESTED, S.SHUTTING_DOWN, (), M.STOP, False),
    (S.RUNNING_SETUP, T.SETUP_SUCCEEDED, S.ONLINE, (), None, True),
    (S.RUNNING_SETUP, T.SETUP_FAILED, S.SETUP_FAILED, (), None, False),
    (S.RUNNING_SETUP, T.STOP_REQUESTED, S.STOPPING, SHUTDOWN, None, False),
    (S.ONLINE, T.SETUP_REQUESTED, S.RUNNING_SETUP, SETUP, None, True),
    (S.ONLINE, T.HEARTBEAT_LOST, S.CONNECTION_LOST, (), None, True),
    (S.ONLINE, T.MACHINE_STOPPED, S.CONNECTION_LOST, (), None, True),
    (S.ONLINE, T.STOP_REQUESTED, S.STOPPING, SHUTDOWN, None, True),
    (S.SETUP_FAILED, T.SETUP_REQUESTED, S.RUNNING_SETUP, SETUP, None, False),
    (S.SETUP_FAILED, T.STOP_REQUESTED, S.STOPPING, SHUTDOWN, None, False),
    (S.START_FAILED, T.START_REQUESTED, S.PENDING, (), M.START, False),
    (S.START_FAILED, T.STOP_REQUESTED, S.SHUTTING_DOWN, (), M.STOP, False),
    (S.START_FAILED, T.TERMINATE_REQUESTED, S.TERMINATING, (), M.TERMINATE, False),
    (S.CONNECTION_LOST, T.HEARTBEAT_RESUMED, S.ONLINE, (), None, True),
    (S.CONNECTION_LOST, T.AUTO_HEAL, S.PENDING, (), M.REPLACE, False),
    (S.CONNECTION_LOST, T.STOP_REQUESTED, S.SHUTTING_DOWN, (), M.STOP, False),
    (S.STOPPING, T.SHUTDOWN_FINISHED, S.SHUTTING_DOWN, (), M.STOP, False),
    (S.SHUTTING_DOWN, T.MACHINE_STOPPED, S.STOPPED, (), None, False),
    (S.STOPPED, T.START_REQUESTED, S.PENDING, (), M.START, False),
    (S.STOPPED, T.TERMINATE_REQUESTED, S.TERMINATING, (), M.TERMINATE, False),
    (S.TERMINATING, T.MACHINE_TERMINATED, S.TERMINATED, (), None, False),
]

# Repeats that are accepted and change nothing.
NO_OP_CASES = [
    (S.PENDING, T.START_REQUESTED),
    (S.BOOTING, T.START_REQUESTED),
    (S.RUNNING_SETUP, T.START_REQUESTED),
    (S.ONLINE, T.START_REQUESTED),
    (S.REQUESTED, T.STOP_REQUESTED),
    (S.STOPPING, T.STOP_REQUESTED),
    (S.SHUTTING_DOWN, T.STOP_REQUESTED),
    (S.STOPPED, T.STOP_REQUESTED),
    (S.TERMINATING, T.TERMINATE_REQUESTED),
    (S.TERMINATED, T.TERMINATE_REQUESTED),
    (S.BOOTING, T.PROVISIONED),
    (S.RUNNING_SETUP, T.PROVISIONED),
    (S.ONLINE, T.PROVISIONED),
    (S.BOOTING, T.ENROLLED),
    (S.CONNECTION_LOST, T.HEARTBEAT_LOST),
    (S.RUNNING_SETUP, T.HEARTBEAT_RESUMED),
    (S.ONLINE, T.HEARTBEAT_RESUMED),
    (S.SETUP_FAILED, T.HEARTBEAT_RESUMED),
    (S.STOPPING, T.HEARTBEAT_RESUMED),
    (S.SHUTTING_DOWN, T.HEARTBEAT_RESUMED),
    (S.STOPPED, T.HEARTBEAT_RESUMED),
]

# Where a manual instance differs: Scalarium never touches its machine.
MANUAL_CASES = [
    (S.REQUESTED, T.START_REQUESTED, S.PENDING),
    (S.STOPPED, T.START_REQUESTED, S.PENDING),
    (S.PENDING, T.STOP_REQUESTED, S.STOPPED),
    (S.BOOTING, T.STOP_REQUESTED, S.STOPPED),
    (S.START_FAILED, T.STOP_REQUESTED, S.STOPPED),
    (S.CONNECTION_LOST, T.STOP_REQUESTED, S.STOPPED),
    (S.STOPPING, T.SHUTDOWN_FINISHED, S.STOPPED),
    (S.STOPPED, T.TERMINATE_REQUESTED, S.TERMINATED),
    (S.START_FAILED, T.TERMINATE_REQUESTED, S.TERMINATED),
    (S.ONLINE, T.STOP_REQUESTED, S.STOPPING),
]
MANUAL_REFUSED = [
    (S.PENDING, T.PROVISIONED),
    (S.CONNECTION_LOST, T.AUTO_HEAL),
    (S.ONLINE, T.MACHINE_STOPPED),
    (S.SHUTTING_DOWN, T.MACHINE_STOPPED),
    (S.TERMINATING, T.MACHINE_TERMINATED),
]


@pytest.mark.parametrize("provider", [Provider.EC2, Provider.LOCAL])
@pytest.mark.parametrize(
    ("state", "trigger", "new", "run", "machine", "configure"),
    MACHINE_CASES,
    ids=[f"{c[0]}-{c[1]}" for c in MACHINE_CASES],
)
def test_transition_gives_state_command_machine_action_and_configure(
    provider: Provider,
    state: InstanceState,
    trigger: Trigger,
    new: InstanceState,
    run: tuple[str, ...],
    machine: MachineAction | None,
    configure: bool,
) -> None:
    result = transition(state, trigger, provider)
    assert result.state == new
    assert tuple(event.value for event in result.run) == run
    assert result.machine == machine
    assert result.triggers_configure is configure
    assert result.changed


@pytest.mark.parametrize("provider", list(Provider))
@pytest.mark.parametrize(
    ("state", "trigger"), NO_OP_CASES, ids=[f"{s}-{t}" for s, t in NO_OP_CASES]
)
def test_repeated_trigger_is_an_idempotent_no_op(
    provider: Provider, state: InstanceState, trigger: Trigger
) -> None:
    result = transition(state, trigger, provider)
    assert result == Transition(state, trigger, state)
    assert not result.changed
    assert not result.triggers_configure


def test_every_other_pair_is_illegal_for_machine_providers() -> None:
    legal = {(c[0], c[1]) for c in MACHINE_CASES} | set(NO_OP_CASES)
    for state in InstanceState:
        for trigger in Trigger:
            if (state, trigger) in legal:
                continue
            with pytest.raises(IllegalTransition) as caught:
                transition(state, trigger, Provider.EC2)
            error = caught.value
            assert (error.code, error.status) == ("illegal_transition", 409)
            assert (error.state, error.trigger) == (state, trigger)
            assert error.to_dict()["error"]["details"] == {
                "state": state.value,
                "trigger": trigger.value,
                "provider": "ec2",
            }


@pytest.mark.parametrize(("state", "trigger", "new"), MANUAL_CASES)
def test_manual_instance_skips_what_would_touch_its_machine(
    state: InstanceState, trigger: Trigger, new: InstanceState
) -> None:
    result = transition(state, trigger, Provider.MANUAL)
    assert result.state == new
    assert result.machine is None


@pytest.mark.parametrize(("state", "trigger"), MANUAL_REFUSED)
def test_manual_instance_refuses_provider_reports_and_auto_healing(
    state: InstanceState, trigger: Trigger
) -> None:
    with pytest.raises(IllegalTransition):
        transition(state, trigger, Provider.MANUAL)


def test_stopping_a_manual_instance_runs_shutdown_then_leaves_the_machine_alone() -> None:
    stop = transition(S.ONLINE, T.STOP_REQUESTED, "manual")
    done = transition(stop.state, T.SHUTDOWN_FINISHED, "manual")
    assert (stop.command, stop.triggers_configure) == (CommandType.SHUTDOWN, True)
    assert (done.state, done.machine, done.run) == (S.STOPPED, None, ())
    # Its agent keeps running after the stop: its heartbeats change nothing.
    assert not transition(S.STOPPED, T.HEARTBEAT_RESUMED, "manual").changed


def _walk(start: InstanceState, triggers: list[Trigger], provider: Provider) -> list[Transition]:
    steps = []
    state = start
    for trigger in triggers:
        step = transition(state, trigger, provider)
        steps.append(step)
        state = step.state
    return steps


def test_user_story_start_setup_online_stop_on_ec2() -> None:
    steps = _walk(
        S.REQUESTED,
        [
            T.START_REQUESTED,
            T.PROVISIONED,
            T.ENROLLED,
            T.AGENT_CONNECTED,
            T.SETUP_SUCCEEDED,
            T.STOP_REQUESTED,
            T.SHUTDOWN_FINISHED,
            T.MACHINE_STOPPED,
        ],
        Provider.EC2,
    )
    assert [s.state for s in steps] == [
        S.PENDING,
        S.BOOTING,
        S.BOOTING,
        S.RUNNING_SETUP,
        S.ONLINE,
        S.STOPPING,
        S.SHUTTING_DOWN,
        S.STOPPED,
    ]
    # Setup (ending with a deploy of the layers' apps) runs before the instance is online;
    # configure fires exactly when it joins and when it leaves; shutdown runs before the stop.
    assert [s.command for s in steps if s.command] == [CommandType.SETUP, CommandType.SHUTDOWN]
    assert steps[3].run == (LifecycleEvent.SETUP, LifecycleEvent.DEPLOY)
    assert [i for i, s in enumerate(steps) if s.triggers_configure] == [4, 5]
    assert [s.machine for s in steps if s.machine] == [M.START, M.STOP]


def test_auto_healed_instance_boots_again_and_rejoins_with_a_configure() -> None:
    steps = _walk(
        S.ONLINE,
        [T.HEARTBEAT_LOST, T.AUTO_HEAL, T.AGENT_CONNECTED, T.SETUP_SUCCEEDED],
        Provider.EC2,
    )
    assert [s.state for s in steps] == [S.CONNECTION_LOST, S.PENDING, S.RUNNING_SETUP, S.ONLINE]
    assert [s.triggers_configure for s in steps] == [True, False, False, True]
    assert steps[1].machine == M.REPLACE


def _reachable(start: InstanceState, provider: Provider) -> set[InstanceState]:
    seen = {start}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for trigger in allowed_triggers(state, provider):
            target = transition(state, trigger, provider).state
            if target not in seen:
                seen.add(target)
                queue.append(target)
    return seen


@pytest.mark.parametrize("provider", list(Provider))
def test_every_state_can_reach_terminated_and_none_is_a_trap(provider: Provider) -> None:
    for state in _reachable(S.REQUESTED, provider):
        assert S.TERMINATED in _reachable(state, provider), state


def test_every_state_is_reachable_from_requested_on_ec2_and_manual_skips_two() -> None:
    assert _reachable(S.REQUESTED, Provider.EC2) == set(InstanceState)
    assert _reachable(S.REQUESTED, Provider.MANUAL) == set(InstanceState) - {
        S.SHUTTING_DOWN,
        S.TERMINATING,
    }


def test_triggers_and_states_given_as_strings_are_accepted() -> None:
    assert transition("online", "stop_requested", "local").state == S.STOPPING
    with pytest.raises(ValueError):
        transition("online", "reboot_requested")


@pytest.mark.parametrize(
    ("old", "new", "changed"),
    [
        (S.RUNNING_SETUP, S.ONLINE, True),
        (S.ONLINE, S.STOPPING, True),
        (S.ONLINE, S.CONNECTION_LOST, True),
        (S.CONNECTION_LOST, S.ONLINE, True),
        (S.ONLINE, S.ONLINE, False),
        (S.STOPPING, S.SHUTTING_DOWN, False),
        (S.RUNNING_SETUP, S.SETUP_FAILED, False),
    ],
)
def test_online_set_changes_only_when_entering_or_leaving_online(
    old: InstanceState, new: InstanceState, changed: bool
) -> None:
    assert online_set_changed(old, new) is changed


@pytest.mark.parametrize(
    ("state", "silent", "expected"),
    [
        (S.ONLINE, 301.0, True),
        (S.ONLINE, 300.0, False),
        (S.ONLINE, 5.0, False),
        (S.ONLINE, None, True),
        (S.RUNNING_SETUP, 900.0, False),  # a stuck setup ends through its command's timeout
        (S.CONNECTION_LOST, 900.0, False),
        (S.STOPPED, 900.0, False),
    ],
)
def test_heartbeat_is_lost_only_for_a_silent_online_instance(
    state: InstanceState, silent: float | None, expected: bool
) -> None:
    assert heartbeat_lost(state, silent, HEARTBEAT_LIMIT_SECONDS) is expected


@pytest.mark.parametrize(
    ("state", "layers", "silent", "provider", "expected"),
    [
        (S.CONNECTION_LOST, [True], 400.0, Provider.EC2, True),
        (S.CONNECTION_LOST, [True, True], 400.0, Provider.LOCAL, True),
        (S.CONNECTION_LOST, [True, False], 400.0, Provider.EC2, False),  # any layer vetoes
        (S.CONNECTION_LOST, [], 400.0, Provider.EC2, False),
        (S.CONNECTION_LOST, [True], 400.0, Provider.MANUAL, False),  # not our machine
        (S.CONNECTION_LOST, [True], 10.0, Provider.EC2, False),  # it spoke again meanwhile
        (S.CONNECTION_LOST, [True], None, Provider.EC2, True),
        (S.ONLINE, [True], 400.0, Provider.EC2, False),  # first it must be declared lost
        (S.SETUP_FAILED, [True], 400.0, Provider.EC2, False),
    ],
)
def test_auto_heal_guard(
    state: InstanceState,
    layers: list[bool],
    silent: float | None,
    provider: Provider,
    expected: bool,
) -> None:
    assert should_auto_heal(state, layers, silent, 300, provider) is expected


@pytest.mark.parametrize(
    ("state", "layers", "silent", "provider", "expected"),
    [
        (S.ONLINE, [True], 10.0, Provider.EC2, None),
        (S.ONLINE, [True], 301.0, Provider.EC2, T.HEARTBEAT_LOST),
        (S.ONLINE, [False], 301.0, Provider.MANUAL, T.HEARTBEAT_LOST),
        (S.CONNECTION_LOST, [True], 400.0, Provider.EC2, T.AUTO_HEAL),
        (S.CONNECTION_LOST, [False], 400.0, Provider.EC2, None),
        (S.STOPPED, [True], 4000.0, Provider.EC2, None),
    ],
)
def test_health_check_fires_heartbeat_lost_then_auto_heal(
    state: InstanceState,
    layers: list[bool],
    silent: float,
    provider: Provider,
    expected: Trigger | None,
) -> None:
    assert health_trigger(state, layers, silent, provider=provider) == expected
    if expected is not None:
        transition(state, expected, provider)  # the fired trigger is always legal


@pytest.mark.parametrize(
    ("command", "status", "expected"),
    [
        (CommandType.SETUP, CommandStatus.SUCCESSFUL, T.SETUP_SUCCEEDED),
        (CommandType.SETUP, CommandStatus.FAILED, T.SETUP_FAILED),
        (CommandType.SETUP, CommandStatus.TIMED_OUT, T.SETUP_FAILED),
        (CommandType.SETUP, CommandStatus.RUNNING, None),
        (CommandType.SHUTDOWN, CommandStatus.SUCCESSFUL, T.SHUTDOWN_FINISHED),
        (CommandType.SHUTDOWN, CommandStatus.FAILED, T.SHUTDOWN_FINISHED),
        (CommandType.SHUTDOWN, CommandStatus.TIMED_OUT, T.SHUTDOWN_FINISHED),
        (CommandType.SHUTDOWN, CommandStatus.QUEUED, None),
        (CommandType.CONFIGURE, CommandStatus.FAILED, None),
        (CommandType.DEPLOY, CommandStatus.SUCCESSFUL, None),
    ],
)
def test_finished_setup_and_shutdown_commands_report_to_their_instance(
    command: CommandType, status: CommandStatus, expected: Trigger | None
) -> None:
    assert instance_trigger_for(command, status) == expected


# --- commands -------------------------------------------------------------------------------

Q, R, OK, F, SUP, TO = (
    CommandStatus.QUEUED,
    CommandStatus.RUNNING,
    CommandStatus.SUCCESSFUL,
    CommandStatus.FAILED,
    CommandStatus.SUPERSEDED,
    CommandStatus.TIMED_OUT,
)
A, DUP, STALE, REJ = Outcome.APPLIED, Outcome.DUPLICATE, Outcome.STALE, Outcome.REJECTED

# status -> {trigger: (new status, outcome, code)}: all 36 pairs, written out.
COMMAND_TABLE: dict[CommandStatus, dict[str, tuple[CommandStatus, Outcome, str | None]]] = {
    Q: {
        "started": (R, A, None),
        "finished_ok": (OK, A, None),  # the start report was lost, the run happened
        "finished_failed": (F, A, None),
        "interrupted": (F, A, None),
        "timed_out": (TO, A, None),
        "superseded": (SUP, A, None),
    },
    R: {
        "started": (R, DUP, None),
        "finished_ok": (OK, A, None),
        "finished_failed": (F, A, None),
        "interrupted": (F, A, None),
        "timed_out": (TO, A, None),
        "superseded": (R, STALE, None),  # it started first: it runs to completion
    },
    OK: {
        "started": (OK, REJ, "command_finished"),
        "finished_ok": (OK, DUP, None),
        "finished_failed": (OK, REJ, "conflicting_result"),
        "interrupted": (OK, STALE, None),
        "timed_out": (OK, STALE, None),
        "superseded": (OK, STALE, None),
    },
    F: {
        "started": (F, REJ, "command_finished"),
        "finished_ok": (F, REJ, "conflicting_result"),
        "finished_failed": (F, DUP, None),
        "interrupted": (F, DUP, None),
        "timed_out": (F, STALE, None),
        "superseded": (F, STALE, None),
    },
    SUP: {
        "started": (SUP, REJ, "command_finished"),
        "finished_ok": (SUP, STALE, None),
        "finished_failed": (SUP, STALE, None),
        "interrupted": (SUP, STALE, None),
        "timed_out": (SUP, STALE, None),
        "superseded": (SUP, DUP, None),
    },
    TO: {
        "started": (TO, REJ, "command_finished"),
        "finished_ok": (TO, STALE, None),  # a late finish must not resurrect it
        "finished_failed": (TO, STALE, None),
        "interrupted": (TO, STALE, None),
        "timed_out": (TO, DUP, None),
        "superseded": (TO, STALE, None),
    },
}
COMMAND_CASES = [
    (status, trigger, *expected)
    for status, row in COMMAND_TABLE.items()
    for trigger, expected in row.items()
]


def test_command_table_covers_every_status_and_trigger() -> None:
    assert len(COMMAND_CASES) == len(CommandStatus) * 6


@pytest.mark.parametrize(
    ("status", "trigger", "new", "outcome", "code"),
    COMMAND_CASES,
    ids=[f"{c[0]}-{c[1]}" for c in COMMAND_CASES],
)
def test_command_transition(
    status: CommandStatus, trigger: str, new: CommandStatus, outcome: Outcome, code: str | None
) -> None:
    decision = command_transition(status, trigger)
    assert (decision.status, decision.outcome, decision.code) == (new, outcome, code)
    assert decision.changed is (outcome == A)


def test_finished_commands_never_change_whatever_arrives_in_whatever_order() -> None:
    finished = [OK, F, SUP, TO]
    for status in finished:
        state = status
        for trigger in ["started", "finished_ok", "interrupted", "timed_out", "superseded"] * 2:
            state = command_transition(state, trigger).status
        assert state == status


@pytest.mark.parametrize(
    ("status", "created", "started", "timeout", "expected"),
    [
        (R, 500.0, 130.0, 120, True),
        (R, 500.0, 100.0, 120, False),
        (R, 500.0, None, 120, True),  # start report lost: counted from creation
        (Q, 121.0, None, 120, True),
        (Q, 60.0, None, 120, False),
        (OK, 9999.0, 9999.0, 120, False),
        (TO, 9999.0, 9999.0, 120, False),
    ],
)
def test_command_overdue(
    status: CommandStatus, created: float, started: float | None, timeout: int, expected: bool
) -> None:
    assert command_overdue(status, created, started, timeout) is expected
