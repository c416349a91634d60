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
from typing import Any

import redis
from flask import Blueprint, Flask, current_app, g, jsonify, request
from sqlalchemy import select, update

from server import db, events
from server.agent_auth import (
    AgentIdentity,
    AgentRefused,
    VerifiedCertificates,
    authenticate,
    record_refusal,
)
from server.api.registry import read_json
from server.db import get_database, utcnow
from server.enrollment import (
    EnrollmentRefused,
    enroll,
    get_ca,
    get_ca_pem,
    lookup,
    rows_changed,
)
from server.errors import Invalid, ScalariumError, Unavailable
from server.keys import Keys
from server.models import Command, CommandStatus, Instance, InstanceState
from server.queue import get_redis

log = logging.getLogger(__name__)

blueprint = Blueprint("agent_v1", __name__, url_prefix="/agent/v1")

MAX_WAIT_SECONDS = 60
# redis-py's socket timeout is 30 s: a longer BLPOP is cut into slices below it.
WAIT_SLICE_SECONDS = 20.0
WAKE_TTL_SECONDS = 2 * MAX_WAIT_SECONDS
MAX_METRICS_BYTES = 16 * 1024


def init_app(app: Flask) -> None:
    """Register the blueprint and the per-process cache of checked certificates."""
    app.extensions["scalarium.verified_certificates"] = VerifiedCertificates()
    app.register_blueprint(blueprint)


def _keys() -> Keys:
    keys: Keys = current_app.extensions["scalarium.keys"]
    return keys


# --- wake-ups ---------------------------------------------------------------------------------


def wake(connection: redis.Redis, instance_id: str, keys: Keys | None = None) -> None:
    """End an instance's long poll (call after committing a queued command for it)."""
    key = (keys or Keys()).agent_wake(instance_id)
    pipe = connection.pipeline(transaction=True)
    pipe.rpush(key, "1")
    # One pending wake-up is as good as many; a stale one only costs the agent an early re-poll.
    pipe.ltrim(key, 0, 0)
    pipe.expire(key, WAKE_TTL_SECONDS)
    pipe.execute()


def wait_for_wake(connection: redis.Redis, key: str, seconds: float) -> bool:
    """Block until a wake-up is pushed on key or the time passes; tell whether one came."""
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if connection.blpop([key], timeout=min(remaining, WAIT_SLICE_SECONDS)) is not None:
            return True


# --- plumbing ---------------------------------------------------------------------------------


def _refused(
    what: str, error: ScalariumError, instance_id: str | None, stack_id: str | None
) -> ScalariumError:
    db.session().rollback()
    record_refusal(
        get_database(current_app),
        what,
        error,
        instance_id=instance_id,
        stack_id=stack_id,
        data={"path": request.path, "method": request.method},
    )
    log.info("instance %s: %s refused: %s", instance_id or "-", what, error.code)
    return error


def signed(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Require a valid signature; the handler gets the AgentIdentity as `agent`."""

    @functools.wraps(handler)
    def view(**kwargs: Any) -> Any:
        session = db.session()
        try:
            identity = authenticate(
                session,
                get_redis(current_app),
                _keys(),
                get_ca(current_app),
                current_app.extensions["scalarium.verified_certificates"],
                method=request.method,
                path=request.script_root + request.path,
                body=request.get_data(cache=True),
                headers=dict(request.headers.items()),
            )
        except AgentRefused as exc:
            raise _refused(
                f"{request.method} {request.path}", exc.error, exc.instance_id, exc.stack_id
            ) from None
        g.agent = identity
        result = handler(agent=identity, **kwargs)
        session.commit()
        return result

    return view


def _json_object(required: bool) -> dict[str, Any]:
    if not request.get_data(cache=True).strip() and not required:
        return {}
    body = read_json()
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


def parse_metrics(body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Split a heartbeat into (metrics, agent_version); raise Invalid when malformed."""
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
    if len(json.dumps(metrics, separators=(",", ":"))) > MAX_METRICS_BYTES:
        raise Invalid(
            f"heartbeat metrics are over {MAX_METRICS_BYTES} bytes", code="metrics_too_large"
        )
    return metrics, agent_version


@blueprint.post("/heartbeat")
@signed
def heartbeat(agent: AgentIdentity) -> Any:
    """Store the node's metrics; the first heartbeat after enrollment starts setup."""
    session = db.session()
    metrics, agent_version = parse_metrics(_json_object(required=False))
    values: dict[str, Any] = {"metrics": metrics, "last_heartbeat_at": utcnow()}
    if agent_version is not None:
        values["agent_version"] = agent_version
    session.execute(update(Instance).where(Instance.id == agent.instance_id).values(**values))
    status = agent.status
    if status != InstanceState.BOOTING.value:
        return jsonify({"ok": True, "status": status})
    # Conditional, so that two servers handling two first heartbeats move it only once.
    moved = rows_changed(
        session.execute(
            update(Instance)
            .where(Instance.id == agent.instance_id, Instance.status == InstanceState.BOOTING.value)
            .values(status=InstanceState.RUNNING_SETUP.value)
        )
    )
    if moved:
        status = InstanceState.RUNNING_SETUP.value
        events.record(
            session,
            "instance.running_setup",
            f"instance {agent.instance_id}: first heartbeat; running setup",
            stack_id=agent.stack_id,
            instance_id=agent.instance_id,
            data={"status": {"from": InstanceState.BOOTING.value, "to": status}},
            actor=f"instance:{agent.instance_id}",
        )
    return jsonify({"ok": True, "status": status})


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


def command_document(command: Command) -> dict[str, Any]:
    """A queued command as the agent receives it."""
    return {
        "id": command.id,
        "type": command.type,
        "deployment_id": command.deployment_id,
        "node_json_url": f"{blueprint.url_prefix}/commands/{command.id}/node.json",
        "bundle_url": None,
        "bundle_sha256": None,
        "timeout": command.timeout_seconds,
        "args": command.args or {},
    }


def queued_commands(instance_id: str) -> list[dict[str, Any]]:
    """The instance's queued commands, oldest first (ends the read transaction)."""
    session = db.session()
    rows = session.scalars(
        select(Command)
        .where(Command.instance_id == instance_id, Command.status == CommandStatus.QUEUED.value)
        .order_by(Command.created_at, Command.id)
    ).all()
    found = [command_document(row) for row in rows]
    # Never hold a transaction (or, on SQLite, a read snapshot) through the wait.
    session.commit()
    return found


@blueprint.get("/commands")
@signed
def commands(agent: AgentIdentity) -> Any:
    """Long poll: queued commands at once, else wait for a wake-up or ?wait= seconds."""
    wait = parse_wait(request.args.get("wait"))
    db.session().commit()
    connection = get_redis(current_app)
    key = _keys().agent_wake(agent.instance_id)
    try:
        # Dropped before the query: a command committed after the query pushes a new wake-up.
        connection.delete(key)
        found = queued_commands(agent.instance_id)
        if not found and wait > 0 and wait_for_wake(connection, key, wait):
            found = queued_commands(agent.instance_id)
    except redis.RedisError as exc:
        raise Unavailable(
            f"wake-ups unavailable: {type(exc).__name__}", code="redis_unavailable"
        ) from None
    return jsonify({"commands": found})
