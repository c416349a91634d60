"""Benchmark: Chef request signatures and verifications per second (protocol 1.3, RSA 2048).

Run from the repository root: ``.venv/bin/python bench/bench_signing.py [--seconds 2]``.
Each figure covers the whole call (canonical request, body digest, RSA, header split/parse) with
a cached key, as a server verifying every agent request or a client signing them would pay.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

# Benchmarks are scripts, not an installed package: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from chef_bridge import auth  # noqa: E402

DEFAULTS = {"seconds": 2.0, "version": "1.3", "body_bytes": 2048}


def rate(operation: Callable[[int], object], seconds: float) -> tuple[int, float]:
    """Run operation(i) for i = 0, 1, ... for about `seconds`; return (count, elapsed)."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        operation(count)
        count += 1
    return count, time.perf_counter() - start


def main() -> None:
    """Print signatures/s and verifications/s for one protocol version."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=DEFAULTS["seconds"])
    parser.add_argument("--version", default=DEFAULTS["version"], choices=["1.0", "1.1", "1.3"])
    parser.add_argument("--body-bytes", type=int, default=DEFAULTS["body_bytes"])
    args = parser.parse_args()

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = b"x" * args.body_bytes
    now = datetime.now(UTC)
    headers = auth.sign_request(key_pem, "web1", "POST", "/nodes/web1", body, version=args.version)

    def sign(i: int) -> object:
        return auth.sign_request(
            key_pem, "web1", "POST", f"/nodes/web{i}", body, None, args.version
        )

    def verify(_: int) -> None:
        auth.verify_request(public_pem, "POST", "/nodes/web1", body, headers, now=now)

    print(f"protocol {args.version}, RSA 2048, body {args.body_bytes} bytes")
    for label, operation in (("signatures", sign), ("verifications", verify)):
        count, elapsed = rate(operation, args.seconds)
        print(f"{label + '/s':>16}: {count / elapsed:9.0f}  ({count} in {elapsed:.2f}s)")


if __name__ == "__main__":
    main()
