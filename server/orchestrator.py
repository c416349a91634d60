"""The edges of the lifecycle: apply the pure decisions of lifecycle.py and fanout.py to rows.

Every function here takes a session, changes rows, records events, and registers what must
happen after the commit (agent wake-ups, jobs). Callers commit.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from server import events
from server.db import utcnow
from server.deployments import aggregate_status
from server.effects import after_commit
from server.fanout import ConfigureRef, InstanceConfigureState, next_to_run, plan_configure
from server.lifecycle import (
    CommandTrigger,
    Outcome,
    Transition,
    Trigger,
    command_transition,
    instance_trigger_for,
    transition,
)
from server.models import (
    FINISHED_COMMAND_STATES,
    Command,
    CommandStatus,
    CommandType,
    Deployment,
    DeploymentStatus,
    Instance,
    InstanceState,
    LifecycleEvent,
    Stack,
)

log = logging.getLogger(__name__)

SYSTEM_ACTOR = "scalarium"
MAX_LOG_BYTES = 1024 * 1024
TRUNCATION_MARK = "\n[... log truncated by Scalarium: over {limit} bytes ...]\n"


@dataclass
class Hooks:
    """How the orchestrator reaches the world after a commit (set by the app or the worker)."""

    wake: Callable[[str], None]
    enqueue_fanout: Callable[[str], None]
    machine_action: Callable[[str, str], None]
    wake_many: Callable[[list[str]], None] | None = None

    def wake_all(self, instance_ids: list[str]) -> None:
        """Wake many instances at once (one round trip when the hooks can batch)."""
        if self.wake_many is not None:
            self.wake_many(instance_ids)
        else:
            for instance_id in instance_ids:
                self.wake(instance_id)


_hooks: Hooks | None = None


def install_hooks(hooks: Hooks) -> None:
    """Set how wake-ups, fan-out jobs and provider actions are sent (once per process)."""
    global _hooks
    _hooks = hooks


def hooks() -> Hooks:
    """The installed hooks; a process that changes lifecycle state must have installed them."""
    if _hooks is None:
        raise RuntimeError("orchestrator hooks are not installed")
    return _hooks


# ---------------------------------------------------------------- instances


def instance_trigger(
    session: Session,
    instance: Instance,
    trigger: Trigger,
    *,
    actor: str = SYSTEM_ACTOR,
    reason: str | None = None,
) -> Transition:
    """Apply a trigger to an instance: new state, event, command to run, configure fan-out."""
    step = transition(instance.status, trigger, instance.provider)
    if not step.changed:
        return step
    old = instance.status
    instance.status = step.state.value
    message = f"instance {instance.hostname}: {old} -> {step.state.value} ({trigger.value})"
    if reason:
        message += f": {reason}"
    events.record(
        session,
        "instance.state",
        message,
        stack_id=instance.stack_id,
        instance_id=instance.id,
        data={"from": old, "to": step.state.value, "trigger": trigger.value},
        actor=actor,
    )
    if step.command is not None:
        queue_lifecycle_command(session, instance, step.command, step.run)
    if step.machine is not None:
        action, instance_id = step.machine.value, instance.id
        after_commit(session, lambda: hooks().machine_action(instance_id, action))
    if step.triggers_configure:
        request_configure(session, instance.stack_id, reason=message)
    return step


def queue_lifecycle_command(
    session: Session,
    instance: Instance,
    command_type: CommandType,
    run: Iterable[LifecycleEvent],
) -> Command:
    """An automatic deployment of one command (setup, shutdown) on one instance."""
    stack = session.get(Stack, instance.stack_id)
    assert stack is not None
    deployment = Deployment(
        stack_id=instance.stack_id,
        command=command_type.value,
        args={"events": [e.value for e in run]},
        custom_json={},
        comment=f"{command_type.value} of {instance.hostname}",
        created_by=SYSTEM_ACTOR,
    )
    session.add(deployment)
    session.flush()
    command = Command(
        deployment_id=deployment.id,
        instance_id=instance.id,
        type=command_type.value,
        cluster_version=stack.cluster_version,
        args=deployment.args,
        timeout_seconds=120 if command_type == CommandType.SHUTDOWN else 3600,
    )
    session.add(command)
    session.flush()
    instance_id = instance.id
    after_commit(session, lambda: hooks().wake(instance_id))
    return command


def request_configure(session: Session, stack_id: str, *, reason: str) -> int:
    """Bump the stack's cluster version and have a fan-out job send configure to every online
    instance; returns the new version."""
    session.execute(
        update(Stack)
        .where(Stack.id == stack_id)
        .values(cluster_version=Stack.cluster_version + 1)
        .execution_options(synchronize_session=False)
    )
    version = session.scalar(select(Stack.cluster_version).where(Stack.id == stack_id))
    stack = session.get(Stack, stack_id)
    if stack is not None:
        session.refresh(stack, ["cluster_version"])
    log.info("stack %s: cluster version %s (%s)", stack_id, version, reason)
    after_commit(session, lambda: hooks().enqueue_fanout(stack_id))
    return int(version or 0)


# ---------------------------------------------------------------- configure fan-out


def _configure_states(session: Session, stack: Stack) -> list[InstanceConfigureState]:
    """Each instance's configure situation, in two queries."""
    instances = session.scalars(select(Instance).where(Instance.stack_id == stack.id)).all()
    rows = session.execute(
        select(Command.id, Command.instance_id, Command.status, Command.cluster_version)
        .join(Instance, Instance.id == Command.instance_id)
        .where(Instance.stack_id == stack.id, Command.type == CommandType.CONFIGURE.value)
    ).all()
    running: dict[str, ConfigureRef] = {}
    waiting: dict[str, ConfigureRef] = {}
    last: dict[str, int] = {}
    for command_id, instance_id, status, version in rows:
        ref = ConfigureRef(command_id, version)
        if status == CommandStatus.QUEUED:
            current = waiting.get(instance_id)
            if current is None or (version, command_id) > (current.version, current.id):
                waiting[instance_id] = ref
        elif status == CommandStatus.RUNNING:
            running[instance_id] = ref
        if status in (
            CommandStatus.RUNNING,
            CommandStatus.SUCCESSFUL,
            CommandStatus.FAILED,
            CommandStatus.TIMED_OUT,
        ):
            last[instance_id] = max(last.get(instance_id, version), version)
    return [
        InstanceConfigureState(
            instance_id=i.id,
            online=i.status == InstanceState.ONLINE,
            running=running.get(i.id),
            waiting=waiting.get(i.id),
            last_version=last.get(i.id),
        )
        for i in instances
    ]


def fanout_configure(session: Session, stack_id: str) -> dict[str, Any]:
    """Create (and supersede) configure commands for the stack's current cluster version."""
    # A no-op write takes the stack's row lock (PostgreSQL) or the write lock (SQLite), so two
    # fan-outs of one stack never interleave.
    session.execute(
        update(Stack)
        .where(Stack.id == stack_id)
        .values(fanout_version=Stack.fanout_version)
        .execution_options(synchronize_session=False)
    )
    stack = session.get(Stack, stack_id, populate_existing=True)
    if stack is None:
        return {"stack_id": stack_id, "created": 0, "superseded": 0}
    version = stack.cluster_version
    plan = plan_configure(version, _configure_states(session, stack))
    for retired in plan.supersede:
        supersede_command(session, retired.command_id, retired.by_version)
    created: list[str] = []
    if plan.create:
        deployment = Deployment(
            stack_id=stack.id,
            command=CommandType.CONFIGURE.value,
            args={"cluster_version": version},
            custom_json={},
            comment=f"configure for cluster version {version}",
            created_by=SYSTEM_ACTOR,
        )
        session.add(deployment)
        session.flush()
        # One multi-row INSERT: a fan-out to thousands of instances is on the latency path.
        session.execute(
            insert(Command),
            [
                {
                    "deployment_id": deployment.id,
                    "instance_id": new.instance_id,
                    "type": CommandType.CONFIGURE.value,
                    "cluster_version": version,
                    "args": {},
                }
                for new in plan.create
            ],
        )
        created.extend(new.instance_id for new in plan.create)
        events.record(
            session,
            "stack.configure",
            f"configure for cluster version {version} sent to {len(created)} instance(s)",
            stack_id=stack.id,
            data={
                "version": version,
                "deployment_id": deployment.id,
                "superseded": len(plan.supersede),
            },
            actor=SYSTEM_ACTOR,
        )
    stack.fanout_version = version
    session.flush()
    if created:
        after_commit(session, lambda: hooks().wake_all(created))
    return {
        "stack_id": stack_id,
        "version": version,
        "created": len(created),
        "superseded": len(plan.supersede),
    }


def supersede_command(session: Session, command_id: str, by_version: int) -> None:
    """Mark a waiting command superseded (never silently dropped)."""
    command = session.get(Command, command_id)
    if command is None:
        return
    decision = command_transition(command.status, CommandTrigger.SUPERSEDED)
    if not decision.changed:
        return
    command.status = decision.status.value
    command.finished_at = utcnow()
    command.reason = f"superseded by cluster version {by_version}"
    log.info(
        "instance %s: configure %s superseded by %s", command.instance_id, command.id, by_version
    )
    _refresh_deployment(session, command.deployment_id)


# ---------------------------------------------------------------- delivery to agents


def next_command(session: Session, instance: Instance) -> Command | None:
    """The command an idle agent should run next, oldest first; configure by next_to_run."""
    queued = session.scalars(
        select(Command)
        .where(Command.instance_id == instance.id, Command.status == CommandStatus.QUEUED.value)
        .order_by(Command.created_at, Command.id)
    ).all()
    if not queued:
        return None
    others = [c for c in queued if c.type != CommandType.CONFIGURE]
    if others:
        return others[0]
    last = session.scalar(
        select(Command.cluster_version)
        .where(
            Command.instance_id == instance.id,
            Command.type == CommandType.CONFIGURE.value,
            Command.status.in_(
                [
                    CommandStatus.RUNNING.value,
                    CommandStatus.SUCCESSFUL.value,
                    CommandStatus.FAILED.value,
                    CommandStatus.TIMED_OUT.value,
                ]
            ),
        )
        .order_by(Command.cluster_version.desc())
        .limit(1)
    )
    choice = next_to_run(instance.id, last, [ConfigureRef(c.id, c.cluster_version) for c in queued])
    for retired in choice.supersede:
        supersede_command(session, retired.command_id, retired.by_version)
    if choice.run is None:
        return None
    return session.get(Command, choice.run.id)


@dataclass(frozen=True)
class QueuedCommand:
    """A queued command as the delivery fast path reads it (no ORM object)."""

    id: str
    type: str
    deployment_id: str | None
    cluster_version: int
    timeout_seconds: int
    args: dict[str, Any]


@dataclass(frozen=True)
class Delivery:
    """What one read found for an idle agent: the command to hand over and the stack's bundle.

    `settled` is False when handing a command over needs writes first (a waiting configure to
    supersede): the caller then takes the slower path, next_command.
    """

    command: QueuedCommand | None
    bundle_sha256: str | None
    settled: bool


_LAST_CONFIGURE_STATES = (
    CommandStatus.RUNNING.value,
    CommandStatus.SUCCESSFUL.value,
    CommandStatus.FAILED.value,
    CommandStatus.TIMED_OUT.value,
)


@functools.cache
def _delivery_statement() -> Any:
    """The delivery query, built once: building SQLAlchemy expressions per poll costs more than
    running the query."""
    wanted: Any = bindparam("instance_id")
    last = (
        select(func.max(Command.cluster_version))
        .where(
            Command.instance_id == wanted,
            Command.type == CommandType.CONFIGURE.value,
            # Not IN (...): an expanding parameter is re-rendered on every execution.
            or_(*(Command.status == status for status in _LAST_CONFIGURE_STATES)),
        )
        .scalar_subquery()
    )
    return (
        select(
            Command.id,
            Command.type,
            Command.deployment_id,
            Command.cluster_version,
            Command.timeout_seconds,
            Command.args,
            Stack.bundle_sha256,
            last,
        )
        .join(Instance, Instance.id == Command.instance_id)
        .join(Stack, Stack.id == Instance.stack_id)
        .where(Command.instance_id == wanted, Command.status == CommandStatus.QUEUED.value)
        .order_by(Command.created_at, Command.id)
    )


def peek_delivery(session: Session, instance_id: str) -> Delivery:
    """The next command for an idle agent in one query, when no write is needed to choose it.

    Every woken long poll comes here: a fan-out to N agents costs N of these reads, so this is
    the lean path (one prepared SELECT, no ORM objects); next_command remains the path that
    writes.
    """
    # Core, not ORM execution: plain columns need none of the ORM's per-statement work.
    rows = session.connection().execute(_delivery_statement(), {"instance_id": instance_id}).all()
    if not rows:
        return Delivery(None, None, True)
    bundle = rows[0][6]
    commands = [QueuedCommand(r[0], r[1], r[2], r[3], r[4], r[5] or {}) for r in rows]
    others = [c for c in commands if c.type != CommandType.CONFIGURE]
    if others:
        return Delivery(others[0], bundle, True)
    choice = next_to_run(
        instance_id, rows[0][7], [ConfigureRef(c.id, c.cluster_version) for c in commands]
    )
    if choice.supersede:
        return Delivery(None, bundle, False)
    chosen = next((c for c in commands if choice.run and c.id == choice.run.id), None)
    return Delivery(chosen, bundle, True)


# ---------------------------------------------------------------- command progress


class CommandRefused(Exception):
    """The agent's report cannot be taken (the command finished already, or a contradiction)."""

    def __init__(self, code: str, status: str) -> None:
        super().__init__(code)
        self.code = code
        self.status = status


def command_started(session: Session, command: Command) -> None:
    """The agent started a command."""
    decision = command_transition(command.status, CommandTrigger.STARTED)
    if decision.outcome == Outcome.REJECTED:
        raise CommandRefused(decision.code or "command_finished", command.status)
    if decision.changed:
        command.status = decision.status.value
        command.started_at = utcnow()


def append_log(command: Command, offset: int, data: str) -> int:
    """Append a chunk at a byte offset (idempotent: a resent chunk is not stored twice);
    returns the offset the agent sends from next. Raises ValueError on a gap."""
    chunk = data.encode()
    if offset > command.log_bytes:
        raise ValueError(f"gap: expected offset {command.log_bytes}, got {offset}")
    new = chunk[command.log_bytes - offset :]
    if not new:
        return command.log_bytes
    stored = len(command.log.encode())
    room = MAX_LOG_BYTES - stored
    if room > 0:
        kept = new[:room].decode(errors="ignore")
        command.log = command.log + kept
    if len(new) > max(room, 0) and not command.log_truncated:
        command.log_truncated = True
        command.log = command.log + TRUNCATION_MARK.format(limit=MAX_LOG_BYTES)
    command.log_bytes += len(new)
    return command.log_bytes


def command_finished(
    session: Session,
    command: Command,
    trigger: CommandTrigger,
    *,
    exit_code: int | None = None,
    duration: float | None = None,
    reason: str | None = None,
) -> bool:
    """A command ended (agent report, timeout): record it and move its instance on.
    Returns True when something changed."""
    decision = command_transition(command.status, trigger)
    if decision.outcome == Outcome.REJECTED:
        raise CommandRefused(decision.code or "rejected", command.status)
    if not decision.changed:
        return False
    command.status = decision.status.value
    command.finished_at = utcnow()
    command.exit_code = exit_code
    command.duration = duration
    command.reason = reason
    instance = session.get(Instance, command.instance_id)
    events.record(
        session,
        "command.finished",
        f"{command.type} on {instance.hostname if instance else command.instance_id}: "
        f"{command.status}" + (f" ({reason})" if reason else ""),
        stack_id=instance.stack_id if instance else None,
        instance_id=command.instance_id,
        data={"command_id": command.id, "status": command.status, "exit_code": exit_code},
        actor=SYSTEM_ACTOR,
    )
    _refresh_deployment(session, command.deployment_id)
    if instance is not None:
        follow = instance_trigger_for(command.type, command.status)
        if follow is not None:
            try:
                instance_trigger(
                    session, instance, follow, reason=f"{command.type} {command.status}"
                )
            except Exception as exc:  # noqa: BLE001 - an illegal follow-up must not lose the result
                log.warning(
                    "instance %s: %s after %s ignored: %s",
                    instance.hostname,
                    follow.value,
                    command.type,
                    exc,
                )
        instance_id = instance.id
        after_commit(session, lambda: hooks().wake(instance_id))
    return True


def _refresh_deployment(session: Session, deployment_id: str | None) -> None:
    if deployment_id is None:
        return
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        return
    session.flush()
    states = session.scalars(
        select(Command.status).where(Command.deployment_id == deployment_id)
    ).all()
    status = aggregate_status(states)
    if status != deployment.status:
        deployment.status = status.value
        if status != DeploymentStatus.RUNNING:
            deployment.finished_at = utcnow()


def is_finished(command: Command) -> bool:
    """Whether a command reached a final state."""
    return command.status in FINISHED_COMMAND_STATES
