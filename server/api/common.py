"""Helpers shared by the resource modules: lookups that respect roles, secrets on write."""

from __future__ import annotations

from typing import Any, TypeVar

from flask import current_app
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.access import current_principal, require_role
from server.errors import NotFound
from server.models import Role, Stack
from server.vault import MASK, Vault

T = TypeVar("T")


def vault() -> Vault:
    """The app's Vault."""
    found: Vault = current_app.extensions["scalarium.vault"]
    return found


def actor() -> str:
    """How the caller appears in events."""
    principal = current_principal()
    return f"token:{principal.name}"


def get_or_404(db: Session, model: type[T], object_id: str, code: str) -> T:
    """A row by id, or NotFound with the given code."""
    found = db.get(model, object_id)
    if found is None:
        raise NotFound(f"no such {model.__name__.lower()}", code=code, details={"id": object_id})
    return found


def stack_for(db: Session, stack_id: str, needed: Role) -> Stack:
    """A stack the caller holds at least `needed` on (NotFound if invisible)."""
    stack = db.get(Stack, stack_id)
    if stack is None:
        raise NotFound("no such stack", code="stack_not_found", details={"id": stack_id})
    require_role(stack.id, needed)
    return stack


def owned(db: Session, model: type[T], object_id: str, code: str, needed: Role) -> T:
    """A stack-owned row (layer, instance, app, deployment) checked against the caller's role."""
    found = get_or_404(db, model, object_id, code)
    stack_id: str = found.stack_id  # type: ignore[attr-defined]
    if current_principal().role_on(stack_id) is None:
        raise NotFound(f"no such {model.__name__.lower()}", code=code, details={"id": object_id})
    require_role(stack_id, needed)
    return found


def count(db: Session, statement: Any) -> int:
    """Rows a select would return."""
    return int(db.scalar(select(func.count()).select_from(statement.subquery())) or 0)


def seal_source(new: dict[str, Any] | None, old: dict[str, Any] | None) -> dict[str, Any] | None:
    """Encrypt a source's secrets; a masked value sent back keeps the stored secret."""
    if new is None:
        return None
    sealed = dict(new)
    for key in ("ssh_key", "password"):
        value = sealed.get(key)
        if value == MASK:
            if old and old.get(key):
                sealed[key] = old[key]
            else:
                sealed.pop(key)
        elif value:
            sealed[key] = vault().encrypt(value)
    return sealed


def seal_environment(
    new: dict[str, dict[str, Any]], old: dict[str, dict[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    """Encrypt secure environment values; a masked value sent back keeps the stored one."""
    sealed: dict[str, dict[str, Any]] = {}
    for name, spec in new.items():
        secure = bool(spec.get("secure", False))
        value = spec["value"]
        if secure and value == MASK and old and name in old and old[name].get("secure"):
            sealed[name] = dict(old[name])
        elif secure:
            sealed[name] = {"value": vault().encrypt(value), "secure": True}
        else:
            sealed[name] = {"value": value, "secure": False}
    return sealed
