"""Issue #4's faults with real agents on namespace hosts: nothing lost, nothing run twice.

- An agent killed (SIGKILL) during a chef run reports the command `failed` ("interrupted") when
  it comes back, and never runs it again.
- The server killed and restarted while agents long-poll: they reconnect with backoff and the
  next command reaches them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import test_lifecycle_e2e as lifecycle
from tests.e2e.conftest import E2EServer
from tests.e2e.netns import Host, TestNet
from tests.e2e.test_enrollment_e2e import node_env
from tests.e2e.test_lifecycle_e2e import Cluster, runs, wait_for

# The lifecycle test's fixtures: four hosts, the TLS server, a real worker.
net = lifecycle.net
server = lifecycle.server
worker = lifecycle.worker

pytestmark = pytest.mark.e2e


def process_named(host: Host, suffix: bytes) -> int | None:
    """The pid of a process in the host whose command line has a word ending in suffix."""
    for pid in host._pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(suffix) for part in cmdline):
            return pid
    return None


def agent_pid(host: Host) -> int | None:
    """The pid of the agent process in the host, if it runs."""
    return process_named(host, b"agent.py")


def command_of(server: E2EServer, deployment_id: str) -> dict[str, Any]:
    (command,) = server.ok("GET", f"/deployments/{deployment_id}")["commands"]
    return command  # type: ignore[no-any-return]


def test_an_agent_killed_mid_run_reports_the_command_interrupted_and_never_reruns_it(
    net: TestNet,
    server: E2EServer,
    worker: Any,
    tmp_path: Path,
) -> None:
    cluster = Cluster(server, tmp_path)
    host = net[0]
    cluster.start(host, "web1", "app")
    cluster.online("web1")
    deployment = server.ok(
        "POST",
        f"/stacks/{cluster.stack['id']}/deployments",
        {
            "command": "execute_recipes",
            "recipes": ["app::deploy"],
            "custom_json": {"chef_double": {"sleep": 60}},
        },
    )
    wait_for(lambda: command_of(server, deployment["id"])["status"] == "running", "chef running")
    time.sleep(1)  # the chef double is asleep inside its run
    pid = agent_pid(host)
    assert pid is not None
    before = len(runs(host))
    os.kill(pid, signal.SIGKILL)  # the agent dies without a word
    host.stop_processes()  # and so does the orphaned chef run (the machine "rebooted")
    assert agent_pid(host) is None
    # The machine comes back: the same agent, same config, started again.
    assert host.root is not None
    config = host.root / "etc" / "scalarium" / "agent.json"
    agent = host.root / "opt" / "scalarium" / "agent.py"
    with open(tmp_path / "agent-restart.log", "wb") as out:
        host.popen(
            ["python3", str(agent), "--config", str(config)],
            env=node_env(host),
            stdout=out,
            stderr=out,
        )
    wait_for(lambda: command_of(server, deployment["id"])["status"] == "failed", "interrupted")
    command = command_of(server, deployment["id"])
    assert command["reason"] == "interrupted"
    assert server.ok("GET", f"/deployments/{deployment['id']}")["status"] == "failed"
    time.sleep(3)  # a few polls: it must not run again
    again = [r for r in runs(host)[before:] if r["command_id"] == command["id"]]
    # At most the killed run's own last words (the double logs a SIGTERM), never a second run.
    assert [r["outcome"] for r in again] in ([], ["interrupted"])
    assert process_named(host, b"cinc-solo") is None
    assert command_of(server, deployment["id"])["status"] == "failed"
    assert cluster.status("web1") == "online"


def test_agents_reconnect_after_the_server_restarts_and_no_command_is_lost(
    net: TestNet,
    server: E2EServer,
    worker: Any,
    tmp_path: Path,
) -> None:
    cluster = Cluster(server, tmp_path)
    cluster.start(net[0], "web1", "app")
    cluster.start(net[1], "web2", "app")
    cluster.online("web1", "web2")
    time.sleep(1)  # both agents are in a long poll now
    server.stop(signal.SIGKILL)
    time.sleep(2)
    server.start()
    deployment = server.ok(
        "POST",
        f"/stacks/{cluster.stack['id']}/deployments",
        {"command": "execute_recipes", "recipes": ["app::deploy"]},
    )
    wait_for(
        lambda: server.ok("GET", f"/deployments/{deployment['id']}")["status"] == "successful",
        "the deployment after the restart",
    )
    for name in ("web1", "web2"):
        ran = [r for r in runs(cluster.hosts[name]) if r["activity"] == "execute_recipes"]
        assert len(ran) == 1 and ran[0]["recipes"] == ["app::deploy"], name


def test_an_agent_in_a_long_poll_stops_at_once_on_sigterm(
    net: TestNet, server: E2EServer, worker: Any, tmp_path: Path
) -> None:
    cluster = Cluster(server, tmp_path)
    host = net[0]
    cluster.start(host, "web1", "app")
    cluster.online("web1")
    time.sleep(1.5)  # idle: the agent waits in a long poll the server holds for many seconds
    pid = agent_pid(host)
    assert pid is not None
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: agent_pid(host) is None, "the agent to exit", timeout=10)
    assert time.monotonic() - started < 3
