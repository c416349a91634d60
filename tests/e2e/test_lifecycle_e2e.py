"""Issue #4 end to end: hosts set up, go online and reconfigure as the cluster changes.

A real `scalarium server` (HTTPS) and a real `scalarium worker` run on the root side of a
network-namespace network; each namespace host runs the user-data the API hands out (the real
install.sh and agent, chef being the test double). The stack's custom cookbooks come from a
`directory` source (tests/e2e/cookbooks), bundled with the built-in scalarium_base. The test
drives the user story through the API and reads what each host's chef double received.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_URL
from tests.e2e.conftest import E2EServer, tls_server
from tests.e2e.netns import Host, TestNet, hosts
from tests.e2e.test_enrollment_e2e import node_env, write_script

pytestmark = pytest.mark.e2e

COOKBOOKS = Path(__file__).resolve().parent / "cookbooks"
TIMEOUT = 120.0


@pytest.fixture
def net(tmp_path: Path) -> Iterator[TestNet]:
    with hosts(4, prefix="scllc", workdir=tmp_path / "hosts") as network:
        yield network


@pytest.fixture
def server(net: TestNet, tmp_path: Path, redis_client: Any) -> Iterator[E2EServer]:
    with tls_server(net.server_address, "server", tmp_path) as running:
        yield running


@pytest.fixture
def worker(server: E2EServer, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real RQ worker on the server's database and Redis: it runs the fan-out jobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALARIUM_")}
    env.update(
        {
            "SCALARIUM_DATA_DIR": str(server.data_dir),
            "SCALARIUM_REDIS_URL": REDIS_URL,
            "SCALARIUM_PUBLIC_URL": server.public_url,
        }
    )
    with open(tmp_path / "worker.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "worker"],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    yield process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll until check() returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def runs(host: Host) -> list[dict[str, Any]]:
    """What the host's chef double received, one entry per chef run, oldest first."""
    assert host.root is not None
    path = host.root / "chef-double-runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chef_time() -> str:
    """Now, stamped as the chef double stamps its runs (same clock: the hosts share it)."""
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def members(run: dict[str, Any]) -> dict[str, list[str]]:
    """Hostnames per layer as one chef run saw the cluster."""
    return {layer: sorted(names) for layer, names in run["cluster"]["scalarium"].items()}


class Cluster:
    """The stack under test and the hosts running its instances."""

    def __init__(self, server: E2EServer, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.stack = server.ok(
            "POST",
            "/stacks",
            {
                "shortname": "shop",
                "use_custom_cookbooks": True,
                "custom_cookbooks_source": {"type": "directory", "url": str(COOKBOOKS)},
            },
        )
        sid = self.stack["id"]
        self.layers = {
            "lb": server.ok(
                "POST",
                f"/stacks/{sid}/layers",
                {
                    "shortname": "lb",
                    "recipes": {
                        "setup": ["lb::setup"],
                        "configure": ["lb::configure"],
                        "shutdown": ["lb::shutdown"],
                    },
                },
            ),
            "app": server.ok(
                "POST",
                f"/stacks/{sid}/layers",
                {
                    "shortname": "app",
                    "recipes": {
                        "setup": ["app::setup"],
                        "configure": ["app::configure"],
                        "deploy": ["app::deploy"],
                        "shutdown": ["app::shutdown"],
                    },
                },
            ),
        }
        server.ok(
            "POST",
            f"/stacks/{sid}/apps",
            {
                "shortname": "store",
                "layer_ids": [self.layers["app"]["id"]],
                "source": {"type": "git", "url": "https://git.invalid/store.git"},
            },
        )
        self.instances: dict[str, dict[str, Any]] = {}
        self.hosts: dict[str, Host] = {}
        self.procs: dict[str, Any] = {}

    def start(self, host: Host, hostname: str, layer: str) -> None:
        """Create a manual instance and run its user-data on the host."""
        instance = self.server.ok(
            "POST",
            f"/stacks/{self.stack['id']}/instances",
            {"hostname": hostname, "layer_ids": [self.layers[layer]["id"]]},
        )
        user_data = self.server.ok("GET", f"/instances/{instance['id']}/user-data")["user_data"]
        script = write_script(host, user_data)
        log = self.tmp_path / f"{hostname}.log"
        with open(log, "wb") as out:
            self.procs[hostname] = host.popen(
                ["bash", str(script)], env=node_env(host), stdout=out, stderr=out
            )
        self.instances[hostname] = instance
        self.hosts[hostname] = host

    def status(self, hostname: str) -> str:
        return str(self.server.ok("GET", f"/instances/{self.instances[hostname]['id']}")["status"])

    def online(self, *hostnames: str) -> None:
        for name in hostnames:
            wait_for(
                lambda n=name: (
                    self.status(n) == "online"  # type: ignore[misc]
                    or self._failed(n)
                ),
                f"{name} online",
            )
            assert self.status(name) == "online", (self.tmp_path / f"{name}.log").read_text()[
                -3000:
            ]

    def _failed(self, hostname: str) -> bool:
        return self.status(hostname) in ("setup_failed", "start_failed")

    def configured_with(self, hostname: str, expected: dict[str, list[str]]) -> bool:
        """The host's latest successful configure run saw exactly `expected`."""
        configures = [
            r
            for r in runs(self.hosts[hostname])
            if r["activity"] == "configure" and r["outcome"] == "success"
        ]
        return bool(configures) and members(configures[-1]) == expected


def test_hosts_set_up_go_online_and_reconfigure_as_instances_join_and_leave(
    net: TestNet, server: E2EServer, worker: Any, tmp_path: Path
) -> None:
    cluster = Cluster(server, tmp_path)
    cluster.start(net[0], "lb1", "lb")
    cluster.start(net[1], "web1", "app")
    cluster.start(net[2], "web2", "app")
    cluster.online("lb1", "web1", "web2")

    # Setup ran first on each host: base recipe, the layer's setup, then the app's deploy.
    for name, expected in (
        ("lb1", ["scalarium_base::default", "lb::setup"]),
        ("web1", ["scalarium_base::default", "app::setup", "app::deploy"]),
    ):
        first = runs(cluster.hosts[name])[0]
        assert first["activity"] == "setup" and first["outcome"] == "success"
        assert first["recipes"] == expected

    three = {"app": ["web1", "web2"], "lb": ["lb1"]}
    for name in ("lb1", "web1", "web2"):
        wait_for(
            lambda n=name: cluster.configured_with(n, three),  # type: ignore[misc]
            f"{name} configured with the three",
        )
    lb_configure = [r for r in runs(cluster.hosts["lb1"]) if r["activity"] == "configure"][-1]
    assert lb_configure["recipes"] == ["lb::configure"]
    # chef-solo's node_path holds one node per online instance, for local-mode search.
    lb_root = cluster.hosts["lb1"].root
    assert lb_root is not None
    node_files = sorted(p.name for p in (lb_root / "var/lib/scalarium/nodes").glob("*.json"))
    assert node_files == sorted(
        ["web1.json", "web2.json", f"{cluster.instances['lb1']['id']}.json"]
    )

    # A fourth instance joins: once online, all four configure and see it.
    cluster.start(net[3], "web3", "app")
    cluster.online("web3")
    four = {"app": ["web1", "web2", "web3"], "lb": ["lb1"]}
    for name in ("lb1", "web1", "web2", "web3"):
        wait_for(
            lambda n=name: cluster.configured_with(n, four),  # type: ignore[misc]
            f"{name} configured with the four",
        )

    # Stopping one: it leaves `online` at once, so its shutdown recipes run while the others
    # configure without it (as OpsWorks sends Shutdown to it and Configure to the rest: the
    # load balancer stops sending it traffic); its machine stops only after the shutdown.
    web2 = cluster.instances["web2"]["id"]
    stop_requested = chef_time()
    server.ok("POST", f"/instances/{web2}/stop")
    wait_for(lambda: cluster.status("web2") == "stopped", "web2 stopped")
    shutdown = [r for r in runs(cluster.hosts["web2"]) if r["activity"] == "shutdown"]
    assert len(shutdown) == 1 and shutdown[0]["recipes"] == ["app::shutdown"]
    web2_events = server.ok("GET", f"/stacks/{cluster.stack['id']}/events?limit=500")["items"]
    web2_events = [e for e in web2_events if e.get("instance_id") == web2]
    shutdown_done = max(
        e["id"]
        for e in web2_events
        if e["kind"] == "command.finished" and e["message"].startswith("shutdown ")
    )
    stopped = max(
        e["id"]
        for e in web2_events
        if e["kind"] == "instance.state" and e["data"].get("to") == "stopped"
    )
    assert shutdown_done < stopped
    after = {"app": ["web1", "web3"], "lb": ["lb1"]}
    for name in ("lb1", "web1", "web3"):
        wait_for(
            lambda n=name: cluster.configured_with(n, after),  # type: ignore[misc]
            f"{name} configured without web2",
        )
        without = next(
            r
            for r in runs(cluster.hosts[name])
            if r["activity"] == "configure" and members(r) == after
        )
        assert without["started_at"] >= stop_requested

    # Ordering on every host: setup first; versions only move forward.
    for name, host in cluster.hosts.items():
        history = runs(host)
        assert history[0]["activity"] == "setup", name
        versions = [r["cluster_version"] for r in history if r["activity"] == "configure"]
        assert versions == sorted(versions), (name, versions)

    events = server.ok("GET", f"/stacks/{cluster.stack['id']}/events?limit=500")["items"]
    kinds = {e["kind"] for e in events}
    assert {
        "instance.enrolled",
        "instance.state",
        "stack.configure",
        "command.finished",
        "stack.bundle",
    } <= kinds
