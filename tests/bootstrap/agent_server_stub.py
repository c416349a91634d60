"""A tiny loopback server speaking agent protocol v1, for the agent's and install.sh's tests only.

It is not the real server: it keeps everything in memory, verifies request signatures with
`cryptography` against the key of the CSR it signed, and answers polls from a script of
deliveries instead of holding the connection.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

BOOTSTRAP_DIR = Path(__file__).resolve().parents[2] / "bootstrap"


@dataclass
class StubCA:
    """A CA (key + certificate) made for one test session."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        """Return the CA certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, public_key: Any, subject: x509.Name, san_ip: str | None = None) -> bytes:
        """Return a PEM certificate for a public key, signed by this CA."""
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if san_ip:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(san_ip))]),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_ca() -> StubCA:
    """Create a throw-away CA."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Scalarium test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return StubCA(key, cert)


def canonical_string(method: str, path: str, headers: Any) -> str:
    """Rebuild what protocol 1.3 signs from received headers (independent of agent.py)."""
    return "\n".join(
        [
            f"Method:{method}",
            f"Path:{path}",
            f"X-Ops-Content-Hash:{headers['X-Ops-Content-Hash']}",
            "X-Ops-Sign:version=1.3",
            f"X-Ops-Timestamp:{headers['X-Ops-Timestamp']}",
            f"X-Ops-UserId:{headers['X-Ops-Userid']}",
            f"X-Ops-Server-API-Version:{headers['X-Ops-Server-API-Version']}",
        ]
    )


@dataclass
class StubState:
    """Everything the stub remembers; tests arrange and inspect it directly."""

    tokens: dict[str, str] = field(default_factory=dict)
    used_tokens: set[str] = field(default_factory=set)
    public_keys: dict[str, Any] = field(default_factory=dict)
    csr_subjects: list[str] = field(default_factory=list)
    enroll_bodies: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    deliveries: list[list[dict[str, Any]]] = field(default_factory=list)
    node_json: dict[str, dict[str, Any]] = field(default_factory=dict)
    bundles: dict[str, bytes] = field(default_factory=dict)
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    polls: int = 0
    starts: list[str] = field(default_factory=list)
    logs: dict[str, bytes] = field(default_factory=dict)
    log_failures: int = 0
    finishes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    forced_errors: dict[str, tuple[int, str]] = field(default_factory=dict)
    bad_signatures: int = 0
    raw_requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


class StubServer:
    """The protocol stub on 127.0.0.1; `url` is set once started."""

    def __init__(self, ca: StubCA, tls: bool = False) -> None:
        self.ca = ca
        self.state = StubState()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        port = self.httpd.server_address[1]
        if tls:
            self.server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
            cert = ca.issue(self.server_key.public_key(), subject, san_ip="127.0.0.1")
            self._tls_files = (cert, self.server_key)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self._write_tls_files())
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _write_tls_files(self) -> tuple[str, str]:
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix="stub-tls-"))
        cert_pem, key = self._tls_files
        (directory / "cert.pem").write_bytes(cert_pem)
        (directory / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(directory / "cert.pem"), str(directory / "key.pem")

    def start(self) -> StubServer:
        """Serve in a background thread."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def register_key(self, instance_id: str, public_key: Any) -> None:
        """Accept signatures by this key for an instance (skips enrollment in unit tests)."""
        self.state.public_keys[instance_id] = public_key

    # -- request handling, under self.lock --

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        """Route one request; return (status, JSON document or bytes)."""
        path = urlsplit(raw_path).path
        st = self.state
        st.raw_requests.append((method, raw_path, dict(headers.items()), body))
        if path in st.forced_errors:
            status, code = st.forced_errors[path]
            return status, _error(code, f"forced {code}")
        if path.startswith("/bootstrap/v1/"):
            name = path.rsplit("/", 1)[-1]
            if name in ("install.sh", "agent.py"):
                return 200, (BOOTSTRAP_DIR / name).read_bytes()
            return 404, _error("not_found", path)
        doc = json.loads(body) if body else {}
        if path == "/agent/v1/enroll/lookup":
            token = doc.get("token")
            if token not in st.tokens or token in st.used_tokens:
                return 401, _error("invalid_token", "unknown or used token")
            return 200, {"instance_id": st.tokens[token]}
        if path == "/agent/v1/enroll":
            return self._enroll(doc)
        user = self._verify(method, path, headers, body)
        if user is None:
            st.bad_signatures += 1
            return 401, _error("bad_signature", "signature does not verify")
        return self._agent(method, path, user, doc)

    def _enroll(self, doc: dict[str, Any]) -> tuple[int, Any]:
        st = self.state
        token = doc.get("token")
        if token not in st.tokens or token in st.used_tokens:
            return 401, _error("invalid_token", "unknown or used token")
        csr = x509.load_pem_x509_csr(doc["csr"].encode())
        if not csr.is_signature_valid:
            return 400, _error("invalid_csr", "bad CSR signature")
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        st.csr_subjects.append(str(cn))
        instance_id = st.tokens[token]
        if cn != instance_id:
            return 400, _error("invalid_csr", "CN is not the instance id")
        st.used_tokens.add(token)
        st.enroll_bodies.append(doc)
        st.public_keys[instance_id] = csr.public_key()
        cert = self.ca.issue(csr.public_key(), csr.subject).decode()
        settings = {
            "server_url": self.url,
            "heartbeat_interval": 60,
            "poll_wait": 1,
            "command_timeout": 60,
            "log_chunk_bytes": 1024,
        }
        settings.update(st.settings)
        return 201, {
            "instance_id": instance_id,
            "certificate": cert,
            "ca_certificate": self.ca.pem.decode(),
            "settings": settings,
        }

    def _verify(self, method: str, path: str, headers: Any, body: bytes) -> str | None:
        user = headers.get("X-Ops-Userid")
        key = self.state.public_keys.get(user)
        if key is None or headers.get("X-Ops-Sign") != "algorithm=sha256;version=1.3;":
            return None
        expected_hash = base64.b64encode(hashlib.sha256(body).digest()).decode()
        if headers.get("X-Ops-Content-Hash") != expected_hash:
            return None
        parts, n = [], 1
        while headers.get(f"X-Ops-Authorization-{n}"):
            parts.append(headers[f"X-Ops-Authorization-{n}"])
            n += 1
        try:
            key.verify(
                base64.b64decode("".join(parts)),
                canonical_string(method, path, headers).encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except Exception:
            return None
        return str(user)

    def _agent(self, method: str, path: str, user: str, doc: dict[str, Any]) -> tuple[int, Any]:
        st = self.state
        parts = path.split("/")
        if method == "POST" and path == "/agent/v1/heartbeat":
            st.heartbeats.append(doc)
            return 200, {"ok": True}
        if method == "GET" and path == "/agent/v1/commands":
            st.polls += 1
            return 200, {"commands": st.deliveries.pop(0) if st.deliveries else []}
        if method == "GET" and path.startswith("/agent/v1/bundles/"):
            sha = parts[-1].removesuffix(".tar.gz")
            return (200, st.bundles[sha]) if sha in st.bundles else (404, _error("not_found", sha))
        if len(parts) == 6 and parts[3] == "commands":
            cid, action = parts[4], parts[5]
            if method == "GET" and action == "node.json":
                return 200, st.node_json.get(cid, {"run_list": []})
            if method == "POST" and action == "start":
                st.starts.append(cid)
                return 200, {"ok": True}
            if method == "POST" and action == "log":
                if st.log_failures > 0:
                    st.log_failures -= 1
                    return 503, _error("unavailable", "try later")
                current = st.logs.get(cid, b"")
                data = doc["data"].encode()
                # Idempotent by offset: a resent chunk overwrites what it already wrote.
                st.logs[cid] = current[: doc["offset"]] + data
                return 200, {"offset": len(st.logs[cid])}
            if method == "POST" and action == "finish":
                st.finishes.setdefault(cid, []).append(doc)
                return 200, {"ok": True}
        return 404, _error("not_found", path)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": {}}}


def _make_handler(server: StubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with server.lock:
                status, answer = server.handle(self.command, self.path, self.headers, body)
            data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        do_GET = _serve
        do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
