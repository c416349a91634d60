"""The CLI drives the real API served by a real `scalarium server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.cli import main
from tests.conftest import PG_ADMIN_URL, REDIS_URL
from tests.server.live import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    with live_server(tmp_path_factory.mktemp("cli"), REDIS_URL) as live:
        yield live
    client.flushdb()
    client.close()


@pytest.fixture
def cli(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """Run `scalarium ARGS...` in-process against the live server; returns (code, out, err)."""
    monkeypatch.setenv("SCALARIUM_URL", server.url)
    monkeypatch.setenv("SCALARIUM_TOKEN", server.token)
    monkeypatch.setenv("SCALARIUM_DATA_DIR", str(server.data_dir))
    monkeypatch.setenv("SCALARIUM_REDIS_URL", REDIS_URL)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_create_list_show_update_delete_a_stack_from_the_command_line(cli: Any) -> None:
    code, out, _ = cli("stacks", "create", "web", "--set", "region=eu-west-1", "--json")
    assert code == 0
    created = json.loads(out)
    assert created["region"] == "eu-west-1"
    code, out, _ = cli("stacks", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["ID", "SHORTNAME", "NAME"]
    assert any(" web " in f" {row} " for row in rows)
    code, out, _ = cli("stacks", "show", "web", "--json")
    assert json.loads(out)["id"] == created["id"]
    code, out, _ = cli("stacks", "update", "web", "--set", 'custom_json={"a": 1}', "--json")
    assert json.loads(out)["custom_json"] == {"a": 1}
    code, out, _ = cli("stacks", "delete", "web")
    assert (code, out.strip()) == (0, f"deleted {created['id']}")


def test_layers_instances_and_apps_by_name(cli: Any) -> None:
    assert cli("stacks", "create", "shop")[0] == 0
    assert (
        cli(
            "layers",
            "create",
            "--stack",
            "shop",
            "lb",
            "--set",
            'recipes={"configure": ["haproxy::configure"]}',
        )[0]
        == 0
    )
    assert cli("layers", "create", "--stack", "shop", "app")[0] == 0
    code, out, err = cli(
        "instances",
        "create",
        "--stack",
        "shop",
        "web1",
        "--layer",
        "app",
        "--layer",
        "lb",
        "--json",
    )
    assert code == 0, err
    instance = json.loads(out)
    assert len(instance["layer_ids"]) == 2
    code, out, _ = cli("instances", "list", "--stack", "shop")
    assert "web1" in out and "requested" in out
    code, out, _ = cli(
        "apps",
        "create",
        "--stack",
        "shop",
        "store",
        "--data",
        '{"environment": {"KEY": {"value": "v", "secure": true}}}',
        "--json",
    )
    assert code == 0
    assert json.loads(out)["environment"]["KEY"]["value"] == "*****"
    code, out, _ = cli("stacks", "events", "shop")
    assert "instance.created" in out and "app.created" in out
    code, out, _ = cli("stacks", "clone", "shop", "shop-copy", "--json")
    assert code == 0
    code, out, _ = cli("layers", "list", "--stack", "shop-copy", "--json")
    assert sorted(x["shortname"] for x in json.loads(out)) == ["app", "lb"]


def test_server_errors_exit_non_zero_with_the_servers_message(cli: Any) -> None:
    assert cli("stacks", "create", "dup")[0] == 0
    code, _, err = cli("stacks", "create", "dup")
    assert code == 1
    assert "duplicate_shortname" in err
    code, _, err = cli("stacks", "create", "Bad_Name")
    assert code == 1
    assert "invalid_format" in err
    code, _, err = cli("stacks", "show", "no-such-stack")
    assert code == 1
    assert "stack_not_found" in err
    code, _, err = cli("deployments", "create", "--stack", "dup", "configure")
    assert code == 1
    assert "no_online_instances" in err


def test_a_bad_token_exits_non_zero(cli: Any, server: LiveServer) -> None:
    code, _, err = cli("stacks", "list", "--token", "scl_wrong")
    assert code == 1
    assert "bad_token" in err


def test_usage_errors_exit_2(cli: Any) -> None:
    code, _, err = cli("stacks", "update", "anything")
    assert code == 2
    assert "nothing to change" in err
    code, _, err = cli("stacks", "create", "x", "--data", "[1]")
    assert code == 2


def test_tokens_create_list_and_revoke(cli: Any, server: LiveServer) -> None:
    cli("stacks", "create", "tok")
    code, out, err = cli("tokens", "create", "ci-bot", "--role", "tok=deployer")
    assert code == 0, err
    token_id = out.split()[1]
    plaintext = out.strip().splitlines()[-1]
    assert plaintext.startswith("scl_")
    code, out, _ = cli("stacks", "list", "--token", plaintext, "--json")
    assert [s["shortname"] for s in json.loads(out)] == ["tok"]
    code, out, _ = cli("tokens", "list", "--json")
    listed = {t["id"]: t for t in json.loads(out)}
    assert plaintext not in out
    assert listed[token_id]["roles"].endswith("=deployer")
    assert cli("tokens", "revoke", token_id)[0] == 0
    code, _, err = cli("stacks", "list", "--token", plaintext)
    assert code == 1 and "bad_token" in err
    code, _, err = cli("tokens", "create", "x", "--role", "tok=emperor")
    assert code == 2


def test_deployments_show_follow_on_a_finished_deployment(cli: Any, server: LiveServer) -> None:
    from sqlalchemy import create_engine, text

    cli("stacks", "create", "dep")
    cli("layers", "create", "--stack", "dep", "app")
    code, out, _ = cli("instances", "create", "--stack", "dep", "web1", "--layer", "app", "--json")
    instance_id = json.loads(out)["id"]
    engine = create_engine(f"sqlite:///{server.data_dir / 'scalarium.db'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE instances SET status='online' WHERE id=:i"), {"i": instance_id})
    code, out, err = cli(
        "deployments",
        "create",
        "--stack",
        "dep",
        "execute_recipes",
        "--recipe",
        "base::ping",
        "--json",
    )
    assert code == 0, err
    deployment = json.loads(out)
    command_id = deployment["commands"][0]["id"]
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE commands SET status='successful', log=:l WHERE id=:i"),
            {"l": "Recipe: base::ping\nChef Infra Client finished\n", "i": command_id},
        )
        conn.execute(
            text("UPDATE deployments SET status='successful' WHERE id=:i"), {"i": deployment["id"]}
        )
    engine.dispose()
    code, out, _ = cli("deployments", "show", deployment["id"], "--follow")
    assert code == 0
    assert f"[{instance_id[:8]}] Recipe: base::ping" in out
    assert out.strip().endswith("successful")
    code, out, _ = cli("deployments", "log", command_id)
    assert "Chef Infra Client finished" in out


def test_the_console_script_runs_as_a_subprocess(server: LiveServer, tmp_path: Path) -> None:
    env = dict(server.env, SCALARIUM_URL=server.url, SCALARIUM_TOKEN=server.token)
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "stacks", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


def test_config_masks_secrets(monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path) -> None:
    monkeypatch.setenv("SCALARIUM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SCALARIUM_DATABASE_URL", "postgresql://scal:topsecret@db.internal/scal")
    monkeypatch.setenv("SCALARIUM_REDIS_URL", "redis://:redispass@127.0.0.1:6379/0")
    monkeypatch.setenv("SCALARIUM_SECRET_KEY", "very-secret-key")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for secret in ("topsecret", "redispass", "very-secret-key"):
        assert secret not in out
    assert "postgresql://scal:*****@db.internal/scal" in out
    assert os.environ["SCALARIUM_DATA_DIR"] in out


def test_instance_lifecycle_commands(cli: Any) -> None:
    cli("stacks", "create", "life")
    cli("layers", "create", "--stack", "life", "app")
    cli("instances", "create", "--stack", "life", "m1", "--layer", "app")
    code, out, err = cli("instances", "start", "--stack", "life", "m1")
    assert (code, out.strip()) == (0, "instance m1: pending"), err
    code, out, _ = cli("instances", "stop", "--stack", "life", "m1")
    assert (code, out.strip()) == (0, "instance m1: stopped")
    code, _, err = cli("instances", "setup", "--stack", "life", "m1")
    assert code == 1 and "illegal_transition" in err
    code, out, _ = cli("instances", "terminate", "--stack", "life", "m1", "--json")
    assert code == 0 and json.loads(out)["status"] == "terminated"
    code, out, _ = cli("stacks", "events", "life")
    assert "stopped -> terminated" in out


def test_update_cookbooks_is_queued(cli: Any) -> None:
    cli("stacks", "create", "books")
    code, out, err = cli("stacks", "update-cookbooks", "books")
    assert code == 0, err
    assert out.startswith("update-cookbooks: queued")


@pytest.mark.parametrize("command", [["db", "upgrade"], ["tokens", "list"]])
def test_a_database_that_cannot_be_used_is_one_clear_line(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    missing = PG_ADMIN_URL.rsplit("/", 1)[0].replace("://postgres@", "://postgres:pw@")
    monkeypatch.setenv("SCALARIUM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SCALARIUM_DATABASE_URL", missing + "/scalarium_no_such_database")
    monkeypatch.setenv("SCALARIUM_REDIS_URL", REDIS_URL)
    assert main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: database_unavailable: cannot use the database postgresql")
    assert '"scalarium_no_such_database" does not exist' in err
    assert "Traceback" not in err and ":pw@" not in err
