"""Deployments of a stack and the commands they consist of."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from sqlalchemy import select

from server import db
from server.access import current_principal
from server.api import serialize
from server.api.common import count, get_or_404, owned, stack_for
from server.api.registry import Page, paginated
from server.api.v1 import v1
from server.commands import create_deployment as create
from server.deployments import APP_COMMANDS, TargetError
from server.errors import Conflict, Invalid, NotFound
from server.models import App, Command, CommandType, Deployment, Role
from server.schemas import COMMAND, DEPLOYMENT

# Commands a deployer may send; the rest change machines and need a manager.
_DEPLOYER_COMMANDS = APP_COMMANDS | {CommandType.EXECUTE_RECIPES}


@v1.route(
    "/stacks/<stack_id>/deployments",
    "GET",
    summary="List a stack's deployments",
    tag="deployments",
    response=DEPLOYMENT,
    listing=True,
)
def list_deployments(stack_id: str, page: Page) -> dict[str, Any]:
    """Deployments of one stack, newest first (without their commands)."""
    session = db.session()
    stack_for(session, stack_id, Role.VIEWER)
    statement = select(Deployment).where(Deployment.stack_id == stack_id)
    rows = session.scalars(
        statement.order_by(Deployment.created_at.desc(), Deployment.id)
        .limit(page.limit)
        .offset(page.offset)
    ).all()
    items = [serialize.deployment(d, with_commands=False) for d in rows]
    return paginated(items, count(session, statement), page)


@v1.route(
    "/stacks/<stack_id>/deployments",
    "POST",
    summary="Create a deployment",
    tag="deployments",
    body=DEPLOYMENT,
    response=DEPLOYMENT,
    status=201,
    errors=(409,),
)
def create_deployment(stack_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send a command to a stack's online instances (or the ones named)."""
    session = db.session()
    command = CommandType(body["command"])
    needed = Role.DEPLOYER if command in _DEPLOYER_COMMANDS else Role.MANAGER
    stack = stack_for(session, stack_id, needed)
    app: App | None = None
    if command in APP_COMMANDS:
        if not body.get("app_id"):
            raise Invalid(
                f"{command.value} needs an app_id", code="app_required", details={"field": "app_id"}
            )
        app = session.get(App, body["app_id"])
        if app is None or app.stack_id != stack.id:
            raise Invalid(
                "the app is not in this stack",
                code="app_not_in_stack",
                details={"field": "app_id", "value": body["app_id"]},
            )
    elif body.get("app_id"):
        raise Invalid(
            f"{command.value} takes no app_id", code="app_not_allowed", details={"field": "app_id"}
        )
    if command == CommandType.EXECUTE_RECIPES and not body["recipes"]:
        raise Invalid(
            "execute_recipes needs recipes", code="recipes_required", details={"field": "recipes"}
        )
    if command != CommandType.EXECUTE_RECIPES and body["recipes"]:
        raise Invalid(
            f"{command.value} takes no recipes",
            code="recipes_not_allowed",
            details={"field": "recipes"},
        )
    try:
        deployment = create(
            session,
            stack,
            command,
            created_by=current_principal().name,
            instance_ids=body.get("instance_ids"),
            app_layer_ids=frozenset(app.layer_ids) if app else None,
            app_id=app.id if app else None,
            args={"recipes": body["recipes"]} if body["recipes"] else {},
            custom_json=body["custom_json"],
            comment=body["comment"],
        )
    except TargetError as exc:
        error = Conflict if exc.code in ("no_online_instances", "instance_not_online") else Invalid
        raise error(str(exc), code=exc.code, details={"instance_ids": exc.ids}) from exc
    session.refresh(deployment)
    return serialize.deployment(deployment)


@v1.route(
    "/deployments/<deployment_id>",
    "GET",
    summary="Show a deployment and its commands",
    tag="deployments",
    response=DEPLOYMENT,
)
def show_deployment(deployment_id: str) -> dict[str, Any]:
    """One deployment with every command's state."""
    session = db.session()
    return serialize.deployment(
        owned(session, Deployment, deployment_id, "deployment_not_found", Role.VIEWER)
    )


def _command(command_id: str) -> Command:
    session = db.session()
    command = get_or_404(session, Command, command_id, "command_not_found")
    stack_id = command.deployment.stack_id if command.deployment else None
    if stack_id is None:
        from server.models import Instance

        instance = session.get(Instance, command.instance_id)
        stack_id = instance.stack_id if instance else None
    if stack_id is None or current_principal().role_on(stack_id) is None:
        raise NotFound("no such command", code="command_not_found", details={"id": command_id})
    return command


@v1.route(
    "/commands/<command_id>", "GET", summary="Show a command", tag="deployments", response=COMMAND
)
def show_command(command_id: str) -> dict[str, Any]:
    """One command, without its log."""
    return serialize.command(_command(command_id))


@v1.route(
    "/commands/<command_id>/log",
    "GET",
    summary="A command's chef log",
    tag="deployments",
    raw_response={"type": "object"},
    extra_query={"offset": {"type": "integer", "minimum": 0, "maximum": 10**9}},
)
def command_log(command_id: str) -> Response | dict[str, Any]:
    """The log from a byte offset (for --follow), as JSON or text/plain."""
    command = _command(command_id)
    raw = request.args.get("offset", "0")
    if not raw.isdigit() or len(raw) > 10:
        raise Invalid(
            "offset must be a non-negative integer",
            code="invalid_query",
            details={"parameter": "offset"},
        )
    data = command.log.encode()[int(raw) :].decode(errors="replace")
    if request.accept_mimetypes.best == "text/plain":
        return Response(data, mimetype="text/plain")
    return {
        "command_id": command.id,
        "status": command.status,
        "offset": int(raw),
        "next_offset": len(command.log.encode()),
        "truncated": command.log_truncated,
        "log": data,
    }
