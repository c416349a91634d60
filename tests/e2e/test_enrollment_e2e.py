"""Issue #3 end to end: a separate host runs the generated user-data and enrolls over HTTPS.

A real `scalarium server` serves HTTPS on the root side of a network-namespace network (see
conftest.py). A namespace host runs the user-data the API hands out: it writes the CA, fetches the
real install.sh with curl over HTTPS (verified with that CA), which downloads the agent, makes the
key, enrolls with the one-time token and runs the agent in the foreground. The instance must go
`booting` then `running_setup`, hold a certificate that chains to the CA, and the token must show
up in no log; a second host trying the same token is refused with `token_reused`.

Two things keep it hermetic, and both are visible below: the one path the user-data itself
writes (`/etc/scalarium`) is moved under the host's own directory, and install.sh gets
`SCALARIUM_ROOT` / `SCALARIUM_FOREGROUND=1` (its documented defaults for `--root` and
`--foreground`) so that it installs under that directory and starts no systemd unit. Chef is the
test double (tests/chef_double), found on the host's PATH as `cinc-solo` as an image with Cinc
would have it.
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import E2EServer
from tests.e2e.netns import BASE_ENV, Host, TestNet

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHEF_DOUBLE = REPO / "tests" / "chef_double" / "chef-solo"
NODE_ETC = "/etc/scalarium"
# How many times the user-data names NODE_ETC (mkdir, the CA here-document, curl --cacert).
NODE_ETC_MENTIONS = 3
STATE_TIMEOUT = 90.0
# Where a new instance stops moving on its own.
SETTLED = {"online", "setup_failed", "start_failed"}


def token_of(user_data: str) -> str:
    """The enrollment token on the user-data's install line."""
    install = next(line for line in user_data.splitlines() if "bootstrap/v1/install.sh" in line)
    words = shlex.split(install)
    return words[words.index("--token") + 1]


def hermetic(user_data: str, root: Path) -> str:
    """The user-data with its one own write (the CA under /etc/scalarium) moved under ``root``.

    Everything else, the curl | bash line and its arguments included, stays as the server wrote
    it. The count check makes a changed user-data fail here loudly instead of writing to the
    machine's /etc.
    """
    assert user_data.count(NODE_ETC) == NODE_ETC_MENTIONS, user_data
    return user_data.replace(NODE_ETC, f"{root}{NODE_ETC}")


def node_env(host: Host) -> dict[str, str]:
    """The environment the user-data runs with on a host (on top of the harness' minimal one)."""
    assert host.root is not None
    bin_dir = host.root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    if not (bin_dir / "cinc-solo").exists():
        (bin_dir / "cinc-solo").symlink_to(CHEF_DOUBLE)
    return {
        "PATH": f"{bin_dir}:{BASE_ENV['PATH']}",
        "SCALARIUM_ROOT": str(host.root),
        "SCALARIUM_FOREGROUND": "1",
        "PYTHONUNBUFFERED": "1",
        "CHEF_DOUBLE_RECORD": str(host.root / "chef-double-runs.jsonl"),
    }


def write_script(host: Host, user_data: str) -> Path:
    """The host's copy of the user-data, ready for ``bash``."""
    assert host.root is not None
    path = host.root / "user-data.sh"
    path.write_text(hermetic(user_data, host.root))
    path.chmod(0o700)
    return path


@contextmanager
def running(host: Host, script: Path, log: Path) -> Iterator[Any]:
    """Run the user-data on a host in the background (install.sh execs the agent there)."""
    with open(log, "wb") as out:
        proc = host.popen(["bash", str(script)], env=node_env(host), stdout=out, stderr=out)
    try:
        yield proc
    finally:
        host.stop_processes()


def watch_states(server: E2EServer, instance_id: str, proc: Any, log: Path) -> list[str]:
    """Every status the API shows while the node comes up, until it settles (bounded)."""
    seen: list[str] = []
    deadline = time.monotonic() + STATE_TIMEOUT
    while time.monotonic() < deadline:
        status = server.ok("GET", f"/instances/{instance_id}")["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in SETTLED:
            return seen
        if proc.poll() is not None:
            pytest.fail(f"the node exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"instance stuck after {seen}:\n{log.read_text()[-4000:]}")


def state_changes(server: E2EServer, stack_id: str, instance_id: str) -> list[str]:
    """The statuses the instance moved to, oldest first, from the stack's events."""
    page = server.ok("GET", f"/stacks/{stack_id}/events?kind=instance.state&limit=100")
    return [e["data"]["to"] for e in reversed(page["items"]) if e["instance_id"] == instance_id]


def stored_certificates(server: E2EServer, instance_id: str) -> list[str]:
    """The PEM certificates the server stored for an instance (read-only look at its SQLite)."""
    uri = f"file:{server.data_dir / 'scalarium.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        rows = db.execute(
            "SELECT pem FROM instance_certificates WHERE instance_id = ? AND revoked_at IS NULL",
            (instance_id,),
        ).fetchall()
    return [str(row[0]) for row in rows]


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the openssl command line tool."""
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def test_user_data_enrolls_a_separate_host_over_https_and_the_token_works_once(
    e2e_net: TestNet, e2e_server: E2EServer, tmp_path: Path
) -> None:
    server = e2e_server
    stack = server.ok("POST", "/stacks", {"shortname": "e2e", "name": "End to end"})
    layer = server.ok("POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})
    instance = server.ok(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "web1", "layer_ids": [layer["id"]], "provider": "manual"},
    )
    issued = server.ok("GET", f"/instances/{instance['id']}/user-data")
    assert issued["status"] == "pending"
    user_data = issued["user_data"]
    token = token_of(user_data)
    assert f"{server.public_url}/bootstrap/v1/install.sh" in user_data

    node, intruder = e2e_net[0], e2e_net[1]
    assert node.root is not None and intruder.root is not None
    node_log = tmp_path / "node.log"
    with running(node, write_script(node, user_data), node_log) as proc:
        seen = watch_states(server, instance["id"], proc, node_log)
        # The API poll can miss a state that lasts milliseconds; the events cannot.
        changes = state_changes(server, stack["id"], instance["id"])
        assert changes == ["pending", "booting", "running_setup", "online"], (changes, seen)
        # Setup ran on the node, through the agent, with the chef double as its chef-solo.
        (run,) = [
            json.loads(line)
            for line in (node.root / "chef-double-runs.jsonl").read_text().splitlines()
        ]
        assert (run["activity"], run["node_name"], run["outcome"]) == (
            "setup",
            instance["id"],
            "success",
        )

        etc = node.root / "etc" / "scalarium"
        ca, node_cert = etc / "ca.pem", etc / "agent.pem"
        # The CA the user-data wrote is the server's, and curl verified install.sh with it.
        assert ca.read_bytes() == server.ca_path.read_bytes()
        (stored,) = stored_certificates(server, instance["id"])
        assert node_cert.read_text().strip() == stored.strip()
        verified = openssl("verify", "-CAfile", str(ca), str(node_cert))
        assert verified.returncode == 0 and ": OK" in verified.stdout, verified
        subject = openssl("x509", "-noout", "-subject", "-in", str(node_cert)).stdout
        assert instance["id"] in subject
        # Installed under the host's own directory, in the foreground: no unit, nothing in /etc.
        assert (node.root / "opt" / "scalarium" / "agent.py").is_file()
        assert not (node.root / "etc" / "systemd").exists()
        assert not Path(NODE_ETC).exists()

        # Another machine with the same user-data: the token was spent.
        intruder_log = tmp_path / "intruder.log"
        with open(intruder_log, "wb") as out:
            second = intruder.run(
                ["bash", str(write_script(intruder, user_data))],
                env=node_env(intruder),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        refusal = intruder_log.read_text()
        assert second.returncode != 0, refusal
        assert "token_reused" in refusal
        assert not (intruder.root / "etc" / "scalarium" / "agent.pem").exists()

    refused = server.ok("GET", f"/stacks/{stack['id']}/events?kind=agent.refused&limit=100")
    assert any(e["data"].get("code") == "token_reused" for e in refused["items"])
    everything = server.ok("GET", f"/stacks/{stack['id']}/events?limit=100")

    logs = {
        "server log": server.log_path.read_text(errors="replace"),
        "install and agent log": node_log.read_text(errors="replace"),
        "second host's log": refusal,
        "chef logs": "".join(
            p.read_text(errors="replace")
            for p in (node.root / "var" / "lib" / "scalarium").rglob("*.log")
        ),
        "events": json.dumps(everything),
        "agent.json": (node.root / "etc" / "scalarium" / "agent.json").read_text(),
    }
    assert "enrolled with" in logs["install and agent log"]
    for name, text in logs.items():
        assert token not in text, f"the enrollment token is in the {name}"
