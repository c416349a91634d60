"""A discrete-event simulation of configure fan-out, driving server/fanout.py's real decisions.

Not a test by itself: tests/server/test_fanout.py asserts on its results and
bench/bench_coalescing.py prints its figures. Time is simulated (no sleeping); every random
choice comes from the `random.Random` passed in, so a seed replays a run exactly.

Model: each membership change (an instance joining or leaving `online`) bumps the stack's cluster
version and enqueues one fan-out job, which runs after a worker delay, reads the current version
and every instance's configure state, and applies `plan_configure` one instance at a time (a
crashed job stops part-way and is retried later, as RQ or the reconciler would). Each agent runs
one command at a time; when idle it asks `next_to_run` which waiting configure to start.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from statistics import mean

from server.fanout import (
    ConfigureRef,
    FanoutPlan,
    InstanceConfigureState,
    next_to_run,
    plan_configure,
)
from server.models import CommandStatus


@dataclass(frozen=True)
class BurstConfig:
    """One scenario: a stack of `existing` online instances and a burst of changes."""

    existing: int = 50
    joins: int = 100
    leaves: int = 0  # existing instances that leave `online` during the burst
    window: float = 10.0  # every change lands within [0, window) seconds
    run_seconds: tuple[float, float] = (5.0, 20.0)  # how long one configure run takes
    fanout_delay: tuple[float, float] = (0.05, 0.5)  # change -> its fan-out job runs
    poll_delay: tuple[float, float] = (0.0, 0.2)  # agent idle or command created -> agent starts
    busy_at_start: bool = False  # existing instances are mid-way through a configure at t=0
    crash_probability: float = 0.0  # a fan-out job dies part-way through applying its plan
    retry_delay: float = 1.0  # a crashed job runs again this much later
    # At most one pending fan-out job per stack (an RQ job id per stack): a change that finds
    # one queued and not yet started relies on it, since the job reads the version when it runs.
    one_pending_job: bool = False


@dataclass
class SimCommand:
    """A configure command row."""

    id: str
    instance_id: str
    version: int
    status: CommandStatus = CommandStatus.QUEUED
    superseded_by: int | None = None


@dataclass
class SimInstance:
    """An instance row plus its agent."""

    id: str
    existing: bool
    online: bool = True
    running: SimCommand | None = None
    waiting: list[SimCommand] = field(default_factory=list)
    last_version: int | None = None  # newest configure version run or running
    versions_run: list[int] = field(default_factory=list)  # runs started during the simulation

    def state(self) -> InstanceConfigureState:
        """What the fan-out job reads for this instance."""
        waiting = self.waiting[-1] if self.waiting else None
        return InstanceConfigureState(
            self.id, self.online, _ref(self.running), _ref(waiting), self.last_version
        )


def _ref(command: SimCommand | None) -> ConfigureRef | None:
    return None if command is None else ConfigureRef(command.id, command.version)


@dataclass
class SimResult:
    """What happened, and every invariant the run broke."""

    cluster_version: int
    instances: dict[str, SimInstance]
    commands: list[SimCommand]
    fanout_jobs: int
    crashes: int
    retries_that_created: int  # re-planning right after a full apply created something (bug)
    violations: list[str]

    def runs(self, existing: bool = True) -> list[int]:
        """Configure runs started per instance (existing ones, or those that joined)."""
        return [len(i.versions_run) for i in self.instances.values() if i.existing is existing]

    @property
    def created(self) -> int:
        """Configure commands created."""
        return len(self.commands)

    @property
    def superseded(self) -> int:
        """Configure commands marked superseded."""
        return sum(1 for c in self.commands if c.status == CommandStatus.SUPERSEDED)

    def summary(self) -> dict[str, float]:
        """The figures the benchmark prints."""
        existing = self.runs(existing=True)
        joined = self.runs(existing=False)
        return {
            "cluster_version": self.cluster_version,
            "runs_per_existing_max": max(existing, default=0),
            "runs_per_existing_mean": round(mean(existing), 2) if existing else 0.0,
            "runs_per_joined_max": max(joined, default=0),
            "configure_created": self.created,
            "configure_superseded": self.superseded,
            "fanout_jobs": self.fanout_jobs,
            "crashes": self.crashes,
        }


class FanoutSimulation:
    """Runs one BurstConfig to completion."""

    def __init__(self, config: BurstConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.now = 0.0
        self.cluster_version = 0
        self.queue: list[tuple[float, int, str, str]] = []
        self.sequence = 0
        self.instances: dict[str, SimInstance] = {}
        self.commands: dict[str, SimCommand] = {}
        self.fanout_jobs = 0
        self.crashes = 0
        self.retries_that_created = 0
        self.violations: list[str] = []
        self.job_pending = False

    def schedule(self, delay: float, kind: str, subject: str = "") -> None:
        """Queue an event `delay` seconds from now."""
        self.sequence += 1
        heapq.heappush(self.queue, (self.now + delay, self.sequence, kind, subject))

    def run(self) -> SimResult:
        """Play the scenario until nothing is left to happen."""
        cfg = self.config
        for n in range(cfg.existing):
            instance = SimInstance(f"old-{n:04d}", existing=True, last_version=0)
            self.instances[instance.id] = instance
            if cfg.busy_at_start:
                command = self._create(instance, 0)
                instance.waiting.remove(command)
                command.status = CommandStatus.RUNNING
                instance.running = command
                self.schedule(self.rng.uniform(0, cfg.run_seconds[1]), "finish", instance.id)
        for n in range(cfg.joins):
            self.schedule(self.rng.uniform(0, cfg.window), "join", f"new-{n:04d}")
        leaving = self.rng.sample(sorted(self.instances), cfg.leaves)
        for instance_id in leaving:
            self.schedule(self.rng.uniform(0, cfg.window), "leave", instance_id)
        while self.queue:
            self.now, _, kind, subject = heapq.heappop(self.queue)
            getattr(self, f"_on_{kind}")(subject)
        self._check_end()
        return SimResult(
            self.cluster_version,
            self.instances,
            list(self.commands.values()),
            self.fanout_jobs,
            self.crashes,
            self.retries_that_created,
            self.violations,
        )

    # --- events ---------------------------------------------------------------------------

    def _on_join(self, instance_id: str) -> None:
        self.instances[instance_id] = SimInstance(instance_id, existing=False)
        self._membership_changed()

    def _on_leave(self, instance_id: str) -> None:
        self.instances[instance_id].online = False
        self._membership_changed()

    def _membership_changed(self) -> None:
        self.cluster_version += 1
        if self.config.one_pending_job and self.job_pending:
            return
        self.job_pending = True
        self.schedule(self.rng.uniform(*self.config.fanout_delay), "fanout")

    def _on_fanout(self, _: str) -> None:
        self.job_pending = False
        self._fanout()

    def _on_retry(self, _: str) -> None:
        self._fanout()

    def _fanout(self) -> None:
        self.fanout_jobs += 1
        version = self.cluster_version  # the job reads the stack's version when it runs
        plan = plan_configure(version, [i.state() for i in self.instances.values()])
        touched = sorted(
            {c.instance_id for c in plan.create} | {s.instance_id for s in plan.supersede}
        )
        if touched and self.rng.random() < self.config.crash_probability:
            self.crashes += 1
            self._apply(plan, set(touched[: self.rng.randrange(len(touched))]))
            self.schedule(self.config.retry_delay, "retry")
            return
        self._apply(plan, set(touched))
        again = plan_configure(version, [i.state() for i in self.instances.values()])
        if not again.empty:
            self.retries_that_created += 1
            self.violations.append(f"t={self.now:.2f}: re-planning v{version} is not empty")

    def _on_poll(self, instance_id: str) -> None:
        instance = self.instances[instance_id]
        if instance.running is not None or not instance.online:
            return
        refs = [ConfigureRef(c.id, c.version) for c in instance.waiting]
        decision = next_to_run(instance.id, instance.last_version, refs)
        for retired in decision.supersede:
            self._supersede(retired.command_id, retired.by_version)
        if decision.run is None:
            return
        command = self.commands[decision.run.id]
        instance.waiting.remove(command)
        if instance.last_version is not None and command.version <= instance.last_version:
            self.violations.append(f"{instance.id}: ran v{command.version} after an older one")
        command.status = CommandStatus.RUNNING
        instance.running = command
        instance.last_version = command.version
        instance.versions_run.append(command.version)
        self.schedule(self.rng.uniform(*self.config.run_seconds), "finish", instance.id)

    def _on_finish(self, instance_id: str) -> None:
        instance = self.instances[instance_id]
        assert instance.running is not None
        instance.running.status = CommandStatus.SUCCESSFUL
        instance.running = None
        self.schedule(self.rng.uniform(*self.config.poll_delay), "poll", instance.id)

    # --- applying a plan, one instance per transaction --------------------------------------

    def _apply(self, plan: FanoutPlan, instance_ids: set[str]) -> None:
        for retired in plan.supersede:
            if retired.instance_id in instance_ids:
                self._supersede(retired.command_id, retired.by_version)
        for new in plan.create:
            if new.instance_id not in instance_ids:
                continue
            instance = self.instances[new.instance_id]
            self._create(instance, new.version)
            if len(instance.waiting) > 1:
                self.violations.append(f"{instance.id}: {len(instance.waiting)} configures wait")
            if instance.running is None:
                self.schedule(self.rng.uniform(*self.config.poll_delay), "poll", instance.id)

    def _create(self, instance: SimInstance, version: int) -> SimCommand:
        command = SimCommand(f"cmd-{len(self.commands):06d}", instance.id, version)
        self.commands[command.id] = command
        instance.waiting.append(command)
        return command

    def _supersede(self, command_id: str, by_version: int) -> None:
        command = self.commands[command_id]
        if command.status != CommandStatus.QUEUED:
            self.violations.append(f"{command.id}: superseded while {command.status}")
            return
        command.status = CommandStatus.SUPERSEDED
        command.superseded_by = by_version
        self.instances[command.instance_id].waiting.remove(command)

    def _check_end(self) -> None:
        for instance in self.instances.values():
            if instance.waiting or instance.running:
                self.violations.append(f"{instance.id}: commands left unfinished")
            if instance.online and instance.last_version != self.cluster_version:
                self.violations.append(
                    f"{instance.id}: ended on v{instance.last_version}, "
                    f"latest is v{self.cluster_version}"
                )
            runs = instance.versions_run
            if any(later <= earlier for earlier, later in zip(runs, runs[1:], strict=False)):
                self.violations.append(f"{instance.id}: versions not increasing {runs}")


def simulate(config: BurstConfig, seed: int) -> SimResult:
    """Run one scenario with a seeded random source."""
    return FanoutSimulation(config, random.Random(seed)).run()
