"""Signed agent requests: who sent this, with which certificate, and is it fresh.

Agents sign every request the way Chef clients do (``chef_bridge.auth``); the key that checks
the signature is the public key of the instance's newest certificate, which must chain to our
CA, be current, not revoked, and belong to an instance that is not terminated. A signature is
accepted once: Redis remembers it (SET NX) for as long as its timestamp stays inside the skew
window, after which the timestamp check refuses it anyway.

The instance's status and newest certificate are read from the database once and then kept per
process for as long as the process hears of their changes (server/credentials.py).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from chef_bridge import auth
from server import events, pki
from server.credentials import CredentialsCache
from server.db import Database, utcnow
from server.enrollment import RETIRED_STATES
from server.errors import Forbidden, Refused, ScalariumError, Unauthorized, Unavailable
from server.keys import Keys
from server.models import Instance, InstanceCertificate

log = logging.getLogger(__name__)

MAX_SKEW_SECONDS = auth.DEFAULT_MAX_SKEW
MAX_USER_ID_LENGTH = 64


@dataclass(frozen=True)
class ReplayGuard:
    """A checked signature not yet marked as seen: spend it before acting on the request."""

    key: str
    instance_id: str
    ttl: int

    def spend(self, connection: redis.Redis) -> None:
        """Mark the signature as seen; raises the refusal if it was seen before."""
        try:
            first = connection.set(self.key, self.instance_id, nx=True, ex=self.ttl)
        except redis.RedisError as exc:
            raise replay_cache_unavailable(exc) from None
        if not first:
            raise replayed_request()


def replay_cache_unavailable(exc: Exception) -> ScalariumError:
    """The refusal when Redis cannot say whether a signature is new."""
    return Unavailable(f"replay cache unavailable: {type(exc).__name__}", code="redis_unavailable")


def replayed_request() -> ScalariumError:
    """The refusal of a signature seen before."""
    return Unauthorized("this signed request was sent before", code="replayed_request")


@dataclass(frozen=True)
class AgentIdentity:
    """The instance a signed request comes from."""

    instance_id: str
    stack_id: str
    status: str
    serial: str
    # Set when authenticate() left the replay check to the caller (spend_replay=False).
    replay: ReplayGuard | None = None


class AgentRefused(Refused):
    """A signed request was refused: the error to answer with and whom it concerns."""


@dataclass(frozen=True)
class Credentials:
    """One row: the instance a request names and its newest certificate (if any)."""

    instance_id: str
    stack_id: str
    status: str
    serial: str | None
    pem: str | None
    not_after: datetime | None
    revoked_at: datetime | None
    revoke_reason: str | None


# Built once: the hot path of every signed request runs this one statement.
_CREDENTIALS = (
    select(
        Instance.id,
        Instance.stack_id,
        Instance.status,
        InstanceCertificate.serial,
        InstanceCertificate.pem,
        InstanceCertificate.not_after,
        InstanceCertificate.revoked_at,
        InstanceCertificate.revoke_reason,
    )
    .outerjoin(InstanceCertificate, InstanceCertificate.instance_id == Instance.id)
    .where(Instance.id == bindparam("instance_id"))
    .order_by(InstanceCertificate.created_at.desc())
    .limit(1)
)


def load_credentials(session: Session, instance_id: str) -> Credentials | None:
    """The instance and its newest certificate, in one query (None for an unknown instance)."""
    row = session.execute(_CREDENTIALS, {"instance_id": instance_id}).first()
    return Credentials(*row) if row is not None else None


def certificate_problem(certificate: Credentials | None, now: datetime) -> ScalariumError | None:
    """Why the instance's newest certificate cannot authenticate it now, or None."""
    if certificate is None or certificate.serial is None or certificate.not_after is None:
        return Unauthorized("the instance has no certificate; enroll it", code="no_certificate")
    if certificate.revoked_at is not None:
        return Forbidden(
            f"certificate {certificate.serial} was revoked ({certificate.revoke_reason})",
            code="certificate_revoked",
        )
    if certificate.not_after <= now:
        return Unauthorized(
            f"certificate {certificate.serial} expired on {certificate.not_after.isoformat()};"
            " enroll the instance again",
            code="certificate_expired",
        )
    return None


def instance_problem(instance: Credentials | None, user_id: str) -> ScalariumError | None:
    """Why the named instance may not talk to the server, or None."""
    if instance is None:
        return Unauthorized(f"no instance {user_id[:MAX_USER_ID_LENGTH]}", code="unknown_instance")
    if instance.status in RETIRED_STATES:
        return Forbidden(
            f"instance {instance.instance_id} is {instance.status}", code="instance_terminated"
        )
    return None


def replay_ttl(signed_at: datetime, now: datetime, max_skew: int) -> int:
    """Seconds a signature must be remembered: until its timestamp leaves the window."""
    remaining = (signed_at + timedelta(seconds=max_skew) - now).total_seconds()
    return max(1, math.ceil(remaining) + 1)


class VerifiedCertificates:
    """Chain checks already done, per serial (one app has one CA; certificates never change)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._found: dict[str, pki.VerifiedCertificate] = {}
        self._lock = threading.Lock()

    def verify(
        self, ca: pki.CertificateAuthority, serial: str, pem: str, now: datetime
    ) -> pki.VerifiedCertificate:
        """The checked certificate; raises pki.CertificateRejected."""
        found = self._found.get(serial)
        if found is None:
            found = pki.verify_instance_certificate(ca, pem.encode("ascii"), now)
            with self._lock:
                if len(self._found) >= self.limit:
                    self._found.clear()
                self._found[serial] = found
        return found


def authenticate(
    session: Callable[[], Session],
    connection: redis.Redis,
    keys: Keys,
    ca: pki.CertificateAuthority,
    cache: VerifiedCertificates,
    credentials: CredentialsCache | None = None,
    *,
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    now: datetime | None = None,
    max_skew: int = MAX_SKEW_SECONDS,
    spend_replay: bool = True,
) -> AgentIdentity:
    """Check a signed agent request end to end; raises AgentRefused.

    `session` makes (or returns) the request's database session, only if the credentials are
    not kept in `credentials`. With ``spend_replay=False`` the signature is not yet marked as
    seen: the caller must spend ``identity.replay`` before it acts (so that it can do so in the
    same Redis round trip as its own work, as heartbeats do).
    """
    moment = now or utcnow()
    headers = auth.lower_headers(headers)  # once: every check below reads them
    try:
        user_id = auth.parse_user_id(headers)
    except auth.AuthError as exc:
        raise AgentRefused(Unauthorized(exc.message, code=exc.code)) from None
    found = None
    if len(user_id) <= MAX_USER_ID_LENGTH:
        found = (
            credentials.load(user_id, lambda: load_credentials(session(), user_id))
            if credentials is not None
            else load_credentials(session(), user_id)
        )
    problem = instance_problem(found, user_id)
    if problem is not None or found is None:
        raise AgentRefused(
            problem or Unauthorized("unknown instance", code="unknown_instance"),
            instance_id=found.instance_id if found else None,
            stack_id=found.stack_id if found else None,
        )
    instance = found

    def refuse(error: ScalariumError) -> AgentRefused:
        return AgentRefused(error, instance_id=instance.instance_id, stack_id=instance.stack_id)

    problem = certificate_problem(instance, moment)
    if problem is not None or instance.serial is None or instance.pem is None:
        raise refuse(problem or Unauthorized("no certificate", code="no_certificate"))
    try:
        verified = cache.verify(ca, instance.serial, instance.pem, moment)
    except pki.PKIError as exc:
        raise refuse(
            Unauthorized(f"certificate {instance.serial}: {exc.message}", code=exc.code)
        ) from None
    if verified.instance_id != instance.instance_id:
        raise refuse(
            Unauthorized("the certificate names another instance", code="certificate_mismatch")
        )
    try:
        auth.verify_request(
            verified.public_key_pem, method, path, body, headers, now=moment, max_skew=max_skew
        )
        signed_at = auth.parse_time(headers["x-ops-timestamp"])
        signature = auth.signature_id(headers)
    except auth.AuthError as exc:
        raise refuse(Unauthorized(exc.message, code=exc.code)) from None
    guard = ReplayGuard(
        keys.seen_signature(signature),
        instance.instance_id,
        replay_ttl(signed_at, moment, max_skew),
    )
    if spend_replay:
        try:
            guard.spend(connection)
        except ScalariumError as exc:
            raise refuse(exc) from None
    return AgentIdentity(
        instance_id=instance.instance_id,
        stack_id=instance.stack_id,
        status=instance.status,
        serial=instance.serial,
        replay=None if spend_replay else guard,
    )


def record_refusal(
    database: Database,
    what: str,
    error: ScalariumError,
    *,
    instance_id: str | None,
    stack_id: str | None,
    data: dict[str, Any] | None = None,
) -> None:
    """Record a refused agent request as an event, in a transaction of its own."""
    try:
        with database.session() as session:
            events.record(
                session,
                "agent.refused",
                f"instance {instance_id or '-'}: {what} refused: {error.code}",
                stack_id=stack_id,
                instance_id=instance_id,
                data={"code": error.code, "status": error.status, "reason": error.message}
                | (data or {}),
            )
    except Exception:  # noqa: BLE001 - the refusal itself must still reach the node
        log.exception("instance %s: could not record a refused %s", instance_id or "-", what)
