"""Apps of a stack."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select

from server import db, events, orchestrator
from server.api import serialize
from server.api.common import actor, count, owned, seal_environment, seal_source, stack_for
from server.api.instances import layers_of_stack
from server.api.registry import Page, paginated
from server.api.v1 import v1
from server.errors import Conflict, Invalid
from server.models import App, Role
from server.schemas import APP

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _check_environment(environment: dict[str, Any]) -> None:
    bad = [name for name in environment if not _ENV_NAME.fullmatch(name)]
    if bad:
        raise Invalid(
            "environment variable names must match [A-Za-z_][A-Za-z0-9_]{0,127}",
            code="invalid_env_name",
            details={"field": "environment", "names": bad[:20]},
        )


def _ensure_unique(stack_id: str, shortname: str, exclude_id: str | None = None) -> None:
    existing = db.session().scalar(
        select(App).where(App.stack_id == stack_id, App.shortname == shortname)
    )
    if existing is not None and existing.id != exclude_id:
        raise Conflict(
            f"the stack has an app named {shortname!r} already",
            code="duplicate_shortname",
            details={"field": "shortname", "value": shortname},
        )


@v1.route(
    "/stacks/<stack_id>/apps",
    "GET",
    summary="List a stack's apps",
    tag="apps",
    response=APP,
    listing=True,
)
def list_apps(stack_id: str, page: Page) -> dict[str, Any]:
    """Apps of one stack."""
    session = db.session()
    stack_for(session, stack_id, Role.VIEWER)
    statement = select(App).where(App.stack_id == stack_id)
    rows = session.scalars(
        statement.order_by(App.shortname).limit(page.limit).offset(page.offset)
    ).all()
    return paginated([serialize.app(a) for a in rows], count(session, statement), page)


@v1.route(
    "/stacks/<stack_id>/apps",
    "POST",
    summary="Create an app",
    tag="apps",
    body=APP,
    response=APP,
    status=201,
    errors=(409,),
)
def create_app_(stack_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Add an app to a stack (manager)."""
    session = db.session()
    stack = stack_for(session, stack_id, Role.MANAGER)
    _check_environment(body["environment"])
    layers_of_stack(stack.id, body["layer_ids"], at_least_one=False)
    _ensure_unique(stack.id, body["shortname"])
    body.setdefault("name", body["shortname"])
    body["layer_ids"] = list(dict.fromkeys(body["layer_ids"]))
    body["source"] = seal_source(body["source"], None) or {}
    body["environment"] = seal_environment(body["environment"], None)
    app = App(stack_id=stack.id, **body)
    session.add(app)
    session.flush()
    orchestrator.request_configure(session, stack.id, reason="app.created")
    events.record(
        session,
        "app.created",
        f"app {app.shortname} created",
        stack_id=stack.id,
        data={"app_id": app.id},
        actor=actor(),
    )
    return serialize.app(app)


@v1.route("/apps/<app_id>", "GET", summary="Show an app", tag="apps", response=APP)
def show_app(app_id: str) -> dict[str, Any]:
    """One app, secrets masked."""
    return serialize.app(owned(db.session(), App, app_id, "app_not_found", Role.VIEWER))


@v1.route(
    "/apps/<app_id>",
    "PATCH",
    summary="Update an app",
    tag="apps",
    body=APP,
    partial=True,
    response=APP,
    errors=(409,),
)
def update_app(app_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Change an app (manager); masked secrets sent back keep their stored values."""
    session = db.session()
    app = owned(session, App, app_id, "app_not_found", Role.MANAGER)
    if "environment" in body:
        _check_environment(body["environment"])
        body["environment"] = seal_environment(body["environment"], app.environment)
    if "layer_ids" in body:
        layers_of_stack(app.stack_id, body["layer_ids"], at_least_one=False)
        body["layer_ids"] = list(dict.fromkeys(body["layer_ids"]))
    if "shortname" in body:
        _ensure_unique(app.stack_id, body["shortname"], exclude_id=app.id)
    if "source" in body:
        body["source"] = seal_source(body["source"], app.source) or {}
    for key, value in body.items():
        setattr(app, key, value)
    orchestrator.request_configure(session, app.stack_id, reason="app.updated")
    events.record(
        session,
        "app.updated",
        f"app {app.shortname} updated",
        stack_id=app.stack_id,
        data={"app_id": app.id, "fields": sorted(body)},
        actor=actor(),
    )
    session.flush()
    return serialize.app(app)


@v1.route(
    "/apps/<app_id>", "DELETE", summary="Delete an app", tag="apps", raw_response={"type": "object"}
)
def delete_app(app_id: str) -> dict[str, Any]:
    """Delete an app (manager)."""
    session = db.session()
    app = owned(session, App, app_id, "app_not_found", Role.MANAGER)
    orchestrator.request_configure(session, app.stack_id, reason="app.deleted")
    events.record(
        session,
        "app.deleted",
        f"app {app.shortname} deleted",
        stack_id=app.stack_id,
        data={"app_id": app.id},
        actor=actor(),
    )
    session.delete(app)
    return {"deleted": app_id}
