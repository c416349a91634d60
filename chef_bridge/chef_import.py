"""``chef import``: copy roles, environments, data bags and cookbooks from a Chef Server.

The result is a chef-repo, the layout chef-solo and Scalarium's bundles read::

    roles/NAME.json
    environments/NAME.json
    data_bags/BAG/ITEM.json
    cookbooks/NAME/...            (latest_only=True: the newest version of each cookbook)
    cookbooks/NAME-VERSION/...    (latest_only=False: every version, Chef's versioned layout)

Objects are written as the server returns them (pretty-printed, keys sorted). The ``_default``
environment exists on every Chef server and is kept, so the repository mirrors the server
exactly; chef-solo and chef-zero ignore attempts to change it, so it is harmless there. Nodes
and clients are not imported: they describe machines of the old server, not configuration.

Cookbook files are placed at the paths their manifest gives (refused if absolute or with
``..``) and each one is checked against its MD5 checksum. The import is atomic: everything is
built in a temporary directory beside ``dest`` and renamed onto it at the end, so a failure
leaves nothing half-written. The repository is created readable by its owner only, because data
bags often hold secrets.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chef_bridge.chef_server import ChefServerClient, manifest_files, safe_name

log = logging.getLogger(__name__)


class ChefImportError(Exception):
    """An import that cannot start or finish for a reason other than the server's answers."""

    code = "import_failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self)


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote: counts per kind and the cookbook versions chosen."""

    dest: Path
    roles: int = 0
    environments: int = 0
    data_bags: int = 0
    data_bag_items: int = 0
    # (name, version) of every cookbook version written, sorted.
    cookbooks: tuple[tuple[str, str], ...] = field(default=())
    cookbook_files: int = 0
    cookbook_bytes: int = 0

    def describe(self) -> str:
        """Return a one-line account for the operator."""
        return (
            f"{self.roles} roles, {self.environments} environments, {self.data_bags} data bags"
            f" ({self.data_bag_items} items), {len(self.cookbooks)} cookbook versions"
            f" ({self.cookbook_files} files, {self.cookbook_bytes} bytes) into {self.dest}"
        )


def write_json(path: Path, document: Any) -> None:
    """Write a JSON document as chef-repo files are: 2-space indent, sorted keys, final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def choose_versions(versions: list[str], latest_only: bool) -> list[str]:
    """Return the versions to import from a newest-first list."""
    return versions[:1] if latest_only else list(versions)


def cookbook_dir_name(name: str, version: str, latest_only: bool) -> str:
    """Return the directory a cookbook version goes in (``NAME`` or ``NAME-VERSION``)."""
    return name if latest_only else f"{name}-{version}"


def _check_destination(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ChefImportError(
            f"{dest} exists and is not an empty directory; import into a new one",
            code="destination_not_empty",
        )


def import_from_server(
    client: ChefServerClient,
    dest: Path,
    *,
    cookbooks: Iterable[str] | None = None,
    latest_only: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ImportSummary:
    """Copy a Chef Server's roles, environments, data bags and cookbooks into a new chef-repo."""
    dest = Path(dest).absolute()
    _check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.import-", dir=dest.parent))
    try:
        counts = _import_into(client, staging, cookbooks, latest_only, say)
        _check_destination(dest)  # someone may have written there meanwhile
        os.rename(staging, dest)  # onto an absent or empty directory: atomic
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary = ImportSummary(dest=dest, **counts)
    log.info("chef import %s: %s", client.url, summary.describe())
    say(f"done: {summary.describe()}")
    return summary


def _import_into(
    client: ChefServerClient,
    root: Path,
    only: Iterable[str] | None,
    latest_only: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    roles = client.list_roles()
    say(f"roles: {len(roles)}")
    for name in roles:
        write_json(root / "roles" / f"{safe_name(name, 'role')}.json", client.get_role(name))

    environments = client.list_environments()
    say(f"environments: {len(environments)}")
    for name in environments:
        document = client.get_environment(name)
        write_json(root / "environments" / f"{safe_name(name, 'environment')}.json", document)

    bags = client.list_data_bags()
    say(f"data bags: {len(bags)}")
    items = 0
    for bag in bags:
        bag_dir = root / "data_bags" / safe_name(bag, "data bag")
        bag_dir.mkdir(parents=True, exist_ok=True)  # an empty bag is still a bag
        ids = client.list_data_bag_items(bag)
        for item_id in ids:
            item = client.get_data_bag_item(bag, item_id)
            write_json(bag_dir / f"{safe_name(item_id, 'data bag item')}.json", item)
        items += len(ids)
        say(f"data bag {bag}: {len(ids)} items")

    if only is None:
        available = client.list_cookbooks()
    else:
        # One request per named cookbook: a missing one fails with the server's 404.
        available = {name: client.cookbook_versions(name) for name in sorted(set(only))}
    chosen = [
        (name, version)
        for name, versions in sorted(available.items())
        for version in choose_versions(versions, latest_only)
    ]
    say(f"cookbooks: {len(chosen)} versions to fetch")
    files = size = 0
    for number, (name, version) in enumerate(chosen, start=1):
        manifest = client.get_cookbook(name, version)
        listed = manifest_files(manifest)
        target = (
            root
            / "cookbooks"
            / safe_name(cookbook_dir_name(name, version, latest_only), "cookbook")
        )
        target.mkdir(parents=True, exist_ok=True)
        for entry in listed:
            size += client.save_file(entry.url, target / entry.path, entry.checksum)
        files += len(listed)
        say(f"cookbook {name} {version}: {len(listed)} files ({number}/{len(chosen)})")

    return {
        "roles": len(roles),
        "environments": len(environments),
        "data_bags": len(bags),
        "data_bag_items": items,
        "cookbooks": tuple(chosen),
        "cookbook_files": files,
        "cookbook_bytes": size,
    }
