"""The instance and command state machines, as pure decisions over plain data (no I/O).

DESIGN.md "Lifecycle semantics" is the contract. The edges (API handlers, agent endpoints, the
scheduler, provider jobs) load a row, ask this module what happens, and write the answer back
under a row lock; nothing here reads a clock, a database or Redis.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from server.errors import Conflict
from server.models import (
    FINISHED_COMMAND_STATES,
    CommandStatus,
    CommandType,
    InstanceState,
    LifecycleEvent,
    Provider,
)

S = InstanceState

# Heartbeat limit and shutdown timeout defaults (DESIGN.md; OpsWorks used the same figures).
HEARTBEAT_LIMIT_SECONDS = 300
SHUTDOWN_TIMEOUT_SECONDS = 120


class Trigger(enum.StrEnum):
    """Something that happens to an instance, whoever reports it."""

    START_REQUESTED = "start_requested"  # operator or scaling
    PROVISIONED = "provisioned"  # provider: the machine is up
    BOOT_FAILED = "boot_failed"  # provider error, or the node never enrolled in time
    ENROLLED = "enrolled"  # the node's CSR was signed
    # The agent's first signed request after a boot (the edge maps any agent request from an
    # instance in pending or booting to this; later ones are heartbeat_resumed).
    AGENT_CONNECTED = "agent_connected"
    SETUP_SUCCEEDED = "setup_succeeded"
    SETUP_FAILED = "setup_failed"  # failed, timed out or interrupted
    SETUP_REQUESTED = "setup_requested"  # operator re-runs setup (retry, or refresh an online one)
    HEARTBEAT_LOST = "heartbeat_lost"  # silent for longer than the heartbeat limit
    HEARTBEAT_RESUMED = "heartbeat_resumed"  # any signed request from the agent
    AUTO_HEAL = "auto_heal"
    STOP_REQUESTED = "stop_requested"  # operator, scaling
    SHUTDOWN_FINISHED = "shutdown_finished"  # the shutdown command ended, whatever its outcome
    MACHINE_STOPPED = "machine_stopped"  # provider: the machine is stopped
    TERMINATE_REQUESTED = "terminate_requested"
    MACHINE_TERMINATED = "machine_terminated"  # provider: the machine is gone


class MachineAction(enum.StrEnum):
    """What the provider is asked to do to the machine."""

    START = "start"
    STOP = "stop"
    TERMINATE = "terminate"
    REPLACE = "replace"  # auto-healing: stop the machine, then start it (same host name, layers)


# Triggers only a provider that owns the machine can report or act on.
MACHINE_TRIGGERS = frozenset(
    {Trigger.PROVISIONED, Trigger.MACHINE_STOPPED, Trigger.MACHINE_TERMINATED, Trigger.AUTO_HEAL}
)

# Setup ends with a deploy of every app of the instance's layers (DESIGN.md): one setup command
# whose run list is the setup recipes, then the deploy recipes, so "online" means "deployed".
SETUP_RUN: tuple[LifecycleEvent, ...] = (LifecycleEvent.SETUP, LifecycleEvent.DEPLOY)
SHUTDOWN_RUN: tuple[LifecycleEvent, ...] = (LifecycleEvent.SHUTDOWN,)

T = Trigger

# Instance transitions for providers that own the machine (ec2, local). `manual` differs only
# where the machine would be touched: see _MANUAL_SKIPS.
TRANSITIONS: Mapping[tuple[InstanceState, Trigger], InstanceState] = {
    (S.REQUESTED, T.START_REQUESTED): S.PENDING,
    (S.REQUESTED, T.TERMINATE_REQUESTED): S.TERMINATED,  # never started: nothing to remove
    (S.PENDING, T.PROVISIONED): S.BOOTING,
    (S.PENDING, T.ENROLLED): S.BOOTING,  # the node may enroll before the provider says "up"
    (S.PENDING, T.AGENT_CONNECTED): S.RUNNING_SETUP,  # a restarted machine does not re-enroll
    (S.PENDING, T.BOOT_FAILED): S.START_FAILED,
    (S.PENDING, T.STOP_REQUESTED): S.SHUTTING_DOWN,  # no agent yet: nothing to run shutdown on
    (S.BOOTING, T.AGENT_CONNECTED): S.RUNNING_SETUP,
    (S.BOOTING, T.BOOT_FAILED): S.START_FAILED,
    (S.BOOTING, T.STOP_REQUESTED): S.SHUTTING_DOWN,
    (S.RUNNING_SETUP, T.SETUP_SUCCEEDED): S.ONLINE,
    (S.RUNNING_SETUP, T.SETUP_FAILED): S.SETUP_FAILED,
    (S.RUNNING_SETUP, T.STOP_REQUESTED): S.STOPPING,
    (S.ONLINE, T.SETUP_REQUESTED): S.RUNNING_SETUP,  # setup takes an instance out of service
    (S.ONLINE, T.HEARTBEAT_LOST): S.CONNECTION_LOST,
    (S.ONLINE, T.MACHINE_STOPPED): S.CONNECTION_LOST,  # stopped outside Scalarium: a failure
    (S.ONLINE, T.STOP_REQUESTED): S.STOPPING,
    (S.SETUP_FAILED, T.SETUP_REQUESTED): S.RUNNING_SETUP,
    (S.SETUP_FAILED, T.STOP_REQUESTED): S.STOPPING,
    (S.START_FAILED, T.START_REQUESTED): S.PENDING,
    (S.START_FAILED, T.STOP_REQUESTED): S.SHUTTING_DOWN,  # a half-started machine may exist
    (S.START_FAILED, T.TERMINATE_REQUESTED): S.TERMINATING,
    (S.CONNECTION_LOST, T.HEARTBEAT_RESUMED): S.ONLINE,
    (S.CONNECTION_LOST, T.AUTO_HEAL): S.PENDING,
    (S.CONNECTION_LOST, T.STOP_REQUESTED): S.SHUTTING_DOWN,  # the agent is silent: skip shutdown
    (S.STOPPING, T.SHUTDOWN_FINISHED): S.SHUTTING_DOWN,
    (S.SHUTTING_DOWN, T.MACHINE_STOPPED): S.STOPPED,
    (S.STOPPED, T.START_REQUESTED): S.PENDING,
    (S.STOPPED, T.TERMINATE_REQUESTED): S.TERMINATING,
    (S.TERMINATING, T.MACHINE_TERMINATED): S.TERMINATED,
}

# What runs on the instance itself, per transition (one command, events in order).
RUNS: Mapping[tuple[InstanceState, Trigger], tuple[LifecycleEvent, ...]] = {
    (S.PENDING, T.AGENT_CONNECTED): SETUP_RUN,
    (S.BOOTING, T.AGENT_CONNECTED): SETUP_RUN,
    (S.ONLINE, T.SETUP_REQUESTED): SETUP_RUN,
    (S.SETUP_FAILED, T.SETUP_REQUESTED): SETUP_RUN,
    (S.RUNNING_SETUP, T.STOP_REQUESTED): SHUTDOWN_RUN,
    (S.ONLINE, T.STOP_REQUESTED): SHUTDOWN_RUN,
    (S.SETUP_FAILED, T.STOP_REQUESTED): SHUTDOWN_RUN,
}

# What the provider does to the machine, per transition (ec2, local; never for manual).
MACHINE_ACTIONS: Mapping[tuple[InstanceState, Trigger], MachineAction] = {
    (S.REQUESTED, T.START_REQUESTED): MachineAction.START,
    (S.START_FAILED, T.START_REQUESTED): MachineAction.START,
    (S.STOPPED, T.START_REQUESTED): MachineAction.START,
    (S.PENDING, T.STOP_REQUESTED): MachineAction.STOP,
    (S.BOOTING, T.STOP_REQUESTED): MachineAction.STOP,
    (S.START_FAILED, T.STOP_REQUESTED): MachineAction.STOP,
    (S.CONNECTION_LOST, T.STOP_REQUESTED): MachineAction.STOP,
    (S.STOPPING, T.SHUTDOWN_FINISHED): MachineAction.STOP,
    (S.CONNECTION_LOST, T.AUTO_HEAL): MachineAction.REPLACE,
    (S.START_FAILED, T.TERMINATE_REQUESTED): MachineAction.TERMINATE,
    (S.STOPPED, T.TERMINATE_REQUESTED): MachineAction.TERMINATE,
}

# Repeats that are normal (at-least-once delivery, double clicks, late provider reports, the
# heartbeat of a live agent): they change nothing and are not errors.
IDEMPOTENT: frozenset[tuple[InstanceState, Trigger]] = frozenset(
    {(state, T.START_REQUESTED) for state in (S.PENDING, S.BOOTING, S.RUNNING_SETUP, S.ONLINE)}
    | {(state, T.STOP_REQUESTED) for state in (S.REQUESTED, S.STOPPING, S.SHUTTING_DOWN, S.STOPPED)}
    | {(state, T.TERMINATE_REQUESTED) for state in (S.TERMINATING, S.TERMINATED)}
    | {(state, T.PROVISIONED) for state in (S.BOOTING, S.RUNNING_SETUP, S.ONLINE)}
    | {(S.BOOTING, T.ENROLLED), (S.CONNECTION_LOST, T.HEARTBEAT_LOST)}
    # A manual machine keeps its agent running after Scalarium stops it.
    | {
        (state, T.HEARTBEAT_RESUMED)
        for state in (
            S.RUNNING_SETUP,
            S.ONLINE,
            S.SETUP_FAILED,
            S.STOPPING,
            S.SHUTTING_DOWN,
            S.STOPPED,
        )
    }
)

# A manual machine is never stopped or terminated by Scalarium: the states that wait for the
# provider are skipped.
_MANUAL_SKIPS: Mapping[InstanceState, InstanceState] = {
    S.SHUTTING_DOWN: S.STOPPED,
    S.TERMINATING: S.TERMINATED,
}

# Which instance trigger a finished command of each type reports.
_SETUP_OUTCOMES: Mapping[CommandStatus, Trigger] = {
    CommandStatus.SUCCESSFUL: T.SETUP_SUCCEEDED,
    CommandStatus.FAILED: T.SETUP_FAILED,
    CommandStatus.TIMED_OUT: T.SETUP_FAILED,
}


class IllegalTransition(Conflict):
    """The trigger cannot happen to an instance in this state."""

    code = "illegal_transition"

    def __init__(self, state: InstanceState, trigger: Trigger, provider: Provider) -> None:
        super().__init__(
            f"instance in state {state.value} cannot take {trigger.value} ({provider.value})",
            details={"state": state.value, "trigger": trigger.value, "provider": provider.value},
        )
        self.state = state
        self.trigger = trigger
        self.provider = provider


@dataclass(frozen=True)
class Transition:
    """What one trigger does to one instance: its new state and what to run or ask for."""

    source: InstanceState
    trigger: Trigger
    state: InstanceState
    run: tuple[LifecycleEvent, ...] = ()
    machine: MachineAction | None = None

    @property
    def triggers_configure(self) -> bool:
        """True when the stack's online set changed, so every online instance must configure."""
        return online_set_changed(self.source, self.state)

    @property
    def changed(self) -> bool:
        """False for an idempotent repeat: nothing to write, no event to record."""
        return self.state != self.source or bool(self.run) or self.machine is not None

    @property
    def command(self) -> CommandType | None:
        """The command type to queue on this instance for `run`, if any."""
        if not self.run:
            return None
        return CommandType(self.run[0].value)


def online_set_changed(old: InstanceState, new: InstanceState) -> bool:
    """True when an instance enters or leaves `online`."""
    return (old == S.ONLINE) != (new == S.ONLINE)


def transition(
    state: InstanceState | str, trigger: Trigger | str, provider: Provider | str = Provider.EC2
) -> Transition:
    """Apply a trigger to an instance state, or raise IllegalTransition."""
    state, trigger, provider = InstanceState(state), Trigger(trigger), Provider(provider)
    manual = provider == Provider.MANUAL
    if (state, trigger) in IDEMPOTENT:
        return Transition(state, trigger, state)
    key = (state, trigger)
    if key not in TRANSITIONS or (manual and trigger in MACHINE_TRIGGERS):
        raise IllegalTransition(state, trigger, provider)
    target = TRANSITIONS[key]
    machine = MACHINE_ACTIONS.get(key)
    if manual:
        target = _MANUAL_SKIPS.get(target, target)
        machine = None
    return Transition(state, trigger, target, RUNS.get(key, ()), machine)


def allowed_triggers(
    state: InstanceState | str, provider: Provider | str = Provider.EC2
) -> frozenset[Trigger]:
    """The triggers an instance in this state accepts, repeats included (for the API and UI)."""
    allowed = set()
    for trigger in Trigger:
        try:
            transition(state, trigger, provider)
        except IllegalTransition:
            continue
        allowed.add(trigger)
    return frozenset(allowed)


def heartbeat_lost(
    state: InstanceState | str, seconds_since_heartbeat: float | None, limit: float
) -> bool:
    """True when an online instance has been silent for longer than the limit."""
    silent = seconds_since_heartbeat is None or seconds_since_heartbeat > limit
    return InstanceState(state) == S.ONLINE and silent


def should_auto_heal(
    state: InstanceState | str,
    layers_auto_healing: Iterable[bool],
    seconds_since_heartbeat: float | None,
    limit: float,
    provider: Provider | str = Provider.EC2,
) -> bool:
    """True when a lost instance may be replaced: every layer allows it and it is still silent."""
    # OpsWorks: one layer with auto-healing off is enough to leave the instance alone.
    flags = list(layers_auto_healing)
    silent = seconds_since_heartbeat is None or seconds_since_heartbeat > limit
    return (
        InstanceState(state) == S.CONNECTION_LOST
        and Provider(provider) != Provider.MANUAL
        and bool(flags)
        and all(flags)
        and silent
    )


def health_trigger(
    state: InstanceState | str,
    layers_auto_healing: Iterable[bool],
    seconds_since_heartbeat: float | None,
    limit: float = HEARTBEAT_LIMIT_SECONDS,
    provider: Provider | str = Provider.EC2,
) -> Trigger | None:
    """The trigger the scheduler's health check fires for one instance, if any."""
    if heartbeat_lost(state, seconds_since_heartbeat, limit):
        return T.HEARTBEAT_LOST
    if should_auto_heal(state, layers_auto_healing, seconds_since_heartbeat, limit, provider):
        return T.AUTO_HEAL
    return None


def instance_trigger_for(command: CommandType | str, status: CommandStatus | str) -> Trigger | None:
    """The instance trigger a command's final status reports (setup and shutdown only)."""
    command, status = CommandType(command), CommandStatus(status)
    if command == CommandType.SETUP:
        return _SETUP_OUTCOMES.get(status)
    if command == CommandType.SHUTDOWN and status in FINISHED_COMMAND_STATES:
        # Shutdown has a deadline, not a veto: the machine stops whatever the recipes did.
        return T.SHUTDOWN_FINISHED
    return None


# --- commands -------------------------------------------------------------------------------


class CommandTrigger(enum.StrEnum):
    """Something that happens to a command: reported by the agent or decided by the server."""

    STARTED = "started"  # agent: POST .../start
    FINISHED_OK = "finished_ok"  # agent: POST .../finish, exit status 0
    FINISHED_FAILED = "finished_failed"  # agent: POST .../finish, non-zero exit status
    INTERRUPTED = "interrupted"  # agent: restarted while the command ran
    TIMED_OUT = "timed_out"  # scheduler: past its timeout
    SUPERSEDED = "superseded"  # fan-out: a newer configure replaces this waiting one


AGENT_COMMAND_TRIGGERS = frozenset(
    {
        CommandTrigger.STARTED,
        CommandTrigger.FINISHED_OK,
        CommandTrigger.FINISHED_FAILED,
        CommandTrigger.INTERRUPTED,
    }
)


class Outcome(enum.StrEnum):
    """How a command trigger was taken."""

    APPLIED = "applied"  # the status changed
    DUPLICATE = "duplicate"  # the same news again: a no-op, answer as if applied
    STALE = "stale"  # lost a race to another final outcome: a no-op, the first outcome wins
    REJECTED = "rejected"  # a no-op the sender must hear about: `code` says why


@dataclass(frozen=True)
class CommandDecision:
    """The status a command has after a trigger, and how the trigger was taken."""

    status: CommandStatus
    outcome: Outcome
    code: str | None = None

    @property
    def changed(self) -> bool:
        """True when the status must be written."""
        return self.outcome == Outcome.APPLIED


C = CommandStatus
CT = CommandTrigger

# Where each trigger leads from an unfinished command. A finish without a start is accepted: the
# start report may be lost while the run itself happened.
_COMMAND_MOVES: Mapping[CommandTrigger, CommandStatus] = {
    CT.STARTED: C.RUNNING,
    CT.FINISHED_OK: C.SUCCESSFUL,
    CT.FINISHED_FAILED: C.FAILED,
    CT.INTERRUPTED: C.FAILED,
    CT.TIMED_OUT: C.TIMED_OUT,
    CT.SUPERSEDED: C.SUPERSEDED,
}


def command_transition(
    status: CommandStatus | str, trigger: CommandTrigger | str
) -> CommandDecision:
    """Apply a trigger to a command status; every pair has an answer, nothing raises.

    Finished states are final. Delivery is at least once and the scheduler races the agent, so:
    - the same news twice is a DUPLICATE (start on running, a finish matching the recorded
      status, timed_out on timed_out, superseded on superseded);
    - news that lost a race is STALE (a late finish on timed_out or superseded, timed_out or
      superseded after the command finished, interrupted after a recorded finish, superseded
      on a command that started first: it runs to completion);
    - REJECTED, with a code, where the sender must change course: `started` on a finished
      command (`command_finished`: the agent must not run it) and an agent finish that
      contradicts the one already recorded (`conflicting_result`).
    """
    status, trigger = CommandStatus(status), CommandTrigger(trigger)
    if status == C.QUEUED:
        return CommandDecision(_COMMAND_MOVES[trigger], Outcome.APPLIED)
    if status == C.RUNNING:
        if trigger == CT.STARTED:
            return CommandDecision(status, Outcome.DUPLICATE)
        if trigger == CT.SUPERSEDED:
            return CommandDecision(status, Outcome.STALE)
        return CommandDecision(_COMMAND_MOVES[trigger], Outcome.APPLIED)
    # Finished: nothing changes from here on.
    if trigger == CT.STARTED:
        return CommandDecision(status, Outcome.REJECTED, "command_finished")
    if _COMMAND_MOVES[trigger] == status:
        return CommandDecision(status, Outcome.DUPLICATE)
    if status in (C.SUCCESSFUL, C.FAILED) and trigger in (CT.FINISHED_OK, CT.FINISHED_FAILED):
        return CommandDecision(status, Outcome.REJECTED, "conflicting_result")
    return CommandDecision(status, Outcome.STALE)


def command_overdue(
    status: CommandStatus | str,
    seconds_since_created: float,
    seconds_since_started: float | None,
    timeout_seconds: float,
) -> bool:
    """True when the scheduler must time a command out.

    A running command gets its timeout from its start; a queued one the same budget from its
    creation, so a command for an instance that never polls again does not wait forever.
    """
    status = CommandStatus(status)
    if status == C.RUNNING:
        # A lost start report leaves no start time: count from creation, never forever.
        elapsed = seconds_since_created if seconds_since_started is None else seconds_since_started
        return elapsed > timeout_seconds
    if status == C.QUEUED:
        return seconds_since_created > timeout_seconds
    return False
