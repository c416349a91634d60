"""Chef's signed-header request authentication (mixlib-authentication 1.0, 1.1, 1.3), both sides.

Every request a Chef client sends carries ``X-Ops-*`` headers: who signs (``X-Ops-Userid``),
when (``X-Ops-Timestamp``), a digest of the body (``X-Ops-Content-Hash``), the protocol version
(``X-Ops-Sign``) and an RSA signature over a canonical summary of the request, base64-encoded and
split into 60-character ``X-Ops-Authorization-N`` headers. The canonical strings below are
byte-for-byte those of ``mixlib/authentication/signedheaderauth.rb``:

- 1.0 and 1.1 sign with a raw RSA "private encrypt" (PKCS#1 v1.5 type 1 padding, no DigestInfo)
  of a string holding the SHA-1 of the path; 1.1 also hashes the user id;
- 1.3 signs with RSASSA-PKCS1-v1_5 + SHA-256 and includes ``X-Ops-Server-API-Version``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

log = logging.getLogger(__name__)

DEFAULT_SERVER_API_VERSION = "0"
DEFAULT_MAX_SKEW = 900  # seconds; Chef server and mixlib both allow 15 minutes
SIGNATURE_LINE_LENGTH = 60  # Ruby's Base64.encode64 wraps at 60 characters

# The headers every signed request must carry (lower-cased: HTTP header names are
# case-insensitive and proxies do rewrite them).
REQUIRED_HEADERS = (
    "x-ops-sign",
    "x-ops-userid",
    "x-ops-timestamp",
    "x-ops-content-hash",
    "x-ops-authorization-1",
)

_AUTHORIZATION_HEADER = re.compile(r"x-ops-authorization-(\d+)")


class SigningVersion(StrEnum):
    """A version of Chef's header-signing protocol."""

    V1_0 = "1.0"
    V1_1 = "1.1"
    V1_3 = "1.3"


# Each protocol version is bound to exactly one digest (mixlib's ALGORITHM_FOR_VERSION).
ALGORITHM_FOR_VERSION: dict[SigningVersion, str] = {
    SigningVersion.V1_0: "sha1",
    SigningVersion.V1_1: "sha1",
    SigningVersion.V1_3: "sha256",
}


class AuthError(Exception):
    """Base of every request-signing failure; ``code`` is machine-readable."""

    code = "auth_error"
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MissingHeader(AuthError):
    """A mandatory ``X-Ops-*`` header is absent."""

    code = "missing_header"


class MalformedHeader(AuthError):
    """A header is present but cannot be parsed (bad timestamp, garbage base64, ...)."""

    code = "malformed_header"


class UnsupportedVersion(AuthError):
    """``X-Ops-Sign`` names a protocol version or algorithm this module does not speak."""

    code = "unsupported_version"


class TimestampSkew(AuthError):
    """``X-Ops-Timestamp`` is too far from the verifier's clock (stale or future request)."""

    code = "timestamp_skew"


class ContentHashMismatch(AuthError):
    """``X-Ops-Content-Hash`` does not match the body that arrived."""

    code = "content_hash_mismatch"


class BadSignature(AuthError):
    """The signature does not match the request under the signer's public key."""

    code = "bad_signature"


class BadKey(AuthError):
    """A key cannot be loaded or is not an RSA key."""

    code = "bad_key"


class RequestTooLong(AuthError):
    """A 1.0/1.1 canonical request exceeds what one raw RSA block can carry (long user id)."""

    code = "request_too_long"


# --- pure protocol pieces ------------------------------------------------------------------


def parse_version(version: str) -> SigningVersion:
    """Return the SigningVersion for ``version`` or raise UnsupportedVersion."""
    try:
        return SigningVersion(version)
    except ValueError:
        raise UnsupportedVersion(f"unsupported signing protocol version {version!r}") from None


def canonical_path(path: str) -> str:
    """Drop the query string, collapse repeated slashes and strip a trailing slash."""
    path = path.split("?", 1)[0]
    path = re.sub(r"/+", "/", path)
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


_CANONICAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def canonical_time(timestamp: str) -> str:
    """Normalise an ISO 8601 timestamp with a zone to ``YYYY-MM-DDTHH:MM:SSZ`` in UTC."""
    parsed = parse_time(timestamp)
    # What every client sends: already canonical, and valid since it parsed (strftime is slow).
    if _CANONICAL_TIME.fullmatch(timestamp):
        return timestamp
    return format_time(parsed)


def parse_time(timestamp: str) -> datetime:
    """Parse an ISO 8601 timestamp that carries a zone; raise MalformedHeader otherwise."""
    try:
        parsed = datetime.fromisoformat(timestamp.strip())
    except ValueError:
        raise MalformedHeader(f"X-Ops-Timestamp {timestamp!r} is not ISO 8601") from None
    # A zone-less time is ambiguous (Ruby would read it as the signer's local time).
    if parsed.tzinfo is None:
        raise MalformedHeader(f"X-Ops-Timestamp {timestamp!r} has no time zone")
    return parsed.astimezone(UTC)


def format_time(moment: datetime) -> str:
    """Format a datetime as the protocol's ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def digest_b64(data: bytes, algorithm: str) -> str:
    """Return base64 of the ``algorithm`` (sha1 or sha256) digest of ``data``."""
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode("ascii")


def content_hash(body: bytes, version: str) -> str:
    """Return the ``X-Ops-Content-Hash`` value of ``body`` for a protocol version."""
    return digest_b64(body, ALGORITHM_FOR_VERSION[parse_version(version)])


def canonical_request(
    method: str,
    path: str,
    hashed_body: str,
    timestamp: str,
    user_id: str,
    version: str,
    server_api_version: str = DEFAULT_SERVER_API_VERSION,
) -> str:
    """Return the exact string a request's signature covers (mixlib's canonicalize_request)."""
    signing_version = parse_version(version)
    algorithm = ALGORITHM_FOR_VERSION[signing_version]
    method = method.upper()
    path = canonical_path(path)
    timestamp = canonical_time(timestamp)
    if signing_version is SigningVersion.V1_3:
        return "\n".join(
            [
                f"Method:{method}",
                f"Path:{path}",
                f"X-Ops-Content-Hash:{hashed_body}",
                f"X-Ops-Sign:version={signing_version}",
                f"X-Ops-Timestamp:{timestamp}",
                f"X-Ops-UserId:{user_id}",
                f"X-Ops-Server-API-Version:{server_api_version}",
            ]
        )
    if signing_version is SigningVersion.V1_1:
        user_id = digest_b64(user_id.encode(), algorithm)
    return "\n".join(
        [
            f"Method:{method}",
            f"Hashed Path:{digest_b64(path.encode(), algorithm)}",
            f"X-Ops-Content-Hash:{hashed_body}",
            f"X-Ops-Timestamp:{timestamp}",
            f"X-Ops-UserId:{user_id}",
        ]
    )


def split_signature(signature: bytes) -> dict[str, str]:
    """Return the ``X-Ops-Authorization-N`` headers carrying a signature, 60 characters each."""
    encoded = base64.b64encode(signature).decode("ascii")
    lines = [
        encoded[i : i + SIGNATURE_LINE_LENGTH]
        for i in range(0, len(encoded), SIGNATURE_LINE_LENGTH)
    ]
    return {f"X-Ops-Authorization-{n}": line for n, line in enumerate(lines, start=1)}


class LowerHeaders(dict[str, str]):
    """Headers already keyed by lower-cased name with values stripped (not redone).

    Also remembers their joined signature, which a verifier reads twice (check, replay id).
    """

    signature: bytes | None = None


def lower_headers(headers: Mapping[str, str]) -> LowerHeaders:
    """Return the headers keyed by lower-cased name with values stripped."""
    if isinstance(headers, LowerHeaders):
        return headers
    return LowerHeaders((name.lower(), value.strip()) for name, value in headers.items())


def parse_sign_header(value: str) -> tuple[SigningVersion, str]:
    """Parse ``X-Ops-Sign`` (``algorithm=sha1;version=1.0;``) into (version, algorithm)."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        name, sep, field_value = part.partition("=")
        if not sep:
            raise MalformedHeader(f"X-Ops-Sign {value!r} is not a list of name=value pairs")
        fields[name.strip().lower()] = field_value.strip()
    if "version" not in fields:
        raise MalformedHeader(f"X-Ops-Sign {value!r} names no version")
    version = parse_version(fields["version"])
    # Version 1.0 clients omit the algorithm; every version has exactly one.
    algorithm = fields.get("algorithm", ALGORITHM_FOR_VERSION[version]).lower()
    if algorithm != ALGORITHM_FOR_VERSION[version]:
        raise UnsupportedVersion(f"algorithm {algorithm!r} is not valid for version {version}")
    return version, algorithm


def join_signature(headers: Mapping[str, str]) -> bytes:
    """Reassemble and base64-decode the ``X-Ops-Authorization-1..N`` headers."""
    found = lower_headers(headers)
    if found.signature is None:
        found.signature = _join_signature(found)
    return found.signature


def _join_signature(headers: LowerHeaders) -> bytes:
    lines: dict[int, str] = {}
    for name, value in headers.items():
        match = _AUTHORIZATION_HEADER.fullmatch(name)
        if match:
            lines[int(match.group(1))] = value
    if not lines:
        raise MissingHeader("required authentication header X-Ops-Authorization-1 missing")
    # Numbering must run 1..N without gaps, else a line was lost or injected on the way.
    if sorted(lines) != list(range(1, len(lines) + 1)):
        raise MalformedHeader(f"X-Ops-Authorization headers are not numbered 1..N: {sorted(lines)}")
    encoded = "".join(lines[n] for n in range(1, len(lines) + 1))
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedHeader("X-Ops-Authorization headers are not valid base64") from None


def parse_user_id(headers: Mapping[str, str]) -> str:
    """Return the signer named by ``X-Ops-Userid`` (header names matched case-insensitively)."""
    user_id = lower_headers(headers).get("x-ops-userid")
    if user_id is None:
        raise MissingHeader("required authentication header X-Ops-Userid missing")
    if not user_id:
        raise MalformedHeader("X-Ops-Userid is empty")
    return user_id


def signature_id(headers: Mapping[str, str]) -> str:
    """Return a stable hex digest identifying a request's signature, for replay detection."""
    signature = join_signature(headers)
    # Digest the signature as a number: re-wrapping the base64 lines or adding leading zero
    # bytes must not turn a replayed request into a "new" one.
    number = int.from_bytes(signature, "big")
    canonical = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    return hashlib.sha256(canonical).hexdigest()


# --- keys -----------------------------------------------------------------------------------


PublicKeyInput = rsa.RSAPublicKey | bytes | str
PrivateKeyInput = rsa.RSAPrivateKey | bytes | str


def _as_bytes(pem: bytes | str) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else pem


@functools.lru_cache(maxsize=256)
def _load_private_pem(pem: bytes) -> rsa.RSAPrivateKey:
    # Parsing and checking an RSA key costs far more than signing with it: cache per PEM.
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BadKey(f"cannot load private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadKey("Chef request signing needs an RSA private key")
    return key


@functools.lru_cache(maxsize=1024)
def _load_public_pem(pem: bytes) -> rsa.RSAPublicKey:
    try:
        key = (
            x509.load_pem_x509_certificate(pem).public_key()
            if b"-----BEGIN CERTIFICATE-----" in pem
            else serialization.load_pem_public_key(pem)
        )
    except (ValueError, TypeError) as exc:
        raise BadKey(f"cannot load public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadKey("Chef request signing needs an RSA public key")
    return key


def load_private_key(key: PrivateKeyInput) -> rsa.RSAPrivateKey:
    """Return an RSA private key from a key object or an unencrypted PEM."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key
    return _load_private_pem(_as_bytes(key))


def load_public_key(key: PublicKeyInput) -> rsa.RSAPublicKey:
    """Return an RSA public key from a key object, a PEM public key or a PEM certificate."""
    if isinstance(key, rsa.RSAPublicKey):
        return key
    return _load_public_pem(_as_bytes(key))


# --- signing and verifying ------------------------------------------------------------------


def sign_request(
    private_key_pem: PrivateKeyInput,
    user_id: str,
    method: str,
    path: str,
    body: bytes,
    timestamp: str | None = None,
    version: str = "1.3",
    server_api_version: str = DEFAULT_SERVER_API_VERSION,
) -> dict[str, str]:
    """Return the ``X-Ops-*`` headers that sign a request as mixlib-authentication does."""
    signing_version = parse_version(version)
    algorithm = ALGORITHM_FOR_VERSION[signing_version]
    key = load_private_key(private_key_pem)
    timestamp = canonical_time(timestamp) if timestamp else format_time(datetime.now(UTC))
    hashed_body = digest_b64(body, algorithm)
    to_sign = canonical_request(
        method, path, hashed_body, timestamp, user_id, signing_version, server_api_version
    ).encode()
    if signing_version is SigningVersion.V1_3:
        signature = key.sign(to_sign, padding.PKCS1v15(), hashes.SHA256())
    else:
        # 1.0/1.1 are OpenSSL's RSA_private_encrypt: one padded block, so the canonical
        # request must fit in the modulus (a 2048-bit key carries at most 245 bytes).
        limit = key.key_size // 8 - 11
        if len(to_sign) > limit:
            raise RequestTooLong(
                f"version {signing_version} canonical request is {len(to_sign)} bytes,"
                f" the key carries at most {limit}; sign with version 1.3"
            )
        signature = key.sign(to_sign, padding.PKCS1v15(), utils.NoDigestInfo())
    headers = {
        "X-Ops-Sign": f"algorithm={algorithm};version={signing_version};",
        "X-Ops-Userid": user_id,
        "X-Ops-Timestamp": timestamp,
        "X-Ops-Content-Hash": hashed_body,
    }
    if signing_version is SigningVersion.V1_3:
        headers["X-Ops-Server-API-Version"] = server_api_version
    headers.update(split_signature(signature))
    return headers


def verify_request(
    public_key: PublicKeyInput,
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    now: datetime | None = None,
    max_skew: int = DEFAULT_MAX_SKEW,
) -> None:
    """Check a request's ``X-Ops-*`` headers against its method, path and body; raise AuthError."""
    found = lower_headers(headers)
    missing = [name for name in REQUIRED_HEADERS if name not in found]
    if missing:
        raise MissingHeader(
            "required authentication header(s) missing: " + ", ".join(missing).title()
        )
    user_id = parse_user_id(found)
    version, algorithm = parse_sign_header(found["x-ops-sign"])
    signature = join_signature(found)
    signed_at = parse_time(found["x-ops-timestamp"])
    key = load_public_key(public_key)

    # Cheap checks first: a stale replay or a swapped body never costs an RSA operation.
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    skew = abs((now - signed_at).total_seconds())
    if skew >= max_skew:
        raise TimestampSkew(
            f"request from {user_id} signed at {format_time(signed_at)} is {skew:.0f}s away"
            f" from server time {format_time(now)} (allowed: {max_skew}s); check the clock"
        )
    hashed_body = digest_b64(body, algorithm)
    if found["x-ops-content-hash"] != hashed_body:
        raise ContentHashMismatch(f"request from {user_id}: body does not match X-Ops-Content-Hash")

    expected = canonical_request(
        method,
        path,
        hashed_body,
        format_time(signed_at),
        user_id,
        version,
        found.get("x-ops-server-api-version", DEFAULT_SERVER_API_VERSION),
    ).encode()
    try:
        if version is SigningVersion.V1_3:
            key.verify(signature, expected, padding.PKCS1v15(), hashes.SHA256())
        else:
            # mixlib's public_decrypt-and-compare: the block is the canonical request itself.
            recovered = key.recover_data_from_signature(
                signature, padding.PKCS1v15(), utils.NoDigestInfo()
            )
            if not hmac.compare_digest(recovered, expected):
                raise InvalidSignature
    except (InvalidSignature, ValueError):
        log.info("user %s: bad %s signature for %s %s", user_id, version, method, path)
        raise BadSignature(
            f"request from {user_id}: signature does not match; check the client key"
        ) from None
