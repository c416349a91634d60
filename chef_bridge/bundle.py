"""Cookbook bundles: deterministic, content-addressed ``.tar.gz`` files of everything a run needs.

Layout inside the tarball: ``cookbooks/<name>/...``, ``roles/...``, ``environments/...`` and
``data_bags/...``. The same inputs always give the same bytes, whatever the filesystem order,
file mtimes, owners or umask: entries are sorted, every header has mtime 0, uid/gid 0, empty
owner names and a normalised mode (0644, or 0755 when any exec bit is set; directories 0755),
the tar format is PAX, and the gzip header has mtime 0 and no file name. (Byte identity also
assumes the same zlib; the digest is only ever compared between bundles built by one server.)

Skipped: VCS directories (``.git``, ``.svn``, ...) and editor or OS junk (``*.swp``, ``*~``,
``.DS_Store``, ...). Symlinks: one pointing to a regular file inside the same source directory is
stored as a copy of that file; any other symlink (to a directory, dangling, or leaving the source
directory) is refused, so a bundle never contains a link and unpacking one never needs to trust
one. Devices, fifos and sockets are refused.

Bundles are written as ``<dest_dir>/<sha256>.tar.gz`` through a temporary file and a rename, and
an existing bundle is never rewritten. :class:`BundleStore` adds an index from
:func:`bundle_cache_key` (a digest of every path and file content that would go in) to the bundle
digest, so a caller skips the tar and gzip work when nothing changed.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import stat
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from chef_bridge.versions import CookbookError

log = logging.getLogger(__name__)

EXTRA_DIRS = ("roles", "environments", "data_bags")
FIXED_MTIME = 0
# Bumped whenever the layout or the rules change, so old cache keys stop matching.
KEY_VERSION = b"scalarium-bundle-v1\n"
SKIP_DIRS = frozenset({".git", ".svn", ".hg", ".bzr", "CVS", "_darcs"})
SKIP_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
SKIP_SUFFIXES = (".swp", ".swo", ".swx", "~", ".orig", ".rej")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMPRESSLEVEL = 9


class BundleError(CookbookError):
    """A bundle that cannot be built from the given inputs."""

    code = "bundle_error"


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk: its sha256 (hex), where it is, its size in bytes, the cookbooks in it."""

    sha256: str
    path: Path
    size: int
    cookbooks: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    arcname: str
    source: Path | None  # None for a directory
    executable: bool = False


def build_bundle(
    cookbooks: Mapping[str, Path], extra_dirs: Mapping[str, Path], dest_dir: Path
) -> Bundle:
    """Write the bundle of ``cookbooks`` (name -> directory) and ``extra_dirs`` (``roles``,
    ``environments``, ``data_bags`` -> directory) to ``dest_dir/<sha256>.tar.gz``."""
    return _write(_collect(cookbooks, extra_dirs), Path(dest_dir), _names(cookbooks))


def bundle_cache_key(
    cookbooks: Mapping[str, Path], extra_dirs: Mapping[str, Path] | None = None
) -> str:
    """A sha256 (hex) of every archive path, mode and file content the bundle would hold."""
    return _key(_collect(cookbooks, extra_dirs or {}))


class BundleStore:
    """A directory of content-addressed bundles, plus ``keys/<cache key>`` files that name the
    bundle digest each set of inputs produced; builds only when the inputs changed."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._keys = self.directory / "keys"

    def path_for(self, sha256: str) -> Path | None:
        """The bundle file with this digest, or None when it is unknown (or not a digest)."""
        if not _SHA256.fullmatch(sha256):
            return None
        path = self.directory / f"{sha256}.tar.gz"
        return path if path.is_file() else None

    def get_or_build(
        self, cookbooks: Mapping[str, Path], extra_dirs: Mapping[str, Path] | None = None
    ) -> Bundle:
        """The bundle for these inputs: from the index when their key is known, else built."""
        entries = _collect(cookbooks, extra_dirs or {})
        key = _key(entries)
        names = _names(cookbooks)
        cached = self._lookup(key, names)
        if cached is not None:
            log.debug("bundle %s: cache hit for key %s", cached.sha256, key)
            return cached
        bundle = _write(entries, self.directory, names)
        self._remember(key, bundle.sha256)
        return bundle

    def _lookup(self, key: str, names: tuple[str, ...]) -> Bundle | None:
        try:
            digest = (self._keys / key).read_text().strip()
        except FileNotFoundError:
            return None
        path = self.path_for(digest)
        if path is None:
            return None  # the bundle was pruned or the index is corrupt: rebuild
        return Bundle(sha256=digest, path=path, size=path.stat().st_size, cookbooks=names)

    def _remember(self, key: str, digest: str) -> None:
        self._keys.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".key-", dir=self._keys)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(digest + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self._keys / key)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# -- collecting the inputs ----------------------------------------------------------------------


def _names(cookbooks: Mapping[str, Path]) -> tuple[str, ...]:
    return tuple(sorted(cookbooks))


def _collect(cookbooks: Mapping[str, Path], extra_dirs: Mapping[str, Path]) -> list[_Entry]:
    """Every entry of the bundle, sorted in tree order, after checking names and sources."""
    for name in cookbooks:
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise BundleError(f"invalid cookbook name {name!r}", "bundle_invalid_name")
    for kind in extra_dirs:
        if kind not in EXTRA_DIRS:
            raise BundleError(
                f"unknown extra directory {kind!r} (expected one of {', '.join(EXTRA_DIRS)})",
                "bundle_invalid_extra",
            )
    entries: list[_Entry] = []
    if cookbooks:
        entries.append(_Entry("cookbooks", None))
    for name, root in cookbooks.items():
        entries.extend(_tree(Path(root), f"cookbooks/{name}"))
    for kind, root in extra_dirs.items():
        entries.extend(_tree(Path(root), kind))
    return sorted(entries, key=lambda e: e.arcname.split("/"))


def _skipped(name: str, is_dir: bool) -> bool:
    if is_dir:
        return name in SKIP_DIRS
    return name in SKIP_FILES or name.endswith(SKIP_SUFFIXES) or name.startswith(".#")


def _tree(root: Path, prefix: str) -> list[_Entry]:
    """The entries of one source directory, stored under ``prefix``."""
    if not root.is_dir():
        raise BundleError(f"{prefix}: {root} is not a directory", "bundle_source_missing")
    real_root = os.path.realpath(root)
    entries = [_Entry(prefix, None)]
    pending = [(str(root), prefix)]
    while pending:
        directory, arc_dir = pending.pop()
        with os.scandir(directory) as it:
            children = list(it)
        for child in children:
            arcname = f"{arc_dir}/{child.name}"
            if child.is_symlink():
                entries.append(_through_symlink(child.path, arcname, real_root))
                continue
            mode = child.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                if not _skipped(child.name, is_dir=True):
                    entries.append(_Entry(arcname, None))
                    pending.append((child.path, arcname))
            elif stat.S_ISREG(mode):
                if not _skipped(child.name, is_dir=False):
                    entries.append(_Entry(arcname, Path(child.path), bool(mode & 0o111)))
            else:
                raise BundleError(
                    f"{arcname}: not a regular file, directory or symlink", "bundle_special_file"
                )
    return entries


def _through_symlink(path: str, arcname: str, real_root: str) -> _Entry:
    """A symlink to a regular file inside its source directory becomes a copy of that file."""
    target = os.path.realpath(path)
    inside = os.path.commonpath([target, real_root]) == real_root
    if not inside or not os.path.isfile(target):
        raise BundleError(
            f"{arcname}: symlink to {os.readlink(path)!r} does not point to a file inside "
            "its source directory",
            "bundle_symlink_refused",
        )
    return _Entry(arcname, Path(target), bool(os.stat(target).st_mode & 0o111))


# -- digests and writing ------------------------------------------------------------------------


def _key(entries: list[_Entry]) -> str:
    digest = hashlib.sha256(KEY_VERSION)
    for entry in entries:
        if entry.source is None:
            line = f"d {entry.arcname}\n"
        else:
            with open(entry.source, "rb") as fh:
                content = hashlib.file_digest(fh, "sha256").hexdigest()
            line = f"{'x' if entry.executable else 'f'} {content} {entry.arcname}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _tarinfo(entry: _Entry, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.arcname)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.source is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.type = tarfile.REGTYPE
        info.mode = 0o755 if entry.executable else 0o644
        info.size = size
    return info


class _HashingWriter:
    """Passes bytes through to a file, keeping their sha256 and count."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


def _write(entries: list[_Entry], dest_dir: Path, names: tuple[str, ...]) -> Bundle:
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bundle-", suffix=".tmp", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as raw:
            hashing = _HashingWriter(raw)
            with (
                gzip.GzipFile(
                    filename="", mode="wb", fileobj=hashing, mtime=0, compresslevel=_COMPRESSLEVEL
                ) as gz,
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for entry in entries:
                    _add(tar, entry)
            raw.flush()
            os.fsync(raw.fileno())
        digest = hashing.sha256.hexdigest()
        final = dest_dir / f"{digest}.tar.gz"
        if final.exists():
            os.unlink(tmp)  # same content already there: never rewrite a published bundle
            log.debug("bundle %s: already present", digest)
        else:
            os.chmod(tmp, 0o644)
            os.rename(tmp, final)
            log.info("bundle %s: built (%s bytes, %s cookbooks)", digest, hashing.size, len(names))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Bundle(sha256=digest, path=final, size=hashing.size, cookbooks=names)


def _add(tar: tarfile.TarFile, entry: _Entry) -> None:
    if entry.source is None:
        tar.addfile(_tarinfo(entry, 0))
        return
    try:
        with open(entry.source, "rb") as fh:
            tar.addfile(_tarinfo(entry, os.fstat(fh.fileno()).st_size), fh)
    except OSError as exc:  # a source file vanished or changed size mid-build, or disk full
        raise BundleError(f"{entry.arcname}: {exc}", "bundle_io_failed") from exc
