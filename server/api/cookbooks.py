"""A stack's cookbooks: rebuild the bundle and send it to the instances, show the current one."""

from __future__ import annotations

from typing import Any

import redis
from flask import current_app

from server import bundles, db, events
from server.api.common import actor, stack_for
from server.api.v1 import v1
from server.errors import Unavailable
from server.models import Role
from server.queue import get_redis

_JOB = {
    "type": "object",
    "properties": {
        "job_id": {"type": "string"},
        "status": {"type": "string", "enum": ["queued"]},
        "stack_id": {"type": "string"},
    },
    "required": ["job_id", "status"],
}

_BUNDLE = {
    "type": "object",
    "properties": {
        "stack_id": {"type": "string"},
        "sha256": {"type": "string", "nullable": True},
        "built_at": {"type": "string", "format": "date-time", "nullable": True},
        "size": {"type": "integer", "nullable": True},
        "cookbooks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
            },
        },
        "source": {"type": "object", "nullable": True},
    },
    "required": ["stack_id", "sha256", "built_at", "cookbooks"],
}


@v1.route(
    "/stacks/<stack_id>/update-cookbooks",
    "POST",
    summary="Rebuild the stack's cookbook bundle and send it to its online instances",
    tag="cookbooks",
    status=202,
    raw_response=_JOB,
    errors=(503,),
)
def update_cookbooks(stack_id: str) -> dict[str, Any]:
    """Queue a bundle build followed by update_custom_cookbooks on every online instance."""
    session = db.session()
    stack = stack_for(session, stack_id, Role.MANAGER)
    try:
        job_id = bundles.enqueue_update(get_redis(current_app), stack.id, actor())
    except redis.RedisError as exc:
        raise Unavailable("the job queue is unreachable", code="queue_unavailable") from exc
    events.record(
        session,
        "stack.update_cookbooks",
        "cookbook update requested",
        stack_id=stack.id,
        data={"job_id": job_id},
        actor=actor(),
    )
    return {"job_id": job_id, "status": "queued", "stack_id": stack.id}


@v1.route(
    "/stacks/<stack_id>/bundle",
    "GET",
    summary="The stack's current cookbook bundle",
    tag="cookbooks",
    raw_response=_BUNDLE,
)
def show_bundle(stack_id: str) -> dict[str, Any]:
    """The bundle commands of this stack use: sha, when built, cookbooks and versions."""
    session = db.session()
    stack = stack_for(session, stack_id, Role.VIEWER)
    return bundles.bundle_summary(session, stack, current_app.config["SCALARIUM"])
