"""Benchmark: enrollments per second in one process (CSR check + sign + token burn + commit).

Run from the repository root: ``.venv/bin/python bench/bench_enrollment.py [--count 400]``.
Instances, tokens and CSRs are made before the clock starts (RSA keys are the node's cost, not
the server's); each timed enrollment is ``server.enrollment.enroll`` on a fresh session over a
SQLite file, committed, as the POST /agent/v1/enroll handler runs it, minus HTTP.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Benchmarks are scripts, not an installed package: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import pki  # noqa: E402
from server.config import load_settings  # noqa: E402
from server.db import Database  # noqa: E402
from server.enrollment import enroll, issue_token  # noqa: E402
from server.migrate import upgrade  # noqa: E402
from server.models import Instance, Stack  # noqa: E402

DEFAULTS = {"count": 400, "keys": 4}


def main() -> None:
    """Print enrollments per second."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=DEFAULTS["count"])
    parser.add_argument("--keys", type=int, default=DEFAULTS["keys"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scalarium-bench-") as tmp:
        settings = load_settings({}, data_dir=tmp)
        upgrade(settings.database_url)
        database = Database(settings.database_url)
        ca = pki.load_or_create_ca(settings.pki_dir)
        keys = [pki.generate_private_key_pem() for _ in range(args.keys)]
        work: list[tuple[str, str]] = []
        with database.session() as session:
            stack = Stack(shortname="bench", name="bench")
            session.add(stack)
            session.flush()
            for n in range(args.count):
                instance = Instance(stack_id=stack.id, hostname=f"node{n}")
                session.add(instance)
                session.flush()
                _, token, _ = issue_token(session, instance.id, 3600)
                csr = pki.build_csr_pem(keys[n % len(keys)], instance.id).decode()
                work.append((token, csr))
        started = time.perf_counter()
        for token, csr in work:
            with database.session() as session:
                enroll(session, ca, settings, token=token, csr_pem=csr, agent_version="bench")
        elapsed = time.perf_counter() - started
        database.dispose()
    print(
        f"{args.count} enrollments in {elapsed:.2f} s: {args.count / elapsed:.0f}/s "
        f"(EC P-256 CA, RSA-2048 CSRs, SQLite; target >= 200/s)"
    )


if __name__ == "__main__":
    main()
