"""Health and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import current_app, jsonify
from sqlalchemy import text

from server import db
from server.api.registry import openapi_document
from server.api.v1 import v1
from server.queue import get_redis

HEALTH = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "database": {"type": "string"},
        "redis": {"type": "string"},
        "version": {"type": "string"},
    },
}


@v1.route(
    "/health",
    "GET",
    summary="Whether the database and Redis answer",
    tag="system",
    auth=False,
    raw_response=HEALTH,
    errors=(503,),
)
def health() -> Any:
    """200 when the database and Redis both answer, 503 otherwise."""
    checks: dict[str, str] = {}
    try:
        db.session().execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        get_redis(current_app).ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"error: {type(exc).__name__}"
    healthy = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if healthy else "degraded", "version": _version(), **checks}
    return jsonify(body), 200 if healthy else 503


@v1.route(
    "/openapi.json",
    "GET",
    summary="This document",
    tag="system",
    auth=False,
    raw_response={"type": "object"},
)
def openapi() -> dict[str, Any]:
    """The OpenAPI 3 document, built from the schemas that validate requests."""
    return openapi_document([v1], _version())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scalarium")
    except PackageNotFoundError:
        return "0.0.0+source"
