"""Sending one command to a stack's instances: a deployment row, its commands, the wake-ups.

Used by jobs that send a command on their own (``update_custom_cookbooks`` after a bundle
build); the REST API's own validation stays in ``server/api/deployments.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from server import events, orchestrator
from server.deployments import Target, select_targets
from server.effects import after_commit
from server.models import Command, CommandType, Deployment, Stack

log = logging.getLogger(__name__)


def create_deployment(
    session: Session,
    stack: Stack,
    command: CommandType,
    *,
    created_by: str,
    instance_ids: Sequence[str] | None = None,
    app_layer_ids: frozenset[str] | None = None,
    app_id: str | None = None,
    args: dict[str, Any] | None = None,
    custom_json: dict[str, Any] | None = None,
    comment: str = "",
) -> Deployment:
    """Create a deployment of ``command`` on the stack's online instances (or those named) and
    wake them after the commit; raises ``server.deployments.TargetError`` when there are none."""
    targets = [
        Target(i.id, i.status, frozenset(layer.id for layer in i.layers)) for i in stack.instances
    ]
    chosen = select_targets(command, targets, app_layer_ids=app_layer_ids, requested=instance_ids)
    deployment = Deployment(
        stack_id=stack.id,
        app_id=app_id,
        command=command.value,
        args=dict(args or {}),
        custom_json=dict(custom_json or {}),
        comment=comment,
        created_by=created_by,
    )
    session.add(deployment)
    session.flush()
    for instance_id in chosen:
        session.add(
            Command(
                deployment_id=deployment.id,
                instance_id=instance_id,
                type=command.value,
                cluster_version=stack.cluster_version,
                args=deployment.args,
            )
        )
    events.record(
        session,
        "deployment.created",
        f"{command.value} sent to {len(chosen)} instance(s)",
        stack_id=stack.id,
        data={"deployment_id": deployment.id, "command": command.value, "app_id": app_id},
        actor=created_by,
    )
    session.flush()
    for instance_id in chosen:
        after_commit(session, lambda i=instance_id: orchestrator.hooks().wake(i))  # type: ignore[misc]
    return deployment
