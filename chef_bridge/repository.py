"""Finding the cookbooks, roles, environments and data bags in a fetched source tree.

A tree comes in one of three layouts, recognised in this order:

- a single cookbook: ``metadata.json`` or ``metadata.rb`` at the root;
- a chef-repo: a ``cookbooks/`` directory (and ``site-cookbooks/``, which older repos used for
  their own cookbooks), plus ``roles/``, ``environments/`` and ``data_bags/``;
- a directory of cookbooks, as OpsWorks custom cookbook repositories are: one directory per
  cookbook at the top level, each with its metadata.

Cookbooks are named by their metadata, not their directory (a Supermarket download of ``apt`` may
sit in ``apt-7.5.0/``). Directories without metadata are skipped, with a warning when they look
like a cookbook (Chef 12 and later refuse a cookbook without metadata too).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path

from chef_bridge.metadata import METADATA_JSON, METADATA_RB, read_metadata
from chef_bridge.versions import CookbookError

log = logging.getLogger(__name__)

REPO_DIRS = ("roles", "environments", "data_bags")
COOKBOOK_DIRS = ("cookbooks", "site-cookbooks")
# Directories a cookbook has; one of them without metadata beside it means a broken cookbook.
_COOKBOOK_PARTS = ("recipes", "attributes", "resources", "providers", "libraries", "templates")


class RepositoryLayout(StrEnum):
    """How a fetched tree is organised."""

    SINGLE_COOKBOOK = "single_cookbook"
    CHEF_REPO = "chef_repo"
    COOKBOOKS = "cookbooks"


class RepositoryError(CookbookError):
    """A tree whose cookbooks cannot be told apart."""

    code = "cookbook_duplicate"


def has_metadata(directory: Path) -> bool:
    """Whether ``directory`` holds cookbook metadata."""
    return (directory / METADATA_JSON).is_file() or (directory / METADATA_RB).is_file()


def detect_layout(tree: Path) -> RepositoryLayout:
    """Which of the three layouts ``tree`` follows."""
    if has_metadata(tree):
        return RepositoryLayout.SINGLE_COOKBOOK
    if any(_real_dir(tree / name) for name in COOKBOOK_DIRS):
        return RepositoryLayout.CHEF_REPO
    return RepositoryLayout.COOKBOOKS


def find_cookbooks(tree: Path) -> dict[str, Path]:
    """Every cookbook in ``tree``, by the name its metadata declares, sorted by name."""
    tree = Path(tree)
    layout = detect_layout(tree)
    if layout is RepositoryLayout.SINGLE_COOKBOOK:
        return {read_metadata(tree).name: tree}
    parents = (
        [tree / name for name in COOKBOOK_DIRS] if layout is RepositoryLayout.CHEF_REPO else [tree]
    )
    found: dict[str, Path] = {}
    for parent in parents:
        if not _real_dir(parent):
            continue
        for directory in sorted(parent.iterdir()):
            if directory.name.startswith(".") or not _real_dir(directory):
                continue
            if not has_metadata(directory):
                if any((directory / part).is_dir() for part in _COOKBOOK_PARTS):
                    log.warning("cookbook %s: no metadata.rb or metadata.json, skipped", directory)
                continue
            name = read_metadata(directory).name
            if name in found:
                raise RepositoryError(
                    f"cookbook {name!r} is both in {found[name]} and in {directory}",
                    details={"cookbook": name, "paths": [str(found[name]), str(directory)]},
                )
            found[name] = directory
    return dict(sorted(found.items()))


def find_repo_dirs(tree: Path) -> dict[str, Path]:
    """The ``roles``, ``environments`` and ``data_bags`` directories at the top of ``tree``."""
    tree = Path(tree)
    if has_metadata(tree):
        return {}  # a single cookbook: its subdirectories are its own
    return {
        name: tree / name
        for name in REPO_DIRS
        if _real_dir(tree / name) and not has_metadata(tree / name)
    }


def _real_dir(path: Path) -> bool:
    # Symlinked directories are skipped: a cookbook reached twice would be listed twice.
    return path.is_dir() and not path.is_symlink()
