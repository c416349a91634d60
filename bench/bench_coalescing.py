"""Benchmark: configure coalescing when 100 instances join a stack of 50 within 10 s.

Run from the repository root: ``.venv/bin/python bench/bench_coalescing.py [--seeds 5]``.
Simulated time (tests/server/fanout_simulation.py) driving the real decisions of
server/fanout.py; configure runs take 5-20 s. Prints, per fan-out job strategy, configure runs per
existing instance (max, mean; target <= 3) and the configure commands created and superseded.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from statistics import mean

# Benchmarks are scripts, not an installed package: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server.fanout_simulation import BurstConfig, simulate  # noqa: E402

DEFAULTS = {"seeds": 5, "existing": 50, "joins": 100, "window": 10.0, "crash": 0.0}

STRATEGIES: dict[str, dict[str, object]] = {
    "one job per change": {"one_pending_job": False},
    "one pending job per stack": {"one_pending_job": True},
    "one pending job, 1 s debounce": {"one_pending_job": True, "fanout_delay": (1.0, 1.0)},
}


def run(strategy: dict[str, object], base: BurstConfig, seeds: int) -> dict[str, float]:
    """Simulate every seed with one strategy and aggregate the figures."""
    config = dataclasses.replace(base, **strategy)  # type: ignore[arg-type]
    results = [simulate(config, seed) for seed in range(seeds)]
    for result in results:
        if result.violations:
            raise SystemExit(f"invariant broken: {result.violations[:3]}")
    existing = [runs for r in results for runs in r.runs(existing=True)]
    return {
        "runs/existing max": max(existing),
        "runs/existing mean": round(mean(existing), 2),
        "jobs": round(mean(r.fanout_jobs for r in results), 1),
        "created": round(mean(r.created for r in results), 1),
        "superseded": round(mean(r.superseded for r in results), 1),
    }


def main() -> None:
    """Parse arguments, run every strategy, print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"])
    parser.add_argument("--existing", type=int, default=DEFAULTS["existing"])
    parser.add_argument("--joins", type=int, default=DEFAULTS["joins"])
    parser.add_argument("--window", type=float, default=DEFAULTS["window"])
    parser.add_argument("--crash", type=float, default=DEFAULTS["crash"], help="job crash odds")
    args = parser.parse_args()
    base = BurstConfig(
        existing=args.existing,
        joins=args.joins,
        window=args.window,
        crash_probability=args.crash,
    )
    print(
        f"{args.joins} instances join within {args.window:g} s a stack of {args.existing}; "
        f"configure runs {base.run_seconds[0]:g}-{base.run_seconds[1]:g} s; "
        f"{args.seeds} seeds; job crash odds {args.crash:g}"
    )
    for name, strategy in STRATEGIES.items():
        figures = run(strategy, base, args.seeds)
        print(f"{name:32s} " + "  ".join(f"{k} {v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
