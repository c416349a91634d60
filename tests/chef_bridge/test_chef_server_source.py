"""A stack's cookbooks can live on an existing Chef Server: the chef_server source (goiardi)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chef_bridge.chef_server import ChefServerClient
from chef_bridge.repository import find_cookbooks, find_repo_dirs
from chef_bridge.sources import SourceError, fetch_source
from server import pki
from tests.chef_bridge import goiardi

pytestmark = pytest.mark.goiardi
goiardi_server = goiardi.goiardi_server


def cookbook(root: Path, name: str) -> Path:
    path = root / name
    (path / "recipes").mkdir(parents=True)
    (path / "metadata.rb").write_text(f"name '{name}'\nversion '1.2.0'\n")
    (path / "recipes" / "default.rb").write_text(f"log 'hello from {name}'\n")
    return path


def test_a_chef_server_source_fetches_cookbooks_and_roles(
    goiardi_server: goiardi.Goiardi, tmp_path: Path
) -> None:
    client = ChefServerClient(
        goiardi_server.url, goiardi_server.admin_name, goiardi_server.admin_key
    )
    client.upload_cookbook(cookbook(tmp_path / "src", "nginx"))
    client.save_role(
        {
            "name": "frontend",
            "json_class": "Chef::Role",
            "chef_type": "role",
            "run_list": ["recipe[nginx]"],
        }
    )
    source = {
        "type": "chef_server",
        "url": goiardi_server.url,
        "username": goiardi_server.admin_name,
        "ssh_key": goiardi_server.admin_key.decode(),
    }
    fetched = fetch_source(source, tmp_path / "tree")
    assert fetched.revision.startswith("sha256:")
    assert sorted(find_cookbooks(fetched.path)) == ["nginx"]
    roles = find_repo_dirs(fetched.path)["roles"]
    assert json.loads((roles / "frontend.json").read_text())["run_list"] == ["recipe[nginx]"]
    # The same content fetched again resolves to the same revision.
    assert fetch_source(source, tmp_path / "again").revision == fetched.revision


def test_a_chef_server_source_with_a_wrong_key_is_an_auth_failure(
    goiardi_server: goiardi.Goiardi, tmp_path: Path
) -> None:
    source = {
        "type": "chef_server",
        "url": goiardi_server.url,
        "username": goiardi_server.admin_name,
        "ssh_key": pki.generate_private_key_pem(2048).decode(),
    }
    with pytest.raises(SourceError) as raised:
        fetch_source(source, tmp_path / "tree")
    assert raised.value.code == "source_auth_failed"
    assert "BEGIN" not in str(raised.value)
    assert not (tmp_path / "tree").exists()
