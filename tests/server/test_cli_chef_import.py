"""`scalarium chef import` copies a real Chef Server's content (goiardi) into a chef-repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chef_bridge.chef_server import ChefServerClient
from server.cli import main
from tests.chef_bridge import goiardi

pytestmark = pytest.mark.goiardi
goiardi_server = goiardi.goiardi_server


def test_chef_import_writes_a_chef_repo(
    goiardi_server: goiardi.Goiardi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = ChefServerClient(
        goiardi_server.url, goiardi_server.admin_name, goiardi_server.admin_key
    )
    client.save_role(
        {
            "name": "web",
            "json_class": "Chef::Role",
            "chef_type": "role",
            "run_list": ["recipe[nginx]"],
            "default_attributes": {"port": 80},
        }
    )
    key = tmp_path / "admin.pem"
    key.write_bytes(goiardi_server.admin_key)
    dest = tmp_path / "repo"
    code = main(
        [
            "chef",
            "import",
            str(dest),
            "--server",
            goiardi_server.url,
            "--client",
            goiardi_server.admin_name,
            "--key",
            str(key),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    role = json.loads((dest / "roles" / "web.json").read_text())
    assert role["run_list"] == ["recipe[nginx]"]
    assert "BEGIN" not in captured.out + captured.err  # the key is never printed


def test_chef_import_reports_a_wrong_key_clearly(
    goiardi_server: goiardi.Goiardi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server import pki

    key = tmp_path / "other.pem"
    key.write_bytes(pki.generate_private_key_pem(2048))
    code = main(
        [
            "chef",
            "import",
            str(tmp_path / "repo"),
            "--server",
            goiardi_server.url,
            "--client",
            goiardi_server.admin_name,
            "--key",
            str(key),
        ]
    )
    assert code == 1
    assert "unauthorized" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_chef_import_with_a_missing_key_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "chef",
            "import",
            str(tmp_path / "repo"),
            "--server",
            "http://127.0.0.1:1",
            "--client",
            "x",
            "--key",
            str(tmp_path / "nope.pem"),
        ]
    )
    assert code == 2
    assert "nope.pem" in capsys.readouterr().err
