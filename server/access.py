"""API tokens and per-stack roles: who may do what."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from flask import g, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db import utcnow
from server.errors import Forbidden, NotFound, Unauthorized
from server.models import ROLE_RANK, ApiToken, Role, TokenRole

TOKEN_PREFIX = "scl_"


def hash_token(token: str) -> str:
    """The stored form of a token (tokens are 256-bit random, so a plain SHA-256 suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    db: Session,
    name: str,
    *,
    admin: bool = False,
    roles: dict[str, Role] | None = None,
) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the plaintext, which is never stored."""
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name, token_hash=hash_token(plaintext), prefix=plaintext[:10], is_admin=admin
    )
    for stack_id, role in (roles or {}).items():
        token.roles.append(TokenRole(stack_id=stack_id, role=Role(role).value))
    db.add(token)
    db.flush()
    return token, plaintext


def find_token(db: Session, plaintext: str) -> ApiToken | None:
    """The live token matching the plaintext, if any."""
    candidate = db.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(plaintext)))
    if candidate is None or candidate.revoked_at is not None:
        return None
    # The lookup is by hash; this compare keeps the check constant-time all the same.
    if not hmac.compare_digest(candidate.token_hash, hash_token(plaintext)):
        return None
    return candidate


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    token_id: str
    name: str
    is_admin: bool
    roles: dict[str, Role]

    def role_on(self, stack_id: str) -> Role | None:
        """The caller's role on a stack (admins are managers everywhere)."""
        if self.is_admin:
            return Role.MANAGER
        return self.roles.get(stack_id)

    def can(self, stack_id: str, needed: Role) -> bool:
        """Whether the caller has at least the needed role on the stack."""
        role = self.role_on(stack_id)
        return role is not None and ROLE_RANK[role] >= ROLE_RANK[needed]


def authenticate(db: Session) -> Principal:
    """Resolve the request's bearer token to a Principal, or raise Unauthorized."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if not header:
        raise Unauthorized("an API token is required", code="missing_token")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("the Authorization header must be 'Bearer TOKEN'", code="bad_token")
    token = find_token(db, value.strip())
    if token is None:
        raise Unauthorized("the API token is unknown or revoked", code="bad_token")
    token.last_used_at = utcnow()
    return Principal(
        token_id=token.id,
        name=token.name,
        is_admin=token.is_admin,
        roles={r.stack_id: Role(r.role) for r in token.roles},
    )


def current_principal() -> Principal:
    """The principal authenticated for this request."""
    principal: Principal = g.principal
    return principal


def require_role(stack_id: str, needed: Role) -> None:
    """Raise NotFound when the caller cannot see the stack, Forbidden when the role is too low."""
    principal = current_principal()
    if principal.role_on(stack_id) is None:
        raise NotFound("no such stack", code="stack_not_found", details={"id": stack_id})
    if not principal.can(stack_id, needed):
        raise Forbidden(
            f"this needs the {needed.value} role on the stack",
            code="role_too_low",
            details={"needed": needed.value, "have": principal.role_on(stack_id)},
        )


def require_admin() -> None:
    """Raise Forbidden unless the caller is an admin."""
    if not current_principal().is_admin:
        raise Forbidden("this needs an admin token", code="admin_required")


def grant(db: Session, token_id: str, stack_id: str, role: Role) -> None:
    """Give a token a role on a stack, replacing any role it had there."""
    existing = db.get(TokenRole, (token_id, stack_id))
    if existing is None:
        db.add(TokenRole(token_id=token_id, stack_id=stack_id, role=role.value))
    else:
        existing.role = role.value
