"""The certificate authority: instance certificates from CSRs, server TLS material, verification.

This is the one module of the server that imports ``cryptography.hazmat`` and
``cryptography.x509``; everything else passes PEM bytes and paths around.

The CA key is EC P-256 by default: it gives the same ~128-bit security as RSA 3072, signs
much faster (enrollment bursts of hundreds of instances sign one certificate each; see
``bench/bench_pki.py``), and keeps certificates small. Every client that matters (OpenSSL 1.0+,
curl, Python's ssl) verifies ECDSA chains. Instance keys stay RSA (2048..8192 bits) because the
agent signs its requests the way Chef does, which is RSA-only. An operator who needs an RSA CA
passes ``CAKeyAlgorithm.RSA_3072`` or brings their own with ``load_ca``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TypeGuard

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"
LOCK_FILE = ".pki.lock"

MAX_CSR_PEM_BYTES = 16 * 1024
MAX_CERT_PEM_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
CA_LIFETIME = timedelta(days=3650)
SERVER_RENEW_BEFORE = timedelta(days=30)
# Nodes boot with clocks a little behind; a certificate that is not yet valid for them
# would fail the first TLS handshake, so every not_before is set this far in the past.
CLOCK_SKEW = timedelta(minutes=5)
# Hash algorithms a CSR may be signed with; SHA-1 and MD5 signatures are forgeable.
ACCEPTED_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


class PKIError(Exception):
    """Base of every PKI failure; ``code`` is machine-readable, ``status`` the HTTP status."""

    status = 500

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class CSRRejected(PKIError):
    """The node sent a CSR that the CA will not sign (a client mistake)."""

    status = 400


class CertificateRejected(PKIError):
    """A presented certificate does not authenticate an instance."""

    status = 401


class CAError(PKIError):
    """The CA or server TLS material on disk is missing, broken or inconsistent."""

    status = 500


class CAKeyAlgorithm(StrEnum):
    """Key algorithms ``load_or_create_ca`` can create a CA with."""

    EC_P256 = "ec-p256"
    RSA_3072 = "rsa-3072"


class CertificateRole(StrEnum):
    """What a certificate is for; each role has one extension profile."""

    CA = "ca"
    INSTANCE = "instance"
    SERVER = "server"


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


# The CA decides every extension from the role alone; nothing is copied from a CSR.
# Key identifiers (SKI, AKI) and SANs depend on the keys and names, so the builder adds them.
PROFILES: dict[CertificateRole, tuple[tuple[x509.ExtensionType, bool], ...]] = {
    CertificateRole.CA: (
        # path_length=0: this CA signs leaves only, never an intermediate.
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), True),
    ),
    CertificateRole.INSTANCE: (
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(digital_signature=True, key_encipherment=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ),
    CertificateRole.SERVER: (
        (x509.BasicConstraints(ca=False, path_length=None), True),
        # The server key is EC: TLS uses it for ECDHE signatures only, never key transport.
        (_key_usage(digital_signature=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
    ),
}


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA certificate and its private key, as loaded into memory."""

    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes

    @property
    def fingerprint_sha256(self) -> str:
        """SHA-256 fingerprint of the CA certificate, lowercase hex."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA has just signed for an instance."""

    pem: bytes
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str

    @property
    def serial_hex(self) -> str:
        """The serial as stored in the database (lowercase hex, no prefix)."""
        return format(self.serial, "x")


@dataclass(frozen=True)
class VerifiedCertificate:
    """What a valid instance certificate proves: who it is and with which key."""

    instance_id: str
    serial: int
    public_key_pem: bytes
    not_after: datetime
    fingerprint_sha256: str

    @property
    def serial_hex(self) -> str:
        """The serial as stored in the database (lowercase hex, no prefix)."""
        return format(self.serial, "x")


# --- time and encoding helpers ---------------------------------------------------------------


def _utc_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def _truncate(moment: datetime) -> datetime:
    # X.509 times have one-second precision; truncating keeps our return values equal to
    # what is written in the certificate.
    return moment.replace(microsecond=0)


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign the message itself and take no separate hash.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _private_key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_key_pem(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("ascii", "replace") if isinstance(data, str) else data


# --- files -----------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int) -> None:
    # Write to a temporary file created with its final mode, then rename: a reader never sees
    # a half-written file, and a private key is never readable by others, even for a moment.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    # Several servers may start at once on one certs directory; only one may create material.
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _prepare_directory(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        # mkdir's mode is filtered by the umask; the directory holds keys, so force it.
        os.chmod(directory, 0o700)


# --- certificate building --------------------------------------------------------------------


def _build_certificate(
    *,
    role: CertificateRole,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    signing_key: CertificateIssuerPrivateKeyTypes,
    authority_key_id: x509.AuthorityKeyIdentifier,
    not_before: datetime,
    not_after: datetime,
    extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension, critical in PROFILES[role] + extra:
        builder = builder.add_extension(extension, critical=critical)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
    ).add_extension(authority_key_id, critical=False)
    return builder.sign(signing_key, _signature_hash(signing_key))


def _authority_key_id(ca: CertificateAuthority) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        # An operator's CA may lack an SKI; derive the identifier the way RFC 5280 suggests.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)


def _leaf_validity(
    ca: CertificateAuthority, now: datetime, lifetime: timedelta
) -> tuple[datetime, datetime]:
    # A leaf never outlives (or predates) its CA: validators reject such chains.
    not_before = max(_truncate(now - CLOCK_SKEW), ca.certificate.not_valid_before_utc)
    not_after = min(_truncate(now + lifetime), ca.certificate.not_valid_after_utc)
    return not_before, not_after


def _generate_ca_key(algorithm: CAKeyAlgorithm) -> CertificateIssuerPrivateKeyTypes:
    if algorithm is CAKeyAlgorithm.RSA_3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ec.generate_private_key(ec.SECP256R1())


def create_ca(
    common_name: str = "Scalarium CA",
    algorithm: CAKeyAlgorithm = CAKeyAlgorithm.EC_P256,
    now: datetime | None = None,
) -> CertificateAuthority:
    """Create a new self-signed CA in memory (10 years)."""
    moment = _utc_now(now)
    key = _generate_ca_key(algorithm)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = _build_certificate(
        role=CertificateRole.CA,
        subject=name,
        issuer=name,
        public_key=key.public_key(),
        signing_key=key,
        authority_key_id=x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
        not_before=_truncate(moment - CLOCK_SKEW),
        not_after=_truncate(moment + CA_LIFETIME),
    )
    return CertificateAuthority(certificate=certificate, private_key=key)


def _is_issuer_key(key: PrivateKeyTypes) -> TypeGuard[CertificateIssuerPrivateKeyTypes]:
    return isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    )


def ca_from_pem(
    cert_pem: bytes, key_pem: bytes, password: bytes | None = None
) -> CertificateAuthority:
    """Build a CA from PEM bytes, checking it is a CA and that the key matches."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CAError("ca_unreadable", f"CA certificate is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CAError("ca_unreadable", f"CA key is not a usable PEM private key: {exc}") from exc
    if not _is_issuer_key(key):
        raise CAError("ca_key_unsupported", f"CA key type {type(key).__name__} cannot sign")
    if _public_key_pem(key.public_key()) != _public_key_pem(certificate.public_key()):
        raise CAError("ca_key_mismatch", "CA key does not belong to the CA certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        raise CAError("ca_not_a_ca", "certificate has no BasicConstraints ca=TRUE")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CAError("ca_not_a_ca", "CA certificate's key usage lacks keyCertSign")
    return CertificateAuthority(certificate=certificate, private_key=key)


def load_ca(cert_path: Path, key_path: Path, password: bytes | None = None) -> CertificateAuthority:
    """Load an existing CA (for example an operator's own) from its PEM files."""
    try:
        cert_pem = Path(cert_path).read_bytes()
        key_pem = Path(key_path).read_bytes()
    except OSError as exc:
        raise CAError("ca_unreadable", f"cannot read CA files: {exc}") from exc
    ca = ca_from_pem(cert_pem, key_pem, password)
    expires = ca.certificate.not_valid_after_utc
    if expires - datetime.now(UTC) < timedelta(days=365):
        log.warning("ca %s: expires on %s, plan a new CA", ca.fingerprint_sha256, expires)
    return ca


def load_or_create_ca(
    directory: Path,
    common_name: str = "Scalarium CA",
    algorithm: CAKeyAlgorithm = CAKeyAlgorithm.EC_P256,
) -> CertificateAuthority:
    """Load ca.pem + ca-key.pem from directory, creating both (key mode 0600) on first use."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if cert_path.exists() and key_path.exists():
        return load_ca(cert_path, key_path)
    _prepare_directory(directory)
    with _directory_lock(directory):
        # Another process may have created the CA while we waited for the lock.
        if cert_path.exists() and key_path.exists():
            return load_ca(cert_path, key_path)
        if cert_path.exists() or key_path.exists():
            raise CAError(
                "ca_incomplete",
                f"only one of {cert_path} and {key_path} exists; refusing to overwrite it",
            )
        ca = create_ca(common_name, algorithm)
        # The key goes first so that a certificate on disk always has its key.
        _write_file(key_path, _private_key_pem(ca.private_key), 0o600)
        _write_file(cert_path, ca_certificate_pem(ca), 0o644)
        os.chmod(directory, 0o700)
    log.info("ca %s: created in %s (%s)", ca.fingerprint_sha256, directory, algorithm.value)
    return ca


def ca_certificate_pem(ca: CertificateAuthority) -> bytes:
    """The CA certificate as PEM, to hand to nodes and clients."""
    return ca.certificate.public_bytes(serialization.Encoding.PEM)


# --- CSR checks and instance certificates -----------------------------------------------------


def _load_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    data = _as_bytes(csr_pem)
    if len(data) > MAX_CSR_PEM_BYTES:
        raise CSRRejected("csr_too_large", f"CSR is over {MAX_CSR_PEM_BYTES} bytes")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise CSRRejected("csr_malformed", "CSR is not a PEM certificate request")
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRRejected("csr_malformed", f"CSR cannot be parsed: {exc}") from exc


def _check_csr_signature(csr: x509.CertificateSigningRequest) -> None:
    try:
        algorithm = csr.signature_hash_algorithm
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise CSRRejected("csr_bad_signature", f"CSR signature cannot be checked: {exc}") from exc
    if not valid:
        raise CSRRejected("csr_bad_signature", "CSR signature does not match its public key")
    if not isinstance(algorithm, ACCEPTED_CSR_HASHES):
        name = algorithm.name if algorithm is not None else "none"
        raise CSRRejected("csr_bad_signature", f"CSR is signed with a weak hash ({name})")


def _check_csr_key(csr: x509.CertificateSigningRequest) -> None:
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise CSRRejected("csr_key_unsupported", f"CSR public key is unsupported: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        # Instance keys sign Chef-style (X-Ops-Sign) requests, which are RSA only.
        raise CSRRejected(
            "csr_key_unsupported", f"instance keys must be RSA, not {type(key).__name__}"
        )
    if key.key_size < MIN_RSA_BITS:
        raise CSRRejected(
            "csr_key_too_small", f"RSA key has {key.key_size} bits, at least {MIN_RSA_BITS} needed"
        )
    if key.key_size > MAX_RSA_BITS:
        raise CSRRejected(
            "csr_key_unsupported", f"RSA key has {key.key_size} bits, at most {MAX_RSA_BITS}"
        )


def _check_csr_subject(csr: x509.CertificateSigningRequest, instance_id: str) -> None:
    attributes = list(csr.subject)
    if (
        len(attributes) != 1
        or attributes[0].oid != NameOID.COMMON_NAME
        or attributes[0].value != instance_id
    ):
        raise CSRRejected(
            "csr_subject_mismatch",
            f"CSR subject must be exactly CN={instance_id}, got {csr.subject.rfc4514_string()!r}",
        )


def _check_csr_extensions(csr: x509.CertificateSigningRequest) -> None:
    # Requested extensions are never copied, but a CSR asking for CA powers is hostile or
    # badly broken, and the node should hear so rather than get a silently different cert.
    try:
        extensions = csr.extensions
    except ValueError as exc:
        raise CSRRejected("csr_malformed", f"CSR extensions cannot be parsed: {exc}") from exc
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CSRRejected("csr_requests_ca", "CSR requests BasicConstraints ca=TRUE")
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise CSRRejected("csr_requests_ca", "CSR requests keyCertSign or cRLSign usage")


def _checked_csr(csr_pem: bytes, instance_id: str) -> x509.CertificateSigningRequest:
    csr = _load_csr(csr_pem)
    _check_csr_signature(csr)
    _check_csr_key(csr)
    _check_csr_subject(csr, instance_id)
    _check_csr_extensions(csr)
    return csr


def check_csr(csr_pem: bytes, instance_id: str) -> None:
    """Apply every enrollment rule to a CSR; raises CSRRejected with the first failure."""
    _checked_csr(csr_pem, instance_id)


def _instance_name(instance_id: str) -> x509.Name:
    # RFC 5280 caps a CN at 64 characters; instance ids are ours, so a longer one is a bug.
    if not 1 <= len(instance_id) <= 64:
        raise ValueError(f"instance id must be 1..64 characters, got {len(instance_id)}")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, instance_id)])


def issue_instance_certificate(
    ca: CertificateAuthority,
    csr_pem: bytes,
    instance_id: str,
    lifetime_days: int = 365,
    now: datetime | None = None,
) -> IssuedCertificate:
    """Check a node's CSR and sign a clientAuth certificate whose CN is the instance id."""
    subject = _instance_name(instance_id)
    csr = _checked_csr(csr_pem, instance_id)
    not_before, not_after = _leaf_validity(ca, _utc_now(now), timedelta(days=lifetime_days))
    certificate = _build_certificate(
        role=CertificateRole.INSTANCE,
        subject=subject,
        issuer=ca.certificate.subject,
        public_key=csr.public_key(),
        signing_key=ca.private_key,
        authority_key_id=_authority_key_id(ca),
        not_before=not_before,
        not_after=not_after,
    )
    issued = IssuedCertificate(
        pem=certificate.public_bytes(serialization.Encoding.PEM),
        serial=certificate.serial_number,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
    )
    log.info(
        "instance %s: certificate %s issued, valid until %s",
        instance_id,
        issued.serial_hex,
        issued.not_after,
    )
    return issued


# --- verification ----------------------------------------------------------------------------


def _load_certificate(cert_pem: bytes | str) -> x509.Certificate:
    data = _as_bytes(cert_pem)
    if len(data) > MAX_CERT_PEM_BYTES:
        raise CertificateRejected("cert_malformed", f"certificate is over {len(data)} bytes")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateRejected("cert_malformed", f"certificate cannot be parsed: {exc}") from exc


def verify_instance_certificate(
    ca: CertificateAuthority, cert_pem: bytes, now: datetime | None = None
) -> VerifiedCertificate:
    """Check that a certificate was issued by this CA to an instance and is valid now."""
    certificate = _load_certificate(cert_pem)
    try:
        # Checks the issuer name against the CA subject, then the signature with the CA key.
        certificate.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise CertificateRejected(
            "cert_not_issued_by_ca", "certificate was not issued by this CA"
        ) from exc
    moment = _utc_now(now)
    if moment < certificate.not_valid_before_utc:
        raise CertificateRejected(
            "cert_not_yet_valid", f"certificate is valid from {certificate.not_valid_before_utc}"
        )
    if moment > certificate.not_valid_after_utc:
        raise CertificateRejected(
            "cert_expired", f"certificate expired on {certificate.not_valid_after_utc}"
        )
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise CertificateRejected(
            "cert_wrong_usage", "certificate is not an instance (clientAuth) certificate"
        ) from exc
    except ValueError as exc:
        raise CertificateRejected(
            "cert_malformed", f"certificate extensions cannot be parsed: {exc}"
        ) from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages or constraints.ca:
        raise CertificateRejected(
            "cert_wrong_usage", "certificate is not an instance (clientAuth) certificate"
        )
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise CertificateRejected("cert_malformed", "certificate must carry exactly one CN")
    return VerifiedCertificate(
        instance_id=names[0].value,
        serial=certificate.serial_number,
        public_key_pem=_public_key_pem(certificate.public_key()),
        not_after=certificate.not_valid_after_utc,
        fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
    )


def certificate_serial(cert_pem: bytes) -> str:
    """The certificate's serial as lowercase hex (the form revocation is stored under)."""
    return format(_load_certificate(cert_pem).serial_number, "x")


def public_key_pem(cert_pem: bytes) -> bytes:
    """The certificate's public key as SubjectPublicKeyInfo PEM."""
    return _public_key_pem(_load_certificate(cert_pem).public_key())


# --- server TLS --------------------------------------------------------------------------------


# Dot-separated labels of letters, digits, "_" and inner hyphens; a leading "*." is allowed.
_DNS_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"(\*\.)?({_DNS_LABEL}\.)*{_DNS_LABEL}")


def _general_name(raw: str) -> x509.GeneralName:
    host = raw.strip().strip("[]").lower()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        dns = host.encode("idna").decode("ascii")
    except UnicodeError:
        dns = ""
    if not dns or len(dns) > 253 or not _DNS_NAME.fullmatch(dns):
        raise CAError("hostname_invalid", f"{raw!r} is neither a hostname nor an IP address")
    return x509.DNSName(dns)


def _subject_alternative_names(hostnames: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for raw in hostnames:
        name = _general_name(raw)
        if name not in names:
            names.append(name)
    if not names:
        raise CAError("hostname_invalid", "a server certificate needs at least one hostname")
    return names


def issue_server_certificate(
    ca: CertificateAuthority,
    hostnames: list[str],
    lifetime_days: int = 365,
    now: datetime | None = None,
) -> tuple[bytes, bytes]:
    """Make a new EC P-256 key and a serverAuth certificate for the hostnames/IPs; (cert, key)."""
    names = _subject_alternative_names(hostnames)
    key = ec.generate_private_key(ec.SECP256R1())
    first = names[0].value
    # The CN is informational only (clients match SANs); it is capped at 64 characters.
    common_name = str(first)[:64]
    not_before, not_after = _leaf_validity(ca, _utc_now(now), timedelta(days=lifetime_days))
    certificate = _build_certificate(
        role=CertificateRole.SERVER,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
        issuer=ca.certificate.subject,
        public_key=key.public_key(),
        signing_key=ca.private_key,
        authority_key_id=_authority_key_id(ca),
        not_before=not_before,
        not_after=not_after,
        extra=((x509.SubjectAlternativeName(names), False),),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), _private_key_pem(key)


def _server_material_is_current(
    ca: CertificateAuthority, cert_path: Path, key_path: Path, hostnames: list[str], now: datetime
) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        certificate.verify_directly_issued_by(ca.certificate)
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    except x509.ExtensionNotFound:
        return False
    if not _is_issuer_key(key):
        return False
    if _public_key_pem(key.public_key()) != _public_key_pem(certificate.public_key()):
        return False
    if set(sans) != set(_subject_alternative_names(hostnames)):
        return False
    return certificate.not_valid_after_utc - now > SERVER_RENEW_BEFORE


def load_or_create_server_tls(
    directory: Path,
    ca: CertificateAuthority,
    hostnames: list[str],
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Ensure server.pem/server-key.pem are current for the hostnames; return their paths.

    Reissues when either file is missing or unreadable, the hostnames changed, the CA changed,
    or the certificate expires within 30 days.
    """
    directory = Path(directory)
    cert_path, key_path = directory / SERVER_CERT_FILE, directory / SERVER_KEY_FILE
    moment = _utc_now(now)
    if _server_material_is_current(ca, cert_path, key_path, hostnames, moment):
        return cert_path, key_path
    _prepare_directory(directory)
    with _directory_lock(directory):
        if _server_material_is_current(ca, cert_path, key_path, hostnames, moment):
            return cert_path, key_path
        cert_pem, key_pem = issue_server_certificate(ca, hostnames, now=moment)
        _write_file(key_path, key_pem, 0o600)
        _write_file(cert_path, cert_pem, 0o644)
    log.info("server tls: certificate issued for %s in %s", ", ".join(hostnames), directory)
    return cert_path, key_path


# --- the node's side (tests and benchmarks; real nodes use the openssl command) ------------------


def generate_private_key_pem(bits: int = 2048) -> bytes:
    """Generate an RSA private key as PKCS#8 PEM, as the node's openssl would."""
    return _private_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def build_csr_pem(key_pem: bytes, common_name: str) -> bytes:
    """Build a CSR with subject CN=common_name signed by the given private key."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not _is_issuer_key(key):
        raise ValueError(f"cannot sign a CSR with {type(key).__name__}")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, _signature_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)
