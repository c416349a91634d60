"""The cluster picture of a stack, read from the database as chef_bridge's plain input."""

from __future__ import annotations

import threading
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from chef_bridge.node_json import (
    AppInput,
    AppSource,
    ClusterInput,
    InstanceInput,
    LayerInput,
    StackInput,
)
from server.models import App, Instance, Stack
from server.vault import Vault


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def stack_input(stack: Stack) -> StackInput:
    """A stack row as node JSON input (its cookbook source credentials stay out)."""
    return {
        "id": stack.id,
        "name": stack.name,
        "region": stack.region,
        "default_os": stack.default_os,
        "chef_version": stack.chef_version,
        "custom_json": stack.custom_json or {},
        "custom_cookbooks_source": (
            {
                "type": stack.custom_cookbooks_source.get("type"),
                "url": stack.custom_cookbooks_source.get("url"),
                "revision": stack.custom_cookbooks_source.get("revision"),
            }
            if stack.custom_cookbooks_source
            else None
        ),
        "default_ssh_key_name": stack.default_ssh_key_name,
    }


def instance_input(instance: Instance) -> InstanceInput:
    """An instance row as node JSON input."""
    return {
        "id": instance.id,
        "hostname": instance.hostname,
        "status": instance.status,
        "layer_ids": [layer.id for layer in instance.layers],
        "private_ip": instance.private_ip,
        "public_ip": instance.public_ip,
        "private_dns_name": instance.private_dns_name,
        "public_dns_name": instance.public_dns_name,
        "availability_zone": instance.availability_zone,
        "instance_type": instance.instance_type,
        "os": instance.os,
        "architecture": instance.architecture,
        "ec2_instance_id": instance.ec2_instance_id,
        "attributes": instance.attributes or {},
        "created_at": _iso(instance.created_at),
        "agent_version": instance.agent_version,
    }


def app_input(app: App, vault: Vault) -> AppInput:
    """An app row as node JSON input, its secrets decrypted (node JSON goes only to its node)."""
    source = dict(app.source or {})
    for key in ("ssh_key", "password"):
        if source.get(key):
            source[key] = vault.decrypt(source[key])
    if "username" in source:
        source["user"] = source.pop("username")
    environment = {
        name: {
            "value": vault.decrypt(spec["value"]) if spec.get("secure") else spec["value"],
            "secure": bool(spec.get("secure")),
        }
        for name, spec in (app.environment or {}).items()
    }
    return {
        "id": app.id,
        "shortname": app.shortname,
        "name": app.name,
        "type": app.type,
        "source": cast(AppSource, source) if source else AppSource(type="other", url=""),
        "domains": list(app.domains or []),
        "environment": environment,  # type: ignore[typeddict-item]
        "attributes": app.attributes or {},
        "enable_ssl": app.enable_ssl,
        "layer_ids": list(app.layer_ids) or None,
    }


def cluster_input(session: Session, stack_id: str, vault: Vault) -> ClusterInput:
    """Everything node JSON needs about a stack, in three queries whatever its size."""
    stack = session.get(Stack, stack_id)
    if stack is None:
        raise LookupError(f"no stack {stack_id}")
    instances = session.scalars(
        select(Instance)
        .where(Instance.stack_id == stack_id)
        .options(selectinload(Instance.layers))
        .order_by(Instance.hostname)
    ).all()
    layers: list[LayerInput] = [
        {
            "id": layer.id,
            "shortname": layer.shortname,
            "name": layer.name,
            "type": layer.type,
            "recipes": layer.recipes or {},
            "custom_json": layer.custom_json or {},
            "packages": list(layer.packages or []),
            "auto_healing": layer.auto_healing,
        }
        for layer in stack.layers
    ]
    apps = session.scalars(select(App).where(App.stack_id == stack_id).order_by(App.shortname))
    return {
        "version": stack.cluster_version,
        "stack": stack_input(stack),
        "layers": layers,
        "instances": [instance_input(i) for i in instances],
        "apps": [app_input(a, vault) for a in apps],
    }


def cluster_fingerprint(session: Session, stack_id: str) -> tuple[Any, ...]:
    """What changes whenever anything in the stack's cluster picture does: its version and the
    last change of its instances, layers and apps (three aggregate reads, no rows loaded)."""
    from sqlalchemy import func

    from server.models import Layer

    version = tuple(
        session.execute(
            select(Stack.cluster_version, Stack.updated_at).where(Stack.id == stack_id)
        ).one_or_none()
        or ()
    )
    stamps = [
        session.execute(
            select(func.max(model.updated_at), func.count()).where(model.stack_id == stack_id)
        ).one()
        for model in (Instance, Layer, App)
    ]
    return (version, *(tuple(stamp) for stamp in stamps))


class ViewCache:
    """Cluster views per stack, reused while the stack's fingerprint is unchanged.

    A configure fan-out sends N agents for their node JSON at once: each then costs a few
    aggregate reads and its own small document, not a load of the whole cluster.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._views: dict[str, tuple[tuple[Any, ...], Any]] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, stack_id: str, vault: Vault, build: Any) -> Any:
        """The view of the stack's current picture (built with `build(cluster_input)`)."""
        fingerprint = cluster_fingerprint(session, stack_id)
        cached = self._views.get(stack_id)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        view = build(cluster_input(session, stack_id, vault))
        with self._lock:
            if len(self._views) >= self.limit:
                self._views.clear()
            self._views[stack_id] = (fingerprint, view)
        return view
