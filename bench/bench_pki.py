"""Benchmark: instance enrollments (CSR check + sign) per second, for each CA key algorithm.

Run from the repository root: ``.venv/bin/python bench/bench_pki.py [--seconds 2]``.
CSRs are generated beforehand; only ``issue_instance_certificate`` is timed. A verify figure
(what every agent request with a client certificate costs) is printed alongside.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Benchmarks are scripts, not an installed package: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import pki  # noqa: E402

DEFAULTS = {"seconds": 2.0, "keys": 4, "csrs": 200}


def prepare_csrs(keys: int, csrs: int) -> list[tuple[str, bytes]]:
    """Build (instance id, CSR PEM) pairs from a few RSA 2048 keys, as nodes would."""
    key_pems = [pki.generate_private_key_pem(2048) for _ in range(keys)]
    return [
        (f"i-{index:017x}", pki.build_csr_pem(key_pems[index % keys], f"i-{index:017x}"))
        for index in range(csrs)
    ]


def rate(operation: Callable[[int], object], seconds: float) -> tuple[int, float]:
    """Run operation(i) for i = 0, 1, ... for about `seconds`; return (count, elapsed)."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        operation(count)
        count += 1
    return count, time.perf_counter() - start


def bench_algorithm(
    algorithm: pki.CAKeyAlgorithm, csrs: list[tuple[str, bytes]], seconds: float
) -> None:
    """Print issue and verify rates for a fresh CA of the given algorithm."""
    ca = pki.create_ca(algorithm=algorithm)
    issued = [pki.issue_instance_certificate(ca, csr, name).pem for name, csr in csrs[:50]]

    def issue(i: int) -> object:
        name, csr = csrs[i % len(csrs)]
        return pki.issue_instance_certificate(ca, csr, name)

    def verify(i: int) -> object:
        return pki.verify_instance_certificate(ca, issued[i % len(issued)])

    for label, operation in (("csr check + sign", issue), ("verify", verify)):
        count, elapsed = rate(operation, seconds)
        print(
            f"{algorithm.value:9} {label:17} {count / elapsed:9.0f} ops/s "
            f"({count} in {elapsed:.2f} s, {1000 * elapsed / count:.2f} ms each)"
        )


def main() -> None:
    """Parse arguments, prepare CSRs outside the timed part, print one line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=DEFAULTS["seconds"])
    parser.add_argument("--keys", type=int, default=DEFAULTS["keys"])
    parser.add_argument("--csrs", type=int, default=DEFAULTS["csrs"])
    parser.add_argument(
        "--algorithm",
        choices=[a.value for a in pki.CAKeyAlgorithm],
        action="append",
        help="CA key algorithm to measure (repeatable; default: all)",
    )
    args = parser.parse_args()
    algorithms = [
        pki.CAKeyAlgorithm(a) for a in args.algorithm or [a.value for a in pki.CAKeyAlgorithm]
    ]
    csrs = prepare_csrs(int(args.keys), int(args.csrs))
    for algorithm in algorithms:
        bench_algorithm(algorithm, csrs, float(args.seconds))


if __name__ == "__main__":
    main()
