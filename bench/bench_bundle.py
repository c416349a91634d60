"""Bundle build times: 50 synthetic cookbooks of ~20 files each, cold build versus cache hit.

Run: ``.venv/bin/python bench/bench_bundle.py [--cookbooks 50] [--files 20]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chef_bridge.archive import safe_extract  # noqa: E402
from chef_bridge.bundle import BundleStore  # noqa: E402

WORDS = (
    "package service template execute directory file user group cookbook recipe "
    "attribute node default action notifies subscribes only_if not_if variables source "
    "owner mode content restart reload enable start"
).split()


def make_cookbooks(root: Path, count: int, files: int, rng: random.Random) -> dict[str, Path]:
    """Write ``count`` cookbooks of ``files`` files (2-6 KiB of recipe-like text) under root."""
    cookbooks: dict[str, Path] = {}
    for c in range(count):
        name = f"cookbook_{c:03d}"
        book = root / name
        (book / "recipes").mkdir(parents=True)
        (book / "templates/default").mkdir(parents=True)
        (book / "metadata.rb").write_text(f"name '{name}'\nversion '1.0.{c}'\n")
        for f in range(files - 1):
            folder = "recipes" if f % 2 else "templates/default"
            size = rng.randint(2048, 6144)
            text: list[str] = []
            while sum(len(w) + 1 for w in text) < size:
                text.append(rng.choice(WORDS))
            (book / folder / f"file_{f:02d}.rb").write_text(" ".join(text) + "\n")
        cookbooks[name] = book
    return cookbooks


def main() -> None:
    """Print seconds for a cold build, a cache hit and an unpack."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cookbooks", type=int, default=50)
    parser.add_argument("--files", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cookbooks = make_cookbooks(root / "src", args.cookbooks, args.files, random.Random(42))
        store = BundleStore(root / "store")
        start = time.perf_counter()
        bundle = store.get_or_build(cookbooks)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        hit = store.get_or_build(cookbooks)
        cached = time.perf_counter() - start
        assert hit.sha256 == bundle.sha256
        start = time.perf_counter()
        safe_extract(bundle.path, root / "unpacked")
        unpack = time.perf_counter() - start
        total = args.cookbooks * args.files
        print(f"cookbooks={args.cookbooks} files={total} bundle_bytes={bundle.size}")
        print(f"cold_build_seconds={cold:.3f}")
        print(f"cached_build_seconds={cached:.3f}")
        print(f"safe_extract_seconds={unpack:.3f}")


if __name__ == "__main__":
    main()
