"""The network-namespace host harness: reachability, isolation, and teardown that leaves nothing."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.e2e.netns import (
    ETC_NETNS,
    TestNet,
    cleanup_leftovers,
    hosts,
    link_stem,
    pick_subnet,
    route_networks,
    run_name,
    run_pid,
)

pytestmark = pytest.mark.e2e

# Fetches a URL from inside a host; prints the body, or "ERR <errno name>" on a socket error.
FETCH = """
import errno, sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except OSError as exc:
    reason = getattr(exc, "reason", exc)
    print("ERR", errno.errorcode.get(getattr(reason, "errno", None) or 0, repr(reason)))
"""

# Polls a URL until it answers (a server just started in the namespace), printing the body.
FETCH_UNTIL_UP = """
import sys, time, urllib.request
for _ in range(100):
    try:
        print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
        break
    except OSError:
        time.sleep(0.1)
"""


def fetch(net: TestNet, index: int, url: str) -> str:
    """The body (or ERR ...) host ``index`` gets for ``url``."""
    proc = net[index].run(
        [sys.executable, "-c", FETCH, url], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


class EchoClient(BaseHTTPRequestHandler):
    """Answers every GET with the client's address, so a test sees who asked."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def net(tmp_path: Path) -> Iterator[TestNet]:
    """Two namespace hosts; fails (not skips) where namespaces cannot be made."""
    with hosts(2, prefix="sclt", workdir=tmp_path) as created:
        yield created


@pytest.fixture
def root_server(net: TestNet) -> Iterator[str]:
    """An HTTP server bound to the root side's address; yields its URL."""
    server = ThreadingHTTPServer((net.server_address, 0), EchoClient)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{net.server_address}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def netns_names() -> set[str]:
    """Every network namespace name on this machine."""
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return {entry["name"] for entry in json.loads(out or "[]")}


def link_names() -> set[str]:
    """Every link name in the root namespace."""
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def test_each_host_reaches_a_server_bound_to_the_root_side_address(
    net: TestNet, root_server: str
) -> None:
    for index, host in enumerate(net):
        assert fetch(net, index, root_server) == host.address


def test_hosts_have_distinct_addresses_in_the_subnet_and_their_own_root_dirs(
    net: TestNet, tmp_path: Path
) -> None:
    addresses = [host.address for host in net]
    assert len(set(addresses)) == 2
    assert all(ipaddress.ip_address(a) in net.subnet for a in addresses)
    assert ipaddress.ip_address(net.server_address) in net.subnet
    assert [host.root for host in net] == [tmp_path / host.hostname for host in net]
    assert all(host.root is not None and host.root.is_dir() for host in net)


def test_hosts_cannot_see_each_others_loopback(net: TestNet) -> None:
    token = uuid.uuid4().hex
    (Path(str(net[0].root)) / "index.html").write_text(token)
    server = net[0].popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "18777"],
        cwd=net[0].root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = "http://127.0.0.1:18777/index.html"
    ready = net[0].run(
        [sys.executable, "-c", FETCH_UNTIL_UP, url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ready.stdout.strip() == token, ready.stderr
    assert fetch(net, 1, url) == "ERR ECONNREFUSED"
    assert server.poll() is None


def test_hosts_reach_each_other_over_the_bridge_and_by_name(net: TestNet) -> None:
    server = net[1].popen(
        [sys.executable, "-m", "http.server", "--bind", net[1].address, "18778"],
        cwd=net[1].root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (Path(str(net[1].root)) / "who").write_text("host2")
    url = f"http://{net[1].hostname}:18778/who"
    ready = net[0].run(
        [sys.executable, "-c", FETCH_UNTIL_UP, url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ready.stdout.strip() == "host2", ready.stderr
    assert server.poll() is None


def test_nothing_but_the_test_subnet_is_routed_from_a_host(net: TestNet) -> None:
    # TEST-NET-3 stands for "anywhere else": with no default route the connect fails locally.
    assert fetch(net, 0, "http://203.0.113.7:80/") == "ERR ENETUNREACH"


def test_each_host_has_its_own_hostname_and_resolves_server(net: TestNet) -> None:
    for host in net:
        proc = host.run("hostname; getent hosts server", capture_output=True, text=True, timeout=10)
        name, entry = proc.stdout.splitlines()
        assert name == host.hostname
        assert entry.split()[0] == net.server_address


def test_the_environment_is_only_what_the_test_passes(net: TestNet) -> None:
    os.environ["SCALARIUM_NETNS_LEAK"] = "1"
    try:
        proc = net[0].run(["env"], env={"MINE": "yes"}, capture_output=True, text=True)
    finally:
        del os.environ["SCALARIUM_NETNS_LEAK"]
    names = {line.split("=", 1)[0] for line in proc.stdout.splitlines()}
    assert "MINE" in names
    assert "SCALARIUM_NETNS_LEAK" not in names


def test_teardown_leaves_no_namespace_link_or_process_behind_even_after_a_failure(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        with hosts(2, prefix="sclt", workdir=tmp_path) as created:
            sleeper = created[0].popen(["sleep", "300"])
            names = {host.netns for host in created}
            links = {*created.links, created.bridge}
            assert names <= netns_names()
            assert links <= link_names()
            raise RuntimeError("the test failed")
    assert sleeper.returncode is not None
    # Only this run's names: other runs on the machine may be adding and removing their own.
    assert not names & netns_names()
    assert not links & link_names()
    assert not any((ETC_NETNS / name).exists() for name in names)


def test_concurrent_runs_get_their_own_names_and_subnets(tmp_path: Path) -> None:
    with hosts(1, prefix="sclt") as first, hosts(1, prefix="sclt") as second:
        assert first[0].netns != second[0].netns
        assert first.bridge != second.bridge
        assert not first.subnet.overlaps(second.subnet)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_crashed_runs_leftovers_are_removed_by_the_next_run_with_the_same_prefix() -> None:
    stale = run_name("sclt", dead_pid(), 0)
    stale_ns, stale_link = f"{stale}-h0", "sclt-stale0"
    live_ns = f"{run_name('sclt', os.getpid(), 999)}-h0"
    subprocess.run(["ip", "netns", "add", stale_ns], check=True)
    subprocess.run(["ip", "netns", "add", live_ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", stale_link, "type", "bridge"], check=True)
        subprocess.run(
            ["ip", "link", "set", stale_link, "alias", f"scalarium-netns {stale}"], check=True
        )
        removed = cleanup_leftovers("sclt")
        assert stale_ns not in netns_names()
        assert stale_link not in link_names()
        assert set(removed) == {stale_ns, stale_link}
        assert live_ns in netns_names(), "a live run's namespace must be left alone"
    finally:
        subprocess.run(["ip", "netns", "del", live_ns], check=False)
        subprocess.run(["ip", "netns", "del", stale_ns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", stale_link], check=False, capture_output=True)


@pytest.mark.parametrize(
    ("routes", "start", "expected"),
    [
        ([], 5, "10.213.5.0/24"),
        ([{"dst": "default"}, {"dst": "10.213.5.0/24"}], 5, "10.213.6.0/24"),
        ([{"dst": "10.213.5.7", "type": "local"}], 5, "10.213.6.0/24"),
        ([{"dst": "10.213.0.0/16"}], 0, "10.214.0.0/24"),
        ([{"dst": "10.0.0.0/8"}], 3, "172.30.3.0/24"),
        ([{"dst": "10.0.0.0/8"}, {"dst": "172.16.0.0/12"}], 3, None),
        ([{"dst": "10.213.255.0/24"}], 255, "10.213.0.0/24"),
    ],
)
def test_pick_subnet_skips_every_network_already_routed(
    routes: list[dict[str, str]], start: int, expected: str | None
) -> None:
    picked = pick_subnet(route_networks(routes), start=start)
    assert (str(picked) if picked else None) == expected


@pytest.mark.parametrize(
    ("name", "pid"),
    [
        ("sclt-123-0-h4", 123),
        ("sclt-123-7", 123),
        ("sclt2-123-0-h4", None),
        ("scl-123-0-h4", None),
        ("sclt-abc-0-h1", None),
        ("sclt-123-0-h4-extra", None),
    ],
)
def test_run_pid_only_matches_names_of_the_same_prefix(name: str, pid: int | None) -> None:
    assert run_pid(name, "sclt") == pid


def test_link_names_fit_the_kernel_limit_for_the_largest_pid_and_host_count() -> None:
    stem = link_stem(4194304, 10_000)
    assert len(f"{stem}v199") <= 15


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root")
def test_hosts_fails_with_a_clear_message_when_not_root() -> None:
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            "from tests.e2e.netns import hosts\nwith hosts(1): pass",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=30,
    )
    assert proc.returncode != 0
    assert "NetnsUnavailable: network-namespace hosts need root" in proc.stderr
