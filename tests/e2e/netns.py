"""Network-namespace hosts for the end-to-end tests: several "servers" on one machine.

``hosts(n)`` creates ``n`` Linux network namespaces joined to the root namespace by veth pairs on
one bridge, on a private /24 that no route of this machine covers yet. The bridge holds the root
side's address (``server_address``): a server bound to it is reachable from every host, and the
hosts reach each other over the bridge. Nothing else is routed: the namespaces have no default
route, so any traffic to another address fails at once with "Network is unreachable".

Each host also gets its own loopback (up), its own hostname (a UTS namespace per command, through
``unshare --uts``) and its own ``/etc/hosts`` (``ip netns exec`` bind-mounts
``/etc/netns/NAME/hosts`` over ``/etc/hosts``) naming every host and any extra names the test
asks for. The filesystem is shared: give each host its own directory (``Host.root``).

Names carry the prefix, this process' id and a per-process sequence number, so concurrent runs
never clash, and every link carries an alias naming its run, so a later run with the same prefix
removes what a crashed run left behind (only runs whose process is gone). Teardown is guaranteed
by the context manager, after a failed test too. Needs root, ``ip`` (iproute2) and ``unshare``
(util-linux); without them ``hosts()`` raises ``NetnsUnavailable`` so the test fails, not skips.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ALIAS_MARK = "scalarium-netns"
ETC_NETNS = Path("/etc/netns")
# Candidate /24s, tried in order starting from a pid-dependent offset; the first block is
# the documented test range, the others are fallbacks for machines that already route it.
CANDIDATE_BLOCKS = ("10.213.0.0/16", "10.214.0.0/16", "172.30.0.0/16")
MAX_HOSTS = 200
PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,15}")
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
KILL_GRACE = 3.0
_sequence = itertools.count()


class NetnsUnavailable(RuntimeError):
    """This machine cannot create network-namespace hosts (not root, or tools missing)."""

    code = "netns_unavailable"


class NetnsError(RuntimeError):
    """An ``ip`` command failed while building or tearing down the test network."""

    code = "netns_error"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` in the root namespace."""
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = _ip("-j", *args).stdout.strip()
    return json.loads(out) if out else []


def require_netns() -> None:
    """Raise NetnsUnavailable with a clear message unless namespaces can be made here."""
    missing = [tool for tool in ("ip", "unshare", "hostname") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(
            f"network-namespace hosts need {', '.join(missing)} on PATH (Debian packages "
            "iproute2, util-linux, hostname); install them (CI has them)"
        )
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            f"network-namespace hosts need root (running as uid {os.geteuid()}); "
            "run the e2e tests as root, as CI does"
        )


# --- pure decisions -----------------------------------------------------------------------------


def route_networks(routes: Sequence[Mapping[str, Any]]) -> list[ipaddress.IPv4Network]:
    """The destinations of ``ip -j -4 route show table all`` rows, the default route excepted."""
    networks = []
    for route in routes:
        dst = str(route.get("dst", "default"))
        if dst == "default":
            continue
        try:
            networks.append(ipaddress.IPv4Network(dst, strict=False))
        except ValueError:
            continue
    return networks


def pick_subnet(
    taken: Sequence[ipaddress.IPv4Network], start: int = 0
) -> ipaddress.IPv4Network | None:
    """The first candidate /24 (from ``start`` on in each block) that overlaps no taken network."""
    for block in CANDIDATE_BLOCKS:
        subnets = list(ipaddress.IPv4Network(block).subnets(new_prefix=24))
        for offset in range(len(subnets)):
            candidate = subnets[(start + offset) % len(subnets)]
            if not any(candidate.overlaps(net) for net in taken):
                return candidate
    return None


def run_name(prefix: str, pid: int, sequence: int) -> str:
    """The name of one ``hosts()`` call: what its namespaces and link aliases start with."""
    return f"{prefix}-{pid}-{sequence}"


def run_pid(name: str, prefix: str) -> int | None:
    """The pid in a namespace or run name made by ``run_name`` for ``prefix``, else None."""
    match = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-\d+(?:-h\d+)?", name)
    return int(match.group(1)) if match else None


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


def link_stem(pid: int, sequence: int) -> str:
    """A short per-run stem for link names, which the kernel caps at 15 characters."""
    return f"s{_base36(pid)}-{_base36(sequence)}"


def hosts_file(entries: Mapping[str, str]) -> str:
    """An /etc/hosts text for a namespace host: loopback names plus ``entries`` (name -> ip)."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{name}" for name, address in entries.items()]
    return "\n".join(lines) + "\n"


# --- hosts ----------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Host:
    """One test host: a network namespace with its own address, hostname and /etc/hosts."""

    netns: str
    hostname: str
    address: str
    server_address: str
    root: Path | None = None
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def argv(self, cmd: Sequence[str] | str) -> list[str]:
        """The argv that runs ``cmd`` inside this host (a string goes through ``sh -c``)."""
        command = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        # unshare execs the shell, which execs the command: the pid a caller sees is the
        # command's own, so signals sent to it reach it.
        return [
            "ip",
            "netns",
            "exec",
            self.netns,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.hostname,
            *command,
        ]

    def environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """A minimal environment (PATH, LANG, HOME) with ``env`` on top; nothing else leaks in."""
        base = dict(BASE_ENV)
        base["HOME"] = str(self.root) if self.root else "/root"
        base.update(env or {})
        return base

    def run(
        self, cmd: Sequence[str] | str, *, env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` of ``cmd`` inside this host."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(cmd), env=self.environment(env), **kw)

    def popen(
        self, cmd: Sequence[str] | str, *, env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` of ``cmd`` inside this host; stopped and reaped at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(cmd), env=self.environment(env), **kw)
        self._procs.append(proc)
        return proc

    def stop_processes(self, grace: float = KILL_GRACE) -> None:
        """Stop every process in this namespace (TERM, then KILL) and reap the ones we started."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                self._reap()
                pids = [pid for pid in pids if _pid_alive(pid) and not _is_zombie(pid)]
                if pids:
                    time.sleep(0.05)
            if not pids:
                break
        for proc in self._procs:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("host %s: process %s did not exit", self.hostname, proc.pid)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()

    def _pids(self) -> list[int]:
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(word) for word in out.split() if word.isdigit()]

    def _reap(self) -> None:
        for proc in self._procs:
            proc.poll()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@dataclass
class TestNet:
    """The hosts of one ``hosts()`` call and the root side's address they all reach."""

    __test__ = False  # not a pytest test class, whatever its name

    name: str
    subnet: ipaddress.IPv4Network
    server_address: str
    hosts: list[Host]
    bridge: str
    links: list[str]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]


def cleanup_leftovers(prefix: str) -> list[str]:
    """Remove namespaces, links and /etc/netns entries of dead runs with ``prefix``."""
    removed: list[str] = []
    for entry in _ip_json("netns", "list"):
        name = str(entry.get("name", ""))
        pid = run_pid(name, prefix)
        if pid is not None and not _pid_alive(pid):
            Host(name, name, "", "").stop_processes(grace=1.0)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for link in _ip_json("link", "show"):
        alias = str(link.get("ifalias", ""))
        mark, _, name = alias.partition(" ")
        pid = run_pid(name, prefix) if mark == ALIAS_MARK else None
        if pid is not None and not _pid_alive(pid):
            _ip("link", "del", str(link["ifname"]), check=False)
            removed.append(str(link["ifname"]))
    if ETC_NETNS.is_dir():
        for path in ETC_NETNS.iterdir():
            pid = run_pid(path.name, prefix)
            if pid is not None and not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
    for name in removed:
        log.info("netns %s: removed, left over by a dead run", name)
    return removed


def _lock_path() -> str:
    return os.path.join(tempfile.gettempdir(), "scalarium-netns.lock")


def _teardown(net: TestNet) -> None:
    for host in net.hosts:
        host.stop_processes()
    for host in net.hosts:
        _ip("netns", "del", host.netns, check=False)
        shutil.rmtree(ETC_NETNS / host.netns, ignore_errors=True)
    existing = {str(link["ifname"]) for link in _ip_json("link", "show")}
    for link in [*net.links, net.bridge]:
        if link in existing:
            _ip("link", "del", link, check=False)


def _build(net: TestNet, stem: str, extra_hosts: Mapping[str, str]) -> None:
    alias = f"{ALIAS_MARK} {net.name}"
    _ip("link", "add", net.bridge, "type", "bridge")
    _ip("link", "set", net.bridge, "alias", alias)
    _ip("addr", "add", f"{net.server_address}/{net.subnet.prefixlen}", "dev", net.bridge)
    _ip("link", "set", net.bridge, "up")
    names = {host.hostname: host.address for host in net.hosts}
    names.update(extra_hosts)
    for index, host in enumerate(net.hosts):
        outside, inside = f"{stem}v{index}", f"{stem}p{index}"
        _ip("netns", "add", host.netns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        net.links.append(outside)
        _ip("link", "set", outside, "alias", alias)
        _ip("link", "set", outside, "master", net.bridge, "up")
        _ip("link", "set", inside, "netns", host.netns)
        inns = ("-n", host.netns)
        _ip(*inns, "link", "set", inside, "name", "eth0")
        _ip(*inns, "addr", "add", f"{host.address}/{net.subnet.prefixlen}", "dev", "eth0")
        _ip(*inns, "link", "set", "eth0", "up")
        _ip(*inns, "link", "set", "lo", "up")
        etc = ETC_NETNS / host.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts_file(names), encoding="utf-8")
        if host.root is not None:
            host.root.mkdir(parents=True, exist_ok=True)


@contextmanager
def hosts(
    n: int,
    prefix: str = "scl",
    *,
    workdir: Path | None = None,
    extra_hosts: Mapping[str, str] | None = None,
) -> Iterator[TestNet]:
    """Create ``n`` namespace hosts on a fresh private /24 and remove everything afterwards.

    With ``workdir``, each host gets ``workdir/<hostname>`` as ``Host.root`` (for install.sh
    ``--root``). ``extra_hosts`` adds names to every host's /etc/hosts; the name ``server`` always
    resolves to ``server_address``.
    """
    require_netns()
    if not PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must be a letter then up to 15 letters/digits/_")
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"n must be between 1 and {MAX_HOSTS}, got {n}")
    pid, sequence = os.getpid(), next(_sequence)
    name = run_name(prefix, pid, sequence)
    stem = link_stem(pid, sequence)
    with open(_lock_path(), "a+") as lock:
        # Held while choosing the subnet and until its route exists, so that two runs starting
        # together cannot pick the same /24.
        fcntl.flock(lock, fcntl.LOCK_EX)
        cleanup_leftovers(prefix)
        taken = route_networks(_ip_json("-4", "route", "show", "table", "all"))
        subnet = pick_subnet(taken, start=pid % 256)
        if subnet is None:
            raise NetnsUnavailable(f"no free test subnet in {', '.join(CANDIDATE_BLOCKS)}")
        addresses = list(subnet.hosts())
        server_address = str(addresses[0])
        net = TestNet(
            name=name,
            subnet=subnet,
            server_address=server_address,
            hosts=[
                Host(
                    netns=f"{name}-h{index}",
                    hostname=f"{prefix}-host{index + 1}",
                    address=str(addresses[index + 1]),
                    server_address=server_address,
                    root=(workdir / f"{prefix}-host{index + 1}") if workdir else None,
                )
                for index in range(n)
            ],
            bridge=f"{stem}b",
            links=[],
        )
        try:
            _build(net, stem, {"server": server_address, **(extra_hosts or {})})
        except BaseException:
            _teardown(net)
            raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    log.info("netns %s: %d hosts on %s, server side %s", name, n, subnet, server_address)
    try:
        yield net
    finally:
        _teardown(net)
        log.info("netns %s: removed", name)
