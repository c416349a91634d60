"""Cookbook bundles of stacks: where they are stored and how agents get them."""

from __future__ import annotations

from pathlib import Path

from chef_bridge.bundle import BundleStore
from server.config import Settings


def store(settings: Settings) -> BundleStore:
    """The content-addressed bundle store under the data dir."""
    return BundleStore(settings.data_dir / "bundles")


def bundle_path(settings: Settings, sha256: str) -> Path | None:
    """The file of a stored bundle, or None (a malformed sha is simply not found)."""
    return store(settings).path_for(sha256)
