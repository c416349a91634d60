"""Layers of a stack."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from server import db, events, orchestrator
from server.api import serialize
from server.api.common import actor, count, owned, stack_for
from server.api.registry import Page, paginated
from server.api.v1 import v1
from server.errors import Conflict
from server.models import Layer, Role
from server.schemas import LAYER


def _ensure_unique(stack_id: str, shortname: str, exclude_id: str | None = None) -> None:
    existing = db.session().scalar(
        select(Layer).where(Layer.stack_id == stack_id, Layer.shortname == shortname)
    )
    if existing is not None and existing.id != exclude_id:
        raise Conflict(
            f"the stack has a layer named {shortname!r} already",
            code="duplicate_shortname",
            details={"field": "shortname", "value": shortname},
        )


@v1.route(
    "/stacks/<stack_id>/layers",
    "GET",
    summary="List a stack's layers",
    tag="layers",
    response=LAYER,
    listing=True,
)
def list_layers(stack_id: str, page: Page) -> dict[str, Any]:
    """Layers of one stack, oldest first."""
    session = db.session()
    stack_for(session, stack_id, Role.VIEWER)
    statement = select(Layer).where(Layer.stack_id == stack_id)
    rows = session.scalars(
        statement.order_by(Layer.created_at, Layer.id).limit(page.limit).offset(page.offset)
    ).all()
    return paginated([serialize.layer(x) for x in rows], count(session, statement), page)


@v1.route(
    "/stacks/<stack_id>/layers",
    "POST",
    summary="Create a layer",
    tag="layers",
    body=LAYER,
    response=LAYER,
    status=201,
    errors=(409,),
)
def create_layer(stack_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Add a layer to a stack (manager)."""
    session = db.session()
    stack = stack_for(session, stack_id, Role.MANAGER)
    _ensure_unique(stack.id, body["shortname"])
    body.setdefault("name", body["shortname"])
    layer = Layer(stack_id=stack.id, **body)
    session.add(layer)
    session.flush()
    orchestrator.request_configure(session, stack.id, reason="layer.created")
    events.record(
        session,
        "layer.created",
        f"layer {layer.shortname} created",
        stack_id=stack.id,
        data={"layer_id": layer.id},
        actor=actor(),
    )
    return serialize.layer(layer)


@v1.route("/layers/<layer_id>", "GET", summary="Show a layer", tag="layers", response=LAYER)
def show_layer(layer_id: str) -> dict[str, Any]:
    """One layer."""
    return serialize.layer(owned(db.session(), Layer, layer_id, "layer_not_found", Role.VIEWER))


@v1.route(
    "/layers/<layer_id>",
    "PATCH",
    summary="Update a layer",
    tag="layers",
    body=LAYER,
    partial=True,
    response=LAYER,
    errors=(409,),
)
def update_layer(layer_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Change a layer's settings (manager)."""
    session = db.session()
    layer = owned(session, Layer, layer_id, "layer_not_found", Role.MANAGER)
    if "shortname" in body:
        _ensure_unique(layer.stack_id, body["shortname"], exclude_id=layer.id)
    for key, value in body.items():
        setattr(layer, key, value)
    orchestrator.request_configure(session, layer.stack_id, reason="layer.updated")
    events.record(
        session,
        "layer.updated",
        f"layer {layer.shortname} updated",
        stack_id=layer.stack_id,
        data={"layer_id": layer.id, "fields": sorted(body)},
        actor=actor(),
    )
    session.flush()
    return serialize.layer(layer)


@v1.route(
    "/layers/<layer_id>",
    "DELETE",
    summary="Delete a layer without instances",
    tag="layers",
    raw_response={"type": "object"},
    errors=(409,),
)
def delete_layer(layer_id: str) -> dict[str, Any]:
    """Delete a layer that holds no instances (manager)."""
    session = db.session()
    layer = owned(session, Layer, layer_id, "layer_not_found", Role.MANAGER)
    if layer.instances:
        raise Conflict(
            "the layer still has instances",
            code="layer_has_instances",
            details={"instances": [i.id for i in layer.instances]},
        )
    for app in layer.stack.apps:
        if layer.id in app.layer_ids:
            app.layer_ids = [i for i in app.layer_ids if i != layer.id]
    orchestrator.request_configure(session, layer.stack_id, reason="layer.deleted")
    events.record(
        session,
        "layer.deleted",
        f"layer {layer.shortname} deleted",
        stack_id=layer.stack_id,
        data={"layer_id": layer.id},
        actor=actor(),
    )
    session.delete(layer)
    return {"deleted": layer_id}
