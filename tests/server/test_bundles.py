"""Stack cookbook bundles (server/bundles.py, server/api/cookbooks.py): built from a stack's
custom source plus the built-in cookbooks, cached, sent to instances by update-cookbooks."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from rq import Queue, SimpleWorker
from rq.job import Job
from sqlalchemy import delete, select

import server.api.cookbooks  # noqa: F401  (registers the routes until app.py imports it)
from chef_bridge.resolver import ResolutionError
from chef_bridge.versions import CookbookError
from server import bundles, runtime
from server.bundles import (
    BASE_RECIPES,
    BUILTIN_COOKBOOKS,
    Wanted,
    build_stack_bundle,
    ensure_stack_bundle,
    expand_roles,
    server_error,
    stack_run_list,
)
from server.db import get_database
from server.errors import Conflict, Invalid, ScalariumError, Unavailable
from server.keys import Keys
from server.models import Command, Deployment, Event, Instance, InstanceState, Role, Stack
from server.vault import Vault
from server.wakeups import wake_channel
from tests.conftest import REDIS_URL, Api

FIXTURES = Path(__file__).parent / "fixtures" / "cookbooks"
REPO_ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- pure decisions

RUN_LIST_CASES = [
    pytest.param([], [Wanted("recipe[scalarium_base]", "base recipes")], id="base-only"),
    pytest.param(
        [("app", {"setup": ["web"], "configure": ["web::configure", "web"]})],
        [
            Wanted("recipe[scalarium_base]", "base recipes"),
            Wanted("web::configure", "layer app (configure)"),
            Wanted("web", "layer app (configure)"),
        ],
        id="every-event-once-each",
    ),
    pytest.param(
        [("lb", {"deploy": ["haproxy"]}), ("app", {"deploy": ["haproxy", "rails"]})],
        [
            Wanted("recipe[scalarium_base]", "base recipes"),
            Wanted("haproxy", "layer lb (deploy)"),
            Wanted("rails", "layer app (deploy)"),
        ],
        id="first-layer-naming-an-entry-is-its-requester",
    ),
]


@pytest.mark.parametrize(("layers", "expected"), RUN_LIST_CASES)
def test_stack_run_list_names_base_and_every_layer_recipe_once(
    layers: list[tuple[str, dict[str, list[str]]]], expected: list[Wanted]
) -> None:
    assert stack_run_list(layers) == expected


ROLE_CASES = [
    pytest.param(
        [Wanted("role[web]", "layer a (setup)")],
        {"web": ["recipe[nginx]", "role[base]"], "base": ["recipe[ntp]"]},
        [Wanted("recipe[nginx]", "role web"), Wanted("recipe[ntp]", "role base")],
        id="nested-roles-in-order",
    ),
    pytest.param(
        [Wanted("role[a]", "x")],
        {"a": ["role[b]", "recipe[one]"], "b": ["role[a]", "recipe[two]"]},
        [Wanted("recipe[two]", "role b"), Wanted("recipe[one]", "role a")],
        id="a-cycle-expands-once",
    ),
    pytest.param(
        [Wanted("role[ruby_only]", "x"), Wanted("web", "y")],
        {"ruby_only": None},
        [Wanted("web", "y")],
        id="unreadable-role-is-skipped",
    ),
]


@pytest.mark.parametrize(("wanted", "roles", "expected"), ROLE_CASES)
def test_roles_are_replaced_by_their_recipes(
    wanted: list[Wanted], roles: dict[str, list[str] | None], expected: list[Wanted]
) -> None:
    assert expand_roles(wanted, roles) == expected


def test_a_role_nobody_defines_is_refused_naming_who_asked() -> None:
    with pytest.raises(ResolutionError) as caught:
        expand_roles([Wanted("role[ghost]", "layer app (setup)")], {})
    assert caught.value.code == "role_missing"
    assert caught.value.details == {"role": "ghost", "requested_by": ["layer app (setup)"]}


ERROR_CASES = [
    ("cookbook_missing", Conflict),
    ("constraint_conflict", Conflict),
    ("metadata_unreadable", Conflict),
    ("invalid_source", Invalid),
    ("source_unreachable", Unavailable),
    ("timeout", Unavailable),
]


@pytest.mark.parametrize(("code", "kind"), ERROR_CASES)
def test_cookbook_errors_keep_their_code_in_the_server_hierarchy(
    code: str, kind: type[ScalariumError]
) -> None:
    error = server_error(CookbookError("boom", code, {"cookbook": "x"}))
    assert type(error) is kind
    assert (error.code, error.details, error.message) == (code, {"cookbook": "x"}, "boom")


def test_every_builtin_ruby_file_passes_ruby_syntax_check() -> None:
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby is not installed (make deps installs it)")
    files = sorted(BUILTIN_COOKBOOKS.rglob("*.rb"))
    assert BUILTIN_COOKBOOKS / "scalarium_base" / "recipes" / "default.rb" in files
    for path in files:
        result = subprocess.run([ruby, "-c", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"


# ---------------------------------------------------------------- building from sources


@pytest.fixture
def custom_repo(tmp_path: Path) -> Path:
    """A private copy of the custom cookbook fixture, free to change."""
    copy = tmp_path / "custom"
    shutil.copytree(FIXTURES / "custom", copy)
    return copy


def git(cwd: Path, *args: str) -> str:
    """Run git in a test repository."""
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "HOME": str(cwd),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def make_git_repo(tree: Path) -> str:
    """Turn a tree into a git repository on branch main; returns the commit sha."""
    git(tree, "init", "-q", "-b", "main")
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", "cookbooks")
    return git(tree, "rev-parse", "HEAD")


def vault_of(app: Flask) -> Vault:
    found: Vault = app.extensions["scalarium.vault"]
    return found


def make_stack(admin: Api, source: dict[str, Any] | None, recipes: dict[str, list[str]]) -> str:
    """A stack using these custom cookbooks, with one layer running these recipes."""
    body: dict[str, Any] = {"shortname": "prod"}
    if source is not None:
        body.update(use_custom_cookbooks=True, custom_cookbooks_source=source)
    stack = admin.ok("POST", "/stacks", body)
    admin.ok("POST", f"/stacks/{stack['id']}/layers", {"shortname": "app", "recipes": recipes})
    return str(stack["id"])


APP_RECIPES = {"setup": ["web"], "configure": ["role[frontend]"]}


def build(app: Flask, stack_id: str) -> tuple[str, dict[str, Any]]:
    """Build the stack's bundle and commit; returns its sha and the recorded event data."""
    with get_database(app).session() as session:
        bundle = build_stack_bundle(session, stack_id, app.config["SCALARIUM"], vault_of(app))
    with get_database(app).session() as session:
        stack = session.get(Stack, stack_id)
        assert stack is not None and stack.bundle_sha256 == bundle.sha256
        assert stack.bundle_built_at is not None
        event = session.scalars(
            select(Event).where(Event.kind == "stack.bundle").order_by(Event.id.desc())
        ).first()
        assert event is not None
        return bundle.sha256, event.data


def members(app: Flask, sha: str) -> dict[str, str]:
    """Archive path -> file content (empty for directories) of a stored bundle."""
    path = bundles.bundle_path(app.config["SCALARIUM"], sha)
    assert path is not None
    found: dict[str, str] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            found[member.name] = handle.read().decode() if handle else ""
    return found


def cookbook_names(files: dict[str, str]) -> set[str]:
    return {p.split("/")[1] for p in files if p.startswith("cookbooks/") and p.count("/") >= 1}


EXPECTED_COOKBOOKS = {"web": "1.2.0", "helper": "1.0.3", "scalarium_base": "1.0.0"}


def test_directory_source_bundle_holds_the_run_lists_closure_base_and_repo_dirs(
    app: Flask, admin: Api, custom_repo: Path
) -> None:
    stack_id = make_stack(admin, {"type": "directory", "url": str(custom_repo)}, APP_RECIPES)
    sha, data = build(app, stack_id)
    files = members(app, sha)
    assert cookbook_names(files) == set(EXPECTED_COOKBOOKS)  # not `unused`, in no run list
    assert "cookbooks/scalarium_base/recipes/default.rb" in files
    assert "cookbooks/web/recipes/configure.rb" in files
    assert '"shell": "/bin/bash"' in files["data_bags/users/alice.json"]
    assert "roles/frontend.json" in files and "environments/production.json" in files
    assert data["sha256"] == sha
    assert data["cookbooks"] == EXPECTED_COOKBOOKS
    assert data["source"]["type"] == "directory"
    assert data["source"]["revision"].startswith("sha256:")


def test_git_source_over_file_url_is_bundled_at_its_commit(
    app: Flask, admin: Api, custom_repo: Path
) -> None:
    commit = make_git_repo(custom_repo)
    source = {"type": "git", "url": f"file://{custom_repo}", "revision": "main"}
    stack_id = make_stack(admin, source, APP_RECIPES)
    sha, data = build(app, stack_id)
    files = members(app, sha)
    assert cookbook_names(files) == set(EXPECTED_COOKBOOKS)
    assert "roles/frontend.json" in files and "data_bags/users/alice.json" in files
    assert not any("/.git" in p or p.startswith(".git") for p in files)
    assert data["source"] == {"type": "git", "url": f"file://{custom_repo}", "revision": commit}
    fetched = app.config["SCALARIUM"].data_dir / "sources" / stack_id
    assert sorted(p.name for p in fetched.iterdir()) == [commit]


def test_stack_without_custom_cookbooks_gets_the_builtin_base(app: Flask, admin: Api) -> None:
    stack_id = make_stack(admin, None, {})
    sha, data = build(app, stack_id)
    assert cookbook_names(members(app, sha)) == {"scalarium_base"}
    assert data["source"] is None


def test_a_custom_cookbook_overrides_the_builtin_of_the_same_name(
    app: Flask, admin: Api, custom_repo: Path
) -> None:
    mine = custom_repo / "scalarium_base"
    (mine / "recipes").mkdir(parents=True)
    (mine / "metadata.rb").write_text("name 'scalarium_base'\nversion '9.0.0'\n")
    (mine / "recipes" / "default.rb").write_text("log 'our own base'\n")
    stack_id = make_stack(admin, {"type": "directory", "url": str(custom_repo)}, APP_RECIPES)
    sha, data = build(app, stack_id)
    files = members(app, sha)
    assert files["cookbooks/scalarium_base/recipes/default.rb"] == "log 'our own base'\n"
    assert data["cookbooks"]["scalarium_base"] == "9.0.0"


def _depend_on_missing(repo: Path) -> None:
    (repo / "helper" / "metadata.rb").write_text(
        "name 'helper'\nversion '1.0.3'\ndepends 'missing_dep'\n"
    )


def _layer_names_missing(repo: Path) -> None:
    pass  # the layer itself asks for a cookbook the repository lacks


FAILURE_CASES = [
    pytest.param(
        _depend_on_missing,
        APP_RECIPES,
        "cookbook_missing",
        {"cookbook": "missing_dep", "requested_by": ["helper 1.0.3"]},
        id="missing-dependency",
    ),
    pytest.param(
        _layer_names_missing,
        {"setup": ["web", "nosuch::install"]},
        "cookbook_missing",
        {
            "cookbook": "nosuch",
            "requested_by": ["run list"],
            "run_list_requested_by": ["layer app (setup)"],
        },
        id="layer-recipe-nobody-has",
    ),
    pytest.param(
        _layer_names_missing,
        {"setup": ["role[ghost]"]},
        "role_missing",
        {"role": "ghost", "requested_by": ["layer app (setup)"]},
        id="unknown-role",
    ),
]


@pytest.mark.parametrize(("breaks", "recipes", "code", "details"), FAILURE_CASES)
def test_a_failed_build_names_the_culprit_and_keeps_the_previous_bundle(
    app: Flask,
    admin: Api,
    custom_repo: Path,
    breaks: Any,
    recipes: dict[str, list[str]],
    code: str,
    details: dict[str, Any],
) -> None:
    stack_id = make_stack(admin, {"type": "directory", "url": str(custom_repo)}, APP_RECIPES)
    previous, _ = build(app, stack_id)
    layer_id = admin.ok("GET", f"/stacks/{stack_id}/layers")["items"][0]["id"]
    admin.ok("PATCH", f"/layers/{layer_id}", {"recipes": recipes})
    breaks(custom_repo)
    with get_database(app).session() as session, pytest.raises(Conflict) as caught:
        build_stack_bundle(session, stack_id, app.config["SCALARIUM"], vault_of(app))
    assert caught.value.code == code
    assert caught.value.details == details
    for name in [details.get("cookbook") or details["role"], *details["requested_by"]]:
        assert name in caught.value.message
    with get_database(app).session() as session:
        stack = session.get(Stack, stack_id)
        assert stack is not None and stack.bundle_sha256 == previous
        kinds = session.scalars(select(Event.kind).where(Event.kind == "stack.bundle")).all()
        assert kinds == ["stack.bundle"]
    assert bundles.bundle_path(app.config["SCALARIUM"], previous) is not None


def test_same_inputs_are_a_cache_hit_without_rebuilding(
    app: Flask, admin: Api, custom_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stack_id = make_stack(admin, {"type": "directory", "url": str(custom_repo)}, APP_RECIPES)
    first, _ = build(app, stack_id)
    path = bundles.bundle_path(app.config["SCALARIUM"], first)
    assert path is not None
    before = path.stat()
    caplog.set_level(logging.DEBUG, logger="chef_bridge.bundle")
    caplog.clear()
    second, _ = build(app, stack_id)
    assert second == first
    messages = [r.getMessage() for r in caplog.records if r.name == "chef_bridge.bundle"]
    assert any("cache hit" in m for m in messages), messages
    assert not any("built" in m or "already present" in m for m in messages), messages
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    (custom_repo / "web" / "recipes" / "default.rb").write_text("log 'changed'\n")
    third, _ = build(app, stack_id)
    assert third != first


def test_ensure_builds_a_missing_bundle_once_and_backs_off_after_a_failure(
    app: Flask, admin: Api, custom_repo: Path
) -> None:
    settings = app.config["SCALARIUM"]
    stack_id = make_stack(admin, {"type": "directory", "url": str(custom_repo)}, APP_RECIPES)
    with get_database(app).session() as session:
        sha = ensure_stack_bundle(session, stack_id, settings, vault_of(app))
    assert sha is not None and bundles.bundle_path(settings, sha) is not None
    shutil.rmtree(custom_repo)  # a second build would now fail: ensure must not try
    with get_database(app).session() as session:
        assert ensure_stack_bundle(session, stack_id, settings, vault_of(app)) == sha
    other = make_stack_named(admin, "broken", str(custom_repo))
    for _ in range(2):
        with get_database(app).session() as session:
            assert ensure_stack_bundle(session, other, settings, vault_of(app)) is None
    with get_database(app).session() as session:
        failures = session.scalars(
            select(Event).where(Event.stack_id == other, Event.kind == "stack.bundle_failed")
        ).all()
        assert [e.data["code"] for e in failures] == ["source_unreachable"]  # one try, not two


def make_stack_named(admin: Api, shortname: str, url: str) -> str:
    stack = admin.ok(
        "POST",
        "/stacks",
        {
            "shortname": shortname,
            "use_custom_cookbooks": True,
            "custom_cookbooks_source": {"type": "directory", "url": url},
        },
    )
    return str(stack["id"])


# ---------------------------------------------------------------- the API and the job


@pytest.fixture
def worker_env(
    app: Flask, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SimpleWorker]:
    """A burst worker whose jobs see the same database, data dir and Redis as the app."""
    settings = app.config["SCALARIUM"]
    monkeypatch.setenv("SCALARIUM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SCALARIUM_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("SCALARIUM_REDIS_URL", REDIS_URL)
    runtime.reset()
    yield SimpleWorker([Queue("default", connection=redis_client)], connection=redis_client)
    runtime.database().dispose()
    runtime.redis_connection().close()
    runtime.reset()


def add_instance(app: Flask, admin: Api, stack_id: str, hostname: str, status: str) -> str:
    layer_id = admin.ok("GET", f"/stacks/{stack_id}/layers")["items"][0]["id"]
    created = admin.ok(
        "POST", f"/stacks/{stack_id}/instances", {"hostname": hostname, "layer_ids": [layer_id]}
    )
    with get_database(app).session() as session:
        instance = session.get(Instance, created["id"])
        assert instance is not None
        instance.status = status
    return str(created["id"])


def test_update_cookbooks_builds_and_sends_the_bundle_to_online_instances(
    app: Flask,
    admin: Api,
    custom_repo: Path,
    worker_env: SimpleWorker,
    redis_client: redis.Redis,
) -> None:
    stack_id = make_stack(admin, {"type": "directory", "url": str(custom_repo)}, APP_RECIPES)
    online = add_instance(app, admin, stack_id, "web1", InstanceState.ONLINE.value)
    add_instance(app, admin, stack_id, "web2", InstanceState.STOPPED.value)
    assert admin.ok("GET", f"/stacks/{stack_id}/bundle")["sha256"] is None
    answer = admin.ok("POST", f"/stacks/{stack_id}/update-cookbooks", status=202)
    assert answer["status"] == "queued" and answer["job_id"]
    listener = redis_client.pubsub()
    listener.subscribe(wake_channel(Keys()))
    worker_env.work(burst=True)
    job = Job.fetch(answer["job_id"], connection=redis_client)
    assert job is not None and job.get_status(refresh=True) == "finished"
    shown = admin.ok("GET", f"/stacks/{stack_id}/bundle")
    assert shown["sha256"] == job.return_value()["sha256"]
    assert shown["built_at"] is not None and shown["size"] > 0
    assert {c["name"]: c["version"] for c in shown["cookbooks"]} == EXPECTED_COOKBOOKS
    with get_database(app).session() as session:
        deployment = session.scalars(
            select(Deployment).where(
                Deployment.stack_id == stack_id, Deployment.command == "update_custom_cookbooks"
            )
        ).one()
        assert deployment.command == "update_custom_cookbooks"
        assert deployment.created_by == "token:admin"
        assert deployment.args == {"bundle_sha256": shown["sha256"]}
        targets = session.scalars(
            select(Command.instance_id).where(Command.deployment_id == deployment.id)
        ).all()
        assert targets == [online]
    woken = []  # the agent was woken: a wake-up for it went out on the channel
    while (message := listener.get_message(timeout=1)) is not None:
        if message["type"] == "message":
            woken.append(message["data"].decode())
    listener.close()
    assert set(woken) == {online}  # (a configure fan-out may wake it too)


def test_update_cookbooks_failure_is_recorded_with_its_code(
    app: Flask, admin: Api, custom_repo: Path, worker_env: SimpleWorker
) -> None:
    stack_id = make_stack(admin, {"type": "directory", "url": str(custom_repo)}, APP_RECIPES)
    add_instance(app, admin, stack_id, "web1", InstanceState.ONLINE.value)
    _depend_on_missing(custom_repo)
    admin.ok("POST", f"/stacks/{stack_id}/update-cookbooks", status=202)
    worker_env.work(burst=True)
    failures = admin.ok("GET", f"/stacks/{stack_id}/events?kind=stack.bundle_failed")["items"]
    assert [(e["data"]["code"], e["data"]["details"]["cookbook"]) for e in failures] == [
        ("cookbook_missing", "missing_dep")
    ]
    with get_database(app).session() as session:
        assert (
            session.scalars(
                select(Deployment).where(
                    Deployment.stack_id == stack_id,
                    Deployment.command == "update_custom_cookbooks",
                )
            ).all()
            == []
        )


def test_bundle_listing_survives_pruned_events(app: Flask, admin: Api, custom_repo: Path) -> None:
    stack_id = make_stack(admin, {"type": "directory", "url": str(custom_repo)}, APP_RECIPES)
    sha, _ = build(app, stack_id)
    with get_database(app).session() as session:
        session.execute(delete(Event))
    shown = admin.ok("GET", f"/stacks/{stack_id}/bundle")
    assert shown["sha256"] == sha
    assert {c["name"]: c["version"] for c in shown["cookbooks"]} == EXPECTED_COOKBOOKS


ROLE_CHECKS = [
    (Role.VIEWER, "POST", 403, "role_too_low"),
    (Role.DEPLOYER, "POST", 403, "role_too_low"),
    (None, "POST", 404, "stack_not_found"),
    (None, "GET", 404, "stack_not_found"),
]


@pytest.mark.parametrize(("role", "method", "status", "code"), ROLE_CHECKS)
def test_update_cookbooks_needs_a_manager_and_the_bundle_a_viewer(
    app: Flask,
    admin: Api,
    as_role: Any,
    redis_client: redis.Redis,
    role: Role | None,
    method: str,
    status: int,
    code: str,
) -> None:
    stack_id = make_stack(admin, None, {})
    path = (
        f"/stacks/{stack_id}/update-cookbooks" if method == "POST" else f"/stacks/{stack_id}/bundle"
    )
    before = Queue("default", connection=redis_client).job_ids
    as_role(stack_id, role).error(method, path, None, status, code)
    assert Queue("default", connection=redis_client).job_ids == before


def test_a_viewer_sees_the_bundle_and_a_manager_queues_an_update(
    admin: Api, as_role: Any, redis_client: redis.Redis
) -> None:
    stack_id = make_stack(admin, None, {})
    assert as_role(stack_id, Role.VIEWER).ok("GET", f"/stacks/{stack_id}/bundle")["cookbooks"] == []
    manager = as_role(stack_id, Role.MANAGER)
    before = Queue("default", connection=redis_client).job_ids
    job = manager.ok("POST", f"/stacks/{stack_id}/update-cookbooks", status=202)
    assert Queue("default", connection=redis_client).job_ids == [*before, job["job_id"]]


def test_base_recipes_name_the_builtin_base_cookbook() -> None:
    assert BASE_RECIPES == ["recipe[scalarium_base]"]
    assert (REPO_ROOT / "cookbooks" / "scalarium_base" / "metadata.rb").is_file()
