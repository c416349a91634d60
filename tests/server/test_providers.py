"""Instance providers: the pure plan, and the `local` provider running the real install.sh and
agent against a live `scalarium server`, with an in-test RQ worker draining the queue."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, SimpleWorker

from server import runtime
from server.config import load_settings
from server.lifecycle import MachineAction, Trigger
from server.models import InstanceState, Provider
from server.providers import (
    EC2_UNAVAILABLE,
    Plan,
    ProviderError,
    Step,
    plan,
    provider_action,
)
from server.providers.local import (
    LocalProvider,
    agent_environment,
    install_command,
    layout,
    log_tail,
    parse_stat,
)
from tests.conftest import REDIS_URL
from tests.server.live import LiveServer, live_server

CHEF_DOUBLE = Path(__file__).resolve().parents[1] / "chef_double" / "chef-solo"
WAIT_SECONDS = 60.0
S = InstanceState
A = MachineAction

# ---------------------------------------------------------------- the plan (pure)


@pytest.mark.parametrize(
    ("provider", "action", "state", "expected"),
    [
        (
            "local",
            A.START,
            S.PENDING,
            Plan((Step.START,), Trigger.PROVISIONED, Trigger.BOOT_FAILED),
        ),
        ("ec2", A.START, S.PENDING, Plan((Step.START,), Trigger.PROVISIONED, Trigger.BOOT_FAILED)),
        (
            "local",
            A.REPLACE,
            S.PENDING,
            Plan((Step.STOP, Step.START), Trigger.PROVISIONED, Trigger.BOOT_FAILED),
        ),
        ("local", A.STOP, S.SHUTTING_DOWN, Plan((Step.STOP,), Trigger.MACHINE_STOPPED)),
        ("local", A.STOP, S.STOPPED, Plan((Step.STOP,))),
        (
            "local",
            A.TERMINATE,
            S.TERMINATING,
            Plan((Step.STOP, Step.REMOVE), Trigger.MACHINE_TERMINATED),
        ),
        ("local", A.TERMINATE, S.TERMINATED, Plan((Step.STOP, Step.REMOVE))),
    ],
)
def test_each_machine_action_does_what_the_state_still_needs(
    provider: str, action: MachineAction, state: InstanceState, expected: Plan
) -> None:
    assert plan(provider, action, state) == expected


@pytest.mark.parametrize(
    ("provider", "action", "state"),
    [
        # A repeated or late start: the machine was reported up, or a stop came in meanwhile.
        ("local", A.START, S.BOOTING),
        ("local", A.START, S.ONLINE),
        ("local", A.START, S.SHUTTING_DOWN),
        ("local", A.START, S.STOPPED),
        ("local", A.STOP, S.PENDING),
        ("local", A.TERMINATE, S.STOPPED),
        ("local", A.REPLACE, S.ONLINE),
        # Scalarium never touches a manual machine, whatever it is asked.
        *(("manual", action, state) for action in A for state in (S.PENDING, S.SHUTTING_DOWN)),
        ("manual", A.TERMINATE, S.TERMINATING),
    ],
)
def test_stale_actions_and_manual_machines_do_nothing(
    provider: str, action: MachineAction, state: InstanceState
) -> None:
    decision = plan(provider, action, state)
    assert decision.idle and decision.skip


# ---------------------------------------------------------------- local: pure pieces


@pytest.mark.parametrize(
    ("chef_binary", "tail"),
    [("", ["--ca"]), ("/opt/x/cinc-solo", ["--ca", "--chef-binary", "/opt/x/cinc-solo"])],
)
def test_install_command_takes_the_token_on_stdin_and_the_chef_binary_when_set(
    tmp_path: Path, chef_binary: str, tail: list[str]
) -> None:
    settings = load_settings(
        {}, data_dir=str(tmp_path), bind="127.0.0.1:9", local_chef_binary=chef_binary
    )
    where = layout(settings.data_dir, "abc123")
    argv = install_command(settings, where)
    assert argv[argv.index("--token-file") + 1] == "-" and "--token" not in argv
    assert argv[argv.index("--root") + 1] == str(tmp_path.resolve() / "local" / "abc123")
    assert argv[argv.index("--server") + 1] == "http://127.0.0.1:9"
    assert argv[argv.index("--chef") + 1] == "skip" and "--foreground" in argv
    flags = [a for a in argv if a.startswith("--")]
    assert flags[-len([t for t in tail if t.startswith("--")]) :] == [
        t for t in tail if t.startswith("--")
    ]
    assert ("--chef-binary" in argv) == bool(chef_binary)


@pytest.mark.parametrize("instance_id", ["../etc", "a/b", "", "x" * 65, "a b"])
def test_unsafe_instance_ids_never_become_paths(tmp_path: Path, instance_id: str) -> None:
    with pytest.raises(ProviderError) as caught:
        layout(tmp_path, instance_id)
    assert caught.value.code == "bad_instance_id"


@pytest.mark.parametrize(
    ("text", "pid", "state", "pgrp"),
    [
        ("42 (python3) S 1 42 42 0 -1", 42, "S", 42),
        ("7 (a (weird) name) Z 3 9 9 0", 7, "Z", 9),
    ],
)
def test_proc_stat_lines_parse_even_with_odd_command_names(
    text: str, pid: int, state: str, pgrp: int
) -> None:
    info = parse_stat(text)
    assert (info.pid, info.state, info.pgrp) == (pid, state, pgrp)


def test_the_agent_environment_carries_no_scalarium_settings() -> None:
    env = agent_environment(
        {"PATH": "/bin", "SCALARIUM_DATABASE_URL": "postgresql://u:pw@h/db", "HOME": "/root"}
    )
    assert env == {"PATH": "/bin", "HOME": "/root", "PYTHONUNBUFFERED": "1"}


def test_log_tail_keeps_the_last_lines_on_one_line() -> None:
    text = "one\n\ntwo\nscalarium-install: error: boom\n"
    assert log_tail(text, lines=2) == "two | scalarium-install: error: boom"


def test_a_local_start_that_cannot_reach_the_server_fails_with_install_sh_s_reason(
    tmp_path: Path,
) -> None:
    settings = load_settings({}, data_dir=str(tmp_path / "var"), bind="127.0.0.1:1")
    provider = LocalProvider(settings, lambda _: "sce_not-a-real-token")
    assert provider.start("i1").startswith("local agent started (pid ")
    with pytest.raises(ProviderError) as caught:
        provider.wait_booted("i1")
    assert caught.value.code == "local_start_failed"
    assert "cannot download the agent" in caught.value.message
    assert "sce_not-a-real-token" not in caught.value.message
    log_text = layout(settings.data_dir, "i1").log_file.read_text()
    assert "sce_not-a-real-token" not in log_text


# ---------------------------------------------------------------- live: server, worker, agent


@dataclass
class Rig:
    """A live server, the queue it feeds, and an API client."""

    server: LiveServer
    redis: redis.Redis

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One API request; returns the JSON body (raises on an HTTP error)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.server.url}/api/v1{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.server.token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read()!r}") from None

    def drain(self) -> None:
        """Run every queued job in this process (provider actions, fan-outs)."""
        queue = Queue("default", connection=self.redis)
        SimpleWorker([queue], connection=self.redis).work(burst=True)

    def instance(self, instance_id: str) -> dict[str, Any]:
        """The instance as the API shows it."""
        found: dict[str, Any] = self.call("GET", f"/instances/{instance_id}")
        return found

    def wait_for(self, instance_id: str, *states: InstanceState) -> dict[str, Any]:
        """Drain the queue and poll until the instance is in one of the states."""
        deadline = time.monotonic() + WAIT_SECONDS
        seen: list[str] = []
        while time.monotonic() < deadline:
            self.drain()
            current = self.instance(instance_id)
            if not seen or seen[-1] != current["status"]:
                seen.append(current["status"])
            if current["status"] in states:
                return current
            time.sleep(0.2)
        raise AssertionError(
            f"instance {instance_id} never reached {states}; went through {seen}; "
            f"events: {self.event_messages(instance_id)}"
        )

    def event_messages(self, instance_id: str) -> list[str]:
        """The instance's event messages, oldest first."""
        stack_id = self.instance(instance_id)["stack_id"]
        body = self.call("GET", f"/stacks/{stack_id}/events?limit=200")
        rows = body["items"] if isinstance(body, dict) else body
        mine = [e for e in rows if e.get("instance_id") == instance_id]
        return [e["message"] for e in sorted(mine, key=lambda e: e["id"])]

    def new_instance(self, provider: str) -> str:
        """A stack with one layer (no recipes) and one instance of this provider."""
        stack = self.call("POST", "/stacks", {"shortname": f"s{provider}"})
        layer = self.call("POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})
        created = self.call(
            "POST",
            f"/stacks/{stack['id']}/instances",
            {"hostname": f"{provider}1", "layer_ids": [layer["id"]], "provider": provider},
        )
        return str(created["id"])


def _processes_under(path: Path) -> list[int]:
    """Live processes whose command line names this path (our agents, install.sh, chef)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            if state != "Z" and str(path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _agents_under(root: Path) -> list[int]:
    return [
        pid
        for pid in _processes_under(root)
        if b"agent.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


@pytest.fixture
def rig(
    tmp_path: Path, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Rig]:
    with live_server(
        tmp_path, REDIS_URL, extra_env={"SCALARIUM_LOCAL_CHEF_BINARY": str(CHEF_DOUBLE)}
    ) as server:
        # The in-test worker reads the same settings as the server.
        for name, value in server.env.items():
            if name.startswith("SCALARIUM_"):
                monkeypatch.setenv(name, value)
        runtime.reset()
        try:
            yield Rig(server, redis_client)
        finally:
            for pid in _processes_under(tmp_path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            runtime.database().dispose()
            runtime.redis_connection().close()
            runtime.reset()


@pytest.mark.slow
def test_a_local_instance_enrolls_runs_setup_goes_online_stops_and_terminates(rig: Rig) -> None:
    instance_id = rig.new_instance("local")
    root = rig.server.data_dir.resolve() / "local" / instance_id
    assert rig.call("POST", f"/instances/{instance_id}/start")["status"] == "pending"

    online = rig.wait_for(instance_id, S.ONLINE, S.SETUP_FAILED, S.START_FAILED)
    assert online["status"] == "online", rig.event_messages(instance_id)
    agents = _agents_under(root)
    assert len(agents) == 1
    assert (root / "run" / "scalarium-agent.pid").read_text().strip() == str(agents[0])
    messages = rig.event_messages(instance_id)
    assert any("(provisioned)" in m and "local agent started" in m for m in messages), messages
    assert any("(agent_connected)" in m for m in messages), messages
    # Setup really ran through the chef double the setting names.
    config = json.loads((root / "etc" / "scalarium" / "agent.json").read_text())
    assert config["settings"]["chef_binary"] == str(CHEF_DOUBLE)
    runs = [
        json.loads(line)
        for record in root.rglob("chef-double-runs.jsonl")
        for line in record.read_text().splitlines()
    ]
    assert runs and all(run["outcome"] == "success" for run in runs)
    # The token never reached a command line or the log.
    assert "sce_" not in (root / "var" / "log" / "scalarium-agent.log").read_text()

    rig.call("POST", f"/instances/{instance_id}/stop")
    assert rig.wait_for(instance_id, S.STOPPED)["status"] == "stopped"
    assert _processes_under(root) == []
    assert not (root / "run" / "scalarium-agent.pid").exists()
    assert any("(machine_stopped)" in m for m in rig.event_messages(instance_id))

    rig.call("POST", f"/instances/{instance_id}/terminate")
    assert rig.wait_for(instance_id, S.TERMINATED)["status"] == "terminated"
    assert not root.exists()


@pytest.mark.slow
def test_starting_twice_never_starts_a_second_agent_and_a_stopped_one_starts_again(
    rig: Rig,
) -> None:
    instance_id = rig.new_instance("local")
    root = rig.server.data_dir.resolve() / "local" / instance_id
    rig.call("POST", f"/instances/{instance_id}/start")
    rig.wait_for(instance_id, S.RUNNING_SETUP, S.ONLINE)
    first = _agents_under(root)
    assert len(first) == 1
    assert (root / "run" / "scalarium-agent.pid").read_text().strip() == str(first[0])
    # The job delivered again (at least once), and the provider asked directly while running.
    again = provider_action(instance_id, MachineAction.START.value)
    assert again["outcome"] == "skipped"
    direct = LocalProvider(runtime.settings(), lambda _: pytest.fail("no new token wanted"))
    assert direct.start(instance_id) == f"local agent already running (pid {first[0]})"
    assert _agents_under(root) == first

    rig.call("POST", f"/instances/{instance_id}/stop")
    rig.wait_for(instance_id, S.STOPPED)
    assert _processes_under(root) == []
    # Started again, the same root keeps its enrollment: the agent reconnects and runs setup.
    rig.call("POST", f"/instances/{instance_id}/start")
    assert rig.wait_for(instance_id, S.ONLINE, S.SETUP_FAILED)["status"] == "online"
    second = _agents_under(root)
    assert len(second) == 1 and second != first
    assert "already enrolled" in (root / "var" / "log" / "scalarium-agent.log").read_text()
    rig.call("POST", f"/instances/{instance_id}/stop")
    rig.wait_for(instance_id, S.STOPPED)
    assert _processes_under(root) == []


def test_an_ec2_start_fails_with_a_clear_reason_until_the_ec2_provider_exists(rig: Rig) -> None:
    instance_id = rig.new_instance("ec2")
    rig.call("POST", f"/instances/{instance_id}/start")
    assert rig.wait_for(instance_id, S.START_FAILED)["status"] == "start_failed"
    messages = rig.event_messages(instance_id)
    assert any("(boot_failed)" in m and EC2_UNAVAILABLE in m for m in messages), messages


def test_a_manual_instance_gets_no_machine_action(rig: Rig) -> None:
    instance_id = rig.new_instance("manual")
    result = provider_action(instance_id, MachineAction.START.value)
    assert result["outcome"] == "skipped"
    assert plan(Provider.MANUAL, MachineAction.STOP, S.SHUTTING_DOWN).idle
