"""Helpers the benchmarks share (the bench scripts' own folder is on sys.path)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from server.client import Client


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def api(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    """One REST call as the admin, through the project's own API client."""
    return Client(base, token, timeout=60).request(method, path, body)


# --- a C load generator, so that the client does not eat the server's CPU -------------------

WRK_SCRIPT = r"""
-- Replays pre-built raw HTTP requests, one line each ("\1" stands for CRLF); thread `id` of
-- `nthreads` takes every nthreads-th line, so no two connections send the same request.
local requests, position = {}, 0
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local nthreads, n = tonumber(args[2]), 0
  for line in io.lines(args[1]) do
    if n % nthreads == id then
      table.insert(requests, (line:gsub("\1", "\r\n")))
    end
    n = n + 1
  end
end

function request()
  position = position + 1
  if position > #requests then
    position = 1
    exhausted = true
  end
  return requests[position]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d %d\n", summary.requests,
    summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def raw_request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """One HTTP/1.1 request as bytes on the wire (keep-alive)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def have_wrk() -> bool:
    """Whether the wrk load generator is installed (Debian package `wrk`)."""
    return shutil.which("wrk") is not None


def wrk(
    port: int, requests: list[bytes], connections: int, seconds: float, threads: int = 1
) -> dict[str, float]:
    """Send `requests` (raw, round-robin, repeated if they run out) with wrk; its figures.

    Returns requests (answered), failed (non-2xx/3xx answers and socket errors), seconds, and
    the latency p50/p99/max in milliseconds.
    """
    with tempfile.TemporaryDirectory(prefix="scalarium-wrk-") as tmp:
        script = Path(tmp, "replay.lua")
        script.write_text(WRK_SCRIPT)
        lines = Path(tmp, "requests.txt")
        with lines.open("wb") as out:
            for raw in requests:
                if b"\n" in raw.replace(b"\r\n", b"") or b"\x01" in raw:
                    raise ValueError("a request body may not hold a newline or \\x01")
                out.write(raw.replace(b"\r\n", b"\x01") + b"\n")
        printed = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/",
                "--",
                str(lines),
                str(threads),
            ],
            capture_output=True,
            text=True,
        )
    if printed.returncode != 0:
        raise RuntimeError(f"wrk failed ({printed.returncode}): {printed.stderr.strip()}")
    result = next(line for line in printed.stdout.splitlines() if line.startswith("RESULT "))
    total, duration, status, *socket_errors, p50, p99, worst = (
        int(word) for word in result.split()[1:]
    )
    return {
        "requests": total,
        "failed": status + sum(socket_errors),
        "seconds": duration / 1e6,
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "max_ms": worst / 1000,
    }


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    total = 0
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        # After the command name: state ppid pgrp ... utime(12) stime(13), counted from state=0.
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def pid_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
