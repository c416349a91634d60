"""Enrollment: one-time tokens, the user-data that carries them, and certificates per instance.

A node proves who it is once, with a token the server made for exactly one instance (256-bit
random, stored hashed, single use, expiring, and replaced whenever user-data is asked for again).
The CA then signs the node's CSR; from that moment the newest unrevoked certificate of the
instance authenticates every signed request (see server/agent_auth.py).

The decisions (is this token usable, which chef install mode, what the user-data says, which
facts are acceptable) are plain functions; the functions taking a Session are the thin edge.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import secrets
import shlex
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server import events, pki
from server.config import Settings
from server.credentials import credentials_changed
from server.db import utcnow
from server.errors import Conflict, Forbidden, Invalid, Refused, ScalariumError, Unauthorized
from server.models import (
    EnrollmentToken,
    Instance,
    InstanceCertificate,
    InstanceState,
    Provider,
    Stack,
)

log = logging.getLogger(__name__)

TOKEN_PREFIX = "sce_"
MAX_TOKEN_LENGTH = 128
# Instances in these states never enroll again and get no new user-data.
RETIRED_STATES = frozenset({InstanceState.TERMINATING, InstanceState.TERMINATED})
# Asking for user-data is the operator saying "this machine is about to boot".
PENDING_FROM = frozenset({InstanceState.REQUESTED, InstanceState.STOPPED})
# Settings the agent receives at enrollment (it keeps its own defaults for the rest).
AGENT_SETTINGS: dict[str, Any] = {
    "heartbeat_interval": 60,
    "poll_wait": 30,
    "server_api_version": "1",
}
_CHEF_MODE = re.compile(r"^(skip|(cinc|chef):[A-Za-z0-9._-]{1,32}|url:https://[^\s'\"]{1,2000})$")
_TEXT_FACTS = {"os": 64, "architecture": 16}


class TokenProblem(StrEnum):
    """Why a token cannot be used; each value is the error code the node gets."""

    INVALID = "invalid_token"
    REUSED = "token_reused"
    EXPIRED = "token_expired"
    SUPERSEDED = "token_superseded"


_TOKEN_MESSAGES = {
    TokenProblem.INVALID: "the enrollment token is unknown",
    TokenProblem.REUSED: "the enrollment token was used already; ask for new user-data",
    TokenProblem.EXPIRED: "the enrollment token has expired; ask for new user-data",
    TokenProblem.SUPERSEDED: "newer user-data replaced this enrollment token; use that one",
}


class EnrollmentRefused(Refused):
    """An enrollment step refused the node: the error it gets, and who it concerns (for events)."""


# --- the CA ---------------------------------------------------------------------------------


def load_configured_ca(settings: Settings) -> pki.CertificateAuthority:
    """The operator's CA when both files are configured, else the one under data_dir/pki."""
    if settings.ca_cert and settings.ca_key:
        return pki.load_ca(Path(settings.ca_cert), Path(settings.ca_key))
    return pki.load_or_create_ca(settings.pki_dir)


def init_app(app: Flask) -> None:
    """Load (or create on first start) the CA the app signs instance certificates with."""
    ca = load_configured_ca(app.config["SCALARIUM"])
    app.extensions["scalarium.ca"] = ca
    app.extensions["scalarium.ca_pem"] = pki.ca_certificate_pem(ca)


def get_ca(app: Flask) -> pki.CertificateAuthority:
    """The app's CA."""
    ca: pki.CertificateAuthority = app.extensions["scalarium.ca"]
    return ca


def get_ca_pem(app: Flask) -> bytes:
    """The app's CA certificate as PEM."""
    pem: bytes = app.extensions["scalarium.ca_pem"]
    return pem


def error_from_pki(exc: pki.PKIError) -> ScalariumError:
    """The server error a PKI failure becomes (same code, same status)."""
    kind: type[ScalariumError] = {400: Invalid, 401: Unauthorized, 403: Forbidden}.get(
        exc.status, ScalariumError
    )
    return kind(exc.message, code=exc.code)


# --- tokens (pure) ----------------------------------------------------------------------------


def new_token() -> str:
    """A fresh 256-bit enrollment token (the plaintext; only its hash is stored)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token (256 random bits need no slow hash)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def token_problem(row: EnrollmentToken | None, now: datetime) -> TokenProblem | None:
    """Why this token row cannot enroll a node now, or None when it can."""
    if row is None:
        return TokenProblem.INVALID
    if row.used_at is not None:
        return TokenProblem.REUSED
    if row.superseded_at is not None:
        return TokenProblem.SUPERSEDED
    if row.expires_at <= now:
        return TokenProblem.EXPIRED
    return None


def token_error(problem: TokenProblem) -> ScalariumError:
    """The 401 a token problem is answered with."""
    return Unauthorized(_TOKEN_MESSAGES[problem], code=problem.value)


# --- user-data (pure) -------------------------------------------------------------------------


def chef_install_mode(setting: str, chef_version: str, chef_binary: str) -> str:
    """The install.sh --chef value from the server setting and the stack's pinned Chef."""
    choice = setting.strip() or "auto"
    if choice == "auto":
        choice = "chef" if Path(chef_binary).name == "chef-solo" else "cinc"
    if choice in ("cinc", "chef"):
        choice = f"{choice}:{chef_version or 'latest'}"
    if not _CHEF_MODE.fullmatch(choice):
        raise ValueError(
            f"SCALARIUM_CHEF_INSTALL {setting!r} is not auto, cinc, chef, cinc:VERSION, "
            "chef:VERSION, skip or url:https://...#sha256=HEX"
        )
    return choice


def render_user_data(
    *,
    server_url: str,
    token: str,
    ca_pem: str,
    chef_mode: str,
    label: str,
    expires_at: datetime,
    root: str = "/",
) -> str:
    """The shell script a node runs as root: write the CA, then curl install.sh into bash."""
    server = server_url.rstrip("/")
    prefix = root.rstrip("/")
    ca_path = f"{prefix}/etc/scalarium/ca.pem"
    pem = ca_pem.strip()
    if "SCALARIUM_CA" in pem:
        raise ValueError("the CA PEM must not contain the here-document delimiter")
    install = [
        "curl",
        "-fsS",
        "--retry",
        "5",
        "--cacert",
        ca_path,
        f"{server}/bootstrap/v1/install.sh",
    ]
    args = ["--server", server, "--token", token, "--chef", chef_mode]
    if prefix:
        args += ["--root", root]
    # The label is shown in a comment only; keep it on one line of printable characters.
    safe_label = re.sub(r"[^A-Za-z0-9 ._:/()-]", "?", label)[:200]
    return "\n".join(
        [
            "#!/bin/bash",
            f"# Scalarium user-data for {safe_label}.",
            "# It carries a one-time enrollment token: treat this script as a secret.",
            f"# The token expires at {expires_at.strftime('%Y-%m-%dT%H:%M:%SZ')}.",
            "set -euo pipefail",
            "umask 022",
            f"mkdir -p {shlex.quote(str(Path(ca_path).parent))}",
            f"cat > {shlex.quote(ca_path)} <<'SCALARIUM_CA'",
            pem,
            "SCALARIUM_CA",
            f"{shlex.join(install)} | bash -s -- {shlex.join(args)}",
            "",
        ]
    )


@dataclass(frozen=True)
class UserData:
    """A rendered user-data script and when its token stops working."""

    script: str
    expires_at: datetime


# --- facts (pure) -----------------------------------------------------------------------------


def parse_facts(facts: Any, agent_version: Any) -> dict[str, str | None]:
    """The instance columns a node's facts fill; raise Invalid on anything malformed."""
    if facts is None:
        facts = {}
    if not isinstance(facts, dict):
        raise Invalid("facts must be a JSON object", code="invalid_facts")
    out: dict[str, str | None] = {}
    for name, limit in _TEXT_FACTS.items():
        value = facts.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > limit:
            raise Invalid(
                f"facts.{name} must be a string of at most {limit} characters",
                code="invalid_facts",
                details={"field": f"facts.{name}"},
            )
        out[name] = value
    for name in ("private_ip", "public_ip"):
        value = facts.get(name)
        if value is None:
            continue
        try:
            out[name] = str(ipaddress.ip_address(str(value)))
        except ValueError:
            raise Invalid(
                f"facts.{name} is not an IP address",
                code="invalid_facts",
                details={"field": f"facts.{name}"},
            ) from None
    if agent_version is not None:
        if not isinstance(agent_version, str) or not 0 < len(agent_version) <= 32:
            raise Invalid(
                "agent_version must be a string of 1 to 32 characters",
                code="invalid_agent_version",
                details={"field": "agent_version"},
            )
        out["agent_version"] = agent_version
    return out


# --- the edge: sessions -----------------------------------------------------------------------


def rows_changed(result: Any) -> int:
    """How many rows an UPDATE touched (the typed Result hides CursorResult.rowcount)."""
    return int(result.rowcount or 0)


def issue_token(
    session: Session, instance_id: str, ttl_seconds: int, now: datetime | None = None
) -> tuple[EnrollmentToken, str, int]:
    """Make the instance's one live token, superseding older ones; (row, plaintext, superseded)."""
    moment = now or utcnow()
    superseded = rows_changed(
        session.execute(
            update(EnrollmentToken)
            .where(
                EnrollmentToken.instance_id == instance_id,
                EnrollmentToken.used_at.is_(None),
                EnrollmentToken.superseded_at.is_(None),
            )
            .values(superseded_at=moment)
        )
    )
    plaintext = new_token()
    row = EnrollmentToken(
        token_hash=hash_token(plaintext),
        instance_id=instance_id,
        created_at=moment,
        expires_at=moment + timedelta(seconds=ttl_seconds),
    )
    session.add(row)
    session.flush()
    return row, plaintext, superseded


def issue_user_data(
    session: Session,
    instance: Instance,
    settings: Settings,
    ca_pem: bytes,
    actor: str | None = None,
    now: datetime | None = None,
) -> UserData:
    """Issue a fresh token for the instance and render its user-data; records an event."""
    moment = now or utcnow()
    if instance.status in RETIRED_STATES:
        raise Conflict(
            f"instance {instance.hostname} is {instance.status}; it cannot enroll",
            code="instance_terminated",
            details={"status": instance.status},
        )
    stack: Stack = instance.stack
    try:
        mode = chef_install_mode(settings.chef_install, stack.chef_version, stack.chef_binary)
    except ValueError as exc:
        raise ScalariumError(str(exc), code="bad_configuration") from exc
    row, plaintext, superseded = issue_token(
        session, instance.id, settings.enroll_token_ttl, moment
    )
    previous = instance.status
    if instance.status in PENDING_FROM and instance.provider == Provider.MANUAL:
        # For a manual instance, asking for its user-data is how it is started.
        from server import orchestrator
        from server.lifecycle import Trigger

        orchestrator.instance_trigger(
            session,
            instance,
            Trigger.START_REQUESTED,
            actor=actor or "scalarium",
            reason="user-data issued",
        )
    events.record(
        session,
        "instance.user_data",
        f"instance {instance.hostname}: user-data issued (token valid until "
        f"{row.expires_at.strftime('%Y-%m-%dT%H:%M:%SZ')})",
        stack_id=instance.stack_id,
        instance_id=instance.id,
        data={
            "expires_at": row.expires_at.isoformat(),
            "superseded_tokens": superseded,
            "status": {"from": previous, "to": instance.status},
            "chef": mode,
        },
        actor=actor,
    )
    script = render_user_data(
        server_url=settings.public_url,
        token=plaintext,
        ca_pem=ca_pem.decode("ascii"),
        chef_mode=mode,
        label=f"instance {instance.hostname} ({instance.id}) of stack {stack.shortname}",
        expires_at=row.expires_at,
    )
    return UserData(script=script, expires_at=row.expires_at)


def _usable_token(session: Session, token: Any, now: datetime) -> EnrollmentToken:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise EnrollmentRefused(
            Invalid("token must be a non-empty string", code="invalid_token"),
        )
    row = session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token))
    )
    problem = token_problem(row, now)
    if problem is not None:
        instance = session.get(Instance, row.instance_id) if row is not None else None
        raise EnrollmentRefused(
            token_error(problem),
            instance_id=instance.id if instance else None,
            stack_id=instance.stack_id if instance else None,
        )
    assert row is not None
    return row


def lookup(session: Session, token: Any, now: datetime | None = None) -> str:
    """The instance id a usable token was made for (the token is not spent)."""
    moment = now or utcnow()
    row = _usable_token(session, token, moment)
    instance = session.get(Instance, row.instance_id)
    if instance is None or instance.status in RETIRED_STATES:
        raise EnrollmentRefused(
            Forbidden("the instance is terminated", code="instance_terminated"),
            instance_id=row.instance_id,
            stack_id=instance.stack_id if instance else None,
        )
    return instance.id


@dataclass(frozen=True)
class Enrolled:
    """What a successful enrollment hands back to the node."""

    instance_id: str
    stack_id: str
    certificate_pem: str
    serial: str
    settings: dict[str, Any]


def enroll(
    session: Session,
    ca: pki.CertificateAuthority,
    settings: Settings,
    *,
    token: Any,
    csr_pem: Any,
    facts: Any = None,
    agent_version: Any = None,
    claimed_instance_id: Any = None,
    now: datetime | None = None,
) -> Enrolled:
    """Spend a token on a CSR: sign it, revoke older certificates, move the instance to booting.

    Raises EnrollmentRefused (carrying the error and the instance concerned) on any refusal;
    the caller rolls the session back so that nothing changes.
    """
    moment = now or utcnow()
    row = _usable_token(session, token, moment)
    instance = session.get(Instance, row.instance_id)
    assert instance is not None  # the foreign key cascades token rows away with the instance

    def refuse(error: ScalariumError) -> EnrollmentRefused:
        return EnrollmentRefused(error, instance_id=instance.id, stack_id=instance.stack_id)

    if claimed_instance_id is not None and claimed_instance_id != instance.id:
        raise refuse(
            Forbidden(
                "this enrollment token belongs to another instance",
                code="token_wrong_instance",
                details={"claimed": str(claimed_instance_id)[:64]},
            )
        )
    if instance.status in RETIRED_STATES:
        raise refuse(Forbidden("the instance is terminated", code="instance_terminated"))
    if not isinstance(csr_pem, str) or not csr_pem:
        raise refuse(Invalid("csr must be a PEM string", code="csr_malformed"))
    try:
        values = parse_facts(facts, agent_version)
    except Invalid as exc:
        raise refuse(exc) from None
    try:
        issued = pki.issue_instance_certificate(
            ca,
            csr_pem.encode("utf-8", "replace"),
            instance.id,
            lifetime_days=settings.cert_lifetime_days,
            now=moment,
        )
    except pki.PKIError as exc:
        raise refuse(error_from_pki(exc)) from None
    # Spend the token only if nobody spent it meanwhile (two nodes racing on one token).
    spent = rows_changed(
        session.execute(
            update(EnrollmentToken)
            .where(
                EnrollmentToken.id == row.id,
                EnrollmentToken.used_at.is_(None),
                EnrollmentToken.superseded_at.is_(None),
            )
            .values(used_at=moment)
        )
    )
    if spent != 1:
        raise refuse(token_error(TokenProblem.REUSED))
    revoked = revoke_instance_certificates(session, instance.id, "re_enrolled", moment)
    session.add(
        InstanceCertificate(
            serial=issued.serial_hex,
            instance_id=instance.id,
            pem=issued.pem.decode("ascii"),
            not_after=issued.not_after,
            fingerprint=issued.fingerprint_sha256,
            created_at=moment,
        )
    )
    previous = instance.status
    for name, value in values.items():
        setattr(instance, name, value)
    if instance.status == InstanceState.PENDING:
        from server import orchestrator
        from server.lifecycle import Trigger

        orchestrator.instance_trigger(
            session,
            instance,
            Trigger.ENROLLED,
            actor=f"instance:{instance.id}",
            reason=f"certificate {issued.serial_hex}",
        )
    events.record(
        session,
        "instance.enrolled",
        f"instance {instance.hostname}: enrolled, certificate {issued.serial_hex}",
        stack_id=instance.stack_id,
        instance_id=instance.id,
        data={
            "serial": issued.serial_hex,
            "fingerprint": issued.fingerprint_sha256,
            "not_after": issued.not_after.isoformat(),
            "revoked": revoked,
            "status": {"from": previous, "to": instance.status},
            "facts": values,
        },
        actor=f"instance:{instance.id}",
    )
    session.flush()
    stack: Stack = instance.stack
    return Enrolled(
        instance_id=instance.id,
        stack_id=instance.stack_id,
        certificate_pem=issued.pem.decode("ascii"),
        serial=issued.serial_hex,
        settings={
            "server_url": settings.public_url.rstrip("/"),
            **AGENT_SETTINGS,
            "chef_binary": stack.chef_binary,
        },
    )


def revoke_instance_certificates(
    session: Session, instance_id: str, reason: str, now: datetime | None = None
) -> list[str]:
    """Revoke every live certificate of an instance (terminate, delete, re-enroll); the serials."""
    moment = now or utcnow()
    serials = list(
        session.scalars(
            select(InstanceCertificate.serial).where(
                InstanceCertificate.instance_id == instance_id,
                InstanceCertificate.revoked_at.is_(None),
            )
        )
    )
    if serials:
        session.execute(
            update(InstanceCertificate)
            .where(InstanceCertificate.serial.in_(serials))
            .values(revoked_at=moment, revoke_reason=reason[:64])
        )
        # A bulk UPDATE passes the ORM's notice hook by: announce it ourselves.
        credentials_changed(session, [instance_id])
        log.info("instance %s: certificates %s revoked (%s)", instance_id, serials, reason)
    return serials


def current_certificate(session: Session, instance_id: str) -> InstanceCertificate | None:
    """The certificate that authenticates the instance: its newest one (maybe revoked)."""
    return session.scalar(
        select(InstanceCertificate)
        .where(InstanceCertificate.instance_id == instance_id)
        .order_by(InstanceCertificate.created_at.desc())
        .limit(1)
    )
