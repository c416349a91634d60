"""The `local` provider: each instance is the real install.sh and agent, run on this host.

An instance's "machine" is the directory DATA_DIR/local/<instance_id>, used as install.sh's
`--root`, and the agent process that install.sh becomes (`--foreground` execs the agent, so the
pid stays the same). Starting runs bootstrap/install.sh from this repository, detached in its own
session so that it outlives the RQ job; the one-time enrollment token reaches it on stdin
(`--token-file -`), never on a command line that `ps` shows. Stopping signals the agent's process
group (SIGTERM, then SIGKILL after a grace period). Terminating stops and removes the directory.

One host only: the pid files and the data dir are this host's, so every worker that runs local
provider jobs must share the data dir of the server (as `scalarium up` and `make run` do).
Process inspection reads /proc (Linux).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from server import pki
from server.config import Settings
from server.enrollment import load_configured_ca
from server.providers import ProviderError

log = logging.getLogger(__name__)

INSTALL_SH = Path(__file__).resolve().parents[2] / "bootstrap" / "install.sh"
# The agent stops on SIGTERM (killing a running chef, reported failed), but only once its long
# poll returns (up to its poll_wait, 30 s); SIGKILL after this is safe: a command it was running
# is reported interrupted when the agent next starts.
STOP_GRACE_SECONDS = 10.0
KILL_WAIT_SECONDS = 5.0
# How long a start waits to see install.sh enroll or fail, so a broken start is reported as
# such instead of as a boot that never finishes.
ENROLL_WAIT_SECONDS = 30.0
POLL_SECONDS = 0.1
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LOG_TAIL_LINES = 3


@dataclass(frozen=True)
class Layout:
    """Where one local instance keeps its files."""

    root: Path

    @property
    def ca_file(self) -> Path:
        """The CA certificate install.sh verifies the server with."""
        return self.root / "etc" / "scalarium" / "ca.pem"

    @property
    def certificate(self) -> Path:
        """The agent's certificate: present once the instance has enrolled."""
        return self.root / "etc" / "scalarium" / "agent.pem"

    @property
    def pid_file(self) -> Path:
        """The agent's pid (also its process group and session id)."""
        return self.root / "run" / "scalarium-agent.pid"

    @property
    def log_file(self) -> Path:
        """install.sh's and the agent's output."""
        return self.root / "var" / "log" / "scalarium-agent.log"

    @property
    def lock_file(self) -> Path:
        """Serialises start, stop and remove of one instance on this host."""
        return self.root.with_name(self.root.name + ".lock")


def layout(data_dir: Path, instance_id: str) -> Layout:
    """The layout of a local instance under the data dir."""
    if not _SAFE_ID.fullmatch(instance_id):
        raise ProviderError("bad_instance_id", f"instance id {instance_id!r} is not a safe name")
    return Layout(Path(data_dir).resolve() / "local" / instance_id)


def install_command(settings: Settings, where: Layout) -> list[str]:
    """install.sh's command line for a local instance (the token comes on stdin)."""
    argv = [
        "bash",
        str(INSTALL_SH),
        "--server",
        settings.public_url.rstrip("/"),
        "--token-file",
        "-",
        "--root",
        str(where.root),
        "--foreground",
        "--chef",
        "skip",
        "--ca",
        str(where.ca_file),
    ]
    if settings.local_chef_binary:
        argv += ["--chef-binary", settings.local_chef_binary]
    return argv


def agent_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a local agent: this process's, without Scalarium's own settings
    (database URLs and secrets are no business of a node; SCALARIUM_AGENT_ONCE would stop it)."""
    env = {k: v for k, v in environ.items() if not k.startswith("SCALARIUM_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_tail(text: str, lines: int = _LOG_TAIL_LINES, limit: int = 500) -> str:
    """The last non-empty lines of a log, on one line, for an event's reason."""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-limit:]


# ---------------------------------------------------------------- processes (/proc)


@dataclass(frozen=True)
class ProcessInfo:
    """What /proc says about one process."""

    pid: int
    state: str
    pgrp: int


def parse_stat(text: str) -> ProcessInfo:
    """Parse /proc/PID/stat (the command name may hold spaces and parentheses)."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    return ProcessInfo(int(head.split("(", 1)[0]), fields[0], int(fields[2]))


def _process(pid: int) -> ProcessInfo | None:
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def _reap(pid: int) -> None:
    # A zombie child of this process (the agent started by an in-process worker) is dead.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _is_alive(info: ProcessInfo | None) -> bool:
    if info is None:
        return False
    if info.state in ("Z", "X"):
        _reap(info.pid)
        return False
    return True


def _inside(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + os.sep)


def processes_of(root: Path, pgid: int | None) -> list[int]:
    """Live processes of a local instance: the agent's process group, and whatever runs inside
    its root (chef runs in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        info = _process(int(entry.name))
        if not _is_alive(info):
            continue
        assert info is not None
        if pgid is not None and info.pgrp == pgid:
            found.append(info.pid)
            continue
        with contextlib.suppress(OSError):
            if _inside(os.readlink(entry / "cwd"), root):
                found.append(info.pid)
    return found


def running_agent(where: Layout) -> int | None:
    """The pid of the instance's agent (or install.sh before it), if it is running."""
    try:
        pid = int(where.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _is_alive(_process(pid)):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # A recycled pid belongs to some other program: only ours names this root.
    return pid if str(where.root).encode() in cmdline else None


@contextlib.contextmanager
def _locked(where: Layout) -> Iterator[None]:
    where.lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(where.lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _signal_all(pgid: int | None, pids: list[int], sig: signal.Signals) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(root: Path, pgid: int | None, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        left = processes_of(root, pgid)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_SECONDS)


def _spawn(argv: list[str], env: dict[str, str], token: str, log_file: Path) -> int:
    """Start argv detached (new session), token on stdin, output appended to log_file."""
    bash = shutil.which(argv[0], path=env.get("PATH"))
    if bash is None:
        raise ProviderError("local_start_failed", f"{argv[0]} not found on PATH")
    read_end, write_end = os.pipe()
    try:
        # The token fits in the pipe buffer: write it all before the child exists, then EOF.
        os.write(write_end, (token + "\n").encode())
    finally:
        os.close(write_end)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return os.posix_spawn(
            bash,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    except OSError as exc:
        raise ProviderError("local_start_failed", f"cannot run install.sh: {exc}") from None
    finally:
        os.close(read_end)
        os.close(log_fd)


def _exit_status(pid: int) -> int | None:
    """The exit status of our child `pid` once it has exited, else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if _is_alive(_process(pid)) else -1
    return os.waitstatus_to_exitcode(status) if done else None


class LocalProvider:
    """Instances as install.sh + agent processes under DATA_DIR/local."""

    def __init__(
        self,
        settings: Settings,
        issue_token: Callable[[str], str],
        enroll_wait: float = ENROLL_WAIT_SECONDS,
        stop_grace: float = STOP_GRACE_SECONDS,
    ) -> None:
        self.settings = settings
        self.issue_token = issue_token
        self.enroll_wait = enroll_wait
        self.stop_grace = stop_grace

    def layout(self, instance_id: str) -> Layout:
        """The instance's files."""
        return layout(self.settings.data_dir, instance_id)

    def start(self, instance_id: str) -> str:
        """Run install.sh for the instance unless its agent is already running."""
        where = self.layout(instance_id)
        with _locked(where):
            running = running_agent(where)
            if running is not None:
                return f"local agent already running (pid {running})"
            try:
                return self._start(instance_id, where)
            except (OSError, pki.PKIError) as exc:
                raise ProviderError("local_start_failed", f"cannot start: {exc}") from None

    def _start(self, instance_id: str, where: Layout) -> str:
        for directory in (where.ca_file.parent, where.pid_file.parent, where.log_file.parent):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca_pem = pki.ca_certificate_pem(load_configured_ca(self.settings))
        where.ca_file.write_bytes(ca_pem)
        argv = install_command(self.settings, where)
        token = self.issue_token(instance_id)
        pid = _spawn(argv, agent_environment(os.environ), token, where.log_file)
        where.pid_file.write_text(f"{pid}\n")
        log.info("instance %s: install.sh started as pid %s under %s", instance_id, pid, where.root)
        return f"local agent started (pid {pid})"

    def wait_booted(self, instance_id: str) -> str:
        """Wait (bounded) until install.sh has enrolled the instance; raise if it exited."""
        where = self.layout(instance_id)
        try:
            pid = int(where.pid_file.read_text().strip())
        except (OSError, ValueError):
            raise ProviderError("local_start_failed", "the local agent has no pid file") from None
        deadline = time.monotonic() + self.enroll_wait
        while time.monotonic() < deadline:
            status = _exit_status(pid)
            if status is not None:
                tail = log_tail(where.log_file.read_text(errors="replace"))
                raise ProviderError(
                    "local_start_failed", f"install.sh exited with status {status}: {tail}"
                )
            if where.certificate.exists():
                return "enrolled"
            time.sleep(POLL_SECONDS)
        return "not enrolled yet"

    def stop(self, instance_id: str) -> str:
        """Stop the instance's agent: SIGTERM to its processes, SIGKILL after the grace period."""
        where = self.layout(instance_id)
        if not where.root.exists():
            return "no local machine"
        with _locked(where):
            pgid = running_agent(where)
            left = processes_of(where.root, pgid)
            if not left:
                where.pid_file.unlink(missing_ok=True)
                return "no local agent running"
            count = len(left)
            _signal_all(pgid, left, signal.SIGTERM)
            left = _wait_gone(where.root, pgid, self.stop_grace)
            if left:
                log.warning("instance %s: %s still running; SIGKILL", instance_id, left)
                _signal_all(pgid, left, signal.SIGKILL)
                left = _wait_gone(where.root, pgid, KILL_WAIT_SECONDS)
            if left:
                raise ProviderError(
                    "local_stop_failed", f"processes {left} survived SIGKILL; stop them by hand"
                )
            where.pid_file.unlink(missing_ok=True)
        log.info("instance %s: local agent stopped (%s processes)", instance_id, count)
        return f"local agent stopped ({count} process(es))"

    def remove(self, instance_id: str) -> str:
        """Remove the instance's directory (after stop)."""
        where = self.layout(instance_id)
        with _locked(where):
            if processes_of(where.root, running_agent(where)):
                raise ProviderError("local_remove_failed", "the local agent is still running")
            shutil.rmtree(where.root, ignore_errors=True)
            # Unlinking while holding it: a waiter then locks a file nobody else will use,
            # which is harmless because the root it guards is gone.
            where.lock_file.unlink(missing_ok=True)
        log.info("instance %s: removed %s", instance_id, where.root)
        return f"removed {where.root}"
