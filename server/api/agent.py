"""Agent protocol v1 (/agent/v1): enrollment, heartbeats and the command long poll.

Every endpoint except ``ping``, ``enroll/lookup`` and ``enroll`` needs a request signed with the
instance key (server/agent_auth.py). Every refusal is answered with its own code and recorded
as an event in a transaction of its own, so that it survives the request's rollback.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from flask import Blueprint, Flask, current_app, g, jsonify, request
from sqlalchemy import update
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header

from chef_bridge.auth import LowerHeaders
from server import db, orchestrator
from server.agent_auth import (
    AgentIdentity,
    AgentRefused,
    Credentials,
    VerifiedCertificates,
    authenticate,
    record_refusal,
    replay_cache_unavailable,
    replayed_request,
)
from server.api.registry import parse_json_body
from server.bundles import BASE_RECIPES, bundle_path, ensure_stack_bundle
from server.credentials import CredentialsCache
from server.db import get_database, utcnow
from server.enrollment import (
    EnrollmentRefused,
    enroll,
    get_ca,
    get_ca_pem,
    lookup,
)
from server.errors import Conflict, Invalid, NotFound, ScalariumError, unexpected_error
from server.keys import Keys
from server.lifecycle import CommandTrigger, Trigger
from server.models import Command, CommandType, Instance, InstanceState
from server.queue import connect, get_redis
from server.scripts import HotScript
from server.wakeups import Waiter, WakeupHub, publish_wake

log = logging.getLogger(__name__)

blueprint = Blueprint("agent_v1", __name__, url_prefix="/agent/v1")
Result = TypeVar("Result")

MAX_WAIT_SECONDS = 60
MAX_METRICS_BYTES = 16 * 1024
# The database learns of heartbeats at most this often per instance (Redis: every beat).
HEARTBEAT_PERSIST_SECONDS = 15
METRICS_TTL_SECONDS = 3600


def _views() -> Any:
    views = current_app.extensions.get("scalarium.cluster_views")
    if views is None:
        from server.cluster import ViewCache

        views = current_app.extensions.setdefault("scalarium.cluster_views", ViewCache())
    return views


def init_app(app: Flask) -> None:
    """Register the blueprint, the cache of checked certificates and the wake-up hub."""
    app.extensions["scalarium.verified_certificates"] = VerifiedCertificates()
    settings = app.config["SCALARIUM"]
    keys = app.extensions["scalarium.keys"]
    # Connects on the first waiting poll or signed request, in the process that serves it
    # (after gunicorn forks).
    hub = app.extensions["scalarium.wakeups"] = WakeupHub(lambda: connect(settings), keys)
    # Kept only while the hub hears of changes (server/credentials.py).
    credentials: CredentialsCache[Credentials] = CredentialsCache(hub.keep)
    hub.listen(
        keys.credentials_channel(),
        lambda data: credentials.forget(data.split(",")),
        credentials.clear,
    )
    app.extensions["scalarium.credentials"] = credentials
    app.register_blueprint(blueprint)
    app.wsgi_app = HeartbeatPath(app, app.wsgi_app)  # type: ignore[method-assign]


def _keys() -> Keys:
    keys: Keys = current_app.extensions["scalarium.keys"]
    return keys


# --- wake-ups ---------------------------------------------------------------------------------


def wake(connection: redis.Redis, instance_id: str, keys: Keys | None = None) -> None:
    """End an instance's long poll, whichever server holds it (call after the commit)."""
    # One PUBLISH and no list key: a wake-up only matters to a poll that registered before
    # reading the database (server/wakeups.py); any later poll reads the database first.
    publish_wake(connection, instance_id, keys or Keys())


def wake_many(connection: redis.Redis, instance_ids: list[str], keys: Keys | None = None) -> None:
    """End the long polls of many instances in one round trip (a fan-out's wake-ups)."""
    pipe = connection.pipeline(transaction=False)
    for instance_id in instance_ids:
        publish_wake(pipe, instance_id, keys or Keys())
    pipe.execute()


def get_wakeups(app: Flask) -> WakeupHub:
    """This process's wake-up hub (one Redis subscription shared by every waiting poll)."""
    hub: WakeupHub = app.extensions["scalarium.wakeups"]
    return hub


def wait_for_wake(waiter: Waiter, instance_id: str, seconds: float) -> list[dict[str, Any]]:
    """Wait up to `seconds` for a wake-up that brings a command; the commands found (or none).

    A wake-up that finds nothing (a resync after a Redis reconnect, a command another poll took)
    does not end the poll early: it goes back to waiting for the time left.
    """
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not waiter.wait(remaining):
            return []
        found = queued_commands(instance_id)
        if found:
            return found


# --- plumbing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedCall:
    """What checking a signed request reads of it: from Flask's request or a bare WSGI environ."""

    method: str
    path: str  # as routed (the refusal event records it)
    signed_path: str  # as the agent signed it: the script root (a mount prefix) and the path
    body: bytes
    headers: LowerHeaders
    mimetype: str

    @classmethod
    def from_request(cls) -> SignedCall:
        """The current Flask request."""
        return cls(
            method=request.method,
            path=request.path,
            signed_path=request.script_root + request.path,
            body=request.get_data(cache=True),
            headers=_signing_headers(request.environ),
            mimetype=request.mimetype,
        )

    @classmethod
    def from_environ(cls, environ: dict[str, Any], body: bytes) -> SignedCall:
        """A WSGI request whose body was read already (HeartbeatPath)."""
        path = environ.get("PATH_INFO", "")
        return cls(
            method=environ["REQUEST_METHOD"],
            path=path,
            signed_path=environ.get("SCRIPT_NAME", "").rstrip("/") + path,
            body=body,
            headers=_signing_headers(environ),
            # As werkzeug derives request.mimetype.
            mimetype=parse_options_header(environ.get("CONTENT_TYPE", ""))[0].lower(),
        )


def _refused(
    what: str,
    error: ScalariumError,
    instance_id: str | None,
    stack_id: str | None,
    call: SignedCall | None = None,
) -> ScalariumError:
    db.session().rollback()
    record_refusal(
        get_database(current_app),
        what,
        error,
        instance_id=instance_id,
        stack_id=stack_id,
        data={"path": (call or request).path, "method": (call or request).method},
    )
    log.info("instance %s: %s refused: %s", instance_id or "-", what, error.code)
    return error


def _signing_headers(environ: dict[str, Any]) -> LowerHeaders:
    """The request's X-Ops-* headers, lower-cased and stripped (all a signature check reads)."""
    return LowerHeaders(
        (name[5:].replace("_", "-").lower(), value.strip())
        for name, value in environ.items()
        if name.startswith("HTTP_X_OPS_")
    )


def signed(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Require a valid, never seen signature; the handler gets the AgentIdentity as `agent`."""

    @functools.wraps(handler)
    def view(**kwargs: Any) -> Any:
        return run_signed(
            SignedCall.from_request(),
            lambda agent: handler(agent=agent, **kwargs),
            spend_replay=True,
        )

    return view


def run_signed(
    call: SignedCall, handler: Callable[[AgentIdentity], Result], *, spend_replay: bool
) -> Result:
    """Check `call`'s signature, then run `handler` with the agent and commit; needs an app context.

    Any refusal (AgentRefused, from the check or from the handler) is recorded as an event and
    raised as its ScalariumError. With ``spend_replay=False`` the handler spends
    ``agent.replay`` itself, before it acts: the hottest endpoint (heartbeats) then checks for a
    replay in the same Redis round trip as its own work.
    """
    try:
        identity = authenticate(
            db.session,
            get_redis(current_app),
            _keys(),
            get_ca(current_app),
            current_app.extensions["scalarium.verified_certificates"],
            current_app.extensions["scalarium.credentials"],
            method=call.method,
            path=call.signed_path,
            body=call.body,
            headers=call.headers,
            spend_replay=spend_replay,
        )
        result = handler(identity)
    except AgentRefused as exc:
        raise _refused(
            f"{call.method} {call.path}", exc.error, exc.instance_id, exc.stack_id, call
        ) from None
    # A request answered from kept credentials may never have opened a session.
    session = g.get("db_session")
    if session is not None:
        session.commit()
    return result


def _json_object(required: bool) -> dict[str, Any]:
    return json_object(request.get_data(cache=True), request.mimetype, required=required)


def json_object(raw: bytes, mimetype: str, *, required: bool) -> dict[str, Any]:
    """A request body that must be a JSON object (an empty one is {} unless `required`)."""
    if not raw.strip() and not required:
        return {}
    body = parse_json_body(raw, mimetype)
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object", code="invalid_body")
    return body


# --- unsigned endpoints -----------------------------------------------------------------------


@blueprint.get("/ping")
def ping() -> Any:
    """Reachability check for agents and load balancers (unsigned, touches nothing)."""
    return jsonify({"ok": True})


@blueprint.post("/enroll/lookup")
def enroll_lookup() -> Any:
    """Which instance a token was made for, so the node can build its CSR (the token stays live)."""
    session = db.session()
    try:
        body = _json_object(required=True)
        instance_id = lookup(session, body.get("token"))
    except EnrollmentRefused as exc:
        raise _refused("enrollment lookup", exc.error, exc.instance_id, exc.stack_id) from None
    except ScalariumError as exc:
        raise _refused("enrollment lookup", exc, None, None) from None
    session.commit()
    return jsonify({"instance_id": instance_id})


@blueprint.post("/enroll")
def enroll_node() -> Any:
    """Spend a token on a CSR; answer with the certificate, the CA and the agent's settings."""
    session = db.session()
    settings = current_app.config["SCALARIUM"]
    try:
        body = _json_object(required=True)
        enrolled = enroll(
            session,
            get_ca(current_app),
            settings,
            token=body.get("token"),
            csr_pem=body.get("csr"),
            facts=body.get("facts"),
            agent_version=body.get("agent_version"),
            claimed_instance_id=body.get("instance_id"),
        )
        session.commit()
    except EnrollmentRefused as exc:
        raise _refused("enrollment", exc.error, exc.instance_id, exc.stack_id) from None
    except ScalariumError as exc:
        raise _refused("enrollment", exc, None, None) from None
    return (
        jsonify(
            {
                "instance_id": enrolled.instance_id,
                "certificate": enrolled.certificate_pem,
                "ca_certificate": get_ca_pem(current_app).decode("ascii"),
                "settings": enrolled.settings,
            }
        ),
        201,
    )


# --- signed endpoints -------------------------------------------------------------------------


def parse_metrics(body: dict[str, Any], size: int) -> tuple[dict[str, Any], str | None]:
    """Split a heartbeat (`size` bytes as sent) into (metrics, agent_version), or Invalid."""
    agent_version = body.get("agent_version")
    if agent_version is not None and (
        not isinstance(agent_version, str) or not 0 < len(agent_version) <= 32
    ):
        raise Invalid(
            "agent_version must be a string of 1 to 32 characters",
            code="invalid_agent_version",
            details={"field": "agent_version"},
        )
    metrics = {k: v for k, v in body.items() if k != "agent_version"}
    # Re-encoded, no JSON token grows more than 4.5 times (1e15 -> 1000000000000000.0;
    # \\uXXXX for a 2-byte character is 3): a small body needs no second encoding.
    small = size * 6 <= MAX_METRICS_BYTES
    if not small and len(json.dumps(metrics, separators=(",", ":"))) > MAX_METRICS_BYTES:
        raise Invalid(
            f"heartbeat metrics are over {MAX_METRICS_BYTES} bytes", code="metrics_too_large"
        )
    return metrics, agent_version


# One round trip per heartbeat: spend the signature (refusing a replay before anything is
# written), keep the metrics, and learn whether the database is due and the agent's last version.
# KEYS: seen signature, metrics, persisted marker, agent version.
# ARGV: instance id, signature ttl, metrics json, metrics ttl, agent version, persist ttl.
_HEARTBEAT_SCRIPT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return {0}
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
local due = redis.call('SET', KEYS[3], ARGV[5], 'NX', 'EX', ARGV[6])
local previous = redis.call('GETSET', KEYS[4], ARGV[5])
return {1, due and 1 or 0, previous or ''}
"""


_heartbeat_script = HotScript(_HEARTBEAT_SCRIPT)

HEARTBEAT_PATH = f"{blueprint.url_prefix}/heartbeat"


@blueprint.post("/heartbeat")  # HEARTBEAT_PATH
def heartbeat() -> Any:
    """A heartbeat whose body has no Content-Length or is over the limit (HeartbeatPath's rest)."""
    return jsonify(answer_heartbeat(SignedCall.from_request()))


def answer_heartbeat(call: SignedCall) -> dict[str, Any]:
    """Keep the node's latest metrics; the first heartbeat after enrollment starts setup.

    Metrics go to Redis on every beat; the database row (last_heartbeat_at, metrics, agent
    version) is written at most every HEARTBEAT_PERSIST_SECONDS, or at once when the agent
    version changes or the lifecycle moves, so thousands of agents do not mean thousands of
    writes per minute. Needs an app context; raises ScalariumError.
    """
    return run_signed(call, lambda agent: _beat(call, agent), spend_replay=False)


def _beat(call: SignedCall, agent: AgentIdentity) -> dict[str, Any]:
    metrics, agent_version = parse_metrics(
        json_object(call.body, call.mimetype, required=False), len(call.body)
    )
    now = utcnow()
    keys = _keys()
    replay = agent.replay
    if replay is None:
        raise RuntimeError("a heartbeat spends its signature itself (spend_replay=False)")
    try:
        answer = _heartbeat_script(
            get_redis(current_app),
            keys=[
                replay.key,
                keys.metrics(agent.instance_id),
                keys.heartbeat_persisted(agent.instance_id),
                keys.agent_version(agent.instance_id),
            ],
            args=[
                replay.instance_id,
                replay.ttl,
                json.dumps({"at": now.isoformat(), "agent_version": agent_version, **metrics}),
                METRICS_TTL_SECONDS,
                agent_version or "",
                HEARTBEAT_PERSIST_SECONDS,
            ],
        )
    except redis.RedisError as exc:
        raise AgentRefused(
            replay_cache_unavailable(exc), agent.instance_id, agent.stack_id
        ) from None
    if not answer[0]:
        raise AgentRefused(replayed_request(), agent.instance_id, agent.stack_id)
    _, due, previous_version = answer
    connecting = agent.status in _CONNECT_TRIGGERS
    version_changed = (previous_version or b"").decode() != (agent_version or "")
    if not (due or connecting or version_changed):
        return {"ok": True, "status": agent.status}
    session = db.session()
    values: dict[str, Any] = {"metrics": metrics, "last_heartbeat_at": now}
    if agent_version is not None:
        values["agent_version"] = agent_version
    # updated_at stays: a heartbeat is not a change of the cluster picture (server/cluster.py
    # caches views by it).
    values["updated_at"] = Instance.updated_at
    session.execute(update(Instance).where(Instance.id == agent.instance_id).values(**values))
    if not connecting:
        return {"ok": True, "status": agent.status}
    instance = lock_instance(session, agent.instance_id)
    trigger = _CONNECT_TRIGGERS.get(instance.status)
    if trigger is not None:
        orchestrator.instance_trigger(
            session,
            instance,
            trigger,
            actor=f"instance:{agent.instance_id}",
            reason="agent connected",
        )
    return {"ok": True, "status": instance.status}


class HeartbeatPath:
    """WSGI: heartbeats answered below Flask; every other request goes on to `wsgi_app`.

    Heartbeats are most of an agent fleet's requests (one per node per minute), and Flask's
    request machinery (a request context, URL matching, a Response object) cost about as much
    as checking the signature (py-spy on bench/bench_signed_requests.py). This path reads the
    body itself and runs the same answer_heartbeat as the Flask route, in an app context (the
    database session and the teardown that closes it). It takes only a POST to HEARTBEAT_PATH
    with a Content-Length within the app's limit; anything else (a chunked body, an oversized
    one, another method) goes to Flask, which answers it as before.
    """

    def __init__(self, app: Flask, wsgi_app: Callable[..., Any]) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.limit = app.config["MAX_CONTENT_LENGTH"]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != HEARTBEAT_PATH or environ["REQUEST_METHOD"] != "POST":
            return self.wsgi_app(environ, start_response)
        raw_length = environ.get("CONTENT_LENGTH")
        if not raw_length or not raw_length.isdigit() or int(raw_length) > self.limit:
            return self.wsgi_app(environ, start_response)
        length = int(raw_length)
        body = environ["wsgi.input"].read(length) if length else b""
        with self.app.app_context():
            try:
                status, document = 200, answer_heartbeat(SignedCall.from_environ(environ, body))
            except ScalariumError as exc:
                status, document = exc.status, exc.to_dict()
            except Exception as exc:  # noqa: BLE001 - answered as Flask's handler answers it
                error = unexpected_error(exc)
                status, document = error.status, error.to_dict()
            payload = self.app.json.dumps(document).encode() + b"\n"
        start_response(
            f"{status} {HTTP_STATUS_CODES.get(status, 'Unknown')}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]


def latest_metrics(connection: redis.Redis, keys: Keys, instance_id: str) -> dict[str, Any] | None:
    """The metrics of an instance's last heartbeat, if one came recently."""
    raw = connection.get(keys.metrics(instance_id))
    return json.loads(raw) if raw else None


# A signed request from a node that is not yet (or no longer) in service moves it on.
_CONNECT_TRIGGERS = {
    InstanceState.PENDING.value: Trigger.AGENT_CONNECTED,
    InstanceState.BOOTING.value: Trigger.AGENT_CONNECTED,
    InstanceState.CONNECTION_LOST.value: Trigger.HEARTBEAT_RESUMED,
}


def lock_instance(session: Any, instance_id: str) -> Instance:
    """The instance row, locked for this transaction (a no-op write: SQLite and PostgreSQL)."""
    session.execute(
        update(Instance)
        .where(Instance.id == instance_id)
        .values(status=Instance.status, updated_at=Instance.updated_at)
        .execution_options(synchronize_session=False)
    )
    instance = session.get(Instance, instance_id, populate_existing=True)
    if instance is None:
        raise NotFound("no such instance", code="instance_not_found")
    return instance


def parse_wait(raw: str | None) -> int:
    """The long-poll wait in seconds from ?wait=, capped at MAX_WAIT_SECONDS."""
    if raw is None or raw == "":
        return 0
    if not raw.isdigit() or len(raw) > 6:
        raise Invalid(
            "wait must be a whole number of seconds",
            code="invalid_query",
            details={"parameter": "wait"},
        )
    return min(int(raw), MAX_WAIT_SECONDS)


def command_document(
    command: Command | orchestrator.QueuedCommand, bundle_sha256: str | None
) -> dict[str, Any]:
    """A queued command as the agent receives it."""
    prefix = blueprint.url_prefix
    return {
        "id": command.id,
        "type": command.type,
        "deployment_id": command.deployment_id,
        "cluster_version": command.cluster_version,
        "node_json_url": f"{prefix}/commands/{command.id}/node.json",
        "search_nodes_url": f"{prefix}/commands/{command.id}/search-nodes.json",
        "bundle_url": f"{prefix}/bundles/{bundle_sha256}.tar.gz" if bundle_sha256 else None,
        "bundle_sha256": bundle_sha256,
        "timeout": command.timeout_seconds,
        "args": command.args or {},
    }


def queued_commands(instance_id: str) -> list[dict[str, Any]]:
    """The next command the instance should run, if any (ends the transaction)."""
    session = db.session()
    settings = current_app.config["SCALARIUM"]
    found: list[dict[str, Any]] = []
    delivery = orchestrator.peek_delivery(session, instance_id)
    bundle = delivery.bundle_sha256
    if (
        delivery.settled
        and delivery.command is not None
        and bundle is not None
        and bundle_path(settings, bundle)
    ):
        found.append(command_document(delivery.command, bundle))
    elif not delivery.settled or delivery.command is not None:
        # The slow path: supersede stale configures, or build a missing bundle first.
        instance = session.get(Instance, instance_id)
        command = orchestrator.next_command(session, instance) if instance else None
        if instance is not None and command is not None:
            session.commit()  # no write lock may be held while a missing bundle is built
            bundle = ensure_stack_bundle(
                session, instance.stack_id, settings, current_app.extensions["scalarium.vault"]
            )
            found.append(command_document(command, bundle))
    # Never hold a transaction (or, on SQLite, a read snapshot) through the wait.
    session.commit()
    return found


@blueprint.get("/commands")
@signed
def commands(agent: AgentIdentity) -> Any:
    """Long poll: queued commands at once, else wait for a wake-up or ?wait= seconds."""
    wait = parse_wait(request.args.get("wait"))
    # Nothing of the signature check stays open while the poll waits.
    db.session().commit()
    if wait == 0:
        return jsonify({"commands": queued_commands(agent.instance_id)})
    # Registered before the database is read: a command committed after the read wakes us.
    with get_wakeups(current_app).waiter(agent.instance_id) as waiter:
        found = queued_commands(agent.instance_id)
        if not found:
            found = wait_for_wake(waiter, agent.instance_id, wait)
    return jsonify({"commands": found})


# --- command progress -------------------------------------------------------------------------


def _own_command(session: Any, agent: AgentIdentity, command_id: str) -> Command:
    command = session.get(Command, command_id)
    if command is None or command.instance_id != agent.instance_id:
        raise NotFound(
            "no such command for this instance",
            code="command_not_found",
            details={"id": command_id},
        )
    return command


def _refusal(exc: orchestrator.CommandRefused) -> Conflict:
    return Conflict(f"the command is {exc.status}", code=exc.code, details={"status": exc.status})


@blueprint.get("/commands/<command_id>/node.json")
@signed
def node_json(agent: AgentIdentity, command_id: str) -> Any:
    """The node JSON of one command: attributes, run list and the cluster picture."""
    from chef_bridge import node_json as nj

    session = db.session()
    command = _own_command(session, agent, command_id)
    view = _views().get(
        session,
        agent.stack_id,
        current_app.extensions["scalarium.vault"],
        lambda cluster: nj.build_cluster(cluster, base_recipes=BASE_RECIPES),
    )
    deployment = command.deployment
    event = command.type
    extra: list[str] | None = None
    if command.type == CommandType.SETUP:
        # Setup ends with a deploy of every app of the instance's layers (DESIGN.md).
        instance = view.instance_by_id[agent.instance_id]
        extra = nj.run_list(view.layers, instance["layer_ids"], "deploy")
    elif command.type == CommandType.EXECUTE_RECIPES:
        extra = list((command.args or {}).get("recipes", []))
    elif command.type == CommandType.UPDATE_CUSTOM_COOKBOOKS:
        event = "update_custom_cookbooks"
    document = nj.node_json(
        view,
        agent.instance_id,
        event,
        command_id=command.id,
        deployment={
            "id": deployment.id,
            "command": deployment.command,
            "custom_json": deployment.custom_json or {},
            "app_ids": [deployment.app_id] if deployment.app_id else None,
        }
        if deployment is not None
        else None,
        sent_at=utcnow().isoformat().replace("+00:00", "Z"),
        extra_recipes=extra,
    )
    document["scalarium"]["cluster_version"] = view.scalarium.get("cluster_version")
    return current_app.response_class(nj.dumps(view, document), mimetype="application/json")


@blueprint.get("/commands/<command_id>/search-nodes.json")
@signed
def search_nodes(agent: AgentIdentity, command_id: str) -> Any:
    """One Chef node document per online instance, for chef-solo local-mode `search(:node)`.

    Keyed by the file name the agent writes under node_path: other instances by hostname; this
    instance by its own node name (its id), the file chef itself writes during the run, so that
    search finds every instance exactly once.
    """
    from chef_bridge import node_json as nj

    session = db.session()
    _own_command(session, agent, command_id)
    view = _views().get(
        session,
        agent.stack_id,
        current_app.extensions["scalarium.vault"],
        lambda cluster: nj.build_cluster(cluster, base_recipes=BASE_RECIPES),
    )
    nodes = nj.search_nodes(view)
    own = view.instance_by_id[agent.instance_id]["hostname"]
    if own in nodes:
        nodes[agent.instance_id] = {**nodes.pop(own), "name": agent.instance_id}
    return jsonify({"nodes": nodes})


@blueprint.get("/bundles/<sha256>.tar.gz")
@signed
def bundle(agent: AgentIdentity, sha256: str) -> Any:
    """A cookbook bundle by its content address (immutable, so cacheable forever)."""
    from flask import send_file

    from server.bundles import bundle_path

    path = bundle_path(current_app.config["SCALARIUM"], sha256)
    if path is None:
        raise NotFound("no such bundle", code="bundle_not_found", details={"sha256": sha256})
    response = send_file(
        path, mimetype="application/gzip", etag=sha256, conditional=True, max_age=365 * 24 * 3600
    )
    return response


@blueprint.post("/commands/<command_id>/start")
@signed
def start_command(agent: AgentIdentity, command_id: str) -> Any:
    """The agent starts running a command (a repeat is harmless; a finished one is refused)."""
    session = db.session()
    lock_instance(session, agent.instance_id)
    command = _own_command(session, agent, command_id)
    try:
        orchestrator.command_started(session, command)
    except orchestrator.CommandRefused as exc:
        raise _refusal(exc) from None
    return jsonify({"id": command.id, "status": command.status})


@blueprint.post("/commands/<command_id>/log")
@signed
def append_command_log(agent: AgentIdentity, command_id: str) -> Any:
    """A chunk of the chef log at a byte offset; resending a chunk stores it once."""
    session = db.session()
    body = _json_object(required=True)
    offset, data = body.get("offset"), body.get("data")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise Invalid("offset must be a non-negative integer", code="invalid_offset")
    if not isinstance(data, str):
        raise Invalid("data must be a string", code="invalid_log_data")
    session.execute(
        update(Command)
        .where(Command.id == command_id)
        .values(log_bytes=Command.log_bytes)
        .execution_options(synchronize_session=False)
    )
    command = _own_command(session, agent, command_id)
    session.refresh(command)
    try:
        next_offset = orchestrator.append_log(command, offset, data)
    except ValueError:
        raise Conflict(
            "the log has a gap before this chunk",
            code="log_offset_gap",
            details={"offset": command.log_bytes},
        ) from None
    return jsonify({"offset": next_offset})


_FINISH_STATUS = {
    "successful": CommandTrigger.FINISHED_OK,
    "failed": CommandTrigger.FINISHED_FAILED,
}


@blueprint.post("/commands/<command_id>/finish")
@signed
def finish_command(agent: AgentIdentity, command_id: str) -> Any:
    """The agent's result for a command; the instance's lifecycle moves on from it."""
    session = db.session()
    body = _json_object(required=True)
    status, exit_code = body.get("status"), body.get("exit_code")
    duration, reason = body.get("duration"), body.get("reason")
    if status not in _FINISH_STATUS:
        raise Invalid("status must be successful or failed", code="invalid_status")
    if exit_code is not None and (not isinstance(exit_code, int) or isinstance(exit_code, bool)):
        raise Invalid("exit_code must be an integer or null", code="invalid_exit_code")
    if duration is not None and (
        not isinstance(duration, int | float) or isinstance(duration, bool) or duration < 0
    ):
        raise Invalid("duration must be a non-negative number", code="invalid_duration")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
        raise Invalid("reason must be a string of at most 1000 characters", code="invalid_reason")
    trigger = _FINISH_STATUS[status]
    if status == "failed" and reason == "interrupted":
        trigger = CommandTrigger.INTERRUPTED
    lock_instance(session, agent.instance_id)
    command = _own_command(session, agent, command_id)
    try:
        orchestrator.command_finished(
            session,
            command,
            trigger,
            exit_code=exit_code,
            duration=float(duration) if duration is not None else None,
            reason=reason,
        )
    except orchestrator.CommandRefused as exc:
        raise _refusal(exc) from None
    return jsonify({"id": command.id, "status": command.status})
