"""Chef request signing: mixlib-authentication known answers, round trips and hostile requests."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from chef_bridge import auth

# --- known answers, ported from mixlib-authentication ----------------------------------------
# Source: chef/mixlib-authentication spec/mixlib/authentication/mixlib_authentication_spec.rb
# (Apache-2.0). The key pair, request and expected headers are the gem's own fixtures; matching
# them proves byte compatibility with every Ruby Chef client and server.

SPEC_PRIVATE_KEY = b"""-----BEGIN RSA PRIVATE KEY-----
MIIEpAIBAAKCAQEA0ueqo76MXuP6XqZBILFziH/9AI7C6PaN5W0dSvkr9yInyGHS
z/IR1+4tqvP2qlfKVKI4CP6BFH251Ft9qMUBuAsnlAVQ1z0exDtIFFOyQCdR7iXm
jBIWMSS4buBwRQXwDK7id1OxtU23qVJv+xwEV0IzaaSJmaGLIbvRBD+qatfUuQJB
MU/04DdJIwvLtZBYdC2219m5dUBQaa4bimL+YN9EcsDzD9h9UxQo5ReK7b3cNMzJ
BKJWLzFBcJuePMzAnLFktr/RufX4wpXe6XJxoVPaHo72GorLkwnQ0HYMTY8rehT4
mDi1FI969LHCFFaFHSAaRnwdXaQkJmSfcxzCYQIDAQABAoIBAQCW3I4sKN5B9jOe
xq/pkeWBq4OvhW8Ys1yW0zFT8t6nHbB1XrwscQygd8gE9BPqj3e0iIEqtdphbPmj
VHqTYbC0FI6QDClifV7noTwTBjeIOlgZ0NSUN0/WgVzIOxUz2mZ2vBZUovKILPqG
TOi7J7RXMoySMdcXpP1f+PgvYNcnKsT72UcWaSXEV8/zo+Zm/qdGPVWwJonri5Mp
DVm5EQSENBiRyt028rU6ElXORNmoQpVjDVqZ1gipzXkifdjGyENw2rt4V/iKYD7V
5iqXOsvP6Cemf4gbrjunAgDG08S00kiUgvVWcdXW+dlsR2nCvH4DOEe3AYYh/aH8
DxEE7FbtAoGBAPcNO8fJ56mNw0ow4Qg38C+Zss/afhBOCfX4O/SZKv/roRn5+gRM
KRJYSVXNnsjPI1plzqR4OCyOrjAhtuvL4a0DinDzf1+fiztyNohwYsW1vYmqn3ti
EN0GhSgE7ppZjqvLQ3f3LUTxynhA0U+k9wflb4irIlViTUlCsOPkrNJDAoGBANqL
Q+vvuGSsmRLU/Cenjy+Mjj6+QENg51dz34o8JKuVKIPKU8pNnyeLa5fat0qD2MHm
OB9opeQOcw0dStodxr6DB3wi83bpjeU6BWUGITNiWEaZEBrQ0aiqNJJKrrHm8fAZ
9o4l4oHc4hI0kYVYYDuxtKuVJrzZiEapTwoOcYiLAoGBAI/EWbeIHZIj9zOjgjEA
LHvm25HtulLOtyk2jd1njQhlHNk7CW2azIPqcLLH99EwCYi/miNH+pijZ2aHGCXb
/bZrSxM0ADmrZKDxdB6uGCyp+GS2sBxjEyEsfCyvwhJ8b3Q100tqwiNO+d5FCglp
HICx2dgUjuRVUliBwOK93nx1AoGAUI8RhIEjOYkeDAESyhNMBr0LGjnLOosX+/as
qiotYkpjWuFULbibOFp+WMW41vDvD9qrSXir3fstkeIAW5KqVkO6mJnRoT3Knnra
zjiKOITCAZQeiaP8BO5o3pxE9TMqb9VCO3ffnPstIoTaN4syPg7tiGo8k1SklVeH
2S8lzq0CgYAKG2fljIYWQvGH628rp4ZcXS4hWmYohOxsnl1YrszbJ+hzR+IQOhGl
YlkUQYXhy9JixmUUKtH+NXkKX7Lyc8XYw5ETr7JBT3ifs+G7HruDjVG78EJVojbd
8uLA+DdQm5mg4vd1GTiSK65q/3EeoBlUaVor3HhLFki+i9qpT8CBsg==
-----END RSA PRIVATE KEY-----
"""

SPEC_PUBLIC_KEY = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA0ueqo76MXuP6XqZBILFz
iH/9AI7C6PaN5W0dSvkr9yInyGHSz/IR1+4tqvP2qlfKVKI4CP6BFH251Ft9qMUB
uAsnlAVQ1z0exDtIFFOyQCdR7iXmjBIWMSS4buBwRQXwDK7id1OxtU23qVJv+xwE
V0IzaaSJmaGLIbvRBD+qatfUuQJBMU/04DdJIwvLtZBYdC2219m5dUBQaa4bimL+
YN9EcsDzD9h9UxQo5ReK7b3cNMzJBKJWLzFBcJuePMzAnLFktr/RufX4wpXe6XJx
oVPaHo72GorLkwnQ0HYMTY8rehT4mDi1FI969LHCFFaFHSAaRnwdXaQkJmSfcxzC
YQIDAQAB
-----END PUBLIC KEY-----
"""

SPEC_USER_ID = "spec-user"
SPEC_BODY = b"Spec Body"
SPEC_PATH = "/organizations/clownco"
SPEC_TIMESTAMP = "2009-01-01T12:00:00Z"
SPEC_NOW = datetime(2009, 1, 1, 12, 0, 0, tzinfo=UTC)
SPEC_SHA1_BODY = "DFteJZPVv6WKdQmMqZUQUumUyRs="
SPEC_SHA256_BODY = "hDlKNZhIhgso3Fs0S0pZwJ0xyBWtR1RBaeHs1DrzOho="
SPEC_HASHED_PATH = "YtBWDn1blGGuFIuKksdwXzHU9oE="
# The spec derives this one the same way: Base64.encode64(Digest::SHA1.digest(USER_ID)).chomp
SPEC_DIGESTED_USER_ID = base64.b64encode(hashlib.sha1(SPEC_USER_ID.encode()).digest()).decode()

SPEC_CANONICAL = {
    "1.0": "Method:POST\n"
    f"Hashed Path:{SPEC_HASHED_PATH}\n"
    f"X-Ops-Content-Hash:{SPEC_SHA1_BODY}\n"
    f"X-Ops-Timestamp:{SPEC_TIMESTAMP}\n"
    f"X-Ops-UserId:{SPEC_USER_ID}",
    "1.1": "Method:POST\n"
    f"Hashed Path:{SPEC_HASHED_PATH}\n"
    f"X-Ops-Content-Hash:{SPEC_SHA1_BODY}\n"
    f"X-Ops-Timestamp:{SPEC_TIMESTAMP}\n"
    f"X-Ops-UserId:{SPEC_DIGESTED_USER_ID}",
    "1.3": "Method:POST\n"
    f"Path:{SPEC_PATH}\n"
    f"X-Ops-Content-Hash:{SPEC_SHA256_BODY}\n"
    "X-Ops-Sign:version=1.3\n"
    f"X-Ops-Timestamp:{SPEC_TIMESTAMP}\n"
    f"X-Ops-UserId:{SPEC_USER_ID}\n"
    "X-Ops-Server-API-Version:1",
}

SPEC_AUTHORIZATION_LINES = {
    "1.0": [
        "jVHrNniWzpbez/eGWjFnO6lINRIuKOg40ZTIQudcFe47Z9e/HvrszfVXlKG4",
        "NMzYZgyooSvU85qkIUmKuCqgG2AIlvYa2Q/2ctrMhoaHhLOCWWoqYNMaEqPc",
        "3tKHE+CfvP+WuPdWk4jv4wpIkAz6ZLxToxcGhXmZbXpk56YTmqgBW2cbbw4O",
        "IWPZDHSiPcw//AYNgW1CCDptt+UFuaFYbtqZegcBd2n/jzcWODA7zL4KWEUy",
        "9q4rlh/+1tBReg60QdsmDRsw/cdO1GZrKtuCwbuD4+nbRdVBKv72rqHX9cu0",
        "utju9jzczCyB+sSAQWrxSsXB/b8vV2qs0l4VD2ML+w==",
    ],
    "1.1": [
        "UfZD9dRz6rFu6LbP5Mo1oNHcWYxpNIcUfFCffJS1FQa0GtfU/vkt3/O5HuCM",
        "1wIFl/U0f5faH9EWpXWY5NwKR031Myxcabw4t4ZLO69CIh/3qx1XnjcZvt2w",
        "c2R9bx/43IWA/r8w8Q6decuu0f6ZlNheJeJhaYPI8piX/aH+uHBH8zTACZu8",
        "vMnl5MF3/OIlsZc8cemq6eKYstp8a8KYq9OmkB5IXIX6qVMJHA6fRvQEB/7j",
        "281Q7oI/O+lE8AmVyBbwruPb7Mp6s4839eYiOdjbDwFjYtbS3XgAjrHlaD7W",
        "FDlbAG7H8Dmvo+wBxmtNkszhzbBnEYtuwQqT8nM/8A==",
    ],
    "1.3": [
        "FZOmXAyOBAZQV/uw188iBljBJXOm+m8xQ/8KTGLkgGwZNcRFxk1m953XjE3W",
        "VGy1dFT76KeaNWmPCNtDmprfH2na5UZFtfLIKrPv7xm80V+lzEzTd9WBwsfP",
        "42dZ9N+V9I5SVfcL/lWrrlpdybfceJC5jOcP5tzfJXWUITwb6Z3Erg3DU3Uh",
        "H9h9E0qWlYGqmiNCVrBnpe6Si1gU/Jl+rXlRSNbLJ4GlArAPuL976iTYJTzE",
        "MmbLUIm3JRYi00Yb01IUCCKdI90vUq1HHNtlTEu93YZfQaJwRxXlGkCNwIJe",
        "fy49QzaCIEu1XiOx5Jn+4GmkrZch/RrK9VzQWXgs+w==",
    ],
}

SPEC_SIGN_HEADER = {
    "1.0": "algorithm=sha1;version=1.0;",
    "1.1": "algorithm=sha1;version=1.1;",
    "1.3": "algorithm=sha256;version=1.3;",
}
SPEC_CONTENT_HASH = {"1.0": SPEC_SHA1_BODY, "1.1": SPEC_SHA1_BODY, "1.3": SPEC_SHA256_BODY}
SPEC_SERVER_API_VERSION = "1"  # the 1.3 vector was made with X-Ops-Server-API-Version: 1

VERSIONS = ["1.0", "1.1", "1.3"]


def spec_expected_headers(version: str) -> dict[str, str]:
    """The headers mixlib's SignedHeaderAuth#sign returns for the spec request."""
    headers = {
        "X-Ops-Sign": SPEC_SIGN_HEADER[version],
        "X-Ops-Userid": SPEC_USER_ID,
        "X-Ops-Timestamp": SPEC_TIMESTAMP,
        "X-Ops-Content-Hash": SPEC_CONTENT_HASH[version],
    }
    if version == "1.3":
        headers["X-Ops-Server-API-Version"] = SPEC_SERVER_API_VERSION
    for n, line in enumerate(SPEC_AUTHORIZATION_LINES[version], start=1):
        headers[f"X-Ops-Authorization-{n}"] = line
    return headers


@pytest.mark.parametrize("version", VERSIONS)
def test_canonical_request_is_byte_identical_to_mixlib(version: str) -> None:
    canonical = auth.canonical_request(
        "post",
        SPEC_PATH,
        SPEC_CONTENT_HASH[version],
        SPEC_TIMESTAMP,
        SPEC_USER_ID,
        version,
        SPEC_SERVER_API_VERSION,
    )
    assert canonical == SPEC_CANONICAL[version]


@pytest.mark.parametrize("version", VERSIONS)
def test_sign_request_reproduces_mixlib_signed_headers(version: str) -> None:
    headers = auth.sign_request(
        SPEC_PRIVATE_KEY,
        SPEC_USER_ID,
        "POST",
        SPEC_PATH,
        SPEC_BODY,
        timestamp=SPEC_TIMESTAMP,
        version=version,
        server_api_version=SPEC_SERVER_API_VERSION,
    )
    assert headers == spec_expected_headers(version)


@pytest.mark.parametrize(
    "version, sign_header",
    [
        ("1.0", "algorithm=sha1;version=1.0;"),
        ("1.0", "version=1.0"),  # what real 1.0 clients send: no algorithm
        ("1.1", "algorithm=sha1;version=1.1;"),
        ("1.3", "algorithm=sha256;version=1.3;"),
    ],
)
def test_verify_request_accepts_mixlib_signed_headers(version: str, sign_header: str) -> None:
    headers = spec_expected_headers(version) | {"X-Ops-Sign": sign_header}
    auth.verify_request(SPEC_PUBLIC_KEY, "POST", SPEC_PATH, SPEC_BODY, headers, now=SPEC_NOW)


def test_version_1_0_refuses_a_request_too_long_for_one_rsa_block() -> None:
    # mixlib's own spec: a 200-character user id chokes 1.0 but not 1.1 (which hashes it).
    kwargs = {"timestamp": SPEC_TIMESTAMP, "path": SPEC_PATH + "/nodes/" + "A" * 250}
    long_user = "A" * 200
    with pytest.raises(auth.RequestTooLong) as excinfo:
        auth.sign_request(
            SPEC_PRIVATE_KEY, long_user, "PUT", body=SPEC_BODY, version="1.0", **kwargs
        )
    assert excinfo.value.code == "request_too_long"
    headers = auth.sign_request(
        SPEC_PRIVATE_KEY, long_user, "PUT", body=SPEC_BODY, version="1.1", **kwargs
    )
    auth.verify_request(SPEC_PUBLIC_KEY, "PUT", kwargs["path"], SPEC_BODY, headers, now=SPEC_NOW)


# --- pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/", "/"),
        ("//", "/"),
        ("/nodes", "/nodes"),
        ("/nodes/", "/nodes"),
        ("//nodes///web1//", "/nodes/web1"),
        ("/nodes?q=role:web", "/nodes"),
        ("/search/node/?q=a//b", "/search/node"),
        ("", ""),
    ],
)
def test_canonical_path_collapses_slashes_and_drops_trailing_slash_and_query(
    path: str, expected: str
) -> None:
    assert auth.canonical_path(path) == expected


@pytest.mark.parametrize(
    "timestamp, expected",
    [
        ("2009-01-01T12:00:00Z", "2009-01-01T12:00:00Z"),
        ("2009-01-01T13:00:00+01:00", "2009-01-01T12:00:00Z"),
        ("2009-01-01T12:00:00.750+00:00", "2009-01-01T12:00:00Z"),
        ("2008-12-31T19:00:00-05:00", "2009-01-01T00:00:00Z"),
    ],
)
def test_canonical_time_is_utc_iso8601_to_the_second(timestamp: str, expected: str) -> None:
    assert auth.canonical_time(timestamp) == expected


@pytest.mark.parametrize("timestamp", ["yesterday", "2009-01-01T12:00:00", "", "1230811200"])
def test_timestamps_without_zone_or_unparseable_are_malformed(timestamp: str) -> None:
    with pytest.raises(auth.MalformedHeader):
        auth.canonical_time(timestamp)


@pytest.mark.parametrize(
    "value, version, algorithm",
    [
        ("algorithm=sha1;version=1.0;", "1.0", "sha1"),
        ("version=1.0", "1.0", "sha1"),
        (" algorithm=sha1 ; version=1.1 ", "1.1", "sha1"),
        ("algorithm=sha256;version=1.3;", "1.3", "sha256"),
        ("version=1.3", "1.3", "sha256"),
    ],
)
def test_parse_sign_header_reads_version_and_algorithm(
    value: str, version: str, algorithm: str
) -> None:
    assert auth.parse_sign_header(value) == (version, algorithm)


@pytest.mark.parametrize(
    "value, code",
    [
        ("algorithm=sha1;version=1.2;", "unsupported_version"),
        ("algorithm=sha256;version=2.0;", "unsupported_version"),
        ("algorithm=sha1;version=1.3;", "unsupported_version"),
        ("algorithm=sha256;version=1.1;", "unsupported_version"),
        ("algorithm=md5;version=1.0;", "unsupported_version"),
        ("algorithm=sha1;", "malformed_header"),
        ("sha1 1.0", "malformed_header"),
    ],
)
def test_parse_sign_header_refuses_unknown_or_mismatched_versions(value: str, code: str) -> None:
    with pytest.raises(auth.AuthError) as excinfo:
        auth.parse_sign_header(value)
    assert excinfo.value.code == code


def test_signature_is_split_into_60_character_authorization_lines() -> None:
    headers = auth.sign_request(SPEC_PRIVATE_KEY, "web1", "GET", "/nodes", b"", version="1.3")
    lines = [headers[f"X-Ops-Authorization-{n}"] for n in range(1, 7)]
    assert [len(line) for line in lines] == [60, 60, 60, 60, 60, 44]
    assert "X-Ops-Authorization-7" not in headers


# --- round trips ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def public_pem(key_pem: bytes) -> bytes:
    return (
        auth.load_private_key(key_pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.fixture(scope="module")
def other_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


NOW = datetime(2030, 6, 1, 8, 30, 0, tzinfo=UTC)
NOW_ISO = "2030-06-01T08:30:00Z"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/nodes", b""),
        ("POST", "/nodes", b'{"name":"web1","run_list":["recipe[nginx]"]}'),
        ("PUT", "/nodes/web1/", b"\x00\xffbinary"),
        ("DELETE", "/organizations/acme/clients/web1", b""),
    ],
)
def test_signed_request_round_trips(
    key_pem: bytes, public_pem: bytes, version: str, method: str, path: str, body: bytes
) -> None:
    headers = auth.sign_request(key_pem, "web1", method, path, body, NOW_ISO, version)
    auth.verify_request(public_pem, method, path, body, headers, now=NOW)


def test_sign_request_uses_the_current_time_by_default(key_pem: bytes, public_pem: bytes) -> None:
    headers = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"")
    signed_at = datetime.strptime(headers["X-Ops-Timestamp"], "%Y-%m-%dT%H:%M:%SZ")
    assert abs(signed_at.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(seconds=5)
    auth.verify_request(public_pem, "GET", "/nodes", b"", headers)


def test_query_string_is_not_signed(key_pem: bytes, public_pem: bytes) -> None:
    headers = auth.sign_request(key_pem, "web1", "GET", "/search/node?q=role:web", b"", NOW_ISO)
    auth.verify_request(public_pem, "GET", "/search/node", b"", headers, now=NOW)


def _self_signed_certificate(key_pem: bytes) -> bytes:
    key = auth.load_private_key(key_pem)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web1")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "form",
    ["key object", "SubjectPublicKeyInfo bytes", "SubjectPublicKeyInfo str", "PKCS#1", "cert"],
)
def test_verify_request_takes_every_public_key_form(key_pem: bytes, form: str) -> None:
    public = auth.load_private_key(key_pem).public_key()
    spki = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forms: dict[str, auth.PublicKeyInput] = {
        "key object": public,
        "SubjectPublicKeyInfo bytes": spki,
        "SubjectPublicKeyInfo str": spki.decode(),
        "PKCS#1": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        "cert": _self_signed_certificate(key_pem),
    }
    headers = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", NOW_ISO)
    auth.verify_request(forms[form], "GET", "/nodes", b"", headers, now=NOW)


@pytest.mark.parametrize("key", [b"not a key", "-----BEGIN PUBLIC KEY-----\nAAAA\n"])
def test_unloadable_public_key_is_bad_key(key_pem: bytes, key: bytes | str) -> None:
    headers = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", NOW_ISO)
    with pytest.raises(auth.BadKey) as excinfo:
        auth.verify_request(key, "GET", "/nodes", b"", headers, now=NOW)
    assert excinfo.value.code == "bad_key"


def test_signing_with_an_unknown_version_is_refused(key_pem: bytes) -> None:
    with pytest.raises(auth.UnsupportedVersion):
        auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", NOW_ISO, version="1.2")


@pytest.mark.parametrize(
    "rename",
    [str.lower, str.upper, lambda name: name.swapcase(), lambda name: name.replace("Ops", "oPS")],
    ids=["lower", "upper", "swapcase", "mixed"],
)
@pytest.mark.parametrize("version", VERSIONS)
def test_header_names_are_matched_case_insensitively(
    key_pem: bytes, public_pem: bytes, version: str, rename: Callable[[str], str]
) -> None:
    headers = auth.sign_request(key_pem, "web1", "POST", "/nodes", b"{}", NOW_ISO, version)
    renamed = {rename(name): value for name, value in headers.items()}
    auth.verify_request(public_pem, "POST", "/nodes", b"{}", renamed, now=NOW)
    assert auth.parse_user_id(renamed) == "web1"
    assert auth.signature_id(renamed) == auth.signature_id(headers)


# --- hostile requests -----------------------------------------------------------------------

Headers = dict[str, str]


def _without(*names: str) -> Callable[[Headers], Headers]:
    return lambda h: {k: v for k, v in h.items() if k not in names}


def _with(**changes: str) -> Callable[[Headers], Headers]:
    return lambda h: h | {k.replace("_", "-"): v for k, v in changes.items()}


def _rewrap_lines(h: Headers) -> Headers:
    # The same signature split differently is still the same signature.
    joined = "".join(v for k, v in sorted(h.items()) if k.startswith("X-Ops-Authorization-"))
    kept = {k: v for k, v in h.items() if not k.startswith("X-Ops-Authorization-")}
    return kept | {"X-Ops-Authorization-1": joined[:100], "X-Ops-Authorization-2": joined[100:]}


def _drop_line(h: Headers) -> Headers:
    return {k: v for k, v in h.items() if k != "X-Ops-Authorization-3"}


def _extra_line(h: Headers) -> Headers:
    return h | {"X-Ops-Authorization-9": "AAAA"}


def _swap_lines(h: Headers) -> Headers:
    return h | {
        "X-Ops-Authorization-1": h["X-Ops-Authorization-2"],
        "X-Ops-Authorization-2": h["X-Ops-Authorization-1"],
    }


SKEW = 900
HOSTILE = [
    # (case id, mutate headers, method, path, body, now, expected code)
    ("forged", None, "POST", "/nodes", b"{}", NOW, "bad_signature"),
    ("body changed", None, "POST", "/nodes", b'{"admin":true}', NOW, "content_hash_mismatch"),
    ("path changed", None, "POST", "/clients", b"{}", NOW, "bad_signature"),
    ("method changed", None, "PUT", "/nodes", b"{}", NOW, "bad_signature"),
    ("stale", None, "POST", "/nodes", b"{}", NOW + timedelta(seconds=SKEW), "timestamp_skew"),
    ("very stale", None, "POST", "/nodes", b"{}", NOW + timedelta(days=3), "timestamp_skew"),
    ("future", None, "POST", "/nodes", b"{}", NOW - timedelta(seconds=SKEW), "timestamp_skew"),
    (
        "timestamp edited",
        _with(X_Ops_Timestamp="2030-06-01T08:30:01Z"),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "bad_signature",
    ),
    ("userid edited", _with(X_Ops_Userid="admin"), "POST", "/nodes", b"{}", NOW, "bad_signature"),
    (
        "content hash edited",
        _with(X_Ops_Content_Hash="hDlKNZhIhgso3Fs0S0pZwJ0xyBWtR1RBaeHs1DrzOho="),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "content_hash_mismatch",
    ),
    (
        "api version edited",
        _with(X_Ops_Server_API_Version="2"),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "bad_signature",
    ),
    ("no sign", _without("X-Ops-Sign"), "POST", "/nodes", b"{}", NOW, "missing_header"),
    ("no userid", _without("X-Ops-Userid"), "POST", "/nodes", b"{}", NOW, "missing_header"),
    ("no timestamp", _without("X-Ops-Timestamp"), "POST", "/nodes", b"{}", NOW, "missing_header"),
    ("no hash", _without("X-Ops-Content-Hash"), "POST", "/nodes", b"{}", NOW, "missing_header"),
    (
        "no auth 1",
        _without("X-Ops-Authorization-1"),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "missing_header",
    ),
    ("missing line", _drop_line, "POST", "/nodes", b"{}", NOW, "malformed_header"),
    ("extra line", _extra_line, "POST", "/nodes", b"{}", NOW, "malformed_header"),
    ("swapped lines", _swap_lines, "POST", "/nodes", b"{}", NOW, "bad_signature"),
    (
        "garbage base64",
        _with(X_Ops_Authorization_2="!!not*base64!!"),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "malformed_header",
    ),
    (
        "short signature",
        _with(X_Ops_Authorization_1="epicfail"),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "bad_signature",
    ),
    ("empty userid", _with(X_Ops_Userid=""), "POST", "/nodes", b"{}", NOW, "malformed_header"),
    (
        "bad timestamp",
        _with(X_Ops_Timestamp="noon"),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "malformed_header",
    ),
    (
        "version 1.2",
        _with(X_Ops_Sign="algorithm=sha1;version=1.2;"),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "unsupported_version",
    ),
    (
        "version 9.9",
        _with(X_Ops_Sign="version=9.9"),
        "POST",
        "/nodes",
        b"{}",
        NOW,
        "unsupported_version",
    ),
    ("sign garbage", _with(X_Ops_Sign="rsa"), "POST", "/nodes", b"{}", NOW, "malformed_header"),
]


# Every case under every version, except that only 1.3 signs X-Ops-Server-API-Version.
HOSTILE_CASES = [
    pytest.param(version, *row, id=f"{version}-{row[0]}")
    for version in VERSIONS
    for row in HOSTILE
    if version == "1.3" or row[0] != "api version edited"
]


@pytest.mark.parametrize("version, case, mutate, method, path, body, now, code", HOSTILE_CASES)
def test_hostile_request_is_refused_with_its_code(
    key_pem: bytes,
    public_pem: bytes,
    other_key_pem: bytes,
    version: str,
    case: str,
    mutate: Callable[[Headers], Headers] | None,
    method: str,
    path: str,
    body: bytes,
    now: datetime,
    code: str,
) -> None:
    signer = other_key_pem if case == "forged" else key_pem
    headers = auth.sign_request(signer, "web1", "POST", "/nodes", b"{}", NOW_ISO, version)
    if mutate is not None:
        headers = mutate(headers)
    with pytest.raises(auth.AuthError) as excinfo:
        auth.verify_request(public_pem, method, path, body, headers, now=now, max_skew=SKEW)
    assert excinfo.value.code == code


@pytest.mark.parametrize(
    "signed_as, presented_as, code",
    [
        ("1.0", "1.1", "bad_signature"),
        ("1.1", "1.0", "bad_signature"),
        ("1.3", "1.0", "content_hash_mismatch"),
        ("1.0", "1.3", "content_hash_mismatch"),
    ],
)
def test_signature_relabelled_as_another_version_is_refused(
    key_pem: bytes, public_pem: bytes, signed_as: str, presented_as: str, code: str
) -> None:
    headers = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", NOW_ISO, signed_as)
    algorithm = auth.ALGORITHM_FOR_VERSION[auth.SigningVersion(presented_as)]
    headers["X-Ops-Sign"] = f"algorithm={algorithm};version={presented_as};"
    with pytest.raises(auth.AuthError) as excinfo:
        auth.verify_request(public_pem, "GET", "/nodes", b"", headers, now=NOW)
    assert excinfo.value.code == code


@pytest.mark.parametrize("offset", [-(SKEW - 1), 0, SKEW - 1])
def test_timestamps_inside_the_window_are_accepted(
    key_pem: bytes, public_pem: bytes, offset: int
) -> None:
    headers = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", NOW_ISO)
    now = NOW + timedelta(seconds=offset)
    auth.verify_request(public_pem, "GET", "/nodes", b"", headers, now=now, max_skew=SKEW)


@pytest.mark.parametrize("version", VERSIONS)
def test_rewrapped_signature_lines_still_verify_and_keep_their_signature_id(
    key_pem: bytes, public_pem: bytes, version: str
) -> None:
    headers = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", NOW_ISO, version)
    rewrapped = _rewrap_lines(headers)
    auth.verify_request(public_pem, "GET", "/nodes", b"", rewrapped, now=NOW)
    assert auth.signature_id(rewrapped) == auth.signature_id(headers)


# --- replay id and user id --------------------------------------------------------------------


def test_signature_id_is_stable_for_a_replay_and_differs_between_requests(key_pem: bytes) -> None:
    first = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", NOW_ISO)
    replay = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", NOW_ISO)
    later = auth.sign_request(key_pem, "web1", "GET", "/nodes", b"", "2030-06-01T08:30:01Z")
    other_path = auth.sign_request(key_pem, "web1", "GET", "/clients", b"", NOW_ISO)
    assert auth.signature_id(first) == auth.signature_id(replay)
    assert len({auth.signature_id(h) for h in (first, later, other_path)}) == 3
    assert len(auth.signature_id(first)) == 64


@pytest.mark.parametrize(
    "headers, code",
    [
        ({}, "missing_header"),
        ({"X-Ops-Authorization-1": "%%%"}, "malformed_header"),
        ({"X-Ops-Authorization-2": "AAAA"}, "malformed_header"),
    ],
)
def test_signature_id_refuses_missing_or_malformed_authorization(
    headers: Headers, code: str
) -> None:
    with pytest.raises(auth.AuthError) as excinfo:
        auth.signature_id(headers)
    assert excinfo.value.code == code


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"X-Ops-Userid": "web1"}, "web1"),
        ({"x-ops-userid": " admin\n"}, "admin"),
        ({"X-OPS-USERID": "chef-validator"}, "chef-validator"),
    ],
)
def test_parse_user_id_reads_the_userid_header_in_any_case(headers: Headers, expected: str) -> None:
    assert auth.parse_user_id(headers) == expected


@pytest.mark.parametrize(
    "headers, code",
    [({}, "missing_header"), ({"X-Ops-UserId": "  "}, "malformed_header")],
)
def test_parse_user_id_refuses_missing_or_empty_userid(headers: Headers, code: str) -> None:
    with pytest.raises(auth.AuthError) as excinfo:
        auth.parse_user_id(headers)
    assert excinfo.value.code == code
