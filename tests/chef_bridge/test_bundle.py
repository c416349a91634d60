"""Bundles: byte-identical from identical inputs, content-addressed, cached by input key."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from chef_bridge.archive import safe_extract
from chef_bridge.bundle import (
    BundleError,
    BundleStore,
    build_bundle,
    bundle_cache_key,
)

# path relative to the source root -> (content, executable)
TREE: dict[str, tuple[bytes, bool]] = {
    "apache/metadata.rb": (b"name 'apache'\nversion '1.0.0'\n", False),
    "apache/recipes/default.rb": (b"package 'apache2'\n", False),
    "apache/templates/default/site.conf.erb": (b"<VirtualHost *:80>\n", False),
    "apache/files/default/check.sh": (b"#!/bin/sh\nexit 0\n", True),
    "base/metadata.rb": (b"name 'base'\n", False),
    "base/recipes/default.rb": (b"log 'base'\n", False),
    "base/recipes/a-b.rb": (b"log 'a-b'\n", False),
    "base/recipes/a/nested.rb": (b"log 'nested'\n", False),
    "roles/web.json": (b'{"name": "web"}\n', False),
    "data_bags/users/deploy.json": (b'{"id": "deploy"}\n', False),
}


def write_tree(root: Path, *, reverse: bool, mtime: int, umask: int) -> None:
    """Create TREE under root in a given order, with given mtimes and umask."""
    old = os.umask(umask)
    try:
        for rel in sorted(TREE, reverse=reverse):
            content, executable = TREE[rel]
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            if executable:
                path.chmod(0o777 & ~umask | 0o100)
            os.utime(path, (mtime, mtime))
    finally:
        os.umask(old)


def inputs(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    cookbooks = {"base": root / "base", "apache": root / "apache"}
    extra = {"roles": root / "roles", "data_bags": root / "data_bags"}
    return cookbooks, extra


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write_tree(root, reverse=False, mtime=1_600_000_000, umask=0o022)
    return root


def test_same_inputs_give_byte_identical_bundles_whatever_order_mtime_or_umask(
    tmp_path: Path,
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    write_tree(one, reverse=False, mtime=1_000_000_000, umask=0o022)
    write_tree(two, reverse=True, mtime=1_700_000_000, umask=0o077)
    cookbooks_two, extra_two = inputs(two)
    a = build_bundle(*inputs(one), tmp_path / "out1")
    b = build_bundle(dict(reversed(cookbooks_two.items())), extra_two, tmp_path / "out2")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sha256 == b.sha256 == hashlib.sha256(a.path.read_bytes()).hexdigest()
    assert a.path == tmp_path / "out1" / f"{a.sha256}.tar.gz"
    assert a.size == a.path.stat().st_size
    assert a.cookbooks == ("apache", "base")


def test_bundle_layout_and_normalised_headers(src: Path, tmp_path: Path) -> None:
    bundle = build_bundle(*inputs(src), tmp_path / "out")
    raw = bundle.path.read_bytes()
    assert raw[3] == 0  # gzip FLG: no file name, no comment
    assert raw[4:8] == b"\0\0\0\0"  # gzip MTIME
    with tarfile.open(bundle.path) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:3] == ["cookbooks", "cookbooks/apache", "cookbooks/apache/files"]
    assert names.index("cookbooks/base/recipes/a") < names.index(
        "cookbooks/base/recipes/a/nested.rb"
    )
    assert {"roles/web.json", "data_bags/users/deploy.json"} <= set(names)
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        expected = 0o755 if m.isdir() or m.name.endswith(".sh") else 0o644
        assert m.mode == expected, m.name


def test_vcs_directories_and_editor_junk_are_left_out(src: Path, tmp_path: Path) -> None:
    clean = build_bundle(*inputs(src), tmp_path / "clean")
    clean_key = bundle_cache_key(*inputs(src))
    junk = [".git/config", ".svn/entries", "recipes/default.rb.swp", "recipes/x.rb~", ".DS_Store"]
    for rel in junk:
        path = src / "base" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("junk")
    dirty = build_bundle(*inputs(src), tmp_path / "dirty")
    assert dirty.sha256 == clean.sha256
    assert bundle_cache_key(*inputs(src)) == clean_key


def test_symlink_to_a_file_inside_the_cookbook_is_stored_as_that_file(
    src: Path, tmp_path: Path
) -> None:
    (src / "base/recipes/alias.rb").symlink_to("default.rb")
    bundle = build_bundle(*inputs(src), tmp_path / "out")
    with tarfile.open(bundle.path) as tar:
        member = tar.getmember("cookbooks/base/recipes/alias.rb")
        assert member.isreg()
        assert tar.extractfile(member).read() == b"log 'base'\n"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "target",
    ["../../apache/metadata.rb", "/etc/hostname", "../recipes", "missing.rb"],
    ids=["other cookbook", "absolute", "directory", "dangling"],
)
def test_other_symlinks_are_refused(src: Path, tmp_path: Path, target: str) -> None:
    (src / "base/recipes/link.rb").symlink_to(target)
    with pytest.raises(BundleError) as err:
        build_bundle(*inputs(src), tmp_path / "out")
    assert err.value.code == "bundle_symlink_refused"
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "cookbooks,extra,code",
    [
        ({"../evil": "base"}, {}, "bundle_invalid_name"),
        ({"a/b": "base"}, {}, "bundle_invalid_name"),
        ({"..": "base"}, {}, "bundle_invalid_name"),
        ({"base": "base"}, {"nodes": "roles"}, "bundle_invalid_extra"),
        ({"base": "nope"}, {}, "bundle_source_missing"),
    ],
)
def test_bad_inputs_are_refused_with_a_code(
    src: Path, tmp_path: Path, cookbooks: dict[str, str], extra: dict[str, str], code: str
) -> None:
    with pytest.raises(BundleError) as err:
        build_bundle(
            {k: src / v for k, v in cookbooks.items()},
            {k: src / v for k, v in extra.items()},
            tmp_path / "out",
        )
    assert err.value.code == code


def test_fifo_in_a_cookbook_is_refused(src: Path, tmp_path: Path) -> None:
    os.mkfifo(src / "base/pipe")
    with pytest.raises(BundleError) as err:
        build_bundle(*inputs(src), tmp_path / "out")
    assert err.value.code == "bundle_special_file"


def test_existing_bundle_is_not_rewritten_and_no_temp_file_is_left(
    src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = build_bundle(*inputs(src), out)
    before = first.path.stat()
    second = build_bundle(*inputs(src), out)
    after = second.path.stat()
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert [p.name for p in out.iterdir()] == [f"{first.sha256}.tar.gz"]
    assert oct(after.st_mode & 0o777) == oct(0o644)


def test_bundle_unpacks_with_safe_extract_to_the_same_tree(src: Path, tmp_path: Path) -> None:
    bundle = build_bundle(*inputs(src), tmp_path / "out")
    dest = tmp_path / "unpacked"
    safe_extract(bundle.path, dest)
    for rel, (content, executable) in TREE.items():
        top = rel.split("/")[0]
        arc = rel if top in ("roles", "data_bags") else f"cookbooks/{rel}"
        assert (dest / arc).read_bytes() == content
        assert bool((dest / arc).stat().st_mode & 0o111) == executable


@pytest.mark.parametrize(
    "change",
    ["content", "exec bit", "rename", "new empty dir", "cookbook name"],
)
def test_cache_key_changes_with_anything_that_goes_in(src: Path, change: str) -> None:
    cookbooks, extra = inputs(src)
    before = bundle_cache_key(cookbooks, extra)
    recipe = src / "base/recipes/default.rb"
    if change == "content":
        recipe.write_bytes(b"log 'changed'\n")
    elif change == "exec bit":
        recipe.chmod(0o755)
    elif change == "rename":
        recipe.rename(src / "base/recipes/other.rb")
    elif change == "new empty dir":
        (src / "base/attributes").mkdir()
    elif change == "cookbook name":
        cookbooks = {"base2": cookbooks["base"], "apache": cookbooks["apache"]}
    assert bundle_cache_key(cookbooks, extra) != before


def test_cache_key_ignores_mtimes(src: Path) -> None:
    before = bundle_cache_key(*inputs(src))
    os.utime(src / "base/recipes/default.rb", (1, 1))
    assert bundle_cache_key(*inputs(src)) == before


def test_store_builds_once_then_answers_from_the_index(src: Path, tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    first = store.get_or_build(*inputs(src))
    # Truncate the published file: a hit must not rebuild, so it reports the truncated size.
    first.path.write_bytes(b"x")
    hit = store.get_or_build(*inputs(src))
    assert (hit.sha256, hit.path, hit.size) == (first.sha256, first.path, 1)
    assert store.path_for(first.sha256) == first.path


def test_store_rebuilds_when_inputs_change_or_the_bundle_is_gone(src: Path, tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    first = store.get_or_build(*inputs(src))
    first.path.unlink()
    again = store.get_or_build(*inputs(src))
    assert again.sha256 == first.sha256 and again.path.is_file()
    (src / "base/recipes/default.rb").write_text("log 'v2'\n")
    changed = store.get_or_build(*inputs(src))
    assert changed.sha256 != first.sha256
    assert store.path_for(first.sha256) == again.path


@pytest.mark.parametrize("digest", ["../keys/x", "A" * 64, "0" * 63, ""])
def test_path_for_refuses_anything_but_a_sha256(tmp_path: Path, digest: str) -> None:
    assert BundleStore(tmp_path).path_for(digest) is None
