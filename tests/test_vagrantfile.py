"""The Vagrantfile: valid Ruby, the machines it defines, and its provisioning scripts.

Vagrant itself is not installed on the test machines, so the Vagrantfile is evaluated by Ruby
with a stand-in for `Vagrant.configure` that records every setting; the embedded shell scripts
are checked with bash and shellcheck, and the server's provisioning script is run for real
against a TLS `scalarium server` on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import tls_server

REPO = Path(__file__).resolve().parents[1]
VAGRANTFILE = REPO / "Vagrantfile"
SCRIPTS = ("SERVER_INSTALL", "SERVER_CLUSTER", "NODE_BOOTSTRAP")

# Evaluates the Vagrantfile with a recording Vagrant; prints {"calls": [...], "scripts": {...}}.
RECORDER = r"""
require "json"

class Recorder
  def initialize(path, log)
    @path, @log = path, log
  end

  def method_missing(name, *args, **kw, &block)
    name = name.to_s
    if name.end_with?("=")
      @log << { "path" => @path + [name.chomp("=")], "value" => args[0] }
      return args[0]
    end
    @log << { "path" => @path + [name], "args" => args, "kw" => kw }
    child = Recorder.new(@path + [name] + args.map(&:to_s), @log)
    block&.call(child)
    child
  end

  def respond_to_missing?(*) = true
end

module Vagrant
  LOG = []
  def self.require_version(*) = nil
  def self.configure(_version) = yield(Recorder.new([], LOG))
end

load ARGV[0]
scripts = ARGV[1..].to_h { |name| [name, Object.const_get(name)] }
puts JSON.generate({ "calls" => Vagrant::LOG, "scripts" => scripts })
"""


def require_ruby() -> str:
    """The ruby binary (a test dependency, see the Makefile)."""
    ruby = shutil.which("ruby")
    assert ruby, "ruby is needed to check the Vagrantfile (Debian package ruby)"
    return ruby


def evaluate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the Vagrantfile under the recording stand-in with ``env`` added."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SCALARIUM_")}
    return subprocess.run(
        [require_ruby(), "-e", RECORDER, str(VAGRANTFILE), *SCRIPTS],
        env=clean | env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def recorded(env: dict[str, str] | None = None) -> dict[str, Any]:
    """What the Vagrantfile configures: the calls and the embedded scripts."""
    result = evaluate(env or {})
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def machines(calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per defined machine: its private IP and its provisioners' env by name."""
    found: dict[str, dict[str, Any]] = {}
    for call in calls:
        path = call["path"]
        if path == ["vm", "define"]:
            found[call["args"][0]] = {"ip": None, "provision": {}}
        elif path[:2] == ["vm", "define"] and path[3:] == ["vm", "network"]:
            found[path[2]]["ip"] = call["kw"]["ip"]
        elif path[:2] == ["vm", "define"] and path[3:] == ["vm", "provision"]:
            found[path[2]]["provision"][call["args"][0]] = call["kw"]
    return found


def test_vagrantfile_is_valid_ruby() -> None:
    result = subprocess.run(
        [require_ruby(), "-c", str(VAGRANTFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


@pytest.mark.parametrize(
    ("env", "nodes"),
    [({}, 2), ({"SCALARIUM_NODES": "4"}, 4), ({"SCALARIUM_NODES": "0"}, 0)],
)
def test_one_server_and_n_nodes_on_the_private_network(env: dict[str, str], nodes: int) -> None:
    doc = recorded(env)
    found = machines(doc["calls"])
    assert list(found) == ["server"] + [f"node{n}" for n in range(1, nodes + 1)]
    assert found["server"]["ip"] == "192.168.56.10"
    cluster = found["server"]["provision"]["cluster"]
    assert cluster["env"]["NODES"] == str(nodes)
    assert found["server"]["provision"]["install"]["env"]["PUBLIC_URL"] == (
        "https://192.168.56.10:8080"
    )
    for n in range(1, nodes + 1):
        node = found[f"node{n}"]
        assert node["ip"] == f"192.168.56.{10 + n}"
        bootstrap = node["provision"]["bootstrap"]["env"]
        # Each node reads exactly the file the server writes for it.
        assert bootstrap == {"NODE": f"node{n}", "SHARED": cluster["env"]["SHARED"]}
    boxes = [c["value"] for c in doc["calls"] if c["path"] == ["vm", "box"]]
    assert boxes == ["bento/debian-12"]


@pytest.mark.parametrize("value", ["x", "-1", "51"])
def test_a_bad_node_count_is_refused(value: str) -> None:
    result = evaluate({"SCALARIUM_NODES": value})
    assert result.returncode != 0


@pytest.mark.parametrize("name", SCRIPTS)
def test_embedded_scripts_are_clean_bash(name: str, tmp_path: Path) -> None:
    script = tmp_path / f"{name}.sh"
    script.write_text(recorded()["scripts"][name])
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is a test dependency (Debian package shellcheck)"
    result = subprocess.run(
        [shellcheck, "-s", "bash", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_server_provisioning_writes_fresh_user_data_for_every_node(
    tmp_path: Path, redis_client: Any
) -> None:
    """The server VM's script, run against a real server: stack, layer, instances, user-data."""
    script = tmp_path / "cluster.sh"
    script.write_text(recorded()["scripts"]["SERVER_CLUSTER"])
    shared = tmp_path / "shared"
    cli = Path(sys.executable).parent / "scalarium"
    with tls_server("127.0.0.1", "127.0.0.1", tmp_path / "server") as server:

        def provision(nodes: int) -> subprocess.CompletedProcess[str]:
            env = {
                "PATH": os.environ["PATH"],
                "PUBLIC_URL": server.public_url,
                "SHARED": str(shared),
                "STACK": "vagrant",
                "LAYER": "web",
                "NODES": str(nodes),
                "SCALARIUM_DATA_DIR": str(server.data_dir),
                "SCALARIUM_CLI": str(cli),
            }
            return subprocess.run(
                ["bash", str(script)], env=env, capture_output=True, text=True, timeout=120
            )

        first = provision(2)
        assert first.returncode == 0, first.stderr
        scripts = {p.name: p.read_text() for p in shared.iterdir()}
        assert sorted(scripts) == ["node1.sh", "node2.sh"]
        for path in shared.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds a token
        assert all(f"{server.public_url}/bootstrap/v1/install.sh" in s for s in scripts.values())

        # Again with one node more: nothing duplicated, node3 added, tokens reissued.
        again = provision(3)
        assert again.returncode == 0, again.stderr
        (stack,) = [s for s in server.ok("GET", "/stacks")["items"] if s["shortname"] == "vagrant"]
        instances = server.ok("GET", f"/stacks/{stack['id']}/instances")["items"]
        assert sorted((i["hostname"], i["status"]) for i in instances) == [
            ("node1", "pending"),
            ("node2", "pending"),
            ("node3", "pending"),
        ]
        assert (shared / "node1.sh").read_text() != scripts["node1.sh"]
        layers = server.ok("GET", f"/stacks/{stack['id']}/layers")["items"]
        assert [layer["shortname"] for layer in layers] == ["web"]
