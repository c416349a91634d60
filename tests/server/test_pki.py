"""Tests for server.pki: the CA, CSR checks, instance and server certificates, verification."""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server import pki

INSTANCE_ID = "i-0123456789abcdef0"
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command line tool missing")


# --- fixtures and builders -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki") / "certs"


@pytest.fixture(scope="module")
def ca(ca_dir: Path) -> pki.CertificateAuthority:
    return pki.load_or_create_ca(ca_dir)


@pytest.fixture(scope="module")
def other_ca() -> pki.CertificateAuthority:
    # Same subject name as the real CA: only the signature check can tell them apart.
    return pki.create_ca("Scalarium CA")


@pytest.fixture(scope="module")
def node_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def issued(ca: pki.CertificateAuthority, node_key: rsa.RSAPrivateKey) -> pki.IssuedCertificate:
    return pki.issue_instance_certificate(ca, _csr(node_key), INSTANCE_ID)


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _csr(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    subject: x509.Name | None = None,
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
    algorithm: hashes.SHA256 | hashes.SHA384 | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject if subject is not None else _name((NameOID.COMMON_NAME, INSTANCE_ID))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    csr = builder.sign(key, algorithm or hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _pem(der: bytes, label: str) -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode()]
    )


def _corrupt_signature(csr_pem: bytes) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    # The signature is the last field of the DER; flip a byte inside it.
    start = bytes(der).rfind(csr.signature)
    assert start > 0
    der[start + len(csr.signature) // 2] ^= 0xFF
    return _pem(bytes(der), "CERTIFICATE REQUEST")


def _key_usage(**flags: bool) -> x509.KeyUsage:
    fields = (
        "digital_signature content_commitment key_encipherment data_encipherment "
        "key_agreement key_cert_sign crl_sign encipher_only decipher_only"
    ).split()
    return x509.KeyUsage(**{field: flags.get(field, False) for field in fields})


def _small_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _run_openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=30)


# --- the CA on disk --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(pki.CAKeyAlgorithm))
def test_ca_is_created_once_then_reloaded_with_the_same_fingerprint(
    tmp_path: Path, algorithm: pki.CAKeyAlgorithm
) -> None:
    directory = tmp_path / "certs"
    created = pki.load_or_create_ca(directory, algorithm=algorithm)
    reloaded = pki.load_or_create_ca(directory, algorithm=algorithm)

    assert reloaded.fingerprint_sha256 == created.fingerprint_sha256
    assert stat.S_IMODE((directory / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert (directory / "ca.pem").read_bytes() == pki.ca_certificate_pem(created)


def test_ca_key_is_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        pki.load_or_create_ca(tmp_path / "certs")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "certs" / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o700


def test_ca_certificate_has_the_ca_profile_and_ten_years(ca: pki.CertificateAuthority) -> None:
    certificate = x509.load_pem_x509_certificate(pki.ca_certificate_pem(ca))
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value

    assert constraints.critical and constraints.value.ca
    assert usage.key_cert_sign and usage.crl_sign
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert timedelta(days=3649) < lifetime < timedelta(days=3651)


@pytest.mark.parametrize("leftover", ["ca.pem", "ca-key.pem"])
def test_half_a_ca_is_refused_rather_than_overwritten(
    tmp_path: Path, ca: pki.CertificateAuthority, leftover: str
) -> None:
    (tmp_path / leftover).write_bytes(pki.ca_certificate_pem(ca))
    with pytest.raises(pki.CAError) as caught:
        pki.load_or_create_ca(tmp_path)
    assert caught.value.code == "ca_incomplete"
    assert (tmp_path / leftover).read_bytes() == pki.ca_certificate_pem(ca)


def test_operator_ca_loads_from_its_own_paths(
    tmp_path: Path, ca_dir: Path, ca: pki.CertificateAuthority
) -> None:
    loaded = pki.load_ca(ca_dir / "ca.pem", ca_dir / "ca-key.pem")
    assert loaded.fingerprint_sha256 == ca.fingerprint_sha256


def test_operator_ca_with_a_foreign_key_is_refused(
    tmp_path: Path, ca_dir: Path, other_ca: pki.CertificateAuthority
) -> None:
    foreign_key = other_ca.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "key.pem").write_bytes(foreign_key)
    with pytest.raises(pki.CAError) as caught:
        pki.load_ca(ca_dir / "ca.pem", tmp_path / "key.pem")
    assert caught.value.code == "ca_key_mismatch"


def test_a_leaf_certificate_cannot_serve_as_a_ca(
    tmp_path: Path, ca: pki.CertificateAuthority
) -> None:
    cert_pem, key_pem = pki.issue_server_certificate(ca, ["localhost"])
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    with pytest.raises(pki.CAError) as caught:
        pki.load_ca(tmp_path / "c.pem", tmp_path / "k.pem")
    assert caught.value.code == "ca_not_a_ca"


# --- issuing instance certificates -----------------------------------------------------------


def test_issued_certificate_verifies_and_names_the_instance_and_its_key(
    ca: pki.CertificateAuthority, node_key: rsa.RSAPrivateKey, issued: pki.IssuedCertificate
) -> None:
    verified = pki.verify_instance_certificate(ca, issued.pem)
    node_public = node_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    assert verified.instance_id == INSTANCE_ID
    assert verified.serial == issued.serial
    assert verified.public_key_pem == node_public == pki.public_key_pem(issued.pem)
    assert pki.certificate_serial(issued.pem) == issued.serial_hex == format(issued.serial, "x")
    assert verified.fingerprint_sha256 == issued.fingerprint_sha256
    assert len(issued.fingerprint_sha256) == 64


def test_instance_certificate_carries_the_instance_profile_only(
    ca: pki.CertificateAuthority, issued: pki.IssuedCertificate
) -> None:
    certificate = x509.load_pem_x509_certificate(issued.pem)
    extensions = certificate.extensions
    constraints = extensions.get_extension_for_class(x509.BasicConstraints)
    usage = extensions.get_extension_for_class(x509.KeyUsage).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value

    assert certificate.subject == _name((NameOID.COMMON_NAME, INSTANCE_ID))
    assert certificate.issuer == ca.certificate.subject
    assert constraints.critical and not constraints.value.ca
    assert usage.digital_signature and usage.key_encipherment
    assert not (usage.key_cert_sign or usage.crl_sign or usage.content_commitment)
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert aki.key_identifier == ca_ski.digest
    extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert certificate.not_valid_before_utc == issued.not_before
    assert certificate.not_valid_after_utc == issued.not_after
    assert issued.not_after.tzinfo is not None


def test_extensions_requested_in_a_csr_are_never_copied(
    ca: pki.CertificateAuthority, node_key: rsa.RSAPrivateKey
) -> None:
    csr = _csr(
        node_key,
        extensions=(
            (x509.SubjectAlternativeName([x509.DNSName("bank.example")]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ),
    )
    certificate = x509.load_pem_x509_certificate(
        pki.issue_instance_certificate(ca, csr, INSTANCE_ID).pem
    )
    with pytest.raises(x509.ExtensionNotFound):
        certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_every_certificate_gets_a_fresh_random_serial(
    ca: pki.CertificateAuthority, node_key: rsa.RSAPrivateKey
) -> None:
    csr = _csr(node_key)
    serials = {pki.issue_instance_certificate(ca, csr, INSTANCE_ID).serial for _ in range(5)}
    assert len(serials) == 5
    assert all(serial.bit_length() > 64 for serial in serials)


def test_lifetime_is_honoured_and_never_outlives_the_ca(
    ca: pki.CertificateAuthority, node_key: rsa.RSAPrivateKey
) -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    short = pki.issue_instance_certificate(ca, _csr(node_key), INSTANCE_ID, 30, now=now)
    huge = pki.issue_instance_certificate(ca, _csr(node_key), INSTANCE_ID, 100_000)

    assert short.not_after == now + timedelta(days=30)
    assert short.not_before <= now
    assert huge.not_after == ca.certificate.not_valid_after_utc


def test_naive_times_are_refused(ca: pki.CertificateAuthority, node_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError):
        pki.issue_instance_certificate(ca, _csr(node_key), INSTANCE_ID, now=datetime(2030, 1, 1))


HOSTILE_CSRS: list[tuple[str, Callable[[rsa.RSAPrivateKey], bytes | str], str]] = [
    ("garbage text", lambda key: b"hello, I am a certificate request", "csr_malformed"),
    ("empty", lambda key: b"", "csr_malformed"),
    ("text string garbage", lambda key: "not pem at all", "csr_malformed"),
    (
        "pem header with a garbage body",
        lambda key: _pem(os.urandom(300), "CERTIFICATE REQUEST"),
        "csr_malformed",
    ),
    ("20 KiB pem", lambda key: _pem(os.urandom(20 * 1024), "CERTIFICATE REQUEST"), "csr_too_large"),
    (
        "20 KiB of padding around a valid csr",
        lambda key: _csr(key) + b"\n" * (20 * 1024),
        "csr_too_large",
    ),
    ("corrupted signature", lambda key: _corrupt_signature(_csr(key)), "csr_bad_signature"),
    ("1024-bit rsa key", lambda key: _csr(_small_key()), "csr_key_too_small"),
    (
        "ec p-256 key",
        lambda key: _csr(ec.generate_private_key(ec.SECP256R1())),
        "csr_key_unsupported",
    ),
    (
        "wrong common name",
        lambda key: _csr(key, _name((NameOID.COMMON_NAME, "i-someoneelse"))),
        "csr_subject_mismatch",
    ),
    (
        "common name differing in case",
        lambda key: _csr(key, _name((NameOID.COMMON_NAME, INSTANCE_ID.upper()))),
        "csr_subject_mismatch",
    ),
    (
        "extra organisation",
        lambda key: _csr(
            key, _name((NameOID.COMMON_NAME, INSTANCE_ID), (NameOID.ORGANIZATION_NAME, "Evil"))
        ),
        "csr_subject_mismatch",
    ),
    (
        "common name twice",
        lambda key: _csr(
            key, _name((NameOID.COMMON_NAME, INSTANCE_ID), (NameOID.COMMON_NAME, "admin"))
        ),
        "csr_subject_mismatch",
    ),
    (
        "empty subject",
        lambda key: _csr(key, x509.Name([])),
        "csr_subject_mismatch",
    ),
    (
        "basic constraints ca=true",
        lambda key: _csr(
            key, extensions=((x509.BasicConstraints(ca=True, path_length=None), True),)
        ),
        "csr_requests_ca",
    ),
    (
        "key usage keyCertSign",
        lambda key: _csr(
            key, extensions=((_key_usage(digital_signature=True, key_cert_sign=True), True),)
        ),
        "csr_requests_ca",
    ),
]


@pytest.mark.parametrize(
    ("make_csr", "code"),
    [pytest.param(make, code, id=name) for name, make, code in HOSTILE_CSRS],
)
def test_hostile_csr_is_refused_with_its_code(
    ca: pki.CertificateAuthority,
    node_key: rsa.RSAPrivateKey,
    make_csr: Callable[[rsa.RSAPrivateKey], bytes],
    code: str,
) -> None:
    csr = make_csr(node_key)
    with pytest.raises(pki.CSRRejected) as caught:
        pki.issue_instance_certificate(ca, csr, INSTANCE_ID)
    assert caught.value.code == code
    assert caught.value.status == 400
    with pytest.raises(pki.PKIError):
        pki.check_csr(csr, INSTANCE_ID)


@needs_openssl
def test_csr_made_by_the_openssl_command_is_accepted(
    tmp_path: Path, ca: pki.CertificateAuthority
) -> None:
    # This is how install.sh builds the CSR on a real node.
    result = _run_openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes",
        "-keyout", str(tmp_path / "node.key"), "-subj", f"/CN={INSTANCE_ID}",
        "-out", str(tmp_path / "node.csr"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    issued = pki.issue_instance_certificate(ca, (tmp_path / "node.csr").read_bytes(), INSTANCE_ID)
    assert pki.verify_instance_certificate(ca, issued.pem).instance_id == INSTANCE_ID


@needs_openssl
def test_csr_signed_with_sha1_is_refused(
    tmp_path: Path, ca: pki.CertificateAuthority, node_key: rsa.RSAPrivateKey
) -> None:
    # cryptography refuses to build SHA-1 CSRs, so old openssl habits are reproduced here.
    key_file = tmp_path / "node.key"
    key_file.write_bytes(
        node_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = _run_openssl(
        "req", "-new", "-key", str(key_file), "-subj", f"/CN={INSTANCE_ID}", "-sha1",
        "-out", str(tmp_path / "node.csr"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with pytest.raises(pki.CSRRejected) as caught:
        pki.issue_instance_certificate(ca, (tmp_path / "node.csr").read_bytes(), INSTANCE_ID)
    assert caught.value.code == "csr_bad_signature"


# --- verifying instance certificates ---------------------------------------------------------


def test_certificate_from_another_ca_with_the_same_name_is_refused(
    ca: pki.CertificateAuthority,
    other_ca: pki.CertificateAuthority,
    node_key: rsa.RSAPrivateKey,
) -> None:
    foreign = pki.issue_instance_certificate(other_ca, _csr(node_key), INSTANCE_ID)
    with pytest.raises(pki.CertificateRejected) as caught:
        pki.verify_instance_certificate(ca, foreign.pem)
    assert caught.value.code == "cert_not_issued_by_ca"
    assert caught.value.status == 401


def test_certificate_from_a_differently_named_rsa_ca_is_refused(
    ca: pki.CertificateAuthority, node_key: rsa.RSAPrivateKey
) -> None:
    stranger = pki.create_ca("Stranger CA", algorithm=pki.CAKeyAlgorithm.RSA_3072)
    foreign = pki.issue_instance_certificate(stranger, _csr(node_key), INSTANCE_ID)
    with pytest.raises(pki.CertificateRejected) as caught:
        pki.verify_instance_certificate(ca, foreign.pem)
    assert caught.value.code == "cert_not_issued_by_ca"
    assert pki.verify_instance_certificate(stranger, foreign.pem).instance_id == INSTANCE_ID


@pytest.mark.parametrize(
    ("moment", "code"),
    [
        pytest.param(lambda c: c.not_after + timedelta(seconds=1), "cert_expired", id="expired"),
        pytest.param(lambda c: c.not_after + timedelta(days=400), "cert_expired", id="long gone"),
        pytest.param(
            lambda c: c.not_before - timedelta(seconds=1), "cert_not_yet_valid", id="too early"
        ),
        pytest.param(lambda c: c.not_after, None, id="last second"),
        pytest.param(lambda c: c.not_before, None, id="first second"),
    ],
)
def test_validity_window_is_enforced(
    ca: pki.CertificateAuthority,
    issued: pki.IssuedCertificate,
    moment: Callable[[pki.IssuedCertificate], datetime],
    code: str | None,
) -> None:
    if code is None:
        pki.verify_instance_certificate(ca, issued.pem, now=moment(issued))
        return
    with pytest.raises(pki.CertificateRejected) as caught:
        pki.verify_instance_certificate(ca, issued.pem, now=moment(issued))
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("make_cert", "code"),
    [
        pytest.param(lambda ca: pki.ca_certificate_pem(ca), "cert_wrong_usage", id="the ca itself"),
        pytest.param(
            lambda ca: pki.issue_server_certificate(ca, ["localhost"])[0],
            "cert_wrong_usage",
            id="server certificate",
        ),
        pytest.param(lambda ca: b"garbage", "cert_malformed", id="garbage"),
        pytest.param(lambda ca: _pem(os.urandom(200), "CERTIFICATE"), "cert_malformed", id="junk"),
        pytest.param(lambda ca: b"A" * 20_000, "cert_malformed", id="oversized"),
    ],
)
def test_certificates_that_are_not_instance_certificates_are_refused(
    ca: pki.CertificateAuthority,
    make_cert: Callable[[pki.CertificateAuthority], bytes],
    code: str,
) -> None:
    with pytest.raises(pki.CertificateRejected) as caught:
        pki.verify_instance_certificate(ca, make_cert(ca))
    assert caught.value.code == code


@needs_openssl
def test_openssl_verifies_that_an_instance_certificate_chains_to_the_ca(
    tmp_path: Path,
    ca: pki.CertificateAuthority,
    other_ca: pki.CertificateAuthority,
    issued: pki.IssuedCertificate,
) -> None:
    (tmp_path / "ca.pem").write_bytes(pki.ca_certificate_pem(ca))
    (tmp_path / "other.pem").write_bytes(pki.ca_certificate_pem(other_ca))
    (tmp_path / "instance.pem").write_bytes(issued.pem)

    good = _run_openssl(
        "verify", "-x509_strict", "-purpose", "sslclient",
        "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "instance.pem"),
    )  # fmt: skip
    wrong_purpose = _run_openssl(
        "verify", "-purpose", "sslserver",
        "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "instance.pem"),
    )  # fmt: skip
    wrong_ca = _run_openssl(
        "verify", "-CAfile", str(tmp_path / "other.pem"), str(tmp_path / "instance.pem")
    )

    assert good.returncode == 0, good.stdout + good.stderr
    assert wrong_purpose.returncode != 0
    assert wrong_ca.returncode != 0


# --- server TLS ------------------------------------------------------------------------------


def test_server_certificate_has_dns_and_ip_sans_and_server_auth(
    ca: pki.CertificateAuthority,
) -> None:
    cert_pem, key_pem = pki.issue_server_certificate(
        ca, ["Scalarium.Example.com", "127.0.0.1", "[::1]", "localhost", "localhost"]
    )
    certificate = x509.load_pem_x509_certificate(cert_pem)
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    key = serialization.load_pem_private_key(key_pem, password=None)

    assert sans.get_values_for_type(x509.DNSName) == ["scalarium.example.com", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not constraints.ca
    assert key.public_key() == certificate.public_key()
    certificate.verify_directly_issued_by(ca.certificate)


@pytest.mark.parametrize(
    "hostnames",
    [[], ["  "], ["bad host\u0000"], ["-leading.example"], ["a..b"], ["x" * 64 + ".example"]],
)
def test_server_certificate_needs_real_hostnames(
    ca: pki.CertificateAuthority, hostnames: list[str]
) -> None:
    with pytest.raises(pki.PKIError) as caught:
        pki.issue_server_certificate(ca, hostnames)
    assert caught.value.code == "hostname_invalid"


def test_server_tls_is_kept_while_current_and_reissued_when_it_must_be(
    tmp_path: Path, ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority
) -> None:
    def fingerprint() -> bytes:
        return (tmp_path / "server.pem").read_bytes()

    cert_path, key_path = pki.load_or_create_server_tls(tmp_path, ca, ["localhost", "127.0.0.1"])
    first = fingerprint()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert cert_path == tmp_path / "server.pem"

    pki.load_or_create_server_tls(tmp_path, ca, ["127.0.0.1", "localhost"])
    assert fingerprint() == first, "same hostnames in another order must not reissue"

    in_300_days = datetime.now(UTC) + timedelta(days=300)
    pki.load_or_create_server_tls(tmp_path, ca, ["localhost", "127.0.0.1"], now=in_300_days)
    assert fingerprint() == first, "65 days left is not yet time to renew"

    in_340_days = datetime.now(UTC) + timedelta(days=340)
    pki.load_or_create_server_tls(tmp_path, ca, ["localhost", "127.0.0.1"], now=in_340_days)
    renewed = fingerprint()
    assert renewed != first, "a certificate expiring within 30 days must be renewed"

    pki.load_or_create_server_tls(tmp_path, ca, ["localhost", "127.0.0.1", "scalarium.test"])
    widened = fingerprint()
    assert widened != renewed, "a new hostname must reissue"

    pki.load_or_create_server_tls(tmp_path, other_ca, ["localhost", "127.0.0.1", "scalarium.test"])
    assert fingerprint() != widened, "a new CA must reissue"

    key_path.write_bytes(b"lost")
    pki.load_or_create_server_tls(tmp_path, other_ca, ["localhost", "127.0.0.1", "scalarium.test"])
    serialization.load_pem_private_key(key_path.read_bytes(), password=None)


@needs_openssl
def test_openssl_accepts_the_server_certificate_for_its_names(
    tmp_path: Path, ca: pki.CertificateAuthority
) -> None:
    cert_path, _ = pki.load_or_create_server_tls(tmp_path, ca, ["scalarium.test", "10.0.0.7"])
    (tmp_path / "ca.pem").write_bytes(pki.ca_certificate_pem(ca))
    common = [
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-CAfile",
        str(tmp_path / "ca.pem"),
    ]

    by_name = _run_openssl(*common, "-verify_hostname", "scalarium.test", str(cert_path))
    by_ip = _run_openssl(*common, "-verify_ip", "10.0.0.7", str(cert_path))
    wrong_name = _run_openssl(*common, "-verify_hostname", "evil.test", str(cert_path))

    assert by_name.returncode == 0, by_name.stdout + by_name.stderr
    assert by_ip.returncode == 0, by_ip.stdout + by_ip.stderr
    assert wrong_name.returncode != 0


def test_mutual_tls_over_loopback_with_server_and_instance_certificates(
    tmp_path: Path,
    ca: pki.CertificateAuthority,
    node_key: rsa.RSAPrivateKey,
    issued: pki.IssuedCertificate,
) -> None:
    server_cert, server_key = pki.load_or_create_server_tls(tmp_path, ca, ["127.0.0.1"])
    (tmp_path / "ca.pem").write_bytes(pki.ca_certificate_pem(ca))
    (tmp_path / "node.pem").write_bytes(issued.pem)
    (tmp_path / "node.key").write_bytes(
        node_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server_cert, server_key)
    server_context.load_verify_locations(tmp_path / "ca.pem")
    server_context.verify_mode = ssl.CERT_REQUIRED
    client_context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client_context.load_cert_chain(tmp_path / "node.pem", tmp_path / "node.key")

    seen: dict[str, bytes] = {}
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        connection, _ = listener.accept()
        with server_context.wrap_socket(connection, server_side=True) as tls:
            peer = tls.getpeercert(binary_form=True)
            assert peer is not None
            seen["peer"] = peer
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(2) == b"ok"
        thread.join(timeout=5)
    finally:
        listener.close()

    peer_pem = x509.load_der_x509_certificate(seen["peer"]).public_bytes(serialization.Encoding.PEM)
    assert pki.verify_instance_certificate(ca, peer_pem).instance_id == INSTANCE_ID


# --- the node's side helpers -----------------------------------------------------------------


def test_node_helpers_build_a_csr_the_ca_accepts(ca: pki.CertificateAuthority) -> None:
    key_pem = pki.generate_private_key_pem()
    csr_pem = pki.build_csr_pem(key_pem, "i-helper")
    issued = pki.issue_instance_certificate(ca, csr_pem, "i-helper")
    assert pki.verify_instance_certificate(ca, issued.pem).instance_id == "i-helper"
