"""Rows to JSON: timestamps as ISO 8601, secrets masked."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.models import App, Command, Deployment, Instance, Stack
from server.schemas import APP, COMMAND, DEPLOYMENT, EVENT, INSTANCE, LAYER, STACK, Schema
from server.vault import MASK

SECRET_SOURCE_KEYS = ("ssh_key", "password")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def row(obj: Any, schema: Schema) -> dict[str, Any]:
    """The schema's fields of a row."""
    return {name: _plain(getattr(obj, name, None)) for name in schema.fields}


def mask_source(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """A source with its secrets replaced by the mask."""
    if source is None:
        return None
    return {k: (MASK if k in SECRET_SOURCE_KEYS and v else v) for k, v in source.items()}


def stack(obj: Stack) -> dict[str, Any]:
    """A stack as the API shows it."""
    out = row(obj, STACK)
    out["custom_cookbooks_source"] = mask_source(obj.custom_cookbooks_source)
    return out


def layer(obj: Any) -> dict[str, Any]:
    """A layer as the API shows it."""
    return row(obj, LAYER)


def instance(obj: Instance) -> dict[str, Any]:
    """An instance as the API shows it."""
    out = row(obj, INSTANCE)
    out["layer_ids"] = [layer.id for layer in obj.layers]
    return out


def app(obj: App) -> dict[str, Any]:
    """An app as the API shows it, secure environment values masked."""
    out = row(obj, APP)
    out["source"] = mask_source(obj.source)
    out["environment"] = {
        name: {
            "value": MASK if spec.get("secure") else spec.get("value", ""),
            "secure": bool(spec.get("secure")),
        }
        for name, spec in (obj.environment or {}).items()
    }
    return out


def command(obj: Command) -> dict[str, Any]:
    """A command without its log."""
    return row(obj, COMMAND)


def deployment(obj: Deployment, *, with_commands: bool = True) -> dict[str, Any]:
    """A deployment, with its commands."""
    out = row(obj, DEPLOYMENT)
    out["app_id"] = obj.app_id
    out["instance_ids"] = sorted({c.instance_id for c in obj.commands})
    out["recipes"] = list(obj.args.get("recipes", []))
    out["commands"] = [command(c) for c in obj.commands] if with_commands else []
    return out


def event(obj: Any) -> dict[str, Any]:
    """An event row."""
    return row(obj, EVENT)
