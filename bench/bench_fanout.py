"""Benchmark: configure fan-out latency to N long-polling agents, and 10,000 held long polls.

Run from the repository root: ``.venv/bin/python bench/bench_fanout.py [--sizes 100,1000]
[--hold 10000]``. It starts, in a temporary data dir, an embedded Redis, a real ``scalarium
server`` (gunicorn, ``--worker-class``, default gevent) and a real ``scalarium worker``, on SQLite
(or ``--database-url``). The instances are written straight to the database with real
certificates from the installation CA (enrolling 11,000 nodes over HTTP would dominate the
run); they share ``--keys`` RSA key pairs, each with its own certificate (the server checks each
instance's own certificate; sharing keys only saves key generation). Every request is signed for
real with chef_bridge.auth.sign_request, pre-signed, and unique (one per instance).

Fan-out: N agents long-poll ``GET /agent/v1/commands?wait=60``; once all are waiting one more
instance of their stack finishes setup through the orchestrator (a membership change); the
worker runs the fan-out job, which queues configure for every online instance and wakes them.
Printed: for each agent, the time from the change to receiving its configure command
(p50/p90/p99/max).

Hold: ``--hold`` agents long-poll with ``wait=--hold-wait`` at once; printed: errors (anything
but a 200 with no command after the wait), and the server's memory (RSS of gunicorn's master
and workers) before and while they wait.

Loopback only; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Benchmarks are scripts, not an installed package: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json  # noqa: E402

from common import api, free_port  # noqa: E402

from chef_bridge.auth import sign_request  # noqa: E402
from server import embedded, pki  # noqa: E402
from server.config import load_settings  # noqa: E402
from server.db import Database  # noqa: E402
from server.enrollment import load_configured_ca  # noqa: E402
from server.models import Instance, InstanceCertificate, Layer  # noqa: E402

POLL = "/agent/v1/commands"


@dataclass
class Fleet:
    """One stack of online instances with certificates, plus one instance about to join."""

    stack_id: str
    instance_ids: list[str]
    joining_id: str


def wait_fanned_out(database: Database, stack_id: str, timeout: float = 60.0) -> None:
    """Wait until the stack's pending configure fan-outs have run (fanout == cluster version)."""
    from server.models import Stack

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with database.session() as session:
            stack = session.get(Stack, stack_id)
            if stack is not None and stack.fanout_version >= stack.cluster_version:
                return
        time.sleep(0.05)
    raise RuntimeError(f"stack {stack_id}: the fan-out never ran")


class CsrMaker:
    """CSRs for the shared keys, each key parsed once (pki.build_csr_pem re-parses and
    re-validates the RSA key on every call: 55 ms, 10 minutes for 11,000 instances)."""

    def __init__(self, keys: list[bytes]) -> None:
        from cryptography.hazmat.primitives import serialization

        self.keys = [
            serialization.load_pem_private_key(k, None, unsafe_skip_rsa_key_validation=True)
            for k in keys
        ]

    def csr(self, n: int, common_name: str) -> bytes:
        """A CSR for CN=common_name with the n-th shared key."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        )
        key: Any = self.keys[n % len(self.keys)]
        return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def create_fleet(
    database: Database, ca: pki.CertificateAuthority, stack_id: str, count: int, csrs: CsrMaker
) -> Fleet:
    """Write `count` online instances (each with its own certificate) and one in setup."""
    with database.session() as session:
        layer = session.query(Layer).filter(Layer.stack_id == stack_id).one()
        instances = []
        for n in range(count + 1):
            instance = Instance(
                stack_id=stack_id,
                hostname=f"node{n}",
                status="online" if n < count else "running_setup",
                provider="manual",
                private_ip=f"10.{n // 65536}.{n // 256 % 256}.{n % 256}",
            )
            instance.layers = [layer]
            instances.append(instance)
        session.add_all(instances)
        session.flush()
        ids = [i.id for i in instances]
    now = datetime.now(UTC)
    with database.session() as session:
        for n, instance_id in enumerate(ids[:count]):
            issued = pki.issue_instance_certificate(
                ca, csrs.csr(n, instance_id), instance_id, now=now
            )
            session.add(
                InstanceCertificate(
                    serial=issued.serial_hex,
                    instance_id=instance_id,
                    pem=issued.pem.decode("ascii"),
                    not_after=issued.not_after,
                    fingerprint=issued.fingerprint_sha256,
                    created_at=now,
                )
            )
    return Fleet(stack_id, ids[:count], ids[count])


def poll_request(instance_id: str, key: bytes, wait: int, port: int) -> bytes:
    """The raw bytes of one signed long poll."""
    headers = sign_request(key, instance_id, "GET", POLL, b"", server_api_version="1")
    lines = [f"GET {POLL}?wait={wait} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Answer:
    """What one agent got back, and when (time.monotonic)."""

    status: int
    body: bytes
    at: float
    error: str = ""


async def one_poll(port: int, raw: bytes, sent: asyncio.Event | None = None) -> Answer:
    """Send one request on its own connection and read the whole answer."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return Answer(0, b"", time.monotonic(), f"connect: {exc}")
    try:
        writer.write(raw)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        return Answer(status, body, time.monotonic())
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return Answer(0, b"", time.monotonic(), f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()


async def start_polls(
    port: int,
    requests: list[bytes],
    batch: int = 250,
    accepted: Callable[[], Awaitable[int]] | None = None,
    window: int = 1000,
) -> list[asyncio.Task]:
    """Open the polls in batches, keeping at most `window` sent but not yet accepted by the
    server (a 10,000-SYN burst overflows the listen backlog: the kernel then answers with SYN
    cookies and resets; real agents start spread out)."""
    tasks: list[asyncio.Task] = []
    for start in range(0, len(requests), batch):
        while accepted is not None and len(tasks) - await accepted() > window:
            await asyncio.sleep(0.1)
        for raw in requests[start : start + batch]:
            tasks.append(asyncio.create_task(one_poll(port, raw)))
        await asyncio.sleep(0.02)
    return tasks


def seen_signatures(redis_client: Any, prefix: str) -> int:
    """How many signed requests the server accepted so far (its replay cache)."""
    return sum(1 for _ in redis_client.scan_iter(f"{prefix}:agent:sig:*", count=5000))


async def wait_accepted(
    redis_client: Any, prefix: str, expected: int, timeout: float, tasks: list[asyncio.Task]
) -> float:
    """Wait until the server accepted `expected` signed requests (or every poll ended, or the
    time passed); seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout and not all(t.done() for t in tasks):
        if await asyncio.to_thread(seen_signatures, redis_client, prefix) >= expected:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def percentiles(values: list[float]) -> str:
    """p50/p90/p99/max of seconds, in milliseconds."""
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return (
        f"first {ordered[0] * 1000:5.0f} ms  p50 {at(0.50):5.0f} ms  p90 {at(0.90):5.0f} ms"
        f"  p99 {at(0.99):5.0f} ms"
        f"  max {ordered[-1] * 1000:5.0f} ms  (mean {statistics.mean(ordered) * 1000:.0f} ms)"
    )


def server_rss_mb(root_pid: int) -> float:
    """Resident memory of a process and its descendants, in MiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def join_instance(database: Database, fleet: Fleet) -> float:
    """The membership change: the joining instance finishes setup; the commit's time."""
    from server import orchestrator
    from server.lifecycle import Trigger

    with database.session() as session:
        instance = session.get(Instance, fleet.joining_id)
        assert instance is not None
        orchestrator.instance_trigger(session, instance, Trigger.SETUP_SUCCEEDED, reason="bench")
        changed = time.monotonic()
    return changed


async def fanout_round(
    port: int, database: Database, redis_client: Any, prefix: str, fleet: Fleet, keys: list[bytes]
) -> None:
    """N agents wait; one instance joins; print how long each took to get its configure."""
    count = len(fleet.instance_ids)
    before = seen_signatures(redis_client, prefix)
    requests = [
        poll_request(i, keys[n % len(keys)], 60, port) for n, i in enumerate(fleet.instance_ids)
    ]
    tasks = await start_polls(port, requests)
    took = await wait_accepted(redis_client, prefix, before + count, 120, tasks)
    # Accepted is just before the poll registers its waiter; give the last ones a moment.
    await asyncio.sleep(1.0)
    early = [t for t in tasks if t.done()]
    changed = await asyncio.to_thread(join_instance, database, fleet)
    answers = await asyncio.gather(*tasks)
    latencies, errors = [], []
    for answer in answers:
        commands = json.loads(answer.body).get("commands", []) if answer.status == 200 else []
        if answer.status == 200 and commands and commands[0]["type"] == "configure":
            latencies.append(answer.at - changed)
        else:
            errors.append(answer.error or f"{answer.status} {answer.body[:100]!r}")
    print(
        f"fan-out N={count:5}: {len(latencies)} configure received, {len(errors)} errors,"
        f" {len(early)} answered before the change; polls accepted in {took:.1f} s"
    )
    if latencies:
        print(f"  change -> configure at agent: {percentiles(latencies)}")
    for error in sorted(set(errors))[:5]:
        print(f"  error x{errors.count(error)}: {error}")


async def hold_round(
    port: int,
    server_pid: int,
    redis_client: Any,
    prefix: str,
    fleet: Fleet,
    keys: list[bytes],
    wait: int,
) -> None:
    """Every agent long-polls once with `wait`; print the most polls waiting at once, errors
    and the server's memory."""
    count = len(fleet.instance_ids)
    rss_before = server_rss_mb(server_pid)
    before = seen_signatures(redis_client, prefix)
    requests = [
        poll_request(i, keys[n % len(keys)], wait, port) for n, i in enumerate(fleet.instance_ids)
    ]
    tasks: list[asyncio.Task] = []
    peak = {"waiting": 0, "rss": rss_before, "at": 0.0}
    started = time.monotonic()

    async def accepted() -> int:
        return await asyncio.to_thread(seen_signatures, redis_client, prefix) - before

    async def sample() -> None:
        while True:
            waiting = await accepted() - sum(1 for t in tasks if t.done())
            if waiting > peak["waiting"]:
                peak["waiting"], peak["at"] = waiting, time.monotonic() - started
                peak["rss"] = max(peak["rss"], server_rss_mb(server_pid))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    tasks.extend(await start_polls(port, requests, accepted=accepted))
    ramp = time.monotonic() - started
    answers = await asyncio.gather(*tasks)
    sampler.cancel()
    finished = time.monotonic() - started
    errors = [
        a.error or f"{a.status} {a.body[:100]!r}"
        for a in answers
        if a.status != 200 or json.loads(a.body) != {"commands": []}
    ]
    print(
        f"hold N={count} (wait={wait}): all sent after {ramp:.1f} s; at most {peak['waiting']}"
        f" polls waiting at once (at {peak['at']:.0f} s); {len(errors)} errors;"
        f" all answered after {finished:.1f} s"
    )
    print(
        f"  server RSS (gunicorn master + workers): {rss_before:.0f} MiB before,"
        f" {peak['rss']:.0f} MiB with {peak['waiting']} polls waiting"
        f" ({(peak['rss'] - rss_before) * 1024 / max(peak['waiting'], 1):.1f} KiB per poll)"
    )
    for error in sorted(set(errors))[:5]:
        print(f"  error x{errors.count(error)}: {error}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process group we started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> None:
    """Start the server and a worker, then run the fan-out rounds and the hold round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--hold", type=int, default=10000)
    parser.add_argument("--hold-wait", type=int, default=30)
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--worker-class", default="gevent")
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    # SIGTERM ends the run like Ctrl-C: the finally below stops every process we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    # 10,000 client sockets here (the server has its own processes and limits).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, args.hold + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    with tempfile.TemporaryDirectory(prefix="scalarium-fanout-") as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCALARIUM_")}
        env.update(
            {
                "SCALARIUM_DATA_DIR": tmp,
                "SCALARIUM_BIND": f"127.0.0.1:{port}",
                "SCALARIUM_WEB_WORKERS": str(args.web_workers),
                "SCALARIUM_WEB_WORKER_CLASS": args.worker_class,
                "SCALARIUM_LOG_LEVEL": "WARNING",
            }
        )
        if args.database_url:
            env["SCALARIUM_DATABASE_URL"] = args.database_url
        embedded_settings = load_settings(env)
        redis_child = embedded.start(embedded_settings, daemonize=False)
        env["SCALARIUM_REDIS_URL"] = embedded.embedded_url(embedded_settings)
        settings = load_settings(env)
        logs = open(Path(tmp) / "processes.log", "wb")  # noqa: SIM115 - closed below
        processes: list[subprocess.Popen[bytes]] = []
        try:
            for role in ("server", "worker"):
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "server.cli", role],
                        env=env,
                        stdout=logs,
                        stderr=logs,
                        start_new_session=True,
                    )
                )
                if role == "server":
                    from server.processes import wait_healthy

                    base = f"http://127.0.0.1:{port}"
                    if not wait_healthy(base, timeout=60):
                        raise SystemExit("the server did not become healthy")
            token = (Path(tmp) / "admin-token").read_text().strip()
            database = Database(settings.database_url)
            ca = load_configured_ca(settings)
            from server import queue, runtime
            from server.keys import Keys

            redis_client = queue.connect(settings)
            # The bench process changes lifecycle state: its wake-ups, jobs and credentials
            # notices go to our Redis.
            runtime.install_hooks(redis_client, Keys(settings.queue_prefix))
            started = time.monotonic()
            keys = [pki.generate_private_key_pem() for _ in range(args.keys)]
            csrs = CsrMaker(keys)
            fleets = []
            for name, count in [(f"fan{n}", n) for n in sizes] + [("hold", args.hold)]:
                if count <= 0:
                    continue
                stack = api(base, token, "POST", "/stacks", {"shortname": name})
                api(base, token, "POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})
                # Adding the layer asks for a configure fan-out: let it run while the stack has
                # no online instance, so that it hands the fleet nothing before the measured change.
                wait_fanned_out(database, stack["id"])
                fleets.append((name, create_fleet(database, ca, stack["id"], count, csrs)))
            total = sum(len(f.instance_ids) for _, f in fleets)
            print(
                f"setup: {total} online instances with their own certificates"
                f" ({args.keys} shared key pairs) in {time.monotonic() - started:.1f} s;"
                f" server: gunicorn {args.worker_class} x {args.web_workers} workers,"
                f" {'SQLite' if settings.database_url.startswith('sqlite') else 'PostgreSQL'},"
                f" embedded Redis, {os.cpu_count()} CPUs shared by clients and server"
            )

            async def run() -> None:
                for name, fleet in fleets:
                    if name == "hold":
                        await hold_round(
                            port,
                            processes[0].pid,
                            redis_client,
                            "scalarium",
                            fleet,
                            keys,
                            args.hold_wait,
                        )
                    else:
                        await fanout_round(port, database, redis_client, "scalarium", fleet, keys)

            asyncio.run(run())
            database.dispose()
            redis_client.close()
        finally:
            for process in processes:
                stop(process)
            embedded.stop(redis_child, settings)
            logs.close()
            tail = (Path(tmp) / "processes.log").read_bytes()[-3000:].decode(errors="replace")
            if "Traceback" in tail or "ERROR" in tail:
                print("--- server/worker log tail ---\n" + tail)


if __name__ == "__main__":
    main()
