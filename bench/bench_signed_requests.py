"""Benchmark: signed agent heartbeats per second through the HTTP stack, vs. an unsigned no-op.

Run from the repository root: ``.venv/bin/python bench/bench_signed_requests.py [--seconds 5]
[--worker-class gevent|gthread]``.
It starts ``scalarium server`` (gunicorn, embedded defaults: SQLite and the embedded Redis) on a
free loopback port in a temporary data dir, enrolls ``--agents`` instances over HTTP, pre-signs
every heartbeat (replays are refused, so each request carries its own signature), then drives
the server from ``--clients`` keep-alive connections: first with the signed heartbeats (each one
verified, checked against the replay cache and stored), then with the unsigned
``GET /agent/v1/ping`` and ``GET /api/v1/health``, and prints the rates and their ratio.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# Benchmarks are scripts, not an installed package: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    api,
    free_port,
    group_cpu_seconds,
    have_wrk,
    pid_cpu_seconds,
    raw_request,
    wrk,
)

from chef_bridge.auth import format_time, sign_request  # noqa: E402
from server import embedded, pki  # noqa: E402
from server.config import load_settings  # noqa: E402

DEFAULTS = {"seconds": 5.0, "agents": 50, "clients": 16, "keys": 4, "rate_guess": 4000}
PHASES = {
    "heartbeat": "signed heartbeat (POST /agent/v1/heartbeat)",
    "poll": "signed poll (GET /agent/v1/commands?wait=0)",
    "ping": "unsigned no-op (GET /agent/v1/ping)",
    "health": "unsigned health (GET /api/v1/health)",
}
HEARTBEAT = "/agent/v1/heartbeat"
POLL = "/agent/v1/commands"
Request = tuple[str, str, bytes, dict[str, str]]


def post_json(base: str, path: str, body: Any) -> Any:
    """One unauthenticated JSON POST."""
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def admin_token(data_dir: Path, env: dict[str, str]) -> str:
    """The admin token the server wrote on its first start, or (a used database) a new one."""
    written = data_dir / "admin-token"
    if written.exists():
        return written.read_text().strip()
    created = subprocess.run(
        [sys.executable, "-m", "server.cli", "tokens", "create", "bench", "--admin"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return created.stdout.strip().splitlines()[-1]


def enroll_agents(base: str, token: str, agents: int, keys: list[bytes]) -> list[tuple[str, bytes]]:
    """Create and enroll `agents` instances; return (instance id, key) pairs."""
    stack = api(base, token, "POST", "/stacks", {"shortname": f"bench-{os.urandom(3).hex()}"})
    layer = api(base, token, "POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})
    enrolled = []
    for n in range(agents):
        instance = api(
            base,
            token,
            "POST",
            f"/stacks/{stack['id']}/instances",
            {"hostname": f"node{n}", "layer_ids": [layer["id"]]},
        )
        script = api(base, token, "GET", f"/instances/{instance['id']}/user-data")["user_data"]
        words = shlex.split(script.splitlines()[-1])
        enroll_token = words[words.index("--token") + 1]
        key = keys[n % len(keys)]
        post_json(
            base,
            "/agent/v1/enroll",
            {
                "token": enroll_token,
                "csr": pki.build_csr_pem(key, instance["id"]).decode(),
                "agent_version": "bench",
                "facts": {"os": "debian", "architecture": "x86_64"},
            },
        )
        enrolled.append((instance["id"], key))
    return enrolled


def presign(enrolled: list[tuple[str, bytes]], count: int) -> list[Request]:
    """`count` heartbeats, round-robin over the agents, each with its own signature."""
    requests: list[Request] = []
    for n in range(count):
        instance_id, key = enrolled[n % len(enrolled)]
        # Distinct bodies: two identical requests signed in the same second are one signature,
        # and the server rightly refuses the second as a replay.
        body = json.dumps({"agent_version": "bench", "load": [0.1, 0.2, 0.3], "seq": n}).encode()
        headers = sign_request(key, instance_id, "POST", HEARTBEAT, body, server_api_version="1")
        headers["Content-Type"] = "application/json"
        requests.append(("POST", HEARTBEAT, body, headers))
    return requests


def presign_polls(enrolled: list[tuple[str, bytes]], count: int) -> list[Request]:
    """`count` empty-bodied polls; distinct timestamps keep their signatures distinct."""
    base = datetime.now(UTC)
    requests: list[Request] = []
    for n in range(count):
        instance_id, key = enrolled[n % len(enrolled)]
        # Spread inside the 15-minute window: agent n's k-th poll is k seconds older.
        stamp = format_time(base - timedelta(seconds=(n // len(enrolled)) % 840))
        headers = sign_request(
            key, instance_id, "GET", POLL, b"", timestamp=stamp, server_api_version="1"
        )
        requests.append(("GET", POLL + "?wait=0", b"", headers))
    return requests


def drive_python(
    port: int, clients: int, seconds: float, requests: list[Request]
) -> dict[str, float]:
    """Send `requests` in turn from `clients` Python keep-alive connections for `seconds`.

    The fallback without wrk: this client's own CPU use (the GIL, http.client) caps the
    figures on a 2-core machine long before the server does.
    """
    ok = [0] * clients
    failed = [0] * clients
    errors: dict[str, int] = {}
    lock = threading.Lock()
    position = [0]
    deadline = time.monotonic() + seconds
    start = time.perf_counter()

    def next_request() -> Request | None:
        with lock:
            if len(requests) > 1 and position[0] >= len(requests):
                return None  # a signed request cannot be sent twice
            position[0] += 1
            return requests[(position[0] - 1) % len(requests)]

    def worker(slot: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < deadline:
            request = next_request()
            if request is None:
                break
            method, path, body, headers = request
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            if response.status == 200:
                ok[slot] += 1
            else:
                failed[slot] += 1
                with lock:
                    error = f"{response.status} {answer[:120]!r}"
                    errors[error] = errors.get(error, 0) + 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error, count in sorted(errors.items(), key=lambda item: -item[1])[:5]:
        print(f"  {count} x {error}")
    if len(requests) > 1 and position[0] > len(requests):
        print("note: ran out of pre-signed requests; raise --rate-guess")
    return {"requests": sum(ok), "failed": sum(failed), "seconds": time.perf_counter() - start}


def main() -> None:
    """Start a server, enroll agents, and print signed vs. unsigned requests per second."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--web-threads", type=int, default=8)
    parser.add_argument("--worker-class", default="gevent", choices=["gevent", "gthread"])
    parser.add_argument("--database-url", default="", help="default: SQLite in the temp dir")
    parser.add_argument(
        "--client",
        default="wrk",
        choices=["wrk", "python"],
        help="load generator: wrk (C, default when installed) or Python threads",
    )
    parser.add_argument(
        "--only",
        choices=list(PHASES),
        action="append",
        help="run only these phases (repeatable; default: all four)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scalarium-bench-") as tmp:
        port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "SCALARIUM_DATA_DIR": tmp,
                "SCALARIUM_BIND": f"127.0.0.1:{port}",
                "SCALARIUM_WEB_WORKERS": str(args.web_workers),
                "SCALARIUM_WEB_THREADS": str(args.web_threads),
                "SCALARIUM_WEB_WORKER_CLASS": args.worker_class,
                "SCALARIUM_LOG_LEVEL": "WARNING",
            }
        )
        for name in ("SCALARIUM_REDIS_URL", "SCALARIUM_DATABASE_URL", "SCALARIUM_PUBLIC_URL"):
            env.pop(name, None)
        if args.database_url:
            env["SCALARIUM_DATABASE_URL"] = args.database_url
        settings = load_settings(env)
        # Started here (not daemonized) so that this script owns it and stops it.
        redis_child = embedded.start(settings, daemonize=False)
        server_log = Path(tmp) / "server.log"
        with server_log.open("wb") as log_file:
            server = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "server"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            base = f"http://127.0.0.1:{port}"
            from server.processes import wait_healthy

            if not wait_healthy(base, timeout=60):
                tail = server_log.read_text(errors="replace").splitlines()[-20:]
                raise SystemExit("the server did not become healthy; its log:\n" + "\n".join(tail))
            token = admin_token(Path(tmp), env)
            keys = [pki.generate_private_key_pem() for _ in range(args.keys)]
            started = time.perf_counter()
            enrolled = enroll_agents(base, token, args.agents, keys)
            print(
                f"setup: {args.agents} agents enrolled over HTTP in "
                f"{time.perf_counter() - started:.1f} s"
            )
            wanted = [p for p in PHASES if not args.only or p in args.only]
            count = int(args.rate_guess * args.seconds)
            started = time.perf_counter()
            signed = presign(enrolled, count) if "heartbeat" in wanted else []
            poll_count = min(count, 840 * args.agents) if "poll" in wanted else 0
            polls = presign_polls(enrolled, poll_count)
            print(
                f"setup: {len(signed)} heartbeats and {len(polls)} polls pre-signed in "
                f"{time.perf_counter() - started:.1f} s"
            )
            feeds: dict[str, list[Request]] = {
                "heartbeat": signed,
                "poll": polls,
                "ping": [("GET", "/agent/v1/ping", b"", {})],
                "health": [("GET", "/api/v1/health", b"", {})],
            }
            client = args.client
            if client == "wrk" and not have_wrk():
                print("note: wrk is not installed (apt-get install wrk); using the Python client")
                client = "python"
            # Warm every worker's caches (keys, certificates) before timing anything.
            drive_python(port, args.clients, 0.5, feeds["ping"])
            results = {}
            for phase in wanted:
                print(f"running: {phase} ...", flush=True)
                cpu_before = group_cpu_seconds(server.pid)
                redis_before = pid_cpu_seconds(redis_child.pid) if redis_child else 0.0
                if client == "wrk":
                    raw = [raw_request(port, *request) for request in feeds[phase]]
                    figures = wrk(port, raw, args.clients, args.seconds)
                    if len(feeds[phase]) > 1 and figures["requests"] > len(raw):
                        print(f"note: ran out of pre-signed {phase}s; raise --rate-guess")
                else:
                    figures = drive_python(port, args.clients, args.seconds, feeds[phase])
                figures["server_cpu"] = group_cpu_seconds(server.pid) - cpu_before
                if redis_child:
                    figures["redis_cpu"] = pid_cpu_seconds(redis_child.pid) - redis_before
                results[PHASES[phase]] = figures
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            embedded.stop(redis_child, settings)

    per_worker = (
        f"{args.web_threads} threads" if args.worker_class == "gthread" else "gevent greenlets"
    )
    print(
        f"\n{client} client, {args.clients} connections; gunicorn {args.web_workers} workers x "
        f"{per_worker}, {'PostgreSQL' if args.database_url else 'SQLite'} + embedded Redis; "
        f"{os.cpu_count()} CPUs shared "
        "by client and server"
    )
    rates = {}
    for name, figures in results.items():
        rates[name] = (figures["requests"] - figures["failed"]) / figures["seconds"]
        note = f" ({figures['failed']:.0f} refused!)" if figures["failed"] else ""
        latency = (
            f", p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms"
            if "p99_ms" in figures
            else ""
        )
        print(
            f"{name:48} {rates[name]:8.0f} req/s  ({figures['requests']:.0f} in "
            f"{figures['seconds']:.1f} s{latency}){note}"
        )
        if figures["requests"]:
            cpu = 1000 * figures["server_cpu"] / figures["requests"]
            redis_cpu = 1000 * figures.get("redis_cpu", 0.0) / figures["requests"]
            print(
                f"{'':48} server CPU {cpu:.3f} ms/request (+ Redis {redis_cpu:.3f}); "
                f"{1000 / (cpu + redis_cpu):.0f} req/s per core"
            )
    signed_names = [PHASES[p] for p in ("heartbeat", "poll") if PHASES[p] in rates]
    unsigned_names = [PHASES[p] for p in ("ping", "health") if PHASES[p] in rates]
    for signed_name in signed_names:
        for unsigned_name in unsigned_names:
            ratio = rates[signed_name] / rates[unsigned_name]
            print(f"{signed_name.split(' (')[0]} / {unsigned_name.split(' (')[0]}: {ratio:.2f}")


if __name__ == "__main__":
    main()
