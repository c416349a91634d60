"""Agent protocol v1 through the Flask app, with real CSRs and real request signatures."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import importlib.util
import json
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from flask import Flask, request, request_started
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import EnvironBuilder, run_wsgi_app

from chef_bridge.auth import format_time, sign_request
from server import pki
from server.api import agent as agent_api
from server.api.agent import MAX_WAIT_SECONDS, latest_metrics, parse_wait, wake
from server.app import MAX_BODY_BYTES
from server.db import get_database
from server.enrollment import get_ca, revoke_instance_certificates
from server.errors import Invalid
from server.keys import Keys
from server.models import (
    Command,
    EnrollmentToken,
    Event,
    Instance,
    InstanceCertificate,
    InstanceState,
)
from tests.conftest import REDIS_URL, Api
from tests.server.live import LiveServer, live_server

HEARTBEAT = "/agent/v1/heartbeat"
FACTS = {"hostname": "node-a", "os": "debian", "architecture": "x86_64", "private_ip": "10.1.2.3"}


@functools.cache
def rsa_key(n: int, bits: int = 2048) -> bytes:
    """A few RSA keys shared by every test (generating them is the slow part)."""
    return pki.generate_private_key_pem(bits)


@functools.cache
def agent_module() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bootstrap" / "agent.py"
    spec = importlib.util.spec_from_file_location("scalarium_agent_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the class is being built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Node:
    """One simulated node: its instance, its key, and the test client it talks through."""

    client: FlaskClient
    instance_id: str
    key: bytes

    def signed(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        send_body: bytes | None = None,
        key: bytes | None = None,
        user_id: str | None = None,
        timestamp: str | None = None,
        version: str = "1.3",
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send a request signed as this node (every part overridable for hostile cases)."""
        signature = headers or sign_request(
            key or self.key,
            user_id or self.instance_id,
            method,
            path.split("?", 1)[0],
            body,
            timestamp=timestamp,
            version=version,
            server_api_version="1",
        )
        return self.client.open(
            path,
            method=method,
            data=body if send_body is None else send_body,
            headers={**signature, "Content-Type": "application/json"},
        )

    def heartbeat(self, payload: dict[str, Any] | None = None, **kw: Any) -> Any:
        """A signed heartbeat."""
        body = json.dumps(payload or {"agent_version": "1.0.0", "load": [0.1, 0.2, 0.3]}).encode()
        return self.signed("POST", HEARTBEAT, body, **kw)


@pytest.fixture
def stack(admin: Api) -> dict[str, Any]:
    stack: dict[str, Any] = admin.ok("POST", "/stacks", {"shortname": "prod"})
    layer = admin.ok("POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})
    stack["layer_id"] = layer["id"]
    return stack


def new_instance(admin: Api, stack: dict[str, Any], hostname: str) -> str:
    created = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": hostname, "layer_ids": [stack["layer_id"]]},
    )
    return str(created["id"])


def user_data_token(admin: Api, instance_id: str) -> str:
    script = admin.ok("GET", f"/instances/{instance_id}/user-data")["user_data"]
    words = shlex.split(script.splitlines()[-1])
    return words[words.index("--token") + 1]


def enroll_body(token: str, instance_id: str, key: bytes, **changes: Any) -> dict[str, Any]:
    body = {
        "token": token,
        "csr": pki.build_csr_pem(key, instance_id).decode(),
        "agent_version": "1.0.0",
        "facts": FACTS,
    }
    body.update(changes)
    return body


@pytest.fixture
def instance_id(admin: Api, stack: dict[str, Any]) -> str:
    return new_instance(admin, stack, "web1")


@pytest.fixture
def node(app: Flask, admin: Api, instance_id: str) -> Node:
    """An enrolled node."""
    token = user_data_token(admin, instance_id)
    client = app.test_client()
    response = client.post("/agent/v1/enroll", json=enroll_body(token, instance_id, rsa_key(1)))
    assert response.status_code == 201, response.get_json()
    return Node(client, instance_id, rsa_key(1))


# --- state snapshots: "nothing changed" and "an event was recorded" ---------------------------


def snapshot(app: Flask) -> dict[str, Any]:
    """Everything a refused request must leave alone."""
    with get_database(app).session() as session:
        return {
            "instances": [
                (i.id, i.status, i.os, i.agent_version, i.metrics, i.last_heartbeat_at)
                for i in session.scalars(select(Instance).order_by(Instance.id))
            ],
            "certificates": [
                (c.serial, c.revoked_at)
                for c in session.scalars(
                    select(InstanceCertificate).order_by(InstanceCertificate.serial)
                )
            ],
            "tokens": [
                (t.id, t.used_at, t.superseded_at)
                for t in session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.id))
            ],
        }


def refusals(app: Flask, code: str) -> list[Event]:
    with get_database(app).session() as session:
        found = session.scalars(select(Event).where(Event.kind == "agent.refused")).all()
        return [e for e in found if e.data.get("code") == code]


def assert_refused(
    app: Flask, send: Callable[[], Any], status: int, code: str, instance_id: str | None
) -> None:
    """Send once: the answer has this status and code, nothing changed, one event recorded."""
    before, events_before = snapshot(app), len(refusals(app, code))
    response = send()
    payload = response.get_json()
    assert response.status_code == status, payload
    assert payload["error"]["code"] == code, payload
    assert snapshot(app) == before
    found = refusals(app, code)
    assert len(found) == events_before + 1
    assert found[-1].instance_id == instance_id


# --- the whole flow ---------------------------------------------------------------------------


def test_node_enrolls_heartbeats_into_running_setup_and_polls(
    app: Flask, admin: Api, instance_id: str
) -> None:
    token = user_data_token(admin, instance_id)
    client = app.test_client()
    found = client.post("/agent/v1/enroll/lookup", json={"token": token})
    assert found.status_code == 200 and found.get_json() == {"instance_id": instance_id}

    response = client.post("/agent/v1/enroll", json=enroll_body(token, instance_id, rsa_key(1)))
    assert response.status_code == 201, response.get_json()
    answer = response.get_json()
    assert answer["instance_id"] == instance_id
    assert answer["ca_certificate"] == client.get("/bootstrap/v1/ca.pem").get_data(as_text=True)
    assert answer["settings"]["server_url"] == app.config["SCALARIUM"].public_url
    assert answer["settings"]["chef_binary"] == "cinc-solo"
    verified = pki.verify_instance_certificate(get_ca(app), answer["certificate"].encode())
    assert verified.instance_id == instance_id
    shown = admin.ok("GET", f"/instances/{instance_id}")
    assert shown["status"] == InstanceState.BOOTING
    assert (shown["os"], shown["architecture"], shown["private_ip"]) == (
        "debian",
        "x86_64",
        "10.1.2.3",
    )
    assert shown["agent_version"] == "1.0.0" and shown["hostname"] == "web1"

    node = Node(client, instance_id, rsa_key(1))
    first = node.heartbeat({"agent_version": "1.0.1", "load": [1.0, 0.5, 0.2], "disk": None})
    assert first.status_code == 200, first.get_json()
    assert first.get_json()["status"] == InstanceState.RUNNING_SETUP
    shown = admin.ok("GET", f"/instances/{instance_id}")
    assert shown["status"] == InstanceState.RUNNING_SETUP
    assert shown["agent_version"] == "1.0.1" and shown["last_heartbeat_at"]
    assert node.heartbeat().status_code == 200
    with get_database(app).session() as session:
        row = session.get(Instance, instance_id)
        # A new agent version is written at once (Redis has every beat).
        assert row is not None and row.metrics == {"load": [0.1, 0.2, 0.3]}
    latest = latest_metrics(
        app.extensions["scalarium.redis"], app.extensions["scalarium.keys"], instance_id
    )
    assert latest is not None and latest["load"] == [0.1, 0.2, 0.3]
    with get_database(app).session() as session:
        kinds = [e.kind for e in session.scalars(select(Event).order_by(Event.id))]
        assert kinds.count("instance.enrolled") == 1
        moves = [
            (e.data["from"], e.data["to"])
            for e in session.scalars(select(Event).order_by(Event.id))
            if e.kind == "instance.state"
        ]
    assert moves == [
        (InstanceState.REQUESTED, InstanceState.PENDING),
        (InstanceState.PENDING, InstanceState.BOOTING),
        (InstanceState.BOOTING, InstanceState.RUNNING_SETUP),
    ]

    # Setup is queued for the node as it connects: the first poll hands it over.
    polled = node.signed("GET", "/agent/v1/commands?wait=0")
    assert polled.status_code == 200
    assert [c["type"] for c in polled.get_json()["commands"]] == ["setup"]


def test_enrolled_certificate_carries_the_node_key(app: Flask, node: Node) -> None:
    with get_database(app).session() as session:
        (row,) = session.scalars(select(InstanceCertificate)).all()
    certificate = x509.load_pem_x509_certificate(row.pem.encode())
    key = serialization.load_pem_private_key(node.key, password=None)
    assert certificate.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert (
        certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == node.instance_id
    )
    assert row.fingerprint == certificate.fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.3"])
def test_every_chef_signing_version_is_accepted(node: Node, version: str) -> None:
    response = node.heartbeat(version=version)
    assert response.status_code == 200, response.get_json()


def test_re_enrollment_revokes_the_old_certificate(app: Flask, admin: Api, node: Node) -> None:
    token = user_data_token(admin, node.instance_id)
    response = node.client.post(
        "/agent/v1/enroll", json=enroll_body(token, node.instance_id, rsa_key(2))
    )
    assert response.status_code == 201
    with get_database(app).session() as session:
        rows = session.scalars(
            select(InstanceCertificate).order_by(InstanceCertificate.created_at)
        ).all()
    assert [r.revoke_reason for r in rows] == ["re_enrolled", None]
    # The old key no longer authenticates; the new one does.
    assert_refused(app, node.heartbeat, 401, "bad_signature", node.instance_id)
    assert node.heartbeat(key=rsa_key(2)).status_code == 200


def test_agents_own_openssl_signer_is_accepted(node: Node, tmp_path: Path) -> None:
    agent = agent_module()
    key_path = tmp_path / "agent-key.pem"
    key_path.write_bytes(node.key)
    body = json.dumps({"agent_version": agent.AGENT_VERSION}).encode()
    for method, path, payload in (
        ("POST", HEARTBEAT, body),
        ("GET", "/agent/v1/commands?wait=0", b""),
    ):
        headers = agent.signed_headers(
            str(key_path), method, path.split("?")[0], payload, node.instance_id, time.time()
        )
        response = node.client.open(
            path,
            method=method,
            data=payload,
            headers={**headers, "Content-Type": "application/json"},
        )
        assert response.status_code == 200, response.get_json()


def test_ping_needs_no_signature(app: Flask) -> None:
    response = app.test_client().get("/agent/v1/ping")
    assert response.status_code == 200 and response.get_json() == {"ok": True}


# --- bad enrollments --------------------------------------------------------------------------


def tamper_signature(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the signature
    encoded = base64.encodebytes(bytes(der)).decode().replace("\n", "")
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + "\n".join(lines)
        + "\n-----END CERTIFICATE REQUEST-----\n"
    ).encode()


def csr_asking_for_ca(key_pem: bytes, common_name: str) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def expire_tokens(app: Flask, instance_id: str) -> None:
    with get_database(app).session() as session:
        for row in session.scalars(
            select(EnrollmentToken).where(EnrollmentToken.instance_id == instance_id)
        ):
            row.expires_at = datetime.now(UTC) - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("reused token", 401, "token_reused"),
        ("expired token", 401, "token_expired"),
        ("superseded token", 401, "token_superseded"),
        ("unknown token", 401, "invalid_token"),
        ("another instance's token", 403, "token_wrong_instance"),
        ("terminated instance", 403, "instance_terminated"),
        ("CSR subject is another name", 400, "csr_subject_mismatch"),
        ("CSR subject is the other instance", 400, "csr_subject_mismatch"),
        ("CSR with a bad signature", 400, "csr_bad_signature"),
        ("RSA key under 2048 bits", 400, "csr_key_too_small"),
        ("CSR asking for CA rights", 400, "csr_requests_ca"),
        ("garbage PEM", 400, "csr_malformed"),
        ("oversized PEM", 400, "csr_too_large"),
        ("malformed facts", 400, "invalid_facts"),
    ],
)
def test_bad_enrollment_is_refused_with_its_code_changes_nothing_and_is_recorded(
    app: Flask,
    admin: Api,
    stack: dict[str, Any],
    instance_id: str,
    case: str,
    status: int,
    code: str,
) -> None:
    other_id = new_instance(admin, stack, "web2")
    token = user_data_token(admin, instance_id)
    key = rsa_key(1)
    body = enroll_body(token, instance_id, key)
    expected_instance: str | None = instance_id
    client = app.test_client()
    if case == "reused token":
        assert client.post("/agent/v1/enroll", json=body).status_code == 201
        body = enroll_body(token, instance_id, rsa_key(2))
    elif case == "expired token":
        expire_tokens(app, instance_id)
    elif case == "superseded token":
        user_data_token(admin, instance_id)
    elif case == "unknown token":
        body["token"] = "sce_" + "A" * 43
        expected_instance = None
    elif case == "another instance's token":
        body["instance_id"] = other_id
    elif case == "terminated instance":
        with get_database(app).session() as session:
            row = session.get(Instance, instance_id)
            assert row is not None
            row.status = InstanceState.TERMINATED
    elif case == "CSR subject is another name":
        body["csr"] = pki.build_csr_pem(key, "someone-else").decode()
    elif case == "CSR subject is the other instance":
        body["csr"] = pki.build_csr_pem(key, other_id).decode()
    elif case == "CSR with a bad signature":
        body["csr"] = tamper_signature(body["csr"].encode()).decode()
    elif case == "RSA key under 2048 bits":
        body["csr"] = pki.build_csr_pem(rsa_key(9, 1024), instance_id).decode()
    elif case == "CSR asking for CA rights":
        body["csr"] = csr_asking_for_ca(key, instance_id).decode()
    elif case == "garbage PEM":
        body["csr"] = "-----BEGIN CERTIFICATE REQUEST-----\nnot base64 at all\n-----END"
    elif case == "oversized PEM":
        body["csr"] = body["csr"] + "A" * 20_000
    elif case == "malformed facts":
        body["facts"] = {"private_ip": "999.1.1.1"}
    assert_refused(
        app,
        lambda: client.post("/agent/v1/enroll", json=body),
        status,
        code,
        expected_instance,
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"token": "sce_" + "B" * 43}, "invalid_token"),
        ({"token": 5}, "invalid_token"),
        ({}, "invalid_token"),
        ([], "invalid_body"),
    ],
)
def test_bad_lookup_is_refused_and_recorded(app: Flask, body: Any, code: str) -> None:
    status = 401 if body and isinstance(body, dict) and isinstance(body["token"], str) else 400
    assert_refused(
        app,
        lambda: app.test_client().post("/agent/v1/enroll/lookup", json=body),
        status,
        code,
        None,
    )


def test_lookup_does_not_spend_the_token(app: Flask, admin: Api, instance_id: str) -> None:
    token = user_data_token(admin, instance_id)
    client = app.test_client()
    for _ in range(2):
        assert client.post("/agent/v1/enroll/lookup", json={"token": token}).status_code == 200
    response = client.post("/agent/v1/enroll", json=enroll_body(token, instance_id, rsa_key(1)))
    assert response.status_code == 201


# --- bad signed requests ----------------------------------------------------------------------


def revoke(app: Flask, instance_id: str) -> None:
    with get_database(app).session() as session:
        revoke_instance_certificates(session, instance_id, "terminated")


def set_instance(app: Flask, instance_id: str, **values: Any) -> None:
    with get_database(app).session() as session:
        row = session.get(Instance, instance_id)
        assert row is not None
        for name, value in values.items():
            setattr(row, name, value)


def expire_certificates(app: Flask, instance_id: str) -> None:
    with get_database(app).session() as session:
        for row in session.scalars(select(InstanceCertificate)):
            row.not_after = datetime.now(UTC) - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("case", "status", "code", "known"),
    [
        ("forged signature", 401, "bad_signature", True),
        ("body not matching the content hash", 401, "content_hash_mismatch", True),
        ("timestamp too old", 401, "timestamp_skew", True),
        ("timestamp in the future", 401, "timestamp_skew", True),
        ("replayed request", 401, "replayed_request", True),
        ("revoked certificate", 403, "certificate_revoked", True),
        ("expired certificate", 401, "certificate_expired", True),
        ("unknown instance", 401, "unknown_instance", False),
        ("terminated instance", 403, "instance_terminated", True),
        ("no signature at all", 401, "missing_header", False),
    ],
)
def test_bad_signed_request_is_refused_with_its_code_changes_nothing_and_is_recorded(
    app: Flask, node: Node, case: str, status: int, code: str, known: bool
) -> None:
    # One good heartbeat first, so that "nothing changed" covers a running instance.
    assert node.heartbeat().status_code == 200
    body = json.dumps({"agent_version": "9.9.9", "load": [9, 9, 9]}).encode()
    send: Callable[[], Any] = lambda: node.heartbeat(json.loads(body))  # noqa: E731
    if case == "forged signature":
        send = lambda: node.signed("POST", HEARTBEAT, body, key=rsa_key(3))  # noqa: E731
    elif case == "body not matching the content hash":
        tampered = body.replace(b"9.9.9", b"6.6.6")
        send = lambda: node.signed("POST", HEARTBEAT, body, send_body=tampered)  # noqa: E731
    elif case == "timestamp too old":
        stale = format_time(datetime.now(UTC) - timedelta(minutes=16))
        send = lambda: node.signed("POST", HEARTBEAT, body, timestamp=stale)  # noqa: E731
    elif case == "timestamp in the future":
        ahead = format_time(datetime.now(UTC) + timedelta(minutes=16))
        send = lambda: node.signed("POST", HEARTBEAT, body, timestamp=ahead)  # noqa: E731
    elif case == "replayed request":
        headers = sign_request(node.key, node.instance_id, "POST", HEARTBEAT, body)
        assert node.signed("POST", HEARTBEAT, body, headers=headers).status_code == 200
        send = lambda: node.signed("POST", HEARTBEAT, body, headers=headers)  # noqa: E731
    elif case == "revoked certificate":
        revoke(app, node.instance_id)
    elif case == "expired certificate":
        expire_certificates(app, node.instance_id)
    elif case == "unknown instance":
        send = lambda: node.signed(  # noqa: E731
            "POST", HEARTBEAT, body, user_id="00000000-0000-0000-0000-000000000000"
        )
    elif case == "terminated instance":
        set_instance(app, node.instance_id, status=InstanceState.TERMINATED.value)
    elif case == "no signature at all":
        send = lambda: node.client.post(HEARTBEAT, data=body)  # noqa: E731
    assert_refused(app, send, status, code, node.instance_id if known else None)


def test_revoked_and_terminated_answers_tell_the_agent_to_stop(app: Flask, node: Node) -> None:
    agent = agent_module()
    revoke(app, node.instance_id)
    response = node.heartbeat()
    error = agent.error_from_response(response.status_code, response.data)
    assert isinstance(error, agent.AgentRetired)


def test_signed_long_poll_is_refused_before_it_waits(app: Flask, node: Node) -> None:
    started = time.monotonic()
    response = node.signed("GET", "/agent/v1/commands?wait=5", key=rsa_key(3))
    assert response.status_code == 401 and time.monotonic() - started < 2


# --- the long poll ----------------------------------------------------------------------------


def queue_command(app: Flask, instance_id: str, kind: str = "setup") -> str:
    with get_database(app).session() as session:
        command = Command(instance_id=instance_id, type=kind, timeout_seconds=900)
        session.add(command)
        session.flush()
        return command.id


def test_poll_returns_queued_commands_at_once(app: Flask, node: Node) -> None:
    first = queue_command(app, node.instance_id)
    second = queue_command(app, node.instance_id, "configure")
    started = time.monotonic()
    response = node.signed("GET", "/agent/v1/commands?wait=30")
    assert time.monotonic() - started < 2
    commands = response.get_json()["commands"]
    # One command at a time, oldest first; the configure waits its turn.
    assert [c["id"] for c in commands] == [first]
    assert second != first
    # The stack had no bundle: one was built (the built-in base cookbook) before delivery.
    sha = commands[0]["bundle_sha256"]
    assert isinstance(sha, str) and len(sha) == 64
    assert commands[0] == {
        "id": first,
        "type": "setup",
        "deployment_id": None,
        "cluster_version": 0,
        "node_json_url": f"/agent/v1/commands/{first}/node.json",
        "search_nodes_url": f"/agent/v1/commands/{first}/search-nodes.json",
        "bundle_url": f"/agent/v1/bundles/{sha}.tar.gz",
        "bundle_sha256": sha,
        "timeout": 900,
        "args": {},
    }
    bundle = node.signed("GET", f"/agent/v1/bundles/{sha}.tar.gz")
    assert bundle.status_code == 200 and bundle.headers["ETag"].strip('"') == sha
    assert hashlib.sha256(bundle.data).hexdigest() == sha
    bundle.close()
    earlier = format_time(datetime.now(UTC) - timedelta(seconds=5))
    again = node.signed("GET", f"/agent/v1/bundles/{sha}.tar.gz", timestamp=earlier)
    assert again.status_code == 200  # signed anew (another second): not a replay
    again.close()
    missing = node.signed("GET", "/agent/v1/bundles/" + "0" * 64 + ".tar.gz")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "bundle_not_found"


def test_poll_returns_nothing_after_the_wait(node: Node) -> None:
    started = time.monotonic()
    response = node.signed("GET", "/agent/v1/commands?wait=1")
    took = time.monotonic() - started
    assert response.status_code == 200 and response.get_json() == {"commands": []}
    assert 0.9 <= took < 3


def test_poll_ends_early_when_woken_from_another_thread(app: Flask, node: Node) -> None:
    connection = app.extensions["scalarium.redis"]
    keys = app.extensions["scalarium.keys"]
    queued: list[str] = []

    def later() -> None:
        time.sleep(0.5)
        queued.append(queue_command(app, node.instance_id))
        wake(connection, node.instance_id, keys)

    thread = threading.Thread(target=later)
    started = time.monotonic()
    thread.start()
    response = node.signed("GET", "/agent/v1/commands?wait=20")
    took = time.monotonic() - started
    thread.join()
    assert response.status_code == 200
    assert [c["id"] for c in response.get_json()["commands"]] == queued
    assert 0.4 <= took < 5


def test_a_stale_wake_up_does_not_cut_the_next_poll_short(app: Flask, node: Node) -> None:
    wake(app.extensions["scalarium.redis"], node.instance_id, app.extensions["scalarium.keys"])
    started = time.monotonic()
    assert node.signed("GET", "/agent/v1/commands?wait=1").get_json() == {"commands": []}
    assert time.monotonic() - started >= 0.9


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, 0), ("", 0), ("0", 0), ("25", 25), ("60", 60), ("3600", MAX_WAIT_SECONDS)],
)
def test_wait_is_capped(raw: str | None, expected: int) -> None:
    assert parse_wait(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "1.5", "soon", "9" * 20])
def test_bad_wait_is_refused(raw: str) -> None:
    with pytest.raises(Invalid):
        parse_wait(raw)


def test_oversized_heartbeat_is_refused_without_storing_it(app: Flask, node: Node) -> None:
    response = node.heartbeat({"junk": "x" * 20_000})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "metrics_too_large"
    with get_database(app).session() as session:
        row = session.get(Instance, node.instance_id)
        assert row is not None and row.last_heartbeat_at is None


# --- heartbeats below Flask (server/api/agent.py HeartbeatPath) -------------------------------


@pytest.fixture
def flask_requests(app: Flask) -> Iterator[list[str]]:
    """The paths of the requests that went through Flask's own request handling."""
    seen: list[str] = []

    def record(sender: Flask, **extra: Any) -> None:
        seen.append(request.path)

    request_started.connect(record, app)
    yield seen
    request_started.disconnect(record, app)


def without_content_length(app: Flask, node: Node, body: bytes) -> tuple[int, Any]:
    """A signed heartbeat whose body is sent chunked (no Content-Length): (status, payload)."""
    headers = sign_request(
        node.key, node.instance_id, "POST", HEARTBEAT, body, server_api_version="1"
    )
    environ = EnvironBuilder(
        path=HEARTBEAT,
        method="POST",
        data=body,
        headers={**headers, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    ).get_environ()
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input_terminated"] = True
    answer, status, _ = run_wsgi_app(app, environ, buffered=True)
    return int(status.split()[0]), json.loads(b"".join(answer))


def test_heartbeats_and_their_refusals_are_answered_below_flask(
    app: Flask, node: Node, flask_requests: list[str]
) -> None:
    accepted = node.heartbeat()
    assert accepted.status_code == 200
    assert accepted.mimetype == "application/json"
    assert accepted.get_json() == {"ok": True, "status": InstanceState.RUNNING_SETUP.value}
    forged = node.signed("POST", HEARTBEAT, b"{}", key=rsa_key(3))
    assert forged.status_code == 401
    assert forged.get_json()["error"]["code"] == "bad_signature"
    assert refusals(app, "bad_signature")[-1].data["path"] == HEARTBEAT
    assert flask_requests == []
    # Every other agent request still goes through Flask.
    assert node.signed("GET", "/agent/v1/commands?wait=0").status_code == 200
    assert flask_requests == ["/agent/v1/commands"]


def test_a_heartbeat_without_content_length_is_answered_by_flask_the_same_way(
    app: Flask, node: Node, flask_requests: list[str]
) -> None:
    assert node.heartbeat().status_code == 200
    status, payload = without_content_length(
        app, node, json.dumps({"agent_version": "1.0.0", "load": [7, 7, 7]}).encode()
    )
    assert (status, payload) == (200, {"ok": True, "status": InstanceState.RUNNING_SETUP.value})
    assert flask_requests == [HEARTBEAT]
    stored = latest_metrics(
        app.extensions["scalarium.redis"], app.extensions["scalarium.keys"], node.instance_id
    )
    assert stored is not None and stored["load"] == [7, 7, 7]
    # Refused the same way too: a replay of that exact request would be; a bad body is.
    status, payload = without_content_length(app, node, b"[1, 2]")
    assert (status, payload["error"]["code"]) == (400, "invalid_body")


def test_a_heartbeat_body_over_the_request_limit_is_refused_by_flask(
    app: Flask, node: Node, flask_requests: list[str]
) -> None:
    before = snapshot(app)
    body = b'{"junk": "' + b"x" * MAX_BODY_BYTES + b'"}'
    response = node.signed("POST", HEARTBEAT, body)
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"
    assert snapshot(app) == before
    assert flask_requests == [HEARTBEAT]


def test_other_methods_on_the_heartbeat_path_are_not_allowed(app: Flask) -> None:
    response = app.test_client().get(HEARTBEAT)
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_a_failure_below_flask_is_logged_and_answered_as_a_500(
    app: Flask, node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(call: Any, agent: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(agent_api, "_beat", broken)
    response = node.heartbeat()
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    assert "disk on fire" not in response.get_data(as_text=True)
    assert "unhandled error: RuntimeError" in caplog.text
    assert "disk on fire" in caplog.text


def test_a_server_mounted_under_a_prefix_checks_the_path_the_agent_signed(
    app: Flask, node: Node
) -> None:
    body = json.dumps({"agent_version": "1.0.0"}).encode()

    def send(signed_path: str) -> Any:
        headers = sign_request(
            node.key, node.instance_id, "POST", signed_path, body, server_api_version="1"
        )
        return node.client.post(
            HEARTBEAT,
            base_url="http://localhost/scalarium",
            data=body,
            headers={**headers, "Content-Type": "application/json"},
        )

    assert send("/scalarium" + HEARTBEAT).status_code == 200
    unprefixed = send(HEARTBEAT)
    assert unprefixed.status_code == 401
    assert unprefixed.get_json()["error"]["code"] == "bad_signature"


def http_call(
    server: LiveServer,
    method: str,
    path: str,
    body: bytes | Iterator[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request to a live server: (status, JSON answer). An iterator body is sent chunked."""
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_gunicorn_serves_heartbeats_with_and_without_a_content_length(
    tmp_path: Path, redis_client: Any
) -> None:
    with live_server(tmp_path, REDIS_URL) as server:
        admin = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}

        def api(method: str, path: str, payload: Any = None) -> Any:
            body = None if payload is None else json.dumps(payload).encode()
            status, answer = http_call(server, method, "/api/v1" + path, body, admin)
            assert status < 300, answer
            return answer

        stack = api("POST", "/stacks", {"shortname": "live"})
        layer = api("POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})
        instance_id = api(
            "POST",
            f"/stacks/{stack['id']}/instances",
            {"hostname": "node-a", "layer_ids": [layer["id"]]},
        )["id"]
        words = shlex.split(api("GET", f"/instances/{instance_id}/user-data")["user_data"])
        token = words[words.index("--token") + 1]
        status, enrolled = http_call(
            server,
            "POST",
            "/agent/v1/enroll",
            json.dumps(enroll_body(token, instance_id, rsa_key(1))).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 201, enrolled

        def heartbeat(load: int, chunked: bool, headers: dict[str, str] | None = None) -> Any:
            body = json.dumps({"agent_version": "1.0.0", "load": [load]}).encode()
            signature = headers or sign_request(
                rsa_key(1), instance_id, "POST", HEARTBEAT, body, server_api_version="1"
            )
            sent = iter([body[:10], body[10:]]) if chunked else body
            answer = http_call(
                server,
                "POST",
                HEARTBEAT,
                sent,
                {**signature, "Content-Type": "application/json"},
            )
            return answer, signature

        running_setup = {"ok": True, "status": InstanceState.RUNNING_SETUP.value}
        assert heartbeat(1, chunked=False)[0] == (200, running_setup)
        (status, answer), signature = heartbeat(2, chunked=True)
        assert (status, answer) == (200, running_setup)
        (status, answer), _ = heartbeat(2, chunked=False, headers=signature)
        assert (status, answer["error"]["code"]) == (401, "replayed_request")
        stored = redis_client.get(Keys().metrics(instance_id))
        assert stored is not None and json.loads(stored)["load"] == [2]
