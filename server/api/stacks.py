"""Stacks: create, list, show, update, delete, clone."""

from __future__ import annotations

from typing import Any

from flask import request
from sqlalchemy import select

from server import db, events, orchestrator
from server.access import current_principal, require_admin
from server.api import serialize
from server.api.common import actor, count, seal_source, stack_for
from server.api.registry import Page, paginated
from server.api.v1 import v1
from server.errors import Conflict, Invalid
from server.models import (
    QUIESCENT_STATES,
    App,
    Event,
    Layer,
    Role,
    Stack,
)
from server.schemas import EVENT, STACK, STACK_CLONE

_COPIED_STACK_FIELDS = (
    "description",
    "region",
    "default_os",
    "default_instance_type",
    "default_availability_zone",
    "default_ssh_key_name",
    "chef_version",
    "chef_binary",
    "use_custom_cookbooks",
    "custom_cookbooks_source",
    "custom_json",
)
_COPIED_LAYER_FIELDS = (
    "shortname",
    "name",
    "type",
    "recipes",
    "custom_json",
    "packages",
    "auto_healing",
    "scaling",
)
_COPIED_APP_FIELDS = (
    "shortname",
    "name",
    "type",
    "source",
    "domains",
    "environment",
    "attributes",
    "enable_ssl",
)


def _ensure_unique_shortname(shortname: str, exclude_id: str | None = None) -> None:
    existing = db.session().scalar(select(Stack).where(Stack.shortname == shortname))
    if existing is not None and existing.id != exclude_id:
        raise Conflict(
            f"a stack named {shortname!r} exists already",
            code="duplicate_shortname",
            details={"field": "shortname", "value": shortname},
        )


@v1.route(
    "/stacks",
    "GET",
    summary="List the stacks visible to the caller",
    tag="stacks",
    response=STACK,
    listing=True,
)
def list_stacks(page: Page) -> dict[str, Any]:
    """Stacks the caller has a role on (all of them for admins)."""
    session = db.session()
    principal = current_principal()
    statement = select(Stack).order_by(Stack.created_at, Stack.id)
    if not principal.is_admin:
        statement = statement.where(Stack.id.in_(list(principal.roles)))
    rows = session.scalars(statement.limit(page.limit).offset(page.offset)).all()
    return paginated([serialize.stack(s) for s in rows], count(session, statement), page)


@v1.route(
    "/stacks",
    "POST",
    summary="Create a stack",
    tag="stacks",
    body=STACK,
    response=STACK,
    status=201,
    errors=(409,),
)
def create_stack(body: dict[str, Any]) -> dict[str, Any]:
    """Create a stack (admin only)."""
    require_admin()
    session = db.session()
    _ensure_unique_shortname(body["shortname"])
    body.setdefault("name", body["shortname"])
    body["custom_cookbooks_source"] = seal_source(body.get("custom_cookbooks_source"), None)
    stack = Stack(**body)
    session.add(stack)
    session.flush()
    events.record(
        session,
        "stack.created",
        f"stack {stack.shortname} created",
        stack_id=stack.id,
        actor=actor(),
    )
    return serialize.stack(stack)


@v1.route("/stacks/<stack_id>", "GET", summary="Show a stack", tag="stacks", response=STACK)
def show_stack(stack_id: str) -> dict[str, Any]:
    """One stack."""
    return serialize.stack(stack_for(db.session(), stack_id, Role.VIEWER))


@v1.route(
    "/stacks/<stack_id>",
    "PATCH",
    summary="Update a stack",
    tag="stacks",
    body=STACK,
    partial=True,
    response=STACK,
    errors=(409,),
)
def update_stack(stack_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Change some of a stack's settings (manager)."""
    session = db.session()
    stack = stack_for(session, stack_id, Role.MANAGER)
    if "shortname" in body:
        _ensure_unique_shortname(body["shortname"], exclude_id=stack.id)
    if "custom_cookbooks_source" in body:
        body["custom_cookbooks_source"] = seal_source(
            body["custom_cookbooks_source"], stack.custom_cookbooks_source
        )
    for key, value in body.items():
        setattr(stack, key, value)
    orchestrator.request_configure(session, stack.id, reason="stack.updated")
    events.record(
        session,
        "stack.updated",
        f"stack {stack.shortname} updated",
        stack_id=stack.id,
        data={"fields": sorted(body)},
        actor=actor(),
    )
    session.flush()
    return serialize.stack(stack)


@v1.route(
    "/stacks/<stack_id>",
    "DELETE",
    summary="Delete a stack",
    tag="stacks",
    raw_response={"type": "object"},
    errors=(409,),
)
def delete_stack(stack_id: str) -> dict[str, Any]:
    """Delete a stack whose instances are all stopped (admin)."""
    require_admin()
    session = db.session()
    stack = stack_for(session, stack_id, Role.MANAGER)
    busy = [i for i in stack.instances if i.status not in QUIESCENT_STATES]
    if busy:
        raise Conflict(
            "the stack still has instances that are not stopped",
            code="stack_has_instances",
            details={
                "instances": [
                    {"id": i.id, "hostname": i.hostname, "status": i.status} for i in busy
                ]
            },
        )
    events.record(
        session,
        "stack.deleted",
        f"stack {stack.shortname} deleted",
        stack_id=stack.id,
        actor=actor(),
    )
    session.delete(stack)
    return {"deleted": stack_id}


@v1.route(
    "/stacks/<stack_id>/clone",
    "POST",
    summary="Clone a stack (settings, layers, apps)",
    tag="stacks",
    body=STACK_CLONE,
    response=STACK,
    status=201,
    errors=(409,),
)
def clone_stack(stack_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A new stack with the source's settings, layers and apps, and no instances."""
    require_admin()
    session = db.session()
    source = stack_for(session, stack_id, Role.VIEWER)
    _ensure_unique_shortname(body["shortname"])
    clone = Stack(shortname=body["shortname"], name=body.get("name", body["shortname"]))
    for key in _COPIED_STACK_FIELDS:
        setattr(clone, key, getattr(source, key))
    session.add(clone)
    session.flush()
    layer_map: dict[str, str] = {}
    for layer in source.layers:
        copy = Layer(stack_id=clone.id, **{k: getattr(layer, k) for k in _COPIED_LAYER_FIELDS})
        session.add(copy)
        session.flush()
        layer_map[layer.id] = copy.id
    for app in source.apps:
        session.add(
            App(
                stack_id=clone.id,
                layer_ids=[layer_map[i] for i in app.layer_ids if i in layer_map],
                **{k: getattr(app, k) for k in _COPIED_APP_FIELDS},
            )
        )
    events.record(
        session,
        "stack.cloned",
        f"stack {clone.shortname} cloned from {source.shortname}",
        stack_id=clone.id,
        data={"source": source.id},
        actor=actor(),
    )
    session.flush()
    return serialize.stack(clone)


@v1.route(
    "/stacks/<stack_id>/events",
    "GET",
    summary="A stack's events, newest first",
    tag="stacks",
    response=EVENT,
    listing=True,
    extra_query={"kind": {"type": "string", "maxLength": 64}},
)
def list_events(stack_id: str, page: Page) -> dict[str, Any]:
    """The audit trail of one stack."""
    session = db.session()
    stack_for(session, stack_id, Role.VIEWER)
    statement = select(Event).where(Event.stack_id == stack_id)
    kind = request.args.get("kind")
    if kind is not None:
        if len(kind) > 64:
            raise Invalid("kind is too long", code="invalid_query", details={"parameter": "kind"})
        statement = statement.where(Event.kind == kind)
    rows = session.scalars(
        statement.order_by(Event.id.desc()).limit(page.limit).offset(page.offset)
    ).all()
    return paginated([serialize.event(e) for e in rows], count(session, statement), page)
