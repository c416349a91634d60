"""The long-running processes: server, worker, scheduler, and `up`, which runs them all.

Why `scalarium server` runs gunicorn's gevent worker by default: an agent's long poll spends
almost all its life waiting (up to 60 s) for a wake-up, and every node holds one open all the
time. With gthread each waiting poll pins an OS thread, so 10,000 nodes would need 10,000
threads (stacks, GIL hand-offs, and a thread pool sized by the fleet). With gevent a waiting
poll is a parked greenlet of a few kilobytes on one event loop, and since server/wakeups.py
gives each process one Redis subscription for all its waiters, it holds no Redis connection
either: 10,000 concurrent polls fit in two worker processes on two cores. The CPU-bound parts
(RSA verification, cryptography) run as before, one at a time per worker, which is what two
cores allow anyway.

What gevent's monkey patching needs from our stack (checked with bench/bench_fanout.py and
bench/bench_signed_requests.py): redis-py, SQLAlchemy's pool and threading become cooperative
by the patch; psycopg 3 picks a cooperative wait function only when it is imported after the
patch, so the worker re-picks it (`cooperative_psycopg`); SQLite calls run blocking, which is
fine for its short local queries. SCALARIUM_WEB_WORKER_CLASS=gthread keeps the threaded server.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server import embedded
from server.config import Settings
from server.db import Database
from server.keys import Keys
from server.migrate import ensure_admin_token, upgrade
from server.queue import QUEUE_NAMES, connect

log = logging.getLogger(__name__)


def ensure_redis(settings: Settings) -> None:
    """For a standalone process on the embedded defaults, start the shared embedded Redis."""
    if settings.embedded_redis:
        embedded.start(settings, daemonize=True)


def prepare(settings: Settings) -> str | None:
    """Create or upgrade the schema; returns a new admin token on the very first start."""
    upgrade(settings.database_url)
    database = Database(settings.database_url)
    try:
        return ensure_admin_token(settings, database)
    finally:
        database.dispose()


def tls_hostnames(settings: Settings) -> list[str]:
    """Names the server certificate covers: the public URL's host, the bind host, loopback."""
    names: list[str] = []
    public_host = urlsplit(settings.public_url).hostname
    bind_host = settings.bind.rsplit(":", 1)[0].strip("[]") if ":" in settings.bind else ""
    for name in (public_host, bind_host, "localhost", "127.0.0.1"):
        # A wildcard bind address is not a name anyone connects to.
        if name and name not in ("0.0.0.0", "::") and name not in names:
            names.append(name)
    return names


def server_tls(settings: Settings) -> tuple[Path, Path] | None:
    """(certfile, keyfile) for gunicorn when the server serves HTTPS itself, else None."""
    if not settings.tls_enabled:
        return None
    from server import pki
    from server.enrollment import load_configured_ca

    ca = load_configured_ca(settings)
    return pki.load_or_create_server_tls(settings.pki_dir, ca, tls_hostnames(settings))


def worker_options(settings: Settings) -> dict[str, Any]:
    """gunicorn's worker settings for the configured worker class."""
    if settings.web_worker_class == "gthread":
        return {"worker_class": "gthread", "threads": settings.web_threads}
    return {"worker_class": "gevent", "worker_connections": settings.web_connections}


def cooperative_psycopg() -> bool:
    """Under gevent, make psycopg wait through the patched select (True when it was changed).

    psycopg chooses its wait function when it is first imported; when the gunicorn master
    imported it (migrations on PostgreSQL) before the worker patched select, the workers
    inherit the C wait, which blocks the whole event loop during every query.
    """
    waiting = sys.modules.get("psycopg.waiting")
    monkey = sys.modules.get("gevent.monkey")
    if waiting is None or monkey is None or not monkey.is_module_patched("select"):
        return False
    if getattr(waiting, "wait_c", None) is None or waiting.wait is not waiting.wait_c:
        return False
    # psycopg's own choice once select is patched (waiting.py): poll through gevent's hub.
    setattr(waiting, "wait", waiting.wait_poll)  # noqa: B010
    setattr(waiting, "_ready", waiting._ready_poll)  # noqa: B010
    return True


def _agent_noise(path: str, status: int) -> bool:
    """Successful agent heartbeats and polls: thousands a minute, logged only when they fail."""
    return status < 400 and path.startswith(("/agent/v1/heartbeat", "/agent/v1/commands"))


try:
    from gunicorn.glogging import Logger as _GunicornLogger
except ImportError:  # pragma: no cover - gunicorn is a dependency
    _GunicornLogger = object  # type: ignore[assignment,misc]


class AccessLogger(_GunicornLogger):  # type: ignore[misc,valid-type]
    """gunicorn's logger, without the access lines of successful agent traffic."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        status = getattr(resp, "status_code", None) or int(str(resp.status).split()[0])
        if _agent_noise(environ.get("PATH_INFO", ""), int(status)):
            return
        super().access(resp, req, environ, request_time)


def run_server(settings: Settings) -> None:
    """Serve the app with gunicorn (gevent by default: long polls wait on I/O, not CPU)."""
    from gunicorn.app.base import BaseApplication

    tls = server_tls(settings)

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": settings.bind,
                "workers": settings.web_workers,
                **worker_options(settings),
                "timeout": 120,
                "graceful_timeout": 10,
                "control_socket_disable": True,
                "accesslog": "-",
                "errorlog": "-",
                "loglevel": settings.log_level.lower(),
                # Query strings are not logged: webhook and install URLs may carry secrets.
                "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms',
                "logger_class": "server.processes.AccessLogger",
            }
            if tls is not None:
                options["certfile"], options["keyfile"] = str(tls[0]), str(tls[1])
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # In the worker, after gevent's patch (gunicorn loads the app after forking).
            from server.app import create_app

            if cooperative_psycopg():
                log.debug("server: psycopg switched to the gevent-friendly wait")
            return create_app(settings)

    Server().run()


def run_worker(settings: Settings, *, burst: bool = False) -> None:
    """Run an RQ worker on Scalarium's queues."""
    from rq import SimpleWorker

    connection = connect(settings)
    # Jobs run in the worker process itself rather than a fork per job: a fan-out then finds
    # its database engine and Redis client warm, which is most of its latency. Jobs are short
    # and idempotent, and a crashed worker is restarted by whatever supervises it.
    worker = SimpleWorker(list(QUEUE_NAMES), connection=connection)
    # Warm up before the first job: imports, the database engine and its first connection.
    from sqlalchemy import text

    from server import jobs, runtime  # noqa: F401

    runtime.install_orchestrator_hooks()
    with runtime.database().session() as session:
        session.execute(text("SELECT 1"))
    worker.work(burst=burst, logging_level=settings.log_level)


class StopFlag:
    """A stop request set from a signal handler: a plain attribute, never a lock.

    threading.Event.set() takes the Event's lock. A signal handler runs in the main thread
    between two bytecodes; when that thread was inside Event.wait() on the same Event (holding
    its lock for an instant), set() waits for a lock its own thread holds: a deadlock, seen as
    `scalarium up` ignoring Ctrl-C once in many runs. Waiting here is sleeping in short slices.
    """

    SLICE_SECONDS = 0.1

    def __init__(self) -> None:
        self._set = False

    def set(self, *_signal: Any) -> None:
        """Request the stop (usable as a signal handler)."""
        self._set = True

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep until the stop is requested or `timeout` passes; whether it was requested."""
        deadline = time.monotonic() + timeout
        while not self._set:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, self.SLICE_SECONDS))
        return self._set


def run_scheduler(settings: Settings) -> None:
    """Run the periodic-job scheduler until SIGTERM or SIGINT."""
    from server import schedule

    stop = StopFlag()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop.set)
    log.info("scheduler: started")
    schedule.run(connect(settings), Keys(settings.queue_prefix), stop)
    log.info("scheduler: stopped")


def _child_env(settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SCALARIUM_DATA_DIR": str(settings.data_dir.resolve()),
            "SCALARIUM_DATABASE_URL": settings.database_url,
            "SCALARIUM_REDIS_URL": redis_url,
            "SCALARIUM_BIND": settings.bind,
            "SCALARIUM_PUBLIC_URL": settings.public_url,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def local_url(settings: Settings) -> str:
    """The URL this host reaches the server at (https when it serves TLS)."""
    scheme = "https" if settings.tls_enabled else "http"
    host, _, port = settings.bind.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}"


def wait_healthy(url: str, timeout: float = 60.0, cafile: Path | None = None) -> bool:
    """Poll the health endpoint until it answers 200 or the timeout passes."""
    deadline = time.monotonic() + timeout
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(
                url + "/api/v1/health", timeout=2, context=context
            ) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def run_up(settings: Settings) -> int:
    """Everything in one process tree: embedded Redis, server, worker, scheduler."""
    started = time.monotonic()
    redis_child = None
    if settings.embedded_redis:
        redis_child = embedded.start(settings, daemonize=False)
        redis_url = embedded.embedded_url(settings)
    else:
        redis_url = settings.redis_url
    children: list[subprocess.Popen[bytes]] = []
    stopping = StopFlag()
    signal.signal(signal.SIGINT, stopping.set)
    signal.signal(signal.SIGTERM, stopping.set)
    code = 0
    try:
        token = prepare(settings)
        env = _child_env(settings, redis_url)
        for role in ("server", "worker", "scheduler"):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "server.cli", role], env=env, start_new_session=True
                )
            )
        url = local_url(settings)
        cafile = None
        if settings.tls_enabled:
            # Created (or loaded) here first, so that the health check can verify the server.
            server_tls(settings)
            cafile = Path(settings.ca_cert) if settings.ca_cert else settings.pki_dir / "ca.pem"
        if wait_healthy(url, cafile=cafile):
            took = time.monotonic() - started
            print(f"\nScalarium is up at {url} (healthy after {took:.1f} s)", flush=True)
            token_file = (settings.data_dir / "admin-token").resolve()
            if token:
                print(f"Admin token (shown once, also in {token_file}):\n  {token}", flush=True)
            else:
                print(f"Admin token: see {token_file}", flush=True)
            print("Press Ctrl-C to stop.\n", flush=True)
        else:
            print("Scalarium did not become healthy; see the log above", file=sys.stderr)
            stopping.set()
            code = 1
        while not stopping.is_set():
            for child in children:
                if child.poll() is not None:
                    print(
                        f"a child process exited ({child.args[-1]}, status "
                        f"{child.returncode}); stopping",
                        file=sys.stderr,
                    )
                    stopping.set()
                    code = 1
            stopping.wait(0.5)
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        embedded.stop(redis_child, settings)
        print("Scalarium stopped.", flush=True)
    return code
