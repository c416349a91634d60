"""The processes: `scalarium up` on the embedded defaults, the scheduler, the worker."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from rq import Queue, SimpleWorker
from sqlalchemy import func, select

from server import runtime, schedule
from server.db import Database, utcnow
from server.jobs import prune_events
from server.keys import Keys
from server.migrate import upgrade
from server.models import Event
from server.processes import StopFlag
from tests.server.live import free_port


def test_up_starts_everything_on_the_embedded_defaults_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALARIUM_")}
    env.update(
        {
            "SCALARIUM_BIND": f"127.0.0.1:{port}",
            "SCALARIUM_WEB_WORKERS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "up"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line or len(lines) > 400:
                break
        took = time.monotonic() - started
        print(f"scalarium up: healthy after {took:.1f} s")
        output = "".join(lines)
        assert f"Scalarium is up at http://127.0.0.1:{port}" in output, output
        token = (tmp_path / "var" / "admin-token").read_text().strip()
        assert token in output
        assert stat.S_IMODE((tmp_path / "var" / "admin-token").stat().st_mode) == 0o600
        assert (tmp_path / "var" / "scalarium.db").exists()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health") as response:
            assert response.status == 200
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/stacks", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    assert process.returncode == 0, rest
    assert "Scalarium stopped." in rest
    # No child survives: nothing listens on the port, the embedded Redis is gone.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2)
    sockets = list((tmp_path / "var" / "redis").glob("*.sock"))
    assert not any(s.exists() for s in sockets)


def test_a_second_up_reuses_the_data_and_does_not_print_a_new_token(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALARIUM_")}
    env.update({"SCALARIUM_BIND": f"127.0.0.1:{port}", "SCALARIUM_WEB_WORKERS": "1"})
    outputs = []
    for _ in range(2):
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "up"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "Press Ctrl-C" in line or "did not become healthy" in line:
                break
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
        outputs.append("".join(seen) + rest)
        assert process.returncode == 0, outputs[-1]
    token = (tmp_path / "var" / "admin-token").read_text().strip()
    assert token in outputs[0]
    assert token not in outputs[1]
    assert "Admin token: see" in outputs[1]


def test_scheduler_enqueues_each_periodic_slot_once_even_with_two_schedulers(
    redis_client: redis.Redis,
) -> None:
    keys = Keys("scalarium-test")
    table = (schedule.Periodic("prune_events", prune_events, 3600),)
    now = 1_700_000_000.0
    first = schedule.tick(redis_client, keys, now, table)
    second = schedule.tick(redis_client, keys, now + 1, table)  # another scheduler, same slot
    assert first == [f"periodic-prune_events-{int(now // 3600)}"]
    assert second == []
    queued = Queue("default", connection=redis_client).job_ids
    assert queued == first
    later = schedule.tick(redis_client, keys, now + 3600, table)
    assert later == [f"periodic-prune_events-{int(now // 3600) + 1}"]


def test_the_periodic_table_enqueues_every_job_once_per_slot(redis_client: redis.Redis) -> None:
    keys = Keys("scalarium-test")
    now = 1_700_000_000.0
    first = schedule.tick(redis_client, keys, now)
    assert sorted(j.rsplit("-", 1)[0] for j in first) == sorted(
        f"periodic-{p.name}" for p in schedule.PERIODIC
    )
    assert schedule.tick(redis_client, keys, now) == []


def test_worker_runs_the_prune_job_from_the_queue(
    tmp_path: Path, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    monkeypatch.setenv("SCALARIUM_DATABASE_URL", url)
    monkeypatch.setenv("SCALARIUM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SCALARIUM_EVENT_RETENTION_DAYS", "30")
    runtime.reset()
    database = Database(url)
    with database.session() as session:
        session.add(Event(kind="old", message="old", created_at=utcnow() - timedelta(days=31)))
        session.add(Event(kind="new", message="new", created_at=utcnow() - timedelta(days=29)))
    queue = Queue("default", connection=redis_client)
    job = queue.enqueue(prune_events)
    SimpleWorker([queue], connection=redis_client).work(burst=True)
    assert job.get_status(refresh=True) == "finished"
    assert job.return_value() == 1
    with database.session() as session:
        kinds = session.scalars(select(Event.kind)).all()
        assert kinds == ["new"]
        assert session.scalar(select(func.count()).select_from(Event)) == 1
    database.dispose()
    runtime.database().dispose()
    runtime.redis_connection().close()
    runtime.reset()


@pytest.mark.parametrize(
    ("path", "status", "logged"),
    [
        ("/agent/v1/heartbeat", 200, False),
        ("/agent/v1/commands", 200, False),
        ("/agent/v1/commands/abc/finish", 200, False),
        ("/agent/v1/heartbeat", 401, True),
        ("/agent/v1/enroll", 201, True),
        ("/api/v1/stacks", 200, True),
    ],
)
def test_successful_agent_traffic_stays_out_of_the_access_log(
    path: str, status: int, logged: bool
) -> None:
    from server.processes import _agent_noise

    assert _agent_noise(path, status) is not logged


def test_a_stop_flag_set_from_a_signal_handler_ends_the_wait() -> None:
    # threading.Event.set() in a handler could deadlock against the main thread's own wait().
    flag = StopFlag()
    previous = signal.signal(signal.SIGALRM, flag.set)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        assert flag.wait(10)
        assert time.monotonic() - started < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_stop_flag_wait_times_out_when_nobody_stops() -> None:
    flag = StopFlag()
    started = time.monotonic()
    assert not flag.wait(0.3)
    assert 0.25 <= time.monotonic() - started < 5
    flag.set()
    assert flag.is_set() and flag.wait(0)
