"""Safe extraction: good archives unpack with normalised modes, hostile ones change nothing."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from chef_bridge.archive import ArchiveError, safe_extract

MiB = 1024 * 1024

# (name, type, payload or link target, mode)
Spec = tuple[str, bytes, bytes | str, int]


def _info(name: str, kind: bytes, payload: bytes | str, mode: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = info.gid = 4242
    data = b""
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = str(payload)
    elif kind in (tarfile.REGTYPE,):
        data = payload if isinstance(payload, bytes) else payload.encode()
        info.size = len(data)
    elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, data


def make_tar(specs: list[Spec], compression: str = "gz") -> bytes:
    """A tar archive built member by member, hostile members included."""
    buf = io.BytesIO()
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for spec in specs:
            info, data = _info(*spec)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def F(name: str, data: bytes = b"x", mode: int = 0o644) -> Spec:
    return (name, tarfile.REGTYPE, data, mode)


def D(name: str) -> Spec:
    return (name, tarfile.DIRTYPE, b"", 0o755)


def S(name: str, target: str) -> Spec:
    return (name, tarfile.SYMTYPE, target, 0o777)


def H(name: str, target: str) -> Spec:
    return (name, tarfile.LNKTYPE, target, 0o644)


GOOD_FIRST = [D("cookbooks"), F("cookbooks/base/metadata.rb", b"name 'base'\n")]


def test_extracts_files_dirs_links_with_normalised_modes(tmp_path: Path) -> None:
    data = make_tar(
        [
            D("cookbooks"),
            F("cookbooks/base/recipes/default.rb", b"log 'hi'\n", 0o4775),
            F("cookbooks/base/files/run.sh", b"#!/bin/sh\n", 0o700),
            F("cookbooks/base/files/plain.txt", b"plain", 0o666),
            S("cookbooks/base/files/alias.txt", "plain.txt"),
            H("cookbooks/base/files/copy.txt", "cookbooks/base/files/plain.txt"),
            F("./roles/web.json", b"{}"),
        ]
    )
    dest = tmp_path / "out"
    names = safe_extract(io.BytesIO(data), dest)
    assert names == [
        "cookbooks",
        "cookbooks/base/recipes/default.rb",
        "cookbooks/base/files/run.sh",
        "cookbooks/base/files/plain.txt",
        "cookbooks/base/files/alias.txt",
        "cookbooks/base/files/copy.txt",
        "roles/web.json",
    ]
    files = dest / "cookbooks/base/files"
    assert stat.S_IMODE((dest / "cookbooks/base/recipes/default.rb").stat().st_mode) == 0o755
    assert stat.S_IMODE((files / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((files / "plain.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "cookbooks/base").stat().st_mode) == 0o755
    assert os.readlink(files / "alias.txt") == "plain.txt"
    assert (files / "copy.txt").read_bytes() == b"plain"
    assert not (files / "copy.txt").is_symlink()
    assert (dest / "roles/web.json").read_bytes() == b"{}"


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    data = make_tar([F("a/b/c.txt", b"c"), F("a/run", b"r", 0o755)])
    old = os.umask(0o077)
    try:
        safe_extract(io.BytesIO(data), tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out/a/b").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out/a/b/c.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out/a/run").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


HOSTILE: list[tuple[str, list[Spec], str]] = [
    ("absolute path", [F("/etc/cron.d/evil")], "archive_absolute_path"),
    ("tar slip", [F("../../evil")], "archive_path_traversal"),
    ("tar slip inside a path", [F("cookbooks/../../evil")], "archive_path_traversal"),
    ("character device", [("dev/null", tarfile.CHRTYPE, b"", 0o666)], "archive_special_file"),
    ("block device", [("dev/sda", tarfile.BLKTYPE, b"", 0o660)], "archive_special_file"),
    ("fifo", [("pipe", tarfile.FIFOTYPE, b"", 0o644)], "archive_special_file"),
    ("absolute symlink", [S("passwd", "/etc/passwd")], "archive_link_outside"),
    ("relative symlink outside", [S("a/up", "../../etc")], "archive_link_outside"),
    ("symlink via another symlink", [S("here", "."), S("up", "here/..")], "archive_link_outside"),
    ("symlink redirected later", [S("x", "d/.."), S("d", ".")], "archive_link_outside"),
    ("symlink loop", [S("a", "b"), S("b", "a/c")], "archive_link_outside"),
    ("write through a symlink", [D("sub"), S("lnk", "sub"), F("lnk/f")], "archive_path_traversal"),
    ("absolute hardlink", [H("passwd", "/etc/passwd")], "archive_link_outside"),
    ("hardlink outside", [H("passwd", "../../etc/passwd")], "archive_link_outside"),
    ("hardlink to a non-member", [H("passwd", "etc/passwd")], "archive_link_outside"),
    ("hardlink to a directory", [D("d"), H("h", "d")], "archive_link_outside"),
    ("file replacing a directory", [D("d"), F("d/x"), F("d")], "archive_path_conflict"),
]


@pytest.mark.parametrize(
    "specs,code", [(s, c) for _, s, c in HOSTILE], ids=[name for name, _, _ in HOSTILE]
)
def test_hostile_member_is_refused_before_anything_is_written(
    tmp_path: Path, specs: list[Spec], code: str
) -> None:
    archive = tmp_path / "in.tar.gz"
    archive.write_bytes(make_tar(GOOD_FIRST + specs))
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError) as err:
        safe_extract(archive, dest)
    assert err.value.code == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tar.gz"]


def test_symlinks_resolving_inside_are_kept(tmp_path: Path) -> None:
    data = make_tar(
        [D("a/b"), S("a/b/up", "../c"), S("top", "a/b/up"), S("dot", "."), F("a/c", b"c")]
    )
    safe_extract(io.BytesIO(data), tmp_path / "out")
    assert (tmp_path / "out/top").read_bytes() == b"c"


def test_gzip_bomb_member_bigger_than_the_cap_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "in.tar.gz"
    archive.write_bytes(make_tar([F("bomb", bytes(8 * MiB))]))
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(ArchiveError) as err:
        safe_extract(archive, tmp_path / "out", max_bytes=MiB)
    assert err.value.code == "archive_too_large"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tar.gz"]


def test_many_small_members_over_the_total_cap_are_refused(tmp_path: Path) -> None:
    data = make_tar([F(f"f{i}", bytes(200 * 1024)) for i in range(6)])
    with pytest.raises(ArchiveError) as err:
        safe_extract(io.BytesIO(data), tmp_path / "out", max_bytes=MiB)
    assert err.value.code == "archive_too_large"
    assert not (tmp_path / "out").exists()


def _raw_header(name: bytes, kind: bytes, size: int) -> bytes:
    """A ustar header block with a correct checksum and any size we like."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def test_a_giant_pax_header_is_stopped_by_counting_the_stream(tmp_path: Path) -> None:
    # The header's size field says 16 MiB of PAX records: tarfile would read them all into
    # memory. The counting stream stops it, whatever the headers claim.
    size = 16 * MiB
    raw = _raw_header(b"././@PaxHeader", b"x", size) + bytes(size) + bytes(1024)
    data = gzip.compress(raw, compresslevel=1)
    with pytest.raises(ArchiveError) as err:
        safe_extract(io.BytesIO(data), tmp_path / "out", max_bytes=MiB, max_members=10)
    assert err.value.code == "archive_too_large"


def test_member_count_cap(tmp_path: Path) -> None:
    data = make_tar([F(f"f{i}") for i in range(11)])
    with pytest.raises(ArchiveError) as err:
        safe_extract(io.BytesIO(data), tmp_path / "out", max_members=10)
    assert err.value.code == "archive_too_many_members"
    assert safe_extract(io.BytesIO(data), tmp_path / "ok", max_members=11)[-1] == "f10"


class _SwappingStream(io.BytesIO):
    """An archive that changes between the two passes (a file replaced while being read)."""

    def __init__(self, first: bytes, second: bytes) -> None:
        super().__init__(first)
        self._second = second
        self._seeks = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self._seeks += 1
        if self._seeks == 3:  # pass 2 rewinds: from now on serve the other archive
            self.__init__(self._second, b"")  # type: ignore[misc]
            self._seeks = 99
        return super().seek(offset, whence)


def test_failure_during_extraction_removes_what_was_partly_written(tmp_path: Path) -> None:
    good = make_tar(GOOD_FIRST)
    bad = make_tar(GOOD_FIRST + [F("more.txt"), F("../../evil")])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ArchiveError) as err:
        safe_extract(_SwappingStream(good, bad), work / "out")
    assert err.value.code == "archive_path_traversal"
    assert list(work.iterdir()) == []


def test_destination_must_be_absent_or_empty(tmp_path: Path) -> None:
    data = make_tar([F("a")])
    (tmp_path / "empty").mkdir()
    assert safe_extract(io.BytesIO(data), tmp_path / "empty") == ["a"]
    with pytest.raises(ArchiveError) as err:
        safe_extract(io.BytesIO(data), tmp_path / "empty")
    assert err.value.code == "archive_dest_not_empty"


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_every_tar_compression_unpacks(tmp_path: Path, compression: str) -> None:
    data = make_tar([F("a/b", b"hello")], compression)
    assert safe_extract(io.BytesIO(data), tmp_path / "out") == ["a/b"]
    assert (tmp_path / "out/a/b").read_bytes() == b"hello"


class _Pipe(io.RawIOBase):
    """A non-seekable stream, like a socket or a pipe."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._inner.read(min(len(buffer), 1000))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_non_seekable_stream_is_spooled_and_extracted(tmp_path: Path) -> None:
    data = make_tar([F("cookbooks/x/metadata.rb", b"name 'x'")])
    names = safe_extract(_Pipe(data), tmp_path / "out")  # type: ignore[arg-type]
    assert names == ["cookbooks/x/metadata.rb"]


@pytest.mark.parametrize(
    "data",
    [
        b"not an archive at all" * 40,
        make_tar([F("a", os.urandom(4096))])[:2000],
        b"\x1f\x8b" + b"x" * 50,
    ],
    ids=["garbage", "truncated gzip", "bad gzip"],
)
def test_unreadable_archive_is_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(ArchiveError) as err:
        safe_extract(io.BytesIO(data), tmp_path / "out")
    assert err.value.code == "archive_invalid"
    assert list(tmp_path.iterdir()) == []


@contextmanager
def _zip(tmp_path: Path) -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(tmp_path / "in.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        yield zf


def _zip_symlink(zf: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


@pytest.mark.parametrize(
    "name,code",
    [("../evil", "archive_path_traversal"), ("/etc/evil", "archive_absolute_path")],
)
def test_zip_slip_is_refused(tmp_path: Path, name: str, code: str) -> None:
    with _zip(tmp_path) as zf:
        zf.writestr("ok.txt", "ok")
        zf.writestr(name, "evil")
    with pytest.raises(ArchiveError) as err:
        safe_extract(tmp_path / "in.zip", tmp_path / "out")
    assert err.value.code == code
    assert not (tmp_path / "out").exists()


def test_zip_extracts_files_and_inside_symlinks_and_refuses_outside_ones(tmp_path: Path) -> None:
    with _zip(tmp_path) as zf:
        exe = zipfile.ZipInfo("bin/run")
        exe.external_attr = (stat.S_IFREG | 0o755) << 16
        zf.writestr(exe, "#!/bin/sh\n")
        zf.writestr("docs/readme", "hi")
        _zip_symlink(zf, "docs/alias", "readme")
    names = safe_extract(tmp_path / "in.zip", tmp_path / "out")
    assert names == ["bin/run", "docs/readme", "docs/alias"]
    assert stat.S_IMODE((tmp_path / "out/bin/run").stat().st_mode) == 0o755
    assert (tmp_path / "out/docs/alias").read_text() == "hi"

    with _zip(tmp_path) as zf:
        _zip_symlink(zf, "escape", "../../etc/passwd")
    with pytest.raises(ArchiveError) as err:
        safe_extract(tmp_path / "in.zip", tmp_path / "out2")
    assert err.value.code == "archive_link_outside"


def test_zip_bomb_is_refused(tmp_path: Path) -> None:
    with _zip(tmp_path) as zf:
        zf.writestr("bomb", bytes(8 * MiB))
    with pytest.raises(ArchiveError) as err:
        safe_extract(tmp_path / "in.zip", tmp_path / "out", max_bytes=MiB)
    assert err.value.code == "archive_too_large"
