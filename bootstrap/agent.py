#!/usr/bin/env python3
"""Scalarium node agent: enrolls the node, heartbeats, long-polls commands and runs chef-solo.

One stdlib-only file (Python 3.8+) plus the `openssl` command line tool, because it must run on
any node before anything else is installed there.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import enum
import hashlib
import ipaddress
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

AGENT_VERSION = "1.0.0"
PROTOCOL_PREFIX = "/agent/v1"

log = logging.getLogger("scalarium.agent")

# Every tunable in one place; the server's `settings` override the ones it names.
DEFAULTS: dict[str, Any] = {
    "config": "/etc/scalarium/agent.json",
    "state_dir": "/var/lib/scalarium",
    "heartbeat_interval": 60.0,
    "poll_wait": 30,
    "command_timeout": 3600.0,
    "log_chunk_bytes": 65536,
    "log_flush_interval": 2.0,
    "backoff_base": 1.0,
    "backoff_cap": 300.0,
    "seen_ids_max": 1000,
    "chef_binary": "chef-solo",
    "server_api_version": "1",
    "http_timeout": 30.0,
    "kill_grace": 10.0,
}

# Only these answers mean "this node is gone for good": anything else is retried with backoff.
STOP_CODES = frozenset({"instance_terminated", "certificate_revoked"})
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


# str + Enum rather than StrEnum: nodes may run Python 3.8.
class CommandStatus(str, enum.Enum):  # noqa: UP042
    """Final status the agent reports for a command."""

    SUCCESSFUL = "successful"
    FAILED = "failed"


class AgentError(Exception):
    """Base of every error the agent raises; `code` is machine-readable."""

    code = "agent_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(AgentError):
    """The configuration or the command line is unusable."""

    code = "invalid_config"


class NetworkError(AgentError):
    """The server could not be reached or the connection broke."""

    code = "network_error"


class ServerError(AgentError):
    """The server answered with an error document."""

    code = "server_error"

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, code)
        self.status = status
        self.details = details or {}


class AgentRetired(ServerError):
    """The server says this instance is terminated or its certificate revoked."""


class BundleError(AgentError):
    """A cookbook bundle is corrupt or unsafe to unpack."""

    code = "invalid_bundle"


class SigningError(AgentError):
    """`openssl` could not sign a request or build a CSR."""

    code = "signing_failed"


# --- request signing (Chef's signed header auth, protocol 1.3) -------------------------------


def content_hash(body: bytes) -> str:
    """Return X-Ops-Content-Hash: base64 of the body's SHA-256."""
    return base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def canonical_time(epoch: float) -> str:
    """Return the ISO 8601 UTC timestamp Chef signs (second precision, `Z`)."""
    moment = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.timezone.utc)  # noqa: UP017 (3.8 nodes)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_path(path: str) -> str:
    """Collapse repeated slashes and drop one trailing slash, as mixlib-authentication does."""
    collapsed = re.sub(r"/+", "/", path.split("?", 1)[0])
    return collapsed[:-1] if len(collapsed) > 1 and collapsed.endswith("/") else collapsed


def canonical_request(
    method: str, path: str, body_hash: str, timestamp: str, user_id: str, api_version: str
) -> str:
    """Return the string that protocol 1.3 signs."""
    return "\n".join(
        [
            f"Method:{method.upper()}",
            f"Path:{canonical_path(path)}",
            f"X-Ops-Content-Hash:{body_hash}",
            "X-Ops-Sign:version=1.3",
            f"X-Ops-Timestamp:{timestamp}",
            f"X-Ops-UserId:{user_id}",
            f"X-Ops-Server-API-Version:{api_version}",
        ]
    )


def openssl_sign(key_path: str, data: bytes) -> bytes:
    """Sign data with RSA-SHA256 (PKCS#1 v1.5) through `openssl dgst`: the stdlib has no RSA."""
    proc = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", key_path],
        input=data,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout:
        message = proc.stderr.decode("utf-8", "replace").strip()
        raise SigningError(f"openssl dgst failed: {message}")
    return proc.stdout


def authorization_headers(signature: bytes, width: int = 60) -> dict[str, str]:
    """Split a base64 signature into X-Ops-Authorization-N headers (N from 1)."""
    encoded = base64.b64encode(signature).decode("ascii")
    lines = [encoded[i : i + width] for i in range(0, len(encoded), width)]
    return {f"X-Ops-Authorization-{n}": line for n, line in enumerate(lines, start=1)}


def signed_headers(
    key_path: str,
    method: str,
    path: str,
    body: bytes,
    user_id: str,
    now: float,
    api_version: str = DEFAULTS["server_api_version"],
    signer: Callable[[str, bytes], bytes] = openssl_sign,
) -> dict[str, str]:
    """Return every X-Ops-* header for one request."""
    body_hash = content_hash(body)
    timestamp = canonical_time(now)
    to_sign = canonical_request(method, path, body_hash, timestamp, user_id, api_version)
    headers = {
        "X-Ops-Sign": "algorithm=sha256;version=1.3;",
        "X-Ops-Userid": user_id,
        "X-Ops-Timestamp": timestamp,
        "X-Ops-Content-Hash": body_hash,
        "X-Ops-Server-API-Version": api_version,
    }
    headers.update(authorization_headers(signer(key_path, to_sign.encode("utf-8"))))
    return headers


class SignatureSpacer:
    """Keeps the agent from signing the same request twice within one timestamp second.

    The signature covers method, path (without the query), content hash and a timestamp with
    second precision, and RSA PKCS#1 v1.5 signatures are deterministic: two identical requests in
    one second carry identical signatures, and the server refuses the second as a replay. Two
    polls or two empty-bodied POSTs in quick succession are enough to hit that, so an identical
    request waits for the next second instead. The last `limit` signed requests are remembered,
    which also covers a wall clock stepped back by a few seconds.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.sent: dict[tuple[int, str, str, str], None] = {}
        self.lock = threading.Lock()

    def claim(self, method: str, path: str, body_hash: str, epoch: float) -> float:
        """Record a request about to be signed at `epoch`; return 0, or the wait before retrying.

        A non-zero answer records nothing: the caller waits and claims again with a new time.
        """
        key = (int(epoch), method.upper(), canonical_path(path), body_hash)
        with self.lock:
            if key in self.sent:
                # Just past the boundary, so that int() of the new time is the next second.
                return max(0.001, int(epoch) + 1 - epoch + 0.001)
            self.sent[key] = None
            while len(self.sent) > self.limit:
                del self.sent[next(iter(self.sent))]
        return 0.0


# --- transport ---------------------------------------------------------------------------------


def is_loopback_host(host: str | None) -> bool:
    """Tell whether a host name is this machine (plain http is allowed only there)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_from_response(status: int, data: bytes) -> ServerError:
    """Build the error for a 4xx/5xx answer from its `{"error": {...}}` document."""
    code, message = f"http_{status}", f"HTTP {status}"
    details: dict[str, Any] = {}
    try:
        doc = json.loads(data.decode("utf-8"))
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        if isinstance(err, dict):
            code = str(err.get("code") or code)
            message = str(err.get("message") or message)
            raw_details = err.get("details")
            details = raw_details if isinstance(raw_details, dict) else {}
    except (ValueError, UnicodeDecodeError):
        pass
    kind = AgentRetired if status in (401, 403) and code in STOP_CODES else ServerError
    return kind(status, code, message, details)


class Client:
    """JSON over HTTPS to the Scalarium server; signs requests once the node has an identity."""

    def __init__(
        self,
        server_url: str,
        ca_path: str | None,
        instance_id: str | None = None,
        key_path: str | None = None,
        api_version: str = DEFAULTS["server_api_version"],
        timeout: float = DEFAULTS["http_timeout"],
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urllib.parse.urlsplit(server_url)
        handlers: list[Any] = []
        if parts.scheme == "https":
            handlers.append(
                urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_path))
            )
        elif parts.scheme != "http" or not is_loopback_host(parts.hostname):
            raise ConfigError(
                f"server URL {server_url!r} must be https (plain http only on loopback)",
                "insecure_server_url",
            )
        if is_loopback_host(parts.hostname):
            # A proxy from the environment must never see loopback traffic.
            handlers.append(urllib.request.ProxyHandler({}))
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.origin = (parts.scheme, parts.netloc)
        self.instance_id = instance_id
        self.key_path = key_path
        self.api_version = api_version
        self.timeout = timeout
        self.wall_clock = wall_clock
        self.sleep = sleep
        self.spacer = SignatureSpacer()
        self.opener = urllib.request.build_opener(*handlers)

    def server_path(self, url: str) -> str:
        """Return the path (and query) of a server URL or path; refuse another origin."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme or parts.netloc:
            if (parts.scheme, parts.netloc) != self.origin:
                raise AgentError(f"refusing URL outside the server: {url}", "foreign_url")
        base_path = urllib.parse.urlsplit(self.base).path
        path = parts.path
        if base_path and path.startswith(base_path + "/"):
            path = path[len(base_path) :]
        return path + (f"?{parts.query}" if parts.query else "")

    def signing_time(self, method: str, path: str, body: bytes) -> float:
        """Return the time to sign a request at: now, unless that would repeat a signature."""
        body_hash = content_hash(body)
        while True:
            now = self.wall_clock()
            wait = self.spacer.claim(method, path, body_hash, now)
            if wait <= 0:
                return now
            log.debug("request %s %s: identical to one signed this second; waiting", method, path)
            self.sleep(wait)

    def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        raw: bool = False,
        sink: IO[bytes] | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON (or bytes if raw; None if streamed)."""
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "Accept": "application/json",
            "User-Agent": f"scalarium-agent/{AGENT_VERSION}",
        }
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self.instance_id and self.key_path:
            full_path = urllib.parse.urlsplit(self.base + path).path
            headers.update(
                signed_headers(
                    self.key_path,
                    method,
                    full_path,
                    body,
                    self.instance_id,
                    self.signing_time(method, full_path, body),
                    self.api_version,
                )
            )
        req = urllib.request.Request(
            self.base + path, data=body if method != "GET" else None, method=method
        )
        for name, value in headers.items():
            req.add_header(name, value)
        try:
            with self.opener.open(req, timeout=timeout or self.timeout) as resp:
                if sink is not None:
                    shutil.copyfileobj(resp, sink)
                    return None
                data = resp.read()
        except urllib.error.HTTPError as exc:
            raise error_from_response(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            raise NetworkError(f"{method} {path}: {exc}") from None
        if raw:
            return data
        try:
            return json.loads(data.decode("utf-8")) if data else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise AgentError(f"{method} {path}: bad JSON answer: {exc}", "bad_response") from None


# --- small persistence helpers -----------------------------------------------------------------


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half of it."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Any:
    """Return a JSON file's content, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


class SeenCommands:
    """The last N command ids this node accepted, kept on disk: delivery is at least once."""

    def __init__(self, path: str, limit: int = DEFAULTS["seen_ids_max"]) -> None:
        self.path = path
        self.limit = limit
        loaded = read_json(path)
        self.ids: list[str] = [str(i) for i in loaded] if isinstance(loaded, list) else []
        self._set = set(self.ids)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._set

    def add(self, command_id: str) -> None:
        """Remember an id (dropping the oldest past the limit) and persist the list."""
        if command_id in self._set:
            return
        self.ids.append(command_id)
        self.ids = self.ids[-self.limit :]
        self._set = set(self.ids)
        write_atomic(self.path, json.dumps(self.ids).encode())


# --- configuration -------------------------------------------------------------------------------


@dataclass
class Config:
    """Everything the running agent needs, from agent.json merged over DEFAULTS."""

    server_url: str
    instance_id: str
    key_path: str
    cert_path: str
    ca_path: str
    state_dir: str
    heartbeat_interval: float = DEFAULTS["heartbeat_interval"]
    poll_wait: int = DEFAULTS["poll_wait"]
    command_timeout: float = DEFAULTS["command_timeout"]
    log_chunk_bytes: int = DEFAULTS["log_chunk_bytes"]
    log_flush_interval: float = DEFAULTS["log_flush_interval"]
    backoff_base: float = DEFAULTS["backoff_base"]
    backoff_cap: float = DEFAULTS["backoff_cap"]
    chef_binary: str = DEFAULTS["chef_binary"]
    server_api_version: str = DEFAULTS["server_api_version"]
    kill_grace: float = DEFAULTS["kill_grace"]


SETTING_TYPES: dict[str, Callable[[Any], Any]] = {
    "heartbeat_interval": float,
    "poll_wait": int,
    "command_timeout": float,
    "log_chunk_bytes": int,
    "log_flush_interval": float,
    "backoff_base": float,
    "backoff_cap": float,
    "chef_binary": str,
    "server_api_version": str,
    "kill_grace": float,
}


def config_from_document(doc: dict[str, Any]) -> Config:
    """Build a Config from the agent.json document; unknown settings are ignored."""
    try:
        paths = doc["paths"]
        settings = doc.get("settings") or {}
        values = {
            name: cast(settings[name])
            for name, cast in SETTING_TYPES.items()
            if settings.get(name) is not None
        }
        return Config(
            server_url=str(doc["server_url"]),
            instance_id=str(doc["instance_id"]),
            key_path=str(paths["key"]),
            cert_path=str(paths["cert"]),
            ca_path=str(paths["ca"]),
            state_dir=str(paths["state_dir"]),
            **values,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"agent.json is incomplete or malformed: {exc!r}") from None


def load_config(path: str) -> Config:
    """Read agent.json."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise ConfigError(f"cannot read configuration {path}")
    return config_from_document(doc)


# --- metrics from /proc ------------------------------------------------------------------------


def parse_loadavg(text: str) -> list[float]:
    """Return [1m, 5m, 15m] from /proc/loadavg."""
    return [float(v) for v in text.split()[:3]]


def parse_cpu_times(text: str) -> tuple[int, int]:
    """Return (busy, total) jiffies from the aggregate `cpu` line of /proc/stat."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:]]
            # idle + iowait are the not-busy columns; guest time is already inside user/nice.
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values[:8])
            return total - idle, total
    raise ValueError("no aggregate cpu line")


def cpu_percent(previous: tuple[int, int], current: tuple[int, int]) -> float:
    """Return the busy percentage between two /proc/stat samples."""
    busy = current[0] - previous[0]
    total = current[1] - previous[1]
    return round(100.0 * busy / total, 1) if total > 0 else 0.0


def parse_meminfo(text: str) -> dict[str, int]:
    """Return {"total", "available"} in bytes from /proc/meminfo."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return {"total": values.get("MemTotal", 0), "available": available}


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read()


class MetricsReader:
    """Samples load, CPU, memory, disk and uptime; CPU is the average since the last sample."""

    def __init__(self, proc_dir: str = "/proc", disk_path: str = "/") -> None:
        self.proc_dir = proc_dir
        self.disk_path = disk_path
        self.previous_cpu: tuple[int, int] = (0, 0)

    def sample(self) -> dict[str, Any]:
        """Return the metric part of a heartbeat; missing sources are reported as null."""
        metrics: dict[str, Any] = {"load": None, "cpu_percent": None, "memory": None}
        try:
            metrics["load"] = parse_loadavg(_read_text(os.path.join(self.proc_dir, "loadavg")))
            current = parse_cpu_times(_read_text(os.path.join(self.proc_dir, "stat")))
            metrics["cpu_percent"] = cpu_percent(self.previous_cpu, current)
            self.previous_cpu = current
            metrics["memory"] = parse_meminfo(_read_text(os.path.join(self.proc_dir, "meminfo")))
            metrics["uptime"] = float(_read_text(os.path.join(self.proc_dir, "uptime")).split()[0])
        except (OSError, ValueError, IndexError) as exc:
            log.debug("metrics: /proc unreadable: %s", exc)
        try:
            st = os.statvfs(self.disk_path)
            metrics["disk"] = {
                "total": st.f_blocks * st.f_frsize,
                "free": st.f_bavail * st.f_frsize,
            }
        except OSError:
            metrics["disk"] = None
        metrics.setdefault("uptime", None)
        return metrics


# --- backoff -------------------------------------------------------------------------------------


def backoff_delay(
    failures: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Return the wait after `failures` consecutive failures: exponential, capped, jittered.

    Half of the window is fixed and half random ("equal jitter"), so a fleet that lost the server
    at the same moment does not come back in lockstep, yet never retries in a tight loop.
    """
    if failures <= 0:
        return 0.0
    window = min(cap, base * (2 ** min(failures - 1, 62)))
    return window / 2 + rand() * window / 2


# --- bundles and chef-solo -----------------------------------------------------------------------


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse a tar member that could write outside the bundle directory or create a device."""
    name = member.name
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith("/") or os.path.isabs(name):
        raise BundleError(f"absolute path in bundle: {name}", "unsafe_bundle")
    if ".." in parts:
        raise BundleError(f"'..' in bundle path: {name}", "unsafe_bundle")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise BundleError(f"device, fifo or special file in bundle: {name}", "unsafe_bundle")
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            raise BundleError(f"link to an absolute path in bundle: {name}", "unsafe_bundle")
        # Symlinks resolve from their own directory, hard links from the archive root.
        start = os.path.dirname("/".join(parts)) if member.issym() else ""
        resolved = os.path.normpath(os.path.join(start, target))
        if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
            raise BundleError(f"link pointing outside the bundle: {name}", "unsafe_bundle")


def unpack_bundle(archive: str, dest: str) -> None:
    """Unpack a .tar.gz into dest after checking every member."""
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            check_member(member)
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(dest, members, filter="tar")
        else:
            tar.extractall(dest, members)  # noqa: S202 (members checked above; old Pythons)


def sha256_file(path: str) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def ruby_string(value: str) -> str:
    """Quote a value as a single-quoted Ruby literal (no interpolation can happen)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def solo_rb(bundle_dir: str, run_dir: str, state_dir: str, node_name: str) -> str:
    """Return the solo.rb for one run."""
    cookbooks = os.path.join(bundle_dir, "cookbooks")
    lines = [
        "# Written by the Scalarium agent for one chef-solo run.",
        f"cookbook_path [{ruby_string(cookbooks)}]",
        f"role_path {ruby_string(os.path.join(bundle_dir, 'roles'))}",
        f"data_bag_path {ruby_string(os.path.join(bundle_dir, 'data_bags'))}",
        f"environment_path {ruby_string(os.path.join(bundle_dir, 'environments'))}",
        f"node_path {ruby_string(os.path.join(state_dir, 'nodes'))}",
        f"file_cache_path {ruby_string(os.path.join(state_dir, 'cache'))}",
        f"json_attribs {ruby_string(os.path.join(run_dir, 'node.json'))}",
        "log_location STDOUT",
        f"node_name {ruby_string(node_name)}",
    ]
    return "\n".join(lines) + "\n"


def is_chef_branded(binary: str) -> bool:
    """Tell whether a binary is Chef-branded (and so needs the licence accepted)."""
    return os.path.basename(binary).startswith("chef")


def utf8_cut(chunk: bytes) -> int:
    """Return how many leading bytes of chunk end on a UTF-8 character boundary."""
    for back in range(1, min(4, len(chunk)) + 1):
        byte = chunk[-back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        if byte < 0x80:
            return len(chunk)
        needed = 2 if byte >= 0xC0 and byte < 0xE0 else 3 if byte < 0xF0 else 4
        return len(chunk) if back >= needed else len(chunk) - back
    return len(chunk)


class LogStreamer:
    """Sends a growing log file in ordered chunks; resumes from the server's offset on error."""

    def __init__(self, send: Callable[[int, str], int], path: str, chunk_bytes: int) -> None:
        self.send = send
        self.path = path
        self.chunk_bytes = max(16, chunk_bytes)
        self.file_pos = 0
        self.offset = 0

    def pump(self, final: bool = False) -> None:
        """Send everything written so far; raise (keeping the position) if a send fails."""
        while True:
            with open(self.path, "rb") as handle:
                handle.seek(self.file_pos)
                chunk = handle.read(self.chunk_bytes)
            if not chunk:
                return
            usable = len(chunk) if final and len(chunk) < self.chunk_bytes else utf8_cut(chunk)
            if usable == 0:
                return  # half a character: wait for the rest
            data = chunk[:usable].decode("utf-8", "replace")
            self.offset = int(self.send(self.offset, data))
            self.file_pos += usable


# --- the agent -----------------------------------------------------------------------------------


class Agent:
    """One node's agent; `loop()` runs one iteration and returns the wait before the next."""

    def __init__(
        self,
        config: Config,
        client: Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        stop: threading.Event | None = None,
        fast_stop: threading.Event | None = None,
        metrics: MetricsReader | None = None,
    ) -> None:
        self.config = config
        self.client = client or self._make_client(config)
        self.clock = clock
        self.rand = rand
        self.stop = stop or threading.Event()
        self.fast_stop = fast_stop or threading.Event()
        self.metrics = metrics or MetricsReader()
        self.failures = 0
        self.retired = False
        self.running_command: str | None = None
        self.next_heartbeat = clock()
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        self.seen = SeenCommands(os.path.join(config.state_dir, "seen-commands.json"))
        self.running_path = os.path.join(config.state_dir, "running")

    @staticmethod
    def _make_client(config: Config) -> Client:
        return Client(
            config.server_url,
            config.ca_path,
            config.instance_id,
            config.key_path,
            config.server_api_version,
        )

    def reload(self, config: Config) -> None:
        """Apply a re-read configuration (SIGHUP)."""
        self.config = config
        self.client = self._make_client(config)
        self.next_heartbeat = self.clock()
        log.info("instance %s: configuration reloaded", config.instance_id)

    def loop(self) -> float:
        """Run one iteration: pending finish, heartbeat when due, one long poll, its commands."""
        try:
            self.report_interrupted()
            self.heartbeat_if_due()
            for command in self.poll():
                if self.stop.is_set():
                    break
                self.handle(command)
        except AgentRetired as exc:
            log.warning(
                "instance %s: server says %s (%s); agent stops",
                self.config.instance_id,
                exc.code,
                exc,
            )
            self.retired = True
            self.stop.set()
            return 0.0
        except Exception as exc:
            self.failures += 1
            delay = backoff_delay(
                self.failures, self.config.backoff_base, self.config.backoff_cap, self.rand
            )
            if isinstance(exc, AgentError):
                log.warning(
                    "instance %s: %s: %s; retry in %.1fs",
                    self.config.instance_id,
                    exc.code,
                    exc,
                    delay,
                )
            else:
                log.exception(
                    "instance %s: unexpected error; retry in %.1fs", self.config.instance_id, delay
                )
            return delay
        self.failures = 0
        return 0.0

    def heartbeat_if_due(self) -> bool:
        """Send a heartbeat when the interval has passed; tell whether one was sent."""
        now = self.clock()
        if now < self.next_heartbeat:
            return False
        payload = {"agent_version": AGENT_VERSION, "running_command": self.running_command}
        payload.update(self.metrics.sample())
        self.client.request("POST", f"{PROTOCOL_PREFIX}/heartbeat", payload)
        self.next_heartbeat = now + self.config.heartbeat_interval
        return True

    def poll(self) -> list[dict[str, Any]]:
        """Long-poll for commands."""
        wait = max(0, int(self.config.poll_wait))
        answer = self.client.request(
            "GET", f"{PROTOCOL_PREFIX}/commands?wait={wait}", timeout=wait + 30.0
        )
        commands = answer.get("commands") if isinstance(answer, dict) else None
        return [c for c in commands or [] if isinstance(c, dict)]

    def handle(self, command: dict[str, Any]) -> None:
        """Run a command unless it was seen before."""
        command_id = str(command.get("id", ""))
        if not SAFE_ID.match(command_id):
            log.warning(
                "instance %s: ignoring command with bad id %r", self.config.instance_id, command_id
            )
            return
        if command_id in self.seen:
            log.info("command %s: already received; ignored", command_id)
            return
        self.execute(command_id, command)

    # -- execution --

    def _record_running(self, record: dict[str, Any]) -> None:
        write_atomic(self.running_path, json.dumps(record).encode())

    def report_interrupted(self) -> None:
        """Finish what a previous run left: resend a finish, or report an interrupted command."""
        record = read_json(self.running_path)
        if not isinstance(record, dict) or not SAFE_ID.match(str(record.get("id", ""))):
            if os.path.exists(self.running_path):
                os.unlink(self.running_path)
            return
        command_id = str(record["id"])
        self.seen.add(command_id)
        finish = record.get("finish")
        if not isinstance(finish, dict):
            log.warning("command %s: interrupted by an agent restart; reporting failed", command_id)
            finish = {
                "exit_code": None,
                "status": CommandStatus.FAILED.value,
                "duration": 0.0,
                "reason": "interrupted",
            }
            self._record_running({"id": command_id, "finish": finish})
        self.post_finish(command_id, finish)

    def post_finish(self, command_id: str, finish: dict[str, Any]) -> None:
        """Report the end of a command, then forget it was running."""
        self.client.request("POST", f"{PROTOCOL_PREFIX}/commands/{command_id}/finish", finish)
        os.unlink(self.running_path)
        log.info("command %s: finished %s", command_id, finish.get("status"))

    def execute(self, command_id: str, command: dict[str, Any]) -> None:
        """Run one command end to end and report its result."""
        # Recorded before anything runs, so a crash is reported as interrupted, never rerun.
        self.seen.add(command_id)
        self._record_running({"id": command_id, "finish": None})
        self.running_command = command_id
        started = time.monotonic()
        log.info("command %s: %s starting", command_id, command.get("type"))
        try:
            self.client.request("POST", f"{PROTOCOL_PREFIX}/commands/{command_id}/start", {})
            exit_code, reason = self.run_command(command_id, command)
        except AgentRetired:
            raise
        except Exception as exc:
            code = exc.code if isinstance(exc, AgentError) else "agent_exception"
            log.warning("command %s: failed before chef ran: %s: %s", command_id, code, exc)
            exit_code, reason = None, f"{code}: {exc}"
        finally:
            self.running_command = None
        ok = exit_code == 0 and reason is None
        finish = {
            "exit_code": exit_code,
            "status": (CommandStatus.SUCCESSFUL if ok else CommandStatus.FAILED).value,
            "duration": round(time.monotonic() - started, 3),
            "reason": reason,
        }
        self._record_running({"id": command_id, "finish": finish})
        self.post_finish(command_id, finish)

    def run_command(
        self, command_id: str, command: dict[str, Any]
    ) -> tuple[int | None, str | None]:
        """Fetch node.json and the bundle, write solo.rb, run chef; return (exit code, reason)."""
        run_dir = os.path.join(self.config.state_dir, "commands", command_id)
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        node_url = (
            command.get("node_json_url") or f"{PROTOCOL_PREFIX}/commands/{command_id}/node.json"
        )
        node = self.client.request("GET", self.client.server_path(str(node_url)))
        if not isinstance(node, dict):
            raise AgentError("node.json is not an object", "bad_node_json")
        write_atomic(os.path.join(run_dir, "node.json"), json.dumps(node, indent=1).encode())
        search_url = command.get("search_nodes_url")
        if search_url:
            answer = self.client.request("GET", self.client.server_path(str(search_url)))
            found = answer.get("nodes") if isinstance(answer, dict) else None
            if not isinstance(found, dict):
                raise AgentError("search-nodes.json has no nodes object", "bad_search_nodes")
            write_search_nodes(os.path.join(self.config.state_dir, "nodes"), found)
        if command.get("bundle_url"):
            bundle_dir = self.fetch_bundle(str(command["bundle_url"]), command.get("bundle_sha256"))
        else:
            bundle_dir = os.path.join(run_dir, "empty-bundle")
            os.makedirs(os.path.join(bundle_dir, "cookbooks"), exist_ok=True)
        self._seed_nodes(bundle_dir)
        os.makedirs(os.path.join(self.config.state_dir, "cache"), mode=0o700, exist_ok=True)
        solo = solo_rb(bundle_dir, run_dir, self.config.state_dir, self.config.instance_id)
        write_atomic(os.path.join(run_dir, "solo.rb"), solo.encode("utf-8"))
        timeout = float(command.get("timeout") or self.config.command_timeout)
        return self.run_chef(command_id, run_dir, timeout)

    def _seed_nodes(self, bundle_dir: str) -> None:
        # Chef writes the node back into node_path, so nodes shipped in the (shared, cached)
        # bundle are copied out instead of pointing chef at the bundle.
        nodes = os.path.join(self.config.state_dir, "nodes")
        os.makedirs(nodes, mode=0o700, exist_ok=True)
        shipped = os.path.join(bundle_dir, "nodes")
        if os.path.isdir(shipped):
            for name in os.listdir(shipped):
                if name.endswith(".json"):
                    shutil.copyfile(os.path.join(shipped, name), os.path.join(nodes, name))

    def fetch_bundle(self, url: str, sha256: Any) -> str:
        """Return the unpacked bundle directory, downloading and checking it unless cached."""
        if not isinstance(sha256, str) or not SHA256_HEX.match(sha256):
            raise BundleError(f"bad bundle sha256 {sha256!r}")
        bundles = os.path.join(self.config.state_dir, "bundles")
        dest = os.path.join(bundles, sha256)
        if os.path.isfile(os.path.join(dest, ".complete")):
            log.info("bundle %s: cached", sha256[:12])
            return dest
        os.makedirs(bundles, mode=0o700, exist_ok=True)
        archive = os.path.join(bundles, f"{sha256}.tar.gz.part")
        with open(archive, "wb") as sink:
            self.client.request("GET", self.client.server_path(url), sink=sink, timeout=300.0)
        try:
            actual = sha256_file(archive)
            if actual != sha256:
                raise BundleError(
                    f"bundle checksum mismatch: expected {sha256}, got {actual}",
                    "bundle_checksum_mismatch",
                )
            staging = tempfile.mkdtemp(dir=bundles, prefix=f".{sha256[:12]}-")
            try:
                unpack_bundle(archive, staging)
            except (tarfile.TarError, OSError, EOFError) as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise BundleError(f"cannot unpack bundle: {exc}") from None
            except BundleError:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            with open(os.path.join(staging, ".complete"), "w", encoding="utf-8") as marker:
                marker.write(sha256 + "\n")
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            os.replace(staging, dest)
        finally:
            os.unlink(archive)
        log.info("bundle %s: unpacked", sha256[:12])
        return dest

    def _send_log(self, command_id: str) -> Callable[[int, str], int]:
        def send(offset: int, data: str) -> int:
            answer = self.client.request(
                "POST",
                f"{PROTOCOL_PREFIX}/commands/{command_id}/log",
                {"offset": offset, "data": data},
            )
            return int(answer.get("offset", offset + len(data.encode("utf-8"))))

        return send

    def _pump(self, streamer: LogStreamer, final: bool = False) -> bool:
        try:
            streamer.pump(final)
            return True
        except AgentRetired:
            raise
        except (AgentError, ValueError) as exc:
            log.warning("command log: send failed (%s); will resume at %s", exc, streamer.offset)
            return False

    def run_chef(
        self, command_id: str, run_dir: str, timeout: float
    ) -> tuple[int | None, str | None]:
        """Run the chef binary with a timeout, streaming its log; return (exit code, reason)."""
        binary = self.config.chef_binary
        env = dict(os.environ)
        if is_chef_branded(binary):
            env["CHEF_LICENSE"] = "accept-no-persist"
        log_path = os.path.join(run_dir, "chef.log")
        argv = [
            binary,
            "-c",
            os.path.join(run_dir, "solo.rb"),
            "-j",
            os.path.join(run_dir, "node.json"),
        ]
        with open(log_path, "wb") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=run_dir,
                    env=env,
                    start_new_session=True,  # its own process group, so a timeout kills it all
                )
            except OSError as exc:
                raise AgentError(f"cannot run {binary}: {exc}", "chef_not_runnable") from None
        streamer = LogStreamer(self._send_log(command_id), log_path, self.config.log_chunk_bytes)
        deadline = time.monotonic() + timeout
        reason: str | None = None
        exit_code: int | None = None
        while True:
            try:
                exit_code = proc.wait(timeout=self.config.log_flush_interval)
                break
            except subprocess.TimeoutExpired:
                pass
            self._pump(streamer)
            try:
                self.heartbeat_if_due()
            except AgentRetired:
                raise
            except AgentError as exc:
                log.warning("instance %s: heartbeat failed: %s", self.config.instance_id, exc)
            if self.fast_stop.is_set():
                reason = "agent_stopped"
            elif time.monotonic() >= deadline:
                reason = "timeout"
            if reason:
                log.warning("command %s: killing %s (%s)", command_id, binary, reason)
                self._kill(proc)
                exit_code = None
                break
        for attempt in range(3):
            if self._pump(streamer, final=True):
                break
            self.stop.wait(min(5.0, self.config.log_flush_interval * (1 + attempt)))
        if exit_code is not None and exit_code != 0:
            reason = reason or f"{os.path.basename(binary)} exited with status {exit_code}"
        return exit_code, reason

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        for sig, grace in ((signal.SIGTERM, self.config.kill_grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue


# --- enrollment ----------------------------------------------------------------------------------


def os_release(path: str = "/etc/os-release") -> dict[str, str]:
    """Parse /etc/os-release into a dict."""
    values: dict[str, str] = {}
    try:
        text = _read_text(path)
    except OSError:
        return values
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() and not name.startswith("#"):
            values[name.strip()] = value.strip().strip("'\"")
    return values


def primary_ip(server_url: str) -> str | None:
    """Return the local address used to reach the server (a UDP connect sends nothing)."""
    host = urllib.parse.urlsplit(server_url).hostname or "127.0.0.1"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return None


def node_facts(server_url: str) -> dict[str, Any]:
    """Collect the facts sent at enrollment."""
    release = os_release()
    return {
        "hostname": socket.gethostname(),
        "os": release.get("ID", platform.system().lower()),
        "os_version": release.get("VERSION_ID", platform.release()),
        "architecture": platform.machine(),
        "private_ip": primary_ip(server_url),
    }


def build_csr(key_path: str, instance_id: str) -> str:
    """Build a PEM CSR with subject /CN=<instance id> through `openssl req`."""
    if not SAFE_ID.match(instance_id):
        raise SigningError(f"instance id {instance_id!r} is not usable as a CN", "bad_instance_id")
    proc = subprocess.run(
        ["openssl", "req", "-new", "-sha256", "-key", key_path, "-subj", f"/CN={instance_id}"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise SigningError("openssl req failed: " + proc.stderr.decode("utf-8", "replace"))
    return proc.stdout.decode("ascii")


def certificate_is_valid(cert_path: str, ca_path: str | None) -> bool:
    """Tell whether a certificate has not expired and (if a CA is given) chains to it."""
    if not os.path.isfile(cert_path):
        return False
    checks = [["openssl", "x509", "-checkend", "60", "-noout", "-in", cert_path]]
    if ca_path and os.path.isfile(ca_path):
        checks.append(["openssl", "verify", "-CAfile", ca_path, cert_path])
    for argv in checks:
        result = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, check=False)
        if result.returncode != 0:
            return False
    return True


def enrollment_paths(root: str) -> dict[str, str]:
    """Return every path the node uses, under a root prefix."""
    prefix = root.rstrip("/")
    etc = f"{prefix}/etc/scalarium"
    return {
        "config": f"{etc}/agent.json",
        "key": f"{etc}/agent-key.pem",
        "cert": f"{etc}/agent.pem",
        "ca": f"{etc}/ca.pem",
        "stack_ca": f"{etc}/stack-ca.pem",
        "state_dir": f"{prefix}/var/lib/scalarium",
        "agent": f"{prefix}/opt/scalarium/agent.py",
    }


def is_enrolled(config_path: str, server_url: str) -> bool:
    """Tell whether agent.json exists for this server with a key and a valid certificate."""
    doc = read_json(config_path)
    if not isinstance(doc, dict):
        return False
    try:
        config = config_from_document(doc)
    except ConfigError:
        return False
    if config.server_url.rstrip("/") != server_url.rstrip("/"):
        return False
    stack_ca = (doc.get("paths") or {}).get("stack_ca")
    return os.path.isfile(config.key_path) and certificate_is_valid(config.cert_path, stack_ca)


def enroll(
    server_url: str,
    token: str,
    root: str = "/",
    ca_path: str | None = None,
    chef_binary: str | None = None,
    client: Client | None = None,
    default_chef_binary: str | None = None,
) -> dict[str, Any]:
    """Enroll this node with a one-time token; write cert and agent.json; return agent.json."""
    paths = enrollment_paths(root)
    ca_path = ca_path or paths["ca"]
    client = client or Client(server_url, ca_path)
    found = client.request("POST", f"{PROTOCOL_PREFIX}/enroll/lookup", {"token": token})
    instance_id = str(found.get("instance_id", "")) if isinstance(found, dict) else ""
    csr = build_csr(paths["key"], instance_id)
    answer = client.request(
        "POST",
        f"{PROTOCOL_PREFIX}/enroll",
        {
            "token": token,
            "csr": csr,
            "agent_version": AGENT_VERSION,
            "facts": node_facts(server_url),
        },
    )
    if not isinstance(answer, dict) or answer.get("instance_id") != instance_id:
        raise AgentError("enrollment answer names another instance", "bad_response")
    settings = dict(answer.get("settings") or {})
    # An explicit --chef-binary on the node wins over the server's suggestion.
    if chef_binary:
        settings["chef_binary"] = chef_binary
    elif default_chef_binary and not settings.get("chef_binary"):
        settings["chef_binary"] = default_chef_binary
    write_atomic(paths["cert"], str(answer["certificate"]).encode("ascii"), 0o644)
    if answer.get("ca_certificate"):
        write_atomic(paths["stack_ca"], str(answer["ca_certificate"]).encode("ascii"), 0o644)
    doc = {
        "server_url": str(settings.get("server_url") or server_url).rstrip("/"),
        "instance_id": instance_id,
        "paths": {
            "key": paths["key"],
            "cert": paths["cert"],
            "ca": ca_path,
            "stack_ca": paths["stack_ca"] if answer.get("ca_certificate") else None,
            "state_dir": paths["state_dir"],
        },
        "settings": settings,
    }
    os.makedirs(paths["state_dir"], mode=0o700, exist_ok=True)
    write_atomic(paths["config"], (json.dumps(doc, indent=2) + "\n").encode("utf-8"), 0o600)
    log.info("instance %s: enrolled with %s", instance_id, server_url)
    return doc


# --- process entry point -------------------------------------------------------------------------


SAFE_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def write_search_nodes(nodes_dir: str, nodes: dict[str, Any]) -> list[str]:
    """Replace node_path's node files with the cluster's, so local-mode search sees exactly
    the online instances (stale ones from an older picture are removed); returns the names."""
    os.makedirs(nodes_dir, mode=0o700, exist_ok=True)
    wanted = {}
    for name, document in nodes.items():
        if not isinstance(name, str) or not SAFE_NODE_NAME.match(name):
            raise AgentError(f"unsafe node name {name!r}", "bad_search_nodes")
        if not isinstance(document, dict):
            raise AgentError(f"node {name} is not an object", "bad_search_nodes")
        wanted[f"{name}.json"] = document
    for existing in os.listdir(nodes_dir):
        if existing.endswith(".json") and existing not in wanted:
            os.unlink(os.path.join(nodes_dir, existing))
    for filename, document in wanted.items():
        write_atomic(os.path.join(nodes_dir, filename), json.dumps(document).encode())
    return sorted(name[: -len(".json")] for name in wanted)


# On SIGTERM, how long the loop may take to kill a chef run and report it before the exit.
FAST_STOP_GRACE_SECONDS = 5.0


def run(config_path: str, once: bool = False) -> int:
    """Run the agent until stopped; return the process exit status."""
    stop, fast_stop, reload = threading.Event(), threading.Event(), threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        fast_stop.set()
        stop.set()

    def on_int(signum: int, frame: Any) -> None:
        stop.set()

    def on_hup(signum: int, frame: Any) -> None:
        reload.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGHUP, on_hup)

    config = load_config(config_path)
    agent = Agent(config, stop=stop, fast_stop=fast_stop)
    log.info("instance %s: agent %s started", config.instance_id, AGENT_VERSION)
    if once:
        agent.loop()
        return 0 if agent.failures == 0 else 1

    def work() -> None:
        while not stop.is_set():
            if reload.is_set():
                reload.clear()
                try:
                    agent.reload(load_config(config_path))
                except ConfigError as exc:
                    log.error("instance %s: reload refused: %s", config.instance_id, exc)
            delay = agent.loop()
            if delay > 0:
                stop.wait(delay)

    # The loop runs in its own thread so that SIGTERM is honoured at once: a long poll blocked
    # in a socket read cannot be interrupted, but the main thread can stop waiting for it.
    worker = threading.Thread(target=work, name="agent-loop", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if fast_stop.is_set():
            if agent.running_command is not None:
                # A running chef is being killed and reported by the loop: give it a moment.
                worker.join(FAST_STOP_GRACE_SECONDS)
            break
    log.info(
        "instance %s: agent stopped%s", config.instance_id, " (retired)" if agent.retired else ""
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the command line parser."""
    parser = argparse.ArgumentParser(prog="scalarium-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULTS["config"], help="agent.json path")
    parser.add_argument("--once", action="store_true", help="run one iteration and exit")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--version", action="version", version=AGENT_VERSION)
    sub = parser.add_subparsers(dest="action")
    enroll_cmd = sub.add_parser("enroll", help="enroll this node (token read from stdin)")
    enroll_cmd.add_argument("--server", required=True)
    enroll_cmd.add_argument("--root", default="/")
    enroll_cmd.add_argument("--ca", default=None)
    enroll_cmd.add_argument("--chef-binary", default=None)
    enroll_cmd.add_argument("--default-chef-binary", default=None)
    check = sub.add_parser("check-enrollment", help="exit 0 when enrolled with this server")
    check.add_argument("--server", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, configure logging and run the chosen action."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.action == "check-enrollment":
            return 0 if is_enrolled(args.config, args.server) else 1
        if args.action == "enroll":
            # The token comes on stdin: argv and the environment are visible to others.
            token = sys.stdin.readline().strip()
            if not token:
                raise ConfigError("no enrollment token on stdin", "missing_token")
            enroll(
                args.server,
                token,
                args.root,
                args.ca,
                args.chef_binary,
                default_chef_binary=args.default_chef_binary,
            )
            return 0
        return run(args.config, args.once)
    except AgentError as exc:
        print(f"scalarium-agent: error: {exc.code}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
