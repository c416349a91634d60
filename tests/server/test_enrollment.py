"""Enrollment tokens, user-data, the bootstrap downloads and the CA/TLS settings."""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from server import pki
from server.api.bootstrap import BOOTSTRAP_DIR, render_install_script
from server.config import load_settings
from server.db import get_database
from server.enrollment import (
    TokenProblem,
    chef_install_mode,
    hash_token,
    new_token,
    parse_facts,
    render_user_data,
    token_problem,
)
from server.errors import Invalid
from server.models import EnrollmentToken, Event, Instance, InstanceState
from server.processes import local_url, server_tls, tls_hostnames
from tests.conftest import REDIS_URL, Api, make_token

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def token_row(**changes: Any) -> EnrollmentToken:
    values: dict[str, Any] = {
        "token_hash": "x" * 64,
        "instance_id": "i",
        "created_at": NOW - timedelta(minutes=5),
        "expires_at": NOW + timedelta(hours=1),
        "used_at": None,
        "superseded_at": None,
    }
    values.update(changes)
    return EnrollmentToken(**values)


# --- pure decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (None, TokenProblem.INVALID),
        (token_row(), None),
        (token_row(used_at=NOW - timedelta(seconds=1)), TokenProblem.REUSED),
        (token_row(superseded_at=NOW - timedelta(seconds=1)), TokenProblem.SUPERSEDED),
        (token_row(expires_at=NOW), TokenProblem.EXPIRED),
        (token_row(expires_at=NOW - timedelta(seconds=1)), TokenProblem.EXPIRED),
        # A used token stays "reused" even after it expired: the more useful answer.
        (
            token_row(used_at=NOW - timedelta(hours=2), expires_at=NOW - timedelta(hours=1)),
            TokenProblem.REUSED,
        ),
    ],
)
def test_token_problem_names_why_a_token_is_unusable(
    row: EnrollmentToken | None, expected: TokenProblem | None
) -> None:
    assert token_problem(row, NOW) == expected


def test_tokens_are_256_bit_random_and_stored_only_as_hash() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    token = tokens.pop()
    assert token.startswith("sce_") and len(token) == 4 + 43
    assert hash_token(token) != token and len(hash_token(token)) == 64
    assert hash_token(token) == hash_token(token)


@pytest.mark.parametrize(
    ("setting", "version", "binary", "expected"),
    [
        ("auto", "18", "cinc-solo", "cinc:18"),
        ("auto", "17.10.3", "/opt/chef/bin/chef-solo", "chef:17.10.3"),
        ("", "18", "cinc-solo", "cinc:18"),
        ("cinc", "", "cinc-solo", "cinc:latest"),
        ("chef", "18", "cinc-solo", "chef:18"),
        ("cinc:16.12.3", "18", "cinc-solo", "cinc:16.12.3"),
        ("skip", "18", "cinc-solo", "skip"),
        ("url:https://pkg.example/c.deb#sha256=" + "a" * 64, "18", "x", None),
    ],
)
def test_chef_install_mode_follows_setting_and_stack(
    setting: str, version: str, binary: str, expected: str | None
) -> None:
    assert chef_install_mode(setting, version, binary) == (expected or setting)


@pytest.mark.parametrize("setting", ["cinc:18; rm -rf /", "apt", "url:http://x/y", "cinc:$(id)"])
def test_chef_install_mode_refuses_anything_unsafe(setting: str) -> None:
    with pytest.raises(ValueError):
        chef_install_mode(setting, "18", "cinc-solo")


def test_user_data_writes_the_ca_then_pipes_install_sh_into_bash() -> None:
    ca = pki.ca_certificate_pem(pki.create_ca()).decode()
    script = render_user_data(
        server_url="https://scalarium.example:8443/",
        token="sce_abc-DEF_123",
        ca_pem=ca,
        chef_mode="cinc:18",
        label="instance web1 (id) of stack prod",
        expires_at=NOW,
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "cat > /etc/scalarium/ca.pem <<'SCALARIUM_CA'" in lines
    assert ca.strip() in script
    assert "2026-11-26T12:00:00Z" in script
    assert shlex.split(lines[-1]) == [
        "curl",
        "-fsS",
        "--retry",
        "5",
        "--cacert",
        "/etc/scalarium/ca.pem",
        "https://scalarium.example:8443/bootstrap/v1/install.sh",
        "|",
        "bash",
        "-s",
        "--",
        "--server",
        "https://scalarium.example:8443",
        "--token",
        "sce_abc-DEF_123",
        "--chef",
        "cinc:18",
    ]


def test_user_data_under_a_root_writes_the_ca_there_and_passes_root(tmp_path: Path) -> None:
    ca = pki.ca_certificate_pem(pki.create_ca()).decode()
    script = render_user_data(
        server_url="http://127.0.0.1:9",
        token="sce_t",
        ca_pem=ca,
        chef_mode="skip",
        label="x",
        expires_at=NOW,
        root=str(tmp_path),
    )
    # Run everything but the download: the CA lands where install.sh will look for it.
    runnable = "\n".join(line for line in script.splitlines() if not line.startswith("curl "))
    subprocess.run(["bash", "-c", runnable], check=True)
    assert (tmp_path / "etc/scalarium/ca.pem").read_text().strip() == ca.strip()
    assert shlex.split(script.splitlines()[-1])[-2:] == ["--root", str(tmp_path)]


def test_user_data_is_valid_bash() -> None:
    script = render_user_data(
        server_url="https://h",
        token="sce_x",
        ca_pem=pki.ca_certificate_pem(pki.create_ca()).decode(),
        chef_mode="skip",
        label="it's $(weird) `label`\nrm -rf /",
        expires_at=NOW,
    )
    assert "\nrm -rf /" not in script
    subprocess.run(["bash", "-n"], input=script.encode(), check=True)


@pytest.mark.parametrize(
    ("facts", "version", "expected"),
    [
        (None, None, {}),
        ({"os": "ubuntu", "architecture": "x86_64"}, "1.0.0", None),
        ({"private_ip": "10.0.0.5", "public_ip": "2001:db8::1"}, None, None),
        ({"hostname": "node-7", "os_version": "22.04", "private_ip": None}, None, {}),
    ],
)
def test_parse_facts_keeps_known_columns(facts: Any, version: Any, expected: Any) -> None:
    wanted = dict(facts or {}) if expected is None else expected
    if version is not None:
        wanted["agent_version"] = version
    assert parse_facts(facts, version) == wanted


@pytest.mark.parametrize(
    ("facts", "version", "code"),
    [
        ([], None, "invalid_facts"),
        ({"os": "x" * 65}, None, "invalid_facts"),
        ({"architecture": 64}, None, "invalid_facts"),
        ({"private_ip": "10.0.0.300"}, None, "invalid_facts"),
        ({}, "", "invalid_agent_version"),
        ({}, "v" * 33, "invalid_agent_version"),
    ],
)
def test_parse_facts_refuses_malformed_values(facts: Any, version: Any, code: str) -> None:
    with pytest.raises(Invalid) as caught:
        parse_facts(facts, version)
    assert caught.value.code == code


def test_install_script_gets_the_server_url_quoted_for_bash() -> None:
    script = (BOOTSTRAP_DIR / "install.sh").read_text()
    rendered = render_install_script(script, "https://it's.example/")
    assert "SCALARIUM_URL_DEFAULT='https://it'\\''s.example'" in rendered
    # The comparison against the placeholder is split so that it survives substitution.
    assert "'@@SCALARIUM''_URL@@'" in rendered


# --- settings, CA and TLS ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "tls"),
    [
        ({}, False),
        ({"SCALARIUM_PUBLIC_URL": "https://ops.example"}, True),
        ({"SCALARIUM_PUBLIC_URL": "https://ops.example", "SCALARIUM_TLS": "0"}, False),
        ({"SCALARIUM_TLS": "1"}, True),
        ({"SCALARIUM_TLS": "auto"}, False),
    ],
)
def test_tls_is_on_when_asked_or_when_the_public_url_is_https(
    env: dict[str, str], tls: bool
) -> None:
    settings = load_settings(env)
    assert settings.tls_enabled is tls
    if env.get("SCALARIUM_TLS") == "1":
        assert settings.public_url.startswith("https://")


@pytest.mark.parametrize(
    "env",
    [
        {"SCALARIUM_TLS": "maybe"},
        {"SCALARIUM_CA_CERT": "/x.pem"},
        {"SCALARIUM_ENROLL_TOKEN_TTL": "soon"},
    ],
)
def test_bad_enrollment_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        load_settings(env)


def test_enrollment_settings_have_documented_defaults() -> None:
    settings = load_settings({})
    assert (settings.enroll_token_ttl, settings.cert_lifetime_days) == (3600, 365)
    assert settings.chef_install == "auto"
    assert settings.pki_dir == settings.data_dir / "pki"


def test_server_tls_material_covers_the_public_host_and_chains_to_the_ca(tmp_path: Path) -> None:
    settings = load_settings(
        {},
        data_dir=str(tmp_path),
        public_url="https://ops.example:8443",
        bind="0.0.0.0:8443",
    )
    assert tls_hostnames(settings) == ["ops.example", "localhost", "127.0.0.1"]
    assert local_url(settings) == "https://127.0.0.1:8443"
    found = server_tls(settings)
    assert found is not None
    cert, key = found
    assert cert.parent == settings.pki_dir and (key.stat().st_mode & 0o777) == 0o600
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(settings.pki_dir / "ca.pem"), str(cert)],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert server_tls(load_settings({}, data_dir=str(tmp_path))) is None


def test_operator_ca_is_used_when_configured(tmp_path: Path) -> None:
    ca = pki.create_ca("Operator CA")
    (tmp_path / "op.pem").write_bytes(pki.ca_certificate_pem(ca))
    own = pki.load_or_create_ca(tmp_path / "own")
    key_pem = (tmp_path / "own" / "ca-key.pem").read_bytes()
    cert_pem = (tmp_path / "own" / "ca.pem").read_bytes()
    (tmp_path / "k.pem").write_bytes(key_pem)
    (tmp_path / "c.pem").write_bytes(cert_pem)
    from server.app import create_app

    settings = load_settings(
        {},
        data_dir=str(tmp_path / "data"),
        ca_cert=str(tmp_path / "c.pem"),
        ca_key=str(tmp_path / "k.pem"),
        redis_url=REDIS_URL,
    )
    app = create_app(settings)
    body = app.test_client().get("/bootstrap/v1/ca.pem").data
    assert body == cert_pem
    assert own.fingerprint_sha256 != ca.fingerprint_sha256
    # The installation CA was not created beside the operator's.
    assert not (settings.pki_dir / "ca-key.pem").exists()


# --- bootstrap downloads ----------------------------------------------------------------------


def test_bootstrap_serves_install_sh_with_the_public_url(app: Flask) -> None:
    response = app.test_client().get("/bootstrap/v1/install.sh")
    assert response.status_code == 200
    assert response.mimetype == "text/x-shellscript"
    text = response.get_data(as_text=True)
    url = app.config["SCALARIUM"].public_url
    assert f"SCALARIUM_URL_DEFAULT='{url}'" in text
    subprocess.run(["bash", "-n"], input=text.encode(), check=True)


def test_bootstrap_serves_the_agent_and_the_ca(app: Flask) -> None:
    client = app.test_client()
    agent = client.get("/bootstrap/v1/agent.py")
    assert agent.status_code == 200
    assert agent.data == (BOOTSTRAP_DIR / "agent.py").read_bytes()
    again = client.get("/bootstrap/v1/agent.py", headers={"If-None-Match": agent.headers["ETag"]})
    assert again.status_code == 304
    ca = client.get("/bootstrap/v1/ca.pem")
    assert ca.status_code == 200
    assert ca.data == (app.config["SCALARIUM"].pki_dir / "ca.pem").read_bytes()


# --- user-data through the API ----------------------------------------------------------------


@pytest.fixture
def instance(admin: Api) -> dict[str, Any]:
    stack = admin.ok("POST", "/stacks", {"shortname": "prod", "name": "Production"})
    layer = admin.ok("POST", f"/stacks/{stack['id']}/layers", {"shortname": "web"})
    created: dict[str, Any] = admin.ok(
        "POST",
        f"/stacks/{stack['id']}/instances",
        {"hostname": "web1", "layer_ids": [layer["id"]]},
    )
    return created


def token_of(script: str) -> str:
    words = shlex.split(script.splitlines()[-1])
    return words[words.index("--token") + 1]


def tokens(app: Flask, instance_id: str) -> list[EnrollmentToken]:
    with get_database(app).session() as session:
        return list(
            session.scalars(
                select(EnrollmentToken)
                .where(EnrollmentToken.instance_id == instance_id)
                .order_by(EnrollmentToken.created_at)
            )
        )


def test_user_data_issues_a_token_moves_to_pending_and_records_an_event_without_it(
    app: Flask, admin: Api, instance: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = admin.call("GET", f"/instances/{instance['id']}/user-data")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert body["status"] == InstanceState.PENDING
    token = token_of(body["user_data"])
    assert app.config["SCALARIUM"].public_url + "/bootstrap/v1/install.sh" in body["user_data"]
    (row,) = tokens(app, instance["id"])
    assert row.token_hash == hash_token(token)
    assert row.expires_at - row.created_at == timedelta(seconds=3600)
    with get_database(app).session() as session:
        found = session.scalars(select(Event).where(Event.kind == "instance.user_data")).all()
        assert len(found) == 1 and found[0].instance_id == instance["id"]
        every_event = " ".join(f"{e.message} {e.data}" for e in session.scalars(select(Event)))
    assert token not in every_event
    assert token not in caplog.text
    assert hash_token(token) not in caplog.text


def test_asking_again_supersedes_the_old_token(
    app: Flask, admin: Api, instance: dict[str, Any]
) -> None:
    first = token_of(admin.ok("GET", f"/instances/{instance['id']}/user-data")["user_data"])
    second = token_of(admin.ok("GET", f"/instances/{instance['id']}/user-data")["user_data"])
    assert first != second
    old, new = tokens(app, instance["id"])
    assert old.superseded_at is not None and new.superseded_at is None
    assert new.token_hash == hash_token(second)


@pytest.mark.parametrize(
    ("status", "after"),
    [
        (InstanceState.REQUESTED, InstanceState.PENDING),
        (InstanceState.STOPPED, InstanceState.PENDING),
        (InstanceState.ONLINE, InstanceState.ONLINE),
        (InstanceState.SETUP_FAILED, InstanceState.SETUP_FAILED),
    ],
)
def test_user_data_moves_only_requested_or_stopped_instances_to_pending(
    app: Flask, admin: Api, instance: dict[str, Any], status: str, after: str
) -> None:
    with get_database(app).session() as session:
        row = session.get(Instance, instance["id"])
        assert row is not None
        row.status = status
    assert admin.ok("GET", f"/instances/{instance['id']}/user-data")["status"] == after


def test_user_data_is_refused_for_a_terminated_instance(
    app: Flask, admin: Api, instance: dict[str, Any]
) -> None:
    with get_database(app).session() as session:
        row = session.get(Instance, instance["id"])
        assert row is not None
        row.status = InstanceState.TERMINATED
    admin.error("GET", f"/instances/{instance['id']}/user-data", None, 409, "instance_terminated")
    assert tokens(app, instance["id"]) == []


def test_user_data_needs_the_manager_role(
    app: Flask, admin: Api, instance: dict[str, Any], as_role: Any
) -> None:
    from server.models import Role

    path = f"/instances/{instance['id']}/user-data"
    as_role(instance["stack_id"], Role.DEPLOYER).error("GET", path, None, 403, "role_too_low")
    as_role(instance["stack_id"], None).error("GET", path, None, 404, "instance_not_found")
    Api(app.test_client(), "").error("GET", path, None, 401, "missing_token")
    assert tokens(app, instance["id"]) == []
    assert as_role(instance["stack_id"], Role.MANAGER).ok("GET", path)["user_data"]


def test_user_data_is_in_the_openapi_document(admin: Api) -> None:
    document = admin.ok("GET", "/openapi.json")
    operation = document["paths"]["/api/v1/instances/{instance_id}/user-data"]["get"]
    assert (
        "user_data"
        in operation["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
    )


def test_cli_prints_the_user_data(app: Flask, instance: dict[str, Any], capsys: Any) -> None:
    from werkzeug.serving import make_server

    from server import cli

    token = make_token(app, "cli", admin=True)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        code = cli.main(
            ["instances", "user-data", "web1", "--stack", "prod", "--token", token, "--url", url]
        )
    finally:
        server.shutdown()
        thread.join()
    assert code == 0
    out = capsys.readouterr()
    assert out.out.startswith("#!/bin/bash\n")
    assert token_of(out.out).startswith("sce_")
    assert "token valid until" in out.err
