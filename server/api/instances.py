"""Instances of a stack."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from server import db, events, orchestrator
from server.api import serialize
from server.api.common import actor, count, owned, stack_for
from server.api.registry import Page, paginated
from server.api.v1 import v1
from server.errors import Conflict, Invalid
from server.models import QUIESCENT_STATES, Instance, InstanceState, Layer, Role
from server.schemas import INSTANCE

_FIELDS_WHILE_STOPPED = ("provider", "ami_id", "os")


def layers_of_stack(stack_id: str, layer_ids: list[str], *, at_least_one: bool) -> list[Layer]:
    """The layers named, all of which must belong to the stack (order kept, duplicates dropped)."""
    if at_least_one and not layer_ids:
        raise Invalid(
            "an instance needs at least one layer",
            code="layer_required",
            details={"field": "layer_ids"},
        )
    wanted = list(dict.fromkeys(layer_ids))
    found = {
        layer.id: layer for layer in db.session().scalars(select(Layer).where(Layer.id.in_(wanted)))
    }
    foreign = [i for i in wanted if i not in found or found[i].stack_id != stack_id]
    if foreign:
        raise Invalid(
            "every layer must belong to the same stack",
            code="layer_not_in_stack",
            details={"field": "layer_ids", "layer_ids": foreign},
        )
    return [found[i] for i in wanted]


def _ensure_unique_hostname(stack_id: str, hostname: str, exclude_id: str | None = None) -> None:
    existing = db.session().scalar(
        select(Instance).where(Instance.stack_id == stack_id, Instance.hostname == hostname)
    )
    if existing is not None and existing.id != exclude_id:
        raise Conflict(
            f"the stack has an instance named {hostname!r} already",
            code="duplicate_hostname",
            details={"field": "hostname", "value": hostname},
        )


@v1.route(
    "/stacks/<stack_id>/instances",
    "GET",
    summary="List a stack's instances",
    tag="instances",
    response=INSTANCE,
    listing=True,
)
def list_instances(stack_id: str, page: Page) -> dict[str, Any]:
    """Instances of one stack, by hostname."""
    session = db.session()
    stack_for(session, stack_id, Role.VIEWER)
    statement = select(Instance).where(Instance.stack_id == stack_id)
    rows = session.scalars(
        statement.order_by(Instance.hostname).limit(page.limit).offset(page.offset)
    ).all()
    return paginated([serialize.instance(i) for i in rows], count(session, statement), page)


@v1.route(
    "/stacks/<stack_id>/instances",
    "POST",
    summary="Create an instance",
    tag="instances",
    body=INSTANCE,
    response=INSTANCE,
    status=201,
    errors=(409,),
)
def create_instance(stack_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Add an instance (state `requested`) to a stack (manager)."""
    session = db.session()
    stack = stack_for(session, stack_id, Role.MANAGER)
    layers = layers_of_stack(stack.id, body.pop("layer_ids"), at_least_one=True)
    _ensure_unique_hostname(stack.id, body["hostname"])
    body["instance_type"] = body.get("instance_type") or stack.default_instance_type
    body["os"] = body.get("os") or stack.default_os
    body["availability_zone"] = body.get("availability_zone") or stack.default_availability_zone
    instance = Instance(stack_id=stack.id, layers=layers, **body)
    session.add(instance)
    session.flush()
    events.record(
        session,
        "instance.created",
        f"instance {instance.hostname} created",
        stack_id=stack.id,
        instance_id=instance.id,
        data={"layers": [x.shortname for x in layers]},
        actor=actor(),
    )
    return serialize.instance(instance)


@v1.route(
    "/instances/<instance_id>",
    "GET",
    summary="Show an instance",
    tag="instances",
    response=INSTANCE,
)
def show_instance(instance_id: str) -> dict[str, Any]:
    """One instance."""
    return serialize.instance(
        owned(db.session(), Instance, instance_id, "instance_not_found", Role.VIEWER)
    )


@v1.route(
    "/instances/<instance_id>",
    "PATCH",
    summary="Update an instance",
    tag="instances",
    body=INSTANCE,
    partial=True,
    response=INSTANCE,
    errors=(409,),
)
def update_instance(instance_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Change an instance's settings or layers (manager)."""
    session = db.session()
    instance = owned(session, Instance, instance_id, "instance_not_found", Role.MANAGER)
    changing_machine = [
        k for k in _FIELDS_WHILE_STOPPED if k in body and body[k] != getattr(instance, k)
    ]
    if changing_machine and instance.status not in QUIESCENT_STATES:
        raise Conflict(
            "these settings change only while the instance is stopped",
            code="instance_not_stopped",
            details={"fields": changing_machine, "status": instance.status},
        )
    if "layer_ids" in body:
        instance.layers = layers_of_stack(
            instance.stack_id, body.pop("layer_ids"), at_least_one=True
        )
    if "hostname" in body:
        _ensure_unique_hostname(instance.stack_id, body["hostname"], exclude_id=instance.id)
    for key, value in body.items():
        setattr(instance, key, value)
    if instance.status == InstanceState.ONLINE:
        # Only an online instance is part of the picture the others configure with.
        orchestrator.request_configure(session, instance.stack_id, reason="instance.updated")
    events.record(
        session,
        "instance.updated",
        f"instance {instance.hostname} updated",
        stack_id=instance.stack_id,
        instance_id=instance.id,
        data={"fields": sorted(body)},
        actor=actor(),
    )
    session.flush()
    return serialize.instance(instance)


@v1.route(
    "/instances/<instance_id>",
    "DELETE",
    summary="Delete a stopped instance",
    tag="instances",
    raw_response={"type": "object"},
    errors=(409,),
)
def delete_instance(instance_id: str) -> dict[str, Any]:
    """Delete an instance that is not running (manager)."""
    session = db.session()
    instance = owned(session, Instance, instance_id, "instance_not_found", Role.MANAGER)
    if instance.status not in QUIESCENT_STATES:
        raise Conflict(
            f"instance {instance.hostname} is {instance.status}; stop it first",
            code="instance_not_stopped",
            details={"status": instance.status},
        )
    events.record(
        session,
        "instance.deleted",
        f"instance {instance.hostname} deleted",
        stack_id=instance.stack_id,
        instance_id=instance.id,
        actor=actor(),
    )
    session.delete(instance)
    return {"deleted": instance_id}


_ACTIONS = {
    "start": ("start_requested", "instance.start"),
    "stop": ("stop_requested", "instance.stop"),
    "setup": ("setup_requested", "instance.setup"),
    "terminate": ("terminate_requested", "instance.terminate"),
}


def _lifecycle_action(instance_id: str, action: str) -> dict[str, Any]:
    from server.lifecycle import Trigger

    session = db.session()
    instance = owned(session, Instance, instance_id, "instance_not_found", Role.MANAGER)
    trigger = Trigger(_ACTIONS[action][0])
    orchestrator.instance_trigger(session, instance, trigger, actor=actor())
    session.flush()
    return serialize.instance(instance)


@v1.route(
    "/instances/<instance_id>/start",
    "POST",
    summary="Start an instance",
    tag="instances",
    response=INSTANCE,
    status=200,
    errors=(409,),
)
def start_instance(instance_id: str) -> dict[str, Any]:
    """Start: the provider boots the machine (for `manual`, run the user-data on it)."""
    return _lifecycle_action(instance_id, "start")


@v1.route(
    "/instances/<instance_id>/stop",
    "POST",
    summary="Stop an instance",
    tag="instances",
    response=INSTANCE,
    status=200,
    errors=(409,),
)
def stop_instance(instance_id: str) -> dict[str, Any]:
    """Stop: run the shutdown recipes, then the provider stops the machine."""
    return _lifecycle_action(instance_id, "stop")


@v1.route(
    "/instances/<instance_id>/setup",
    "POST",
    summary="Run setup again",
    tag="instances",
    response=INSTANCE,
    status=200,
    errors=(409,),
)
def setup_instance(instance_id: str) -> dict[str, Any]:
    """Run setup again (after a failed setup, or to re-converge a server)."""
    return _lifecycle_action(instance_id, "setup")


@v1.route(
    "/instances/<instance_id>/terminate",
    "POST",
    summary="Terminate an instance",
    tag="instances",
    response=INSTANCE,
    status=200,
    errors=(409,),
)
def terminate_instance(instance_id: str) -> dict[str, Any]:
    """Terminate a stopped instance: the provider removes the machine."""
    return _lifecycle_action(instance_id, "terminate")
