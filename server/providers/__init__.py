"""Instance providers: what starts, stops and removes the machine behind an instance.

The orchestrator asks for a MachineAction after a commit; the RQ job `provider_action` decides
from the instance's current state what still has to happen (a pure plan, so a repeated or late
job does nothing twice), has the instance's provider do it, and reports the outcome back as a
lifecycle trigger (PROVISIONED, BOOT_FAILED, MACHINE_STOPPED, MACHINE_TERMINATED).

Providers:
- `local` (server/providers/local.py): the real bootstrap/install.sh and agent on this host,
  under DATA_DIR/local/<instance_id>; what `make run` demos and the tests use.
- `manual`: the operator's own machine. Scalarium never touches it (lifecycle.py asks for no
  machine action), so there is nothing to implement.
- `ec2`: a placeholder until the EC2 issue brings boto3 provisioning: starting fails honestly
  with BOOT_FAILED "the ec2 provider is not available yet"; as no machine was ever started,
  stopping and terminating have nothing to remove.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from server.config import Settings
from server.lifecycle import IllegalTransition, MachineAction, Trigger
from server.models import InstanceState, Provider

log = logging.getLogger(__name__)

S = InstanceState

EC2_UNAVAILABLE = "the ec2 provider is not available yet"


class ProviderError(Exception):
    """A provider could not do what it was asked; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Step(enum.StrEnum):
    """One thing a provider does to a machine."""

    STOP = "stop"
    START = "start"
    REMOVE = "remove"


@dataclass(frozen=True)
class Plan:
    """What a machine action still needs, given the instance's state now."""

    steps: tuple[Step, ...] = ()
    report: Trigger | None = None  # reported after the steps succeed
    failure: Trigger | None = None  # reported when a step fails (None: an event only)
    skip: str | None = None  # why nothing happens

    @property
    def idle(self) -> bool:
        """True when the job has nothing to do."""
        return not self.steps and self.report is None


# (action, state the action is meant for) -> plan. The state is re-read when the job runs: a
# stop requested after the start was queued must not be undone by that late start.
_PLANS: dict[tuple[MachineAction, InstanceState], Plan] = {
    (MachineAction.START, S.PENDING): Plan((Step.START,), Trigger.PROVISIONED, Trigger.BOOT_FAILED),
    (MachineAction.REPLACE, S.PENDING): Plan(
        (Step.STOP, Step.START), Trigger.PROVISIONED, Trigger.BOOT_FAILED
    ),
    (MachineAction.STOP, S.SHUTTING_DOWN): Plan((Step.STOP,), Trigger.MACHINE_STOPPED),
    # A repeat after the report: make sure, but report nothing again.
    (MachineAction.STOP, S.STOPPED): Plan((Step.STOP,)),
    (MachineAction.TERMINATE, S.TERMINATING): Plan(
        (Step.STOP, Step.REMOVE), Trigger.MACHINE_TERMINATED
    ),
    (MachineAction.TERMINATE, S.TERMINATED): Plan((Step.STOP, Step.REMOVE)),
}


def plan(provider: Provider | str, action: MachineAction | str, state: InstanceState | str) -> Plan:
    """What a machine action does to an instance of this provider in this state."""
    provider, action, state = Provider(provider), MachineAction(action), InstanceState(state)
    if provider == Provider.MANUAL:
        return Plan(skip="manual machines are never started or stopped by Scalarium")
    found = _PLANS.get((action, state))
    if found is None:
        return Plan(skip=f"instance is {state.value}: {action.value} is no longer wanted")
    return found


class MachineProvider(Protocol):
    """What a provider does; each method returns a short description for the instance's events."""

    def start(self, instance_id: str) -> str:
        """Start the machine (or find it running); raise ProviderError on failure."""
        ...

    def wait_booted(self, instance_id: str) -> str:
        """After a start: wait (bounded) for the machine to come up; raise if it failed."""
        ...

    def stop(self, instance_id: str) -> str:
        """Stop the machine (a stopped or absent machine is fine)."""
        ...

    def remove(self, instance_id: str) -> str:
        """Remove whatever the machine left behind."""
        ...


class Ec2Placeholder:
    """EC2 arrives with the EC2 issue; until then starting fails with a clear reason."""

    def start(self, instance_id: str) -> str:
        """Refuse: no EC2 provisioning yet."""
        raise ProviderError("provider_unavailable", EC2_UNAVAILABLE)

    def wait_booted(self, instance_id: str) -> str:
        """Never reached: start always fails."""
        return ""

    def stop(self, instance_id: str) -> str:
        """Nothing to stop: this provider never started a machine."""
        return "no ec2 machine was started"

    def remove(self, instance_id: str) -> str:
        """Nothing to remove: this provider never started a machine."""
        return "no ec2 machine was started"


def provider_for(
    provider: Provider | str, settings: Settings, issue_token: Callable[[str], str]
) -> MachineProvider:
    """The implementation of a provider (manual has none: it never gets a machine action)."""
    from server.providers.local import LocalProvider

    provider = Provider(provider)
    if provider == Provider.LOCAL:
        return LocalProvider(settings, issue_token)
    if provider == Provider.EC2:
        return Ec2Placeholder()
    raise ProviderError("no_machine_provider", f"the {provider.value} provider has no machines")


def run_steps(machine: MachineProvider, instance_id: str, steps: tuple[Step, ...]) -> str:
    """Do the steps in order; the descriptions joined, for the event."""
    done = []
    for step in steps:
        if step == Step.STOP:
            done.append(machine.stop(instance_id))
        elif step == Step.START:
            done.append(machine.start(instance_id))
        else:
            done.append(machine.remove(instance_id))
    return "; ".join(d for d in done if d)


# ---------------------------------------------------------------- the RQ job (the edge)


def _issue_token(instance_id: str) -> str:
    """A fresh enrollment token for the instance, committed before any node can present it."""
    from server import runtime
    from server.enrollment import issue_token

    with runtime.database().session() as session:
        _, plaintext, _ = issue_token(session, instance_id, runtime.settings().enroll_token_ttl)
    return plaintext


def _report(instance_id: str, trigger: Trigger, reason: str) -> str | None:
    """Apply a provider trigger under the instance's row lock; the new state (None if refused)."""
    from server import orchestrator, runtime
    from server.models import Instance

    with runtime.database().session() as session:
        instance = session.get(Instance, instance_id, with_for_update=True)
        if instance is None:
            return None
        try:
            orchestrator.instance_trigger(session, instance, trigger, reason=reason)
        except IllegalTransition as exc:
            # The instance moved on while the provider worked (a stop, a failed setup).
            log.warning("instance %s: %s not applied: %s", instance_id, trigger.value, exc)
            return None
        return str(instance.status)


def _record_failure(instance_id: str, action: str, error: ProviderError) -> None:
    from server import events, orchestrator, runtime
    from server.models import Instance

    with runtime.database().session() as session:
        instance = session.get(Instance, instance_id)
        if instance is None:
            return
        events.record(
            session,
            "instance.provider_failed",
            f"instance {instance.hostname}: {action} failed: {error.message}",
            stack_id=instance.stack_id,
            instance_id=instance.id,
            data={"action": action, "code": error.code},
            actor=orchestrator.SYSTEM_ACTOR,
        )


def provider_action(instance_id: str, action: str) -> dict[str, str | None]:
    """RQ job: do a machine action for an instance and report the outcome (idempotent)."""
    from server import runtime
    from server.models import Instance

    runtime.install_orchestrator_hooks()
    with runtime.database().session() as session:
        instance = session.get(Instance, instance_id)
        if instance is None:
            log.info("instance %s: %s skipped, the instance is gone", instance_id, action)
            return {"instance_id": instance_id, "action": action, "outcome": "gone"}
        provider, state = instance.provider, instance.status
    decision = plan(provider, action, state)
    if decision.idle:
        log.info("instance %s: %s skipped: %s", instance_id, action, decision.skip)
        return {"instance_id": instance_id, "action": action, "outcome": "skipped"}
    status: str | None = None
    try:
        machine = provider_for(provider, runtime.settings(), _issue_token)
        detail = run_steps(machine, instance_id, decision.steps)
        # Reported before waiting for the boot: the node may enroll any moment now.
        if decision.report is not None:
            status = _report(instance_id, decision.report, detail)
        if Step.START in decision.steps:
            detail += f"; {machine.wait_booted(instance_id)}"
    except ProviderError as exc:
        log.warning("instance %s: %s failed (%s): %s", instance_id, action, exc.code, exc.message)
        if decision.failure is not None:
            status = _report(instance_id, decision.failure, exc.message)
        else:
            _record_failure(instance_id, action, exc)
        return {"instance_id": instance_id, "action": action, "outcome": "failed", "state": status}
    log.info("instance %s: %s done (%s)", instance_id, action, detail)
    return {"instance_id": instance_id, "action": action, "outcome": "done", "state": status}
