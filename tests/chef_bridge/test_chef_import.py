"""``chef import`` against goiardi: what is seeded on the server comes back as a chef-repo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chef_bridge.chef_import import ChefImportError, ImportSummary, import_from_server
from chef_bridge.chef_server import ChefServerClient, ChefServerError, ErrorCode
from chef_bridge.metadata import read_metadata
from chef_bridge.versions import Version
from tests.chef_bridge import goiardi
from tests.chef_bridge.goiardi import Goiardi

pytestmark = pytest.mark.goiardi

goiardi_server = goiardi.goiardi_server

# Full documents, as goiardi returns them, so that what comes back must equal what went in.
ROLES = [
    {
        "name": "web",
        "json_class": "Chef::Role",
        "chef_type": "role",
        "description": "web servers",
        "run_list": ["recipe[site]", "role[base]"],
        "env_run_lists": {},
        "default_attributes": {"site": {"port": 8080}},
        "override_attributes": {},
    },
    {
        "name": "base",
        "json_class": "Chef::Role",
        "chef_type": "role",
        "description": "",
        "run_list": ["recipe[site::users]"],
        "env_run_lists": {},
        "default_attributes": {},
        "override_attributes": {"ntp": {"servers": ["0.pool.ntp.org"]}},
    },
]
ENVIRONMENTS = [
    {
        "name": name,
        "json_class": "Chef::Environment",
        "chef_type": "environment",
        "description": f"{name} servers",
        "cookbook_versions": {"site": "~> 1.2"},
        "default_attributes": {"tier": name},
        "override_attributes": {},
    }
    for name in ("production", "staging")
]
ITEMS = [{"id": "alice", "uid": 1000, "groups": ["ops"]}, {"id": "bob", "uid": 1001}]
COOKBOOK_FILES = {
    "metadata.json": json.dumps(
        {"name": "site", "version": "{version}", "dependencies": {"apt": ">= 2.0"}}, indent=2
    )
    + "\n",
    "recipes/default.rb": "template '/etc/site.conf' do\n  source 'site.conf.erb'\nend\n",
    "recipes/users.rb": "user 'alice'\n",
    "templates/default/site.conf.erb": "listen <%= node['site']['port'] %>\n",
    "attributes/default.rb": "default['site']['port'] = 80\n",
    "files/default/motd": "welcome\n",
}
VERSIONS = ["1.9.0", "1.10.0"]  # the newest is 1.10.0: ordered as numbers, not as text


def write_site_cookbook(root: Path, version: str) -> Path:
    cookbook = root / f"site-{version}"
    for relative, text in COOKBOOK_FILES.items():
        (cookbook / relative).parent.mkdir(parents=True, exist_ok=True)
        (cookbook / relative).write_text(text.replace("{version}", version))
    return cookbook


@pytest.fixture(scope="module")
def seeded(goiardi_server: Goiardi, tmp_path_factory: pytest.TempPathFactory) -> ChefServerClient:
    """goiardi holding 2 roles, 2 environments, a bag of 2 items and 2 versions of a cookbook."""
    client = ChefServerClient(
        goiardi_server.url, goiardi_server.admin_name, goiardi_server.admin_key
    )
    for role in ROLES:
        client.create_role(role)
    for environment in ENVIRONMENTS:
        client.create_environment(environment)
    client.create_data_bag("users")
    for item in ITEMS:
        client.create_data_bag_item("users", item)
    sources = tmp_path_factory.mktemp("cookbooks")
    for version in VERSIONS:
        client.upload_cookbook(write_site_cookbook(sources, version))
    return client


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_import_round_trips_roles_environments_data_bags_and_the_latest_cookbook(
    seeded: ChefServerClient, tmp_path: Path
) -> None:
    messages: list[str] = []
    dest = tmp_path / "repo"
    summary = import_from_server(seeded, dest, progress=messages.append)

    for role in ROLES:
        assert read_json(dest / "roles" / f"{role['name']}.json") == role
    for environment in ENVIRONMENTS:
        assert read_json(dest / "environments" / f"{environment['name']}.json") == environment
    # _default exists on every Chef server and is kept.
    assert read_json(dest / "environments" / "_default.json")["name"] == "_default"
    for item in ITEMS:
        assert read_json(dest / "data_bags" / "users" / f"{item['id']}.json") == item

    cookbook = dest / "cookbooks" / "site"
    assert files_under(cookbook) == set(COOKBOOK_FILES)
    for relative, text in COOKBOOK_FILES.items():
        assert (cookbook / relative).read_bytes() == text.replace("{version}", "1.10.0").encode()
    metadata = read_metadata(cookbook)
    assert (metadata.name, metadata.version) == ("site", Version(1, 10, 0))
    assert str(metadata.dependencies["apt"]) == ">= 2.0"

    assert summary == ImportSummary(
        dest=dest,
        roles=2,
        environments=3,
        data_bags=1,
        data_bag_items=2,
        cookbooks=(("site", "1.10.0"),),
        cookbook_files=len(COOKBOOK_FILES),
        cookbook_bytes=sum(len(t.replace("{version}", "1.10.0")) for t in COOKBOOK_FILES.values()),
    )
    assert "cookbook site 1.10.0: 6 files (1/1)" in messages
    assert messages[-1].startswith("done: 2 roles")
    # Only the finished repository is left beside it: the staging directory was renamed.
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_import_of_every_version_uses_the_versioned_cookbook_layout(
    seeded: ChefServerClient, tmp_path: Path
) -> None:
    summary = import_from_server(seeded, tmp_path / "repo", latest_only=False)
    assert summary.cookbooks == (("site", "1.10.0"), ("site", "1.9.0"))
    for version in VERSIONS:
        cookbook = tmp_path / "repo" / "cookbooks" / f"site-{version}"
        assert read_metadata(cookbook).version == Version.parse(version)


def test_import_into_an_existing_empty_directory_fills_it(
    seeded: ChefServerClient, tmp_path: Path
) -> None:
    dest = tmp_path / "repo"
    dest.mkdir()
    import_from_server(seeded, dest, cookbooks=["site"])
    assert (dest / "cookbooks" / "site" / "metadata.json").is_file()


def test_a_failed_import_leaves_nothing_behind(seeded: ChefServerClient, tmp_path: Path) -> None:
    with pytest.raises(ChefServerError) as caught:
        import_from_server(seeded, tmp_path / "repo", cookbooks=["site", "no-such-cookbook"])
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert list(tmp_path.iterdir()) == []


def test_import_refuses_a_destination_that_holds_files(
    seeded: ChefServerClient, tmp_path: Path
) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "keep.txt").write_text("mine")
    with pytest.raises(ChefImportError) as caught:
        import_from_server(seeded, tmp_path / "repo")
    assert caught.value.code == "destination_not_empty"
    assert files_under(tmp_path) == {"repo/keep.txt"}
