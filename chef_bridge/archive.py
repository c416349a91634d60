"""Safe unpacking of bundles and other archives: .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip.

Every member is checked explicitly before anything is written: no absolute paths, no ``..``
components, no device or fifo members, no symlink or hardlink that resolves outside the
destination (following the archive's own symlinks, as the kernel would), no member written
through a symlink, a cap on the number of members and a cap on the bytes actually read, counted
while streaming (headers can lie, and a gzip bomb is small on the wire). The archive is read twice:
the first pass only validates, the second extracts into a staging directory next to ``dest`` that
is renamed into place at the end, so a refused or failing archive leaves nothing behind.

This module depends on the standard library only, so that the node agent can embed it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from chef_bridge.errors import ChefBridgeError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 512 * MiB
DEFAULT_MAX_MEMBERS = 100_000
# Tar headers, padding and PAX/GNU long-name records are read on top of the file data; this
# allowance bounds them so that a lying header (a giant PAX record, say) cannot make us read on.
_HEADER_ALLOWANCE_PER_MEMBER = 3 * 512
_HEADER_ALLOWANCE = 1 * MiB
_CHUNK = 64 * 1024
_MAX_LINK_HOPS = 40
_MAX_SYMLINK_TARGET = 4096
# What a corrupt or truncated archive raises while being read (bz2 raises a bare OSError).
_READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    OSError,
    NotImplementedError,  # zip: unsupported compression method
    RuntimeError,  # zip: encrypted member
)


class ArchiveError(ChefBridgeError):
    """An archive that is refused or cannot be read: a machine-readable ``code`` and details."""

    code: str = "archive_invalid"


class MemberKind(StrEnum):
    """What one archive member is, once special files have been refused."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"


@dataclass(frozen=True)
class _Member:
    raw_name: str
    kind: MemberKind | None  # None: a device, fifo or other special file
    size: int
    mode: int
    linkname: str = ""


@dataclass(frozen=True)
class _Limits:
    max_bytes: int
    max_members: int


# A member plus a function that opens its data (files and zip symlinks only).
_Entry = tuple[_Member, Callable[[], IO[bytes]] | None]


def safe_extract(
    archive: Path | str | BinaryIO,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[str]:
    """Unpack ``archive`` into ``dest`` (absent or empty) after checking every member; return the
    normalised member names in archive order."""
    limits = _Limits(max_bytes=max_bytes, max_members=max_members)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ArchiveError(f"{dest} exists and is not an empty directory", "archive_dest_not_empty")
    with _reopenable(archive, limits) as reopen:
        _walk(reopen, limits, writer=None)  # pass 1: refuse before writing anything
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
        try:
            names = _walk(reopen, limits, writer=_Writer(staging))
            _check_links_on_disk(staging)
            os.chmod(staging, 0o755)
            try:
                os.rename(staging, dest)  # onto an absent or empty directory: atomic
            except OSError as exc:
                raise ArchiveError(
                    f"{dest} appeared or filled up during extraction", "archive_dest_not_empty"
                ) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.debug("archive %s: extracted %s members", dest, len(names))
    return names


# -- input handling -----------------------------------------------------------------------------


@contextmanager
def _reopenable(
    archive: Path | str | BinaryIO, limits: _Limits
) -> Iterator[Callable[[], BinaryIO]]:
    """Yield a function returning a fresh binary stream at the archive's start, for two passes."""
    if isinstance(archive, str | Path):
        path = Path(archive)
        if not path.is_file():
            raise ArchiveError(f"{path} is not a file", "archive_not_found")
        yield lambda: path.open("rb")
        return
    if archive.seekable():
        start = archive.tell()

        def rewind() -> BinaryIO:
            archive.seek(start)
            return _Unclosable(archive)  # type: ignore[return-value]

        yield rewind
        return
    # A pipe or socket: spool it, bounded (compressed data is never much bigger than its content).
    cap = _stream_limit(limits) + _stream_limit(limits) // 100 + MiB
    with tempfile.TemporaryFile() as spool:
        copied = 0
        while chunk := archive.read(_CHUNK):
            copied += len(chunk)
            if copied > cap:
                raise ArchiveError(
                    "archive stream is larger than the size cap", "archive_too_large"
                )
            spool.write(chunk)

        def rewind_spool() -> BinaryIO:
            spool.seek(0)
            return _Unclosable(spool)  # type: ignore[return-value]

        yield rewind_spool


class _Unclosable(io.RawIOBase):
    """A view of a caller's stream that our `with` blocks may close without closing theirs."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class _CountingReader(io.RawIOBase):
    """Decompressed bytes, refused past ``limit``; never asks the decoder for more than that."""

    def __init__(self, inner: _Readable, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._limit - self.count + 1)
        data = self._inner.read(want)
        self.count += len(data)
        if self.count > self._limit:
            raise ArchiveError(
                f"archive expands to more than {self._limit} bytes", "archive_too_large"
            )
        buffer[: len(data)] = data
        return len(data)


def _stream_limit(limits: _Limits) -> int:
    return limits.max_bytes + limits.max_members * _HEADER_ALLOWANCE_PER_MEMBER + _HEADER_ALLOWANCE


def _decompressor(raw: BinaryIO, magic: bytes) -> _Readable:
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def _entries(reopen: Callable[[], BinaryIO], limits: _Limits) -> Generator[_Entry, None, None]:
    """Every member of the archive, streamed, whatever its format."""
    with reopen() as raw:
        start = raw.tell()
        magic = raw.read(6)
        raw.seek(start)
        if magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            yield from _zip_entries(raw, limits)
            return
        with closing(_decompressor(raw, magic)) as plain:
            counted = io.BufferedReader(_CountingReader(plain, _stream_limit(limits)))
            try:
                # Stream mode ("r|"): one forward pass, no seeking, no member list kept.
                with tarfile.open(fileobj=counted, mode="r|") as tar:
                    for info in tar:
                        member = _tar_member(info)
                        opener = None
                        if member.kind is MemberKind.FILE:
                            opener = _tar_opener(tar, info)
                        yield member, opener
            except _READ_ERRORS as exc:
                raise ArchiveError(f"unreadable archive: {exc}", "archive_invalid") from exc


def _tar_opener(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        data = tar.extractfile(info)
        if data is None:
            raise ArchiveError(f"{info.name}: no data", "archive_invalid")
        return data

    return open_member


def _tar_member(info: tarfile.TarInfo) -> _Member:
    kind: MemberKind | None
    if info.isreg():
        kind = MemberKind.FILE
    elif info.isdir():
        kind = MemberKind.DIR
    elif info.issym():
        kind = MemberKind.SYMLINK
    elif info.islnk():
        kind = MemberKind.HARDLINK
    else:
        kind = None
    return _Member(info.name, kind, info.size, info.mode, info.linkname)


def _zip_entries(raw: BinaryIO, limits: _Limits) -> Iterator[_Entry]:
    try:
        with zipfile.ZipFile(raw) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_members:
                raise ArchiveError(
                    f"archive has more than {limits.max_members} members",
                    "archive_too_many_members",
                )
            for info in infos:
                mode = info.external_attr >> 16
                kind: MemberKind | None
                if info.is_dir():
                    kind = MemberKind.DIR
                elif stat.S_ISLNK(mode):
                    kind = MemberKind.SYMLINK
                elif stat.S_IFMT(mode) == 0 or stat.S_ISREG(mode):  # no type bits: a file
                    kind = MemberKind.FILE
                else:
                    kind = None
                member = _Member(info.filename, kind, info.file_size, mode & 0o7777 or 0o644)
                if kind is MemberKind.SYMLINK:
                    # A zip symlink keeps its target as the member's data.
                    with zf.open(info) as fh:
                        target = fh.read(_MAX_SYMLINK_TARGET + 1)
                    if len(target) > _MAX_SYMLINK_TARGET:
                        raise ArchiveError(f"{info.filename}: symlink target too long")
                    member = _Member(
                        info.filename, kind, 0, member.mode, target.decode("utf-8", "replace")
                    )
                    yield member, None
                    continue
                opener = (lambda i=info: zf.open(i)) if kind is MemberKind.FILE else None
                yield member, opener
    except _READ_ERRORS as exc:
        raise ArchiveError(f"unreadable zip archive: {exc}", "archive_invalid") from exc


# -- validation (pure over the virtual tree) ----------------------------------------------------


def _split(name: str, what: str) -> tuple[str, ...]:
    """The path's components, refusing absolute paths and ``..``; empty for the root itself."""
    if "\x00" in name:
        raise ArchiveError(f"{what} {name!r} contains a NUL byte", "archive_invalid")
    if name.startswith("/"):
        raise ArchiveError(f"{what} {name!r} is an absolute path", "archive_absolute_path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"{what} {name!r} contains '..'", "archive_path_traversal")
    return parts


class _Tree:
    """What the archive has created so far, to resolve links the way the kernel will."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, ...], MemberKind] = {}
        self.links: dict[tuple[str, ...], str] = {}

    def resolve(self, start: tuple[str, ...], target: str) -> tuple[str, ...] | None:
        """Where ``target``, seen from directory ``start``, ends up; None if outside the root."""
        if target.startswith("/"):
            return None
        out: list[str] = list(start)
        pending = target.split("/")
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not out:
                    return None
                out.pop()
                continue
            out.append(part)
            link = self.links.get(tuple(out))
            if link is not None:
                hops += 1
                if hops > _MAX_LINK_HOPS or link.startswith("/"):
                    return None
                out.pop()
                pending = link.split("/") + pending
        return tuple(out)

    def add(self, member: _Member, parts: tuple[str, ...]) -> None:
        """Record ``member`` at ``parts`` after checking it against what is already there."""
        name = member.raw_name
        for depth in range(1, len(parts)):
            prefix_kind = self.kinds.get(parts[:depth])
            if prefix_kind is MemberKind.SYMLINK:
                raise ArchiveError(
                    f"member {name!r} is written through a symlink", "archive_path_traversal"
                )
            if prefix_kind not in (None, MemberKind.DIR):
                raise ArchiveError(f"member {name!r} is below a file", "archive_path_conflict")
        previous = self.kinds.get(parts)
        if previous is MemberKind.DIR and member.kind is not MemberKind.DIR:
            raise ArchiveError(f"member {name!r} replaces a directory", "archive_path_conflict")
        if member.kind is MemberKind.SYMLINK:
            if not member.linkname or self.resolve(parts[:-1], member.linkname) is None:
                raise ArchiveError(
                    f"symlink {name!r} -> {member.linkname!r} points outside the destination",
                    "archive_link_outside",
                )
            self.links[parts] = member.linkname
        else:
            self.links.pop(parts, None)
        if member.kind is MemberKind.HARDLINK:
            target = self.hardlink_target(member)
            if self.kinds.get(target) not in (MemberKind.FILE, MemberKind.HARDLINK):
                raise ArchiveError(
                    f"hardlink {name!r} -> {member.linkname!r} is not an earlier file member",
                    "archive_link_outside",
                )
        assert member.kind is not None
        for depth in range(1, len(parts)):
            self.kinds.setdefault(parts[:depth], MemberKind.DIR)
        self.kinds[parts] = member.kind

    def hardlink_target(self, member: _Member) -> tuple[str, ...]:
        """The archive path a hardlink names (relative to the root, as tar stores it)."""
        try:
            return _split(member.linkname, "hardlink target")
        except ArchiveError as exc:
            raise ArchiveError(
                f"hardlink {member.raw_name!r} -> {member.linkname!r} points outside",
                "archive_link_outside",
            ) from exc

    def check_final_links(self) -> None:
        """Refuse a link that a later member redirected outside (``a -> d/..`` then ``d -> .``)."""
        for parts, target in self.links.items():
            if self.resolve(parts[:-1], target) is None:
                raise ArchiveError(
                    f"symlink {'/'.join(parts)!r} -> {target!r} points outside the destination",
                    "archive_link_outside",
                )


def _check_member(member: _Member, limits: _Limits, total: int) -> tuple[str, ...]:
    if member.kind is None:
        raise ArchiveError(
            f"member {member.raw_name!r} is a device, fifo or other special file",
            "archive_special_file",
        )
    parts = _split(member.raw_name, "member")
    if member.kind is MemberKind.FILE and total + member.size > limits.max_bytes:
        raise ArchiveError(
            f"member {member.raw_name!r} takes the archive past {limits.max_bytes} bytes",
            "archive_too_large",
        )
    return parts


def _data_filter_check(member: _Member, parts: tuple[str, ...]) -> None:
    """Second line of defence: Python's own ``data`` filter on the same member, lexically."""
    info = tarfile.TarInfo("/".join(parts))
    info.type = {
        MemberKind.FILE: tarfile.REGTYPE,
        MemberKind.DIR: tarfile.DIRTYPE,
        MemberKind.SYMLINK: tarfile.SYMTYPE,
        MemberKind.HARDLINK: tarfile.LNKTYPE,
    }[member.kind or MemberKind.FILE]
    info.linkname = member.linkname
    info.mode = member.mode & 0o7777
    codes: list[tuple[type[Exception], str]] = [
        (tarfile.AbsolutePathError, "archive_absolute_path"),
        (tarfile.OutsideDestinationError, "archive_path_traversal"),
        (tarfile.SpecialFileError, "archive_special_file"),
        (tarfile.AbsoluteLinkError, "archive_link_outside"),
        (tarfile.LinkOutsideDestinationError, "archive_link_outside"),
    ]
    # A root that cannot exist, so realpath() stays lexical and touches no real directory.
    root = "/nonexistent-scalarium-extract-root"
    try:
        tarfile.data_filter(info, root)
    except tarfile.FilterError as exc:
        for kind, code in codes:
            if isinstance(exc, kind):
                raise ArchiveError(f"member {member.raw_name!r} refused: {exc}", code) from exc
        raise ArchiveError(f"member {member.raw_name!r} refused: {exc}") from exc


# -- the two passes -----------------------------------------------------------------------------


class _Writer:
    """Creates members under the staging root; never follows a link it did not just check."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self._checked: dict[str, bool] = {}

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return os.path.commonpath([real, self.real_root]) == self.real_root

    def _parent_inside(self, parent: str) -> bool:
        # Cached: a directory, once created, is never replaced (the tree refuses that).
        inside = self._checked.get(parent)
        if inside is None:
            inside = self._checked[parent] = self._inside(parent)
        return inside

    def _prepare(self, parts: tuple[str, ...]) -> str:
        path = os.path.join(self.root, *parts)
        parent = self._makedirs(parts[:-1])
        if not self._parent_inside(parent):
            raise ArchiveError(
                f"{'/'.join(parts)!r} leaves the destination", "archive_link_outside"
            )
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)  # a later member with the same name replaces the earlier one
        return path

    def _makedirs(self, parts: tuple[str, ...]) -> str:
        """Create missing directories as 0755 whatever the umask; return the deepest one."""
        path = str(self.root)
        for part in parts:
            path = os.path.join(path, part)
            if os.path.islink(path) or not os.path.isdir(path):
                if os.path.lexists(path):
                    os.unlink(path)
                os.mkdir(path)
                os.chmod(path, 0o755)
        return path

    def directory(self, parts: tuple[str, ...]) -> None:
        """Create (or keep) the directory at ``parts``, mode 0755."""
        path = self._prepare(parts)
        if not os.path.isdir(path):
            os.mkdir(path)
        os.chmod(path, 0o755)

    def file(self, parts: tuple[str, ...], mode: int, chunks: Iterator[bytes]) -> None:
        """Write a regular file, 0755 if the member had any exec bit, else 0644."""
        path = self._prepare(parts)
        final_mode = 0o755 if mode & 0o111 else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            os.fchmod(out.fileno(), final_mode)  # exact mode whatever the umask; never setuid

    def symlink(self, parts: tuple[str, ...], target: str) -> None:
        """Create a symlink whose target the tree has already checked."""
        os.symlink(target, self._prepare(parts))

    def hardlink(self, parts: tuple[str, ...], target: tuple[str, ...]) -> None:
        """Copy an earlier file member to a second name."""
        # A copy, not os.link: the result cannot share an inode with anything outside.
        source = os.path.join(self.root, *target)
        if os.path.islink(source) or not self._inside(source):
            raise ArchiveError(
                f"hardlink {'/'.join(parts)!r} target escapes", "archive_link_outside"
            )
        path = self._prepare(parts)
        shutil.copyfile(source, path, follow_symlinks=False)
        os.chmod(path, os.stat(source).st_mode & 0o755)


def _read_chunks(
    opener: Callable[[], IO[bytes]], member: _Member, limits: _Limits, counter: list[int]
) -> Iterator[bytes]:
    """The member's data, counted as it streams (the header's size is not trusted)."""
    with opener() as data:
        seen = 0
        while chunk := _read(data):
            seen += len(chunk)
            counter[0] += len(chunk)
            if counter[0] > limits.max_bytes or seen > max(member.size, 0) + _CHUNK:
                raise ArchiveError(
                    f"member {member.raw_name!r} expands past the size cap", "archive_too_large"
                )
            yield chunk


def _read(data: IO[bytes]) -> bytes:
    try:
        return data.read(_CHUNK)
    except _READ_ERRORS as exc:
        raise ArchiveError(f"unreadable archive: {exc}", "archive_invalid") from exc


def _walk(reopen: Callable[[], BinaryIO], limits: _Limits, writer: _Writer | None) -> list[str]:
    """One pass over the archive: validate every member and, given a writer, create it."""
    walk = _Pass(limits, writer)
    with closing(_entries(reopen, limits)) as entries:
        for member, opener in entries:
            walk.member(member, opener)
    walk.tree.check_final_links()
    return list(walk.names)


class _Pass:
    """The running state of one pass: the virtual tree, names seen, counts and bytes."""

    def __init__(self, limits: _Limits, writer: _Writer | None) -> None:
        self.limits = limits
        self.writer = writer
        self.tree = _Tree()
        self.names: dict[str, None] = {}
        self.counter = [0]  # bytes actually read, shared with _read_chunks
        self.declared = 0
        self.count = 0

    def member(self, member: _Member, opener: Callable[[], IO[bytes]] | None) -> None:
        """Check one member against everything seen so far, then drain or write its data."""
        self.count += 1
        if self.count > self.limits.max_members:
            raise ArchiveError(
                f"archive has more than {self.limits.max_members} members",
                "archive_too_many_members",
            )
        parts = _check_member(member, self.limits, self.declared)
        if member.kind is MemberKind.FILE:
            self.declared += max(member.size, 0)
        if not parts:
            return  # "./": the destination itself
        if self.writer is None:  # pass 2 sees the same members: once is enough
            _data_filter_check(member, parts)
        self.tree.add(member, parts)
        self.names["/".join(parts)] = None
        chunks: Iterator[bytes] = iter(())
        if opener is not None:
            chunks = _read_chunks(opener, member, self.limits, self.counter)
        writer = self.writer
        if writer is None:
            for _ in chunks:
                pass
        elif member.kind is MemberKind.DIR:
            writer.directory(parts)
        elif member.kind is MemberKind.FILE:
            writer.file(parts, member.mode, chunks)
        elif member.kind is MemberKind.SYMLINK:
            writer.symlink(parts, member.linkname)
        elif member.kind is MemberKind.HARDLINK:
            writer.hardlink(parts, self.tree.hardlink_target(member))


def _check_links_on_disk(root: Path) -> None:
    """Last check on the real tree: every symlink extracted resolves inside the root."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                real = os.path.realpath(path)
                if os.path.commonpath([real, real_root]) != real_root:
                    raise ArchiveError(
                        f"symlink {os.path.relpath(path, root)!r} resolves outside",
                        "archive_link_outside",
                    )
