"""Cookbook bundles of stacks: how they are built, where they are stored, how agents get them.

A stack's bundle holds the closure of every cookbook its run lists can name (the base recipes
and every layer's recipes for every event, roles expanded), resolved over the built-in
``cookbooks/`` of this repository together with the stack's custom cookbooks (a custom cookbook
replaces a built-in one of the same name), plus the custom repository's ``roles/``,
``environments/`` and ``data_bags/``. Bundles are content addressed and cached by their inputs
(``chef_bridge.bundle.BundleStore``); the stack row names the one its commands use.

Building is all or nothing: the custom source is fetched into a fresh directory under
``DATA_DIR/sources/<stack_id>/``, and the stack's ``bundle_sha256`` changes only once the new
bundle is on disk. A failed build leaves the previous bundle in place (bundle files are never
deleted here) and is reported as a server error carrying the cookbook error's ``code``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from chef_bridge.bundle import Bundle, BundleStore
from chef_bridge.metadata import (
    METADATA_JSON,
    METADATA_RB,
    CookbookMetadata,
    parse_metadata_json,
    parse_metadata_rb,
    read_metadata,
)
from chef_bridge.repository import find_cookbooks, find_repo_dirs
from chef_bridge.resolver import (
    RUN_LIST,
    ResolutionError,
    cookbooks_in_run_list,
    merge_sources,
    resolve,
    roles_in_run_list,
)
from chef_bridge.sources import FetchedSource, fetch_source
from chef_bridge.versions import CookbookError
from server import events
from server.config import Settings
from server.db import utcnow
from server.errors import Conflict, Invalid, NotFound, ScalariumError, Unavailable
from server.models import CommandType, Event, Stack
from server.vault import Vault, load_or_create_key

log = logging.getLogger(__name__)

# Run first at setup on every instance (node JSON puts them before the layers' recipes).
BASE_RECIPES = ["recipe[scalarium_base]"]
BUILTIN_COOKBOOKS = Path(__file__).resolve().parent.parent / "cookbooks"
BUNDLE_EVENT = "stack.bundle"
BUNDLE_FAILED_EVENT = "stack.bundle_failed"
# After a failed build, ensure_stack_bundle waits this long before trying again, so agents
# polling a stack whose source is broken do not fetch it on every poll.
RETRY_AFTER = timedelta(seconds=60)
SECRET_FIELDS = ("ssh_key", "password")
BASE_REQUESTER = "base recipes"

# Cookbook error codes that mean "the request or the stored settings are wrong" (400) and
# "a remote is down or slow" (503); every other one is a conflict with the stack's state (409).
_INVALID_CODES = frozenset(
    {"invalid_source", "not_supported_here", "invalid_run_list_item", "source_missing"}
)
_UNAVAILABLE_CODES = frozenset({"source_unreachable", "timeout"})
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")

Progress = Callable[[str], None]


def store(settings: Settings) -> BundleStore:
    """The content-addressed bundle store under the data dir."""
    return BundleStore(settings.data_dir / "bundles")


def bundle_path(settings: Settings, sha256: str) -> Path | None:
    """The file of a stored bundle, or None (a malformed sha is simply not found)."""
    return store(settings).path_for(sha256)


# ---------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class Wanted:
    """One run-list entry a stack needs and who asked for it (a layer and event, or the base)."""

    entry: str
    requested_by: str


def stack_run_list(
    layers: Iterable[tuple[str, Mapping[str, Sequence[str]]]],
    base: Sequence[str] = tuple(BASE_RECIPES),
) -> list[Wanted]:
    """Every run-list entry of a stack: the base recipes, then each layer's recipes for every
    event (``layers`` are (shortname, recipes by event) pairs), each entry once."""
    wanted = [Wanted(entry, BASE_REQUESTER) for entry in base]
    for shortname, recipes in layers:
        for event in sorted(recipes):
            wanted.extend(Wanted(e, f"layer {shortname} ({event})") for e in recipes[event])
    seen: set[str] = set()
    unique: list[Wanted] = []
    for item in wanted:
        if item.entry not in seen:
            seen.add(item.entry)
            unique.append(item)
    return unique


def expand_roles(
    wanted: Sequence[Wanted], roles: Mapping[str, Sequence[str] | None]
) -> list[Wanted]:
    """Replace ``role[x]`` entries by the recipes of the role's run list, recursively.

    ``roles`` maps a role name to its run list, or to None when the role exists but cannot be
    read statically (a ``.rb`` role): its recipes are then not known and it is skipped. A role
    that does not exist at all is refused, as chef-solo would refuse it at converge time.
    """
    result: list[Wanted] = []
    # (entry, the roles it was reached through), as a stack so role recipes keep their place
    pending: list[tuple[Wanted, tuple[str, ...]]] = [(item, ()) for item in reversed(wanted)]
    while pending:
        item, path = pending.pop()
        names = roles_in_run_list([item.entry])
        if not names:
            result.append(item)
            continue
        name = names[0]
        if name in path:
            continue  # Chef expands a role once; a cycle adds nothing new
        if name not in roles:
            raise ResolutionError(
                f"role {name} is not in the repository's roles/ (needed by {item.requested_by})",
                code="role_missing",
                details={"role": name, "requested_by": [item.requested_by]},
            )
        run_list = roles[name]
        if run_list is None:
            continue
        by = f"role {name}"
        pending.extend((Wanted(entry, by), (*path, name)) for entry in reversed(run_list))
    return result


def requesters_of(wanted: Sequence[Wanted], cookbook: str) -> list[str]:
    """Who (layers, base recipes, roles) named a recipe of ``cookbook`` in a run list."""
    found = [w.requested_by for w in wanted if cookbooks_in_run_list([w.entry]) == [cookbook]]
    return list(dict.fromkeys(found))


def server_error(exc: CookbookError) -> ScalariumError:
    """The server error for a cookbook error, keeping its code and details."""
    kind: type[ScalariumError] = Conflict
    if exc.code in _INVALID_CODES:
        kind = Invalid
    elif exc.code in _UNAVAILABLE_CODES:
        kind = Unavailable
    return kind(str(exc), code=exc.code, details=dict(exc.details))


def revision_dir_name(revision: str) -> str:
    """A directory name for a fetched revision (``sha256:ab..`` -> ``sha256_ab..``)."""
    return _UNSAFE_NAME.sub("_", revision)[:120] or "unknown"


# ---------------------------------------------------------------- building


def build_stack_bundle(
    session: Session,
    stack_id: str,
    settings: Settings,
    vault: Vault,
    *,
    progress: Progress | None = None,
    actor: str | None = None,
) -> Bundle:
    """Fetch, resolve and bundle a stack's cookbooks, point the stack at the bundle and record
    a ``stack.bundle`` event (the caller commits); on failure change nothing and raise a
    ScalariumError whose code is the cookbook error's."""
    report = progress or (lambda _line: None)
    stack = session.get(Stack, stack_id)
    if stack is None:
        raise NotFound("no such stack", code="stack_not_found", details={"id": stack_id})
    source = _custom_source(stack, vault)
    wanted = stack_run_list([(layer.shortname, layer.recipes or {}) for layer in stack.layers])
    with _stack_lock(settings, stack_id):
        try:
            fetched = _fetch(settings, stack_id, source, report) if source else None
            bundle, chosen = _resolve_and_build(settings, wanted, fetched, report)
        except CookbookError as exc:
            log.warning("stack %s: bundle failed: %s (%s)", stack_id, exc, exc.code)
            raise server_error(exc) from exc
        if fetched is not None:
            _prune_sources(fetched.path)
    stack.bundle_sha256 = bundle.sha256
    stack.bundle_built_at = utcnow()
    events.record(
        session,
        BUNDLE_EVENT,
        f"cookbook bundle {bundle.sha256[:12]} with {len(chosen)} cookbook(s)"
        + (f" from revision {fetched.revision}" if fetched else " (built-in only)"),
        stack_id=stack.id,
        data={
            "sha256": bundle.sha256,
            "size": bundle.size,
            "cookbooks": {name: str(meta.version) for name, meta in chosen.items()},
            "source": (
                {"type": fetched.type.value, "url": fetched.url, "revision": fetched.revision}
                if fetched
                else None
            ),
        },
        actor=actor,
    )
    session.flush()
    report(f"bundle {bundle.sha256}: {len(chosen)} cookbook(s), {bundle.size} bytes")
    return bundle


def _custom_source(stack: Stack, vault: Vault) -> dict[str, Any] | None:
    """The stack's custom cookbook source with its secrets decrypted, or None when unused."""
    if not stack.use_custom_cookbooks:
        return None
    stored = stack.custom_cookbooks_source
    if not stored:
        raise Invalid(
            "the stack uses custom cookbooks but has no custom_cookbooks_source",
            code="source_missing",
            details={"field": "custom_cookbooks_source"},
        )
    source = dict(stored)
    for key in SECRET_FIELDS:
        if source.get(key):
            try:
                source[key] = vault.decrypt(source[key])
            except ValueError as exc:
                raise Conflict(
                    f"the source's {key} cannot be decrypted with this installation's key",
                    code="source_secret_unreadable",
                    details={"field": key},
                ) from exc
    return source


def _fetch(
    settings: Settings, stack_id: str, source: Mapping[str, Any], report: Progress
) -> FetchedSource:
    """Fetch into a fresh directory, then move it to one named after the revision."""
    root = settings.data_dir / "sources" / stack_id
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".fetch-{uuid.uuid4().hex}"
    try:
        fetched = fetch_source(source, staging, progress=report)
        final = root / revision_dir_name(fetched.revision)
        if final.exists():
            # Same revision fetched before: the new copy is as good, and the old one may have
            # been left half-pruned by a crash; replace it (the stack lock is held).
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return FetchedSource(type=fetched.type, path=final, revision=fetched.revision, url=fetched.url)


def _prune_sources(keep: Path) -> None:
    """Remove the stack's other fetched trees; bundles hold what runs need."""
    for other in keep.parent.iterdir():
        if other != keep and other.is_dir() and not other.is_symlink():
            shutil.rmtree(other, ignore_errors=True)


def _resolve_and_build(
    settings: Settings,
    wanted: list[Wanted],
    fetched: FetchedSource | None,
    report: Progress,
) -> tuple[Bundle, dict[str, CookbookMetadata]]:
    builtin = _cookbooks_with_metadata(BUILTIN_COOKBOOKS)
    custom = _cookbooks_with_metadata(fetched.path) if fetched else {}
    repo_dirs = find_repo_dirs(fetched.path) if fetched else {}
    overridden = sorted(set(builtin) & set(custom))
    if overridden:
        report(f"custom cookbooks override built-in: {', '.join(overridden)}")
    wanted = expand_roles(wanted, _read_roles(repo_dirs.get("roles")))
    available = merge_sources(
        {name: [meta] for name, (_, meta) in builtin.items()},
        {name: [meta] for name, (_, meta) in custom.items()},
    )
    try:
        chosen = resolve(cookbooks_in_run_list([w.entry for w in wanted]), available)
    except ResolutionError as exc:
        raise _with_requesters(exc, wanted) from exc
    paths = {name: (custom.get(name) or builtin[name])[0] for name in chosen}
    report(f"resolved {len(chosen)} cookbook(s): {', '.join(chosen)}")
    bundle = store(settings).get_or_build(paths, repo_dirs)
    return bundle, chosen


def _cookbooks_with_metadata(tree: Path) -> dict[str, tuple[Path, CookbookMetadata]]:
    if not tree.is_dir():
        return {}
    return {name: (path, read_metadata(path)) for name, path in find_cookbooks(tree).items()}


def _with_requesters(exc: ResolutionError, wanted: Sequence[Wanted]) -> ResolutionError:
    """Name the layers behind a "run list" requester, which is all the resolver knows."""
    cookbook = exc.details.get("cookbook")
    if not isinstance(cookbook, str):
        return exc
    layers = requesters_of(wanted, cookbook)
    if not layers:
        return exc
    details = {**exc.details, "run_list_requested_by": layers}
    message = str(exc).replace(RUN_LIST, f"{RUN_LIST}: {', '.join(layers)}")
    return ResolutionError(message, code=exc.code, details=details)


def _read_roles(roles_dir: Path | None) -> dict[str, list[str] | None]:
    """Run lists of the repository's roles: JSON roles read, Ruby roles known but unread."""
    roles: dict[str, list[str] | None] = {}
    if roles_dir is None:
        return roles
    for path in sorted(roles_dir.iterdir()):
        if path.suffix == ".rb":
            log.warning("role %s: Ruby roles are not expanded; list its cookbooks in a layer", path)
            roles.setdefault(path.stem, None)
        elif path.suffix == ".json":
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CookbookError(
                    f"role {path.name}: not readable JSON: {exc}",
                    code="role_invalid",
                    details={"file": path.name},
                ) from exc
            run_list = list(document.get("run_list") or [])
            for entries in (document.get("env_run_lists") or {}).values():
                run_list.extend(entries or [])
            roles[str(document.get("name") or path.stem)] = run_list
    return roles


@contextlib.contextmanager
def _stack_lock(settings: Settings, stack_id: str) -> Iterator[None]:
    """One build per stack at a time on this host (the job and a delivery may race)."""
    directory = settings.data_dir / "sources"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{stack_id}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- what a stack's bundle holds


def bundle_summary(session: Session, stack: Stack, settings: Settings) -> dict[str, Any]:
    """The stack's current bundle: sha, when built, size, cookbooks (name and version), source."""
    sha = stack.bundle_sha256
    summary: dict[str, Any] = {
        "stack_id": stack.id,
        "sha256": sha,
        "built_at": stack.bundle_built_at.isoformat() if stack.bundle_built_at else None,
        "size": None,
        "cookbooks": [],
        "source": None,
    }
    if sha is None:
        return summary
    path = bundle_path(settings, sha)
    summary["size"] = path.stat().st_size if path else None
    recorded = _bundle_event(session, stack.id, sha)
    if recorded is not None:
        versions: dict[str, str] = recorded.data.get("cookbooks") or {}
        summary["source"] = recorded.data.get("source")
    elif path is not None:
        versions = cookbooks_in_bundle(path)  # the event was pruned: read the tarball
    else:
        versions = {}
    summary["cookbooks"] = [{"name": n, "version": v} for n, v in sorted(versions.items())]
    return summary


def _bundle_event(session: Session, stack_id: str, sha: str) -> Event | None:
    recent = session.scalars(
        select(Event)
        .where(Event.stack_id == stack_id, Event.kind == BUNDLE_EVENT)
        .order_by(Event.id.desc())
        .limit(50)
    ).all()
    return next((e for e in recent if (e.data or {}).get("sha256") == sha), None)


def cookbooks_in_bundle(path: Path) -> dict[str, str]:
    """Cookbook name -> version, read from the metadata files inside a bundle tarball."""
    found: dict[str, str] = {}
    with tarfile.open(path, "r:gz") as tar:
        metadata: dict[str, dict[str, str]] = {}
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 3 and parts[0] == "cookbooks" and member.isfile():
                if parts[2] in (METADATA_JSON, METADATA_RB):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        text = handle.read().decode("utf-8", "replace")
                        metadata.setdefault(parts[1], {})[parts[2]] = text
    for directory, files in metadata.items():
        try:
            if METADATA_JSON in files:
                meta = parse_metadata_json(files[METADATA_JSON], METADATA_JSON, directory)
            else:
                meta = parse_metadata_rb(files[METADATA_RB], METADATA_RB, directory)
        except CookbookError:
            continue
        found[directory] = str(meta.version)
    return found


# ---------------------------------------------------------------- synchronous use at delivery


def ensure_stack_bundle(
    session: Session, stack_id: str, settings: Settings, vault: Vault
) -> str | None:
    """The sha of the stack's bundle, built now when the stack has none (or its file is gone).

    Cost: nothing when the bundle exists (a row read and a stat). Otherwise a full build in the
    caller's thread: fetching the custom source (a git clone or download, seconds to minutes,
    bounded by the fetch timeout), reading every cookbook's metadata and hashing every file;
    with unchanged inputs the tarball itself is not rewritten. Returns None when the build
    failed: the failure is recorded as a ``stack.bundle_failed`` event in the caller's session,
    and no new attempt is made for RETRY_AFTER, so a broken source costs one fetch per minute,
    not one per agent poll. The caller commits.
    """
    stack = session.get(Stack, stack_id)
    if stack is None:
        return None
    if stack.bundle_sha256 and bundle_path(settings, stack.bundle_sha256) is not None:
        return stack.bundle_sha256
    if _failed_recently(session, stack_id):
        return None
    try:
        return build_stack_bundle(session, stack_id, settings, vault).sha256
    except ScalariumError as exc:
        _record_failure(session, stack_id, exc, actor=None)
        return None


def _failed_recently(session: Session, stack_id: str) -> bool:
    since = utcnow() - RETRY_AFTER
    last = session.scalar(
        select(Event.id)
        .where(
            Event.stack_id == stack_id,
            Event.kind == BUNDLE_FAILED_EVENT,
            Event.created_at >= since,
        )
        .limit(1)
    )
    return last is not None


def _record_failure(
    session: Session, stack_id: str, exc: ScalariumError, *, actor: str | None
) -> None:
    events.record(
        session,
        BUNDLE_FAILED_EVENT,
        f"cookbook bundle failed: {exc.message}",
        stack_id=stack_id,
        data={"code": exc.code, "message": exc.message, "details": exc.details},
        actor=actor,
    )


# ---------------------------------------------------------------- the update-cookbooks job


def enqueue_update(connection: redis.Redis, stack_id: str, requested_by: str) -> str:
    """Queue an update_cookbooks job for the stack; returns the job id."""
    from server.queue import enqueue

    job = enqueue(connection, update_cookbooks, stack_id, requested_by)
    return str(job.id)


def update_cookbooks(stack_id: str, requested_by: str) -> dict[str, Any]:
    """RQ job: build the stack's bundle, then send update_custom_cookbooks to every online
    instance; a failure is recorded as a ``stack.bundle_failed`` event with its code."""
    from server import runtime
    from server.commands import create_deployment
    from server.deployments import TargetError

    runtime.install_orchestrator_hooks()
    settings = runtime.settings()
    vault = Vault(load_or_create_key(settings.data_dir, settings.secret_key))
    database = runtime.database()
    try:
        with database.session() as session:
            bundle = build_stack_bundle(session, stack_id, settings, vault, actor=requested_by)
            stack = session.get(Stack, stack_id)
            assert stack is not None  # build_stack_bundle found it
            try:
                deployment = create_deployment(
                    session,
                    stack,
                    CommandType.UPDATE_CUSTOM_COOKBOOKS,
                    created_by=requested_by,
                    args={"bundle_sha256": bundle.sha256},
                    comment=f"update custom cookbooks to bundle {bundle.sha256[:12]}",
                )
                deployment_id: str | None = deployment.id
            except TargetError:
                deployment_id = None  # no online instance: new ones get the bundle at setup
    except ScalariumError as exc:
        with database.session() as session:
            _record_failure(session, stack_id, exc, actor=requested_by)
        return {"stack_id": stack_id, "status": "failed", "code": exc.code}
    log.info("stack %s: bundle %s, deployment %s", stack_id, bundle.sha256, deployment_id)
    return {
        "stack_id": stack_id,
        "status": "built",
        "sha256": bundle.sha256,
        "deployment_id": deployment_id,
    }
