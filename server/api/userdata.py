"""User-data: the script that turns a machine into an enrolled instance.

Answered as JSON (``{"user_data": "#!/bin/bash ...", "expires_at": ..., ...}``) like the rest of
/api/v1, so that clients and the OpenAPI document need no special case; `scalarium instances
user-data` prints the script itself. Every call issues a fresh one-time token and kills the
previous one.
"""

from __future__ import annotations

from typing import Any

from flask import current_app, jsonify

from server import db
from server.api.common import actor, owned
from server.api.v1 import v1
from server.enrollment import get_ca_pem, issue_user_data
from server.models import Instance, Role

USER_DATA = {
    "type": "object",
    "properties": {
        "instance_id": {"type": "string"},
        "status": {"type": "string"},
        "expires_at": {"type": "string", "format": "date-time"},
        "user_data": {
            "type": "string",
            "description": "a bash script; it holds a one-time enrollment token",
        },
    },
    "required": ["instance_id", "status", "expires_at", "user_data"],
}


@v1.route(
    "/instances/<instance_id>/user-data",
    "GET",
    summary="Issue an enrollment token and the user-data script carrying it",
    tag="instances",
    raw_response=USER_DATA,
    errors=(409,),
)
def user_data(instance_id: str) -> Any:
    """Fresh user-data for an instance (manager); a requested or stopped one becomes pending."""
    session = db.session()
    instance = owned(session, Instance, instance_id, "instance_not_found", Role.MANAGER)
    issued = issue_user_data(
        session,
        instance,
        current_app.config["SCALARIUM"],
        get_ca_pem(current_app),
        actor=actor(),
    )
    body = {
        "instance_id": instance.id,
        "status": instance.status,
        "expires_at": issued.expires_at.isoformat(),
        "user_data": issued.script,
    }
    # The body holds a live credential: no cache on the way may keep it.
    return jsonify(body), 200, {"Cache-Control": "no-store"}
