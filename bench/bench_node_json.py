"""Benchmark node JSON: build_cluster and per-instance node_json as a stack grows.

Run: .venv/bin/python bench/bench_node_json.py [--sizes 500,1000,5000] [--sample-json-dumps]

For each stack size (online instances in 10 layers, 5 apps) it prints:
- build_cluster ms (once per cluster version);
- node_json ms per instance (median over 200 instances), without serialising;
- total ms for one membership change with the spliced serialiser `dumps`: build once, then
  node_json + dumps for every instance;
- the same total with plain json.dumps (with --sample-json-dumps it is extrapolated from 200
  instances, because re-encoding the whole cluster for every instance takes minutes at 5,000).
Every document holds the whole cluster, so the bytes sent grow as instances²; the point is that
the work besides copying those bytes stays linear.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chef_bridge.node_json import ClusterInput, build_cluster, dumps, node_json  # noqa: E402

LAYERS = 10
APPS = 5
SAMPLE = 200


def make_cluster(instances: int) -> ClusterInput:
    """A synthetic stack: `instances` online instances round-robin over 10 layers."""
    layers: list[Any] = [
        {
            "id": f"layer-{n}",
            "shortname": f"layer{n}",
            "name": f"Layer {n}",
            "type": "custom",
            "recipes": {
                "setup": [f"layer{n}::setup", "common::base"],
                "configure": [f"layer{n}::configure", "common::hosts"],
                "deploy": ["deploy::default"],
                "undeploy": [],
                "shutdown": [],
            },
            "custom_json": {f"layer{n}": {"tuning": {"workers": n + 1}}},
            "packages": ["curl"],
            "auto_healing": True,
        }
        for n in range(LAYERS)
    ]
    hosts: list[Any] = []
    for n in range(instances):
        # Every 10th instance sits in two layers, as utility hosts often do.
        layer_ids = [f"layer-{n % LAYERS}"] + ([f"layer-{(n + 1) % LAYERS}"] if n % 10 == 0 else [])
        hosts.append(
            {
                "id": f"inst-{n:05d}",
                "hostname": f"host{n:05d}",
                "status": "online",
                "layer_ids": layer_ids,
                "private_ip": f"10.{n // 65536}.{n // 256 % 256}.{n % 256}",
                "public_ip": f"198.51.{n // 256 % 256}.{n % 256}",
                "private_dns_name": f"ip-10-0-{n // 256 % 256}-{n % 256}.internal",
                "public_dns_name": f"ec2-198-51-{n // 256 % 256}-{n % 256}.compute.amazonaws.com",
                "availability_zone": f"eu-west-1{'abc'[n % 3]}",
                "instance_type": "t3.medium",
                "os": "Ubuntu 22.04 LTS",
                "architecture": "x86_64",
                "ec2_instance_id": f"i-{n:017x}",
                "attributes": {"node": {"index": n}},
            }
        )
    apps: list[Any] = [
        {
            "id": f"app-{n}",
            "shortname": f"app{n}",
            "name": f"App {n}",
            "type": "php",
            "source": {"type": "git", "url": f"git@example.com:org/app{n}.git", "revision": "main"},
            "domains": [f"app{n}.example.com"],
            "environment": {"SECRET": {"value": "x" * 32, "secure": True}},
            "layer_ids": [f"layer-{n}", f"layer-{n + APPS}"],
            "attributes": {},
            "enable_ssl": False,
        }
        for n in range(APPS)
    ]
    return {
        "version": 1,
        "stack": {
            "id": "stack",
            "name": "bench",
            "region": "eu-west-1",
            "default_os": "Ubuntu 22.04 LTS",
            "chef_version": "16.12.3",
            "custom_json": {"global": {"env": "bench"}},
            "custom_cookbooks_source": None,
        },
        "layers": layers,
        "instances": hosts,
        "apps": apps,
    }


def ms(seconds: float, width: int = 10, digits: int = 1) -> str:
    """Seconds as right-aligned milliseconds."""
    return f"{seconds * 1000:{width}.{digits}f}"


def bench(size: int, sample_json_dumps: bool) -> None:
    """Print the figures for one stack size."""
    cluster = make_cluster(size)
    ids = [host["id"] for host in cluster["instances"]]
    step = max(1, size // SAMPLE)
    sample = ids[::step][:SAMPLE]

    start = time.perf_counter()
    view = build_cluster(cluster)
    build = time.perf_counter() - start

    per_instance = []
    for instance_id in sample:
        start = time.perf_counter()
        node_json(view, instance_id, "configure", command_id="c")
        per_instance.append(time.perf_counter() - start)

    start = time.perf_counter()
    fresh = build_cluster(cluster)
    size_bytes = 0
    for instance_id in ids:
        size_bytes += len(dumps(fresh, node_json(fresh, instance_id, "configure", command_id="c")))
    total_spliced = time.perf_counter() - start

    json_ids = sample if sample_json_dumps else ids
    start = time.perf_counter()
    plain = build_cluster(cluster)
    for instance_id in json_ids:
        json.dumps(node_json(plain, instance_id, "configure", command_id="c"))
    total_json = time.perf_counter() - start
    if sample_json_dumps:
        total_json *= len(ids) / len(json_ids)

    print(
        f"{size:>6} | {ms(build)} | {ms(statistics.median(per_instance), 12, 3)} |"
        f" {ms(total_spliced, 16)} | {ms(total_json, 20)}{'*' if sample_json_dumps else ' '} |"
        f" {size_bytes / len(ids) / 1e6:8.2f}"
    )


def main() -> None:
    """Run the benchmark for each requested size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000,5000")
    parser.add_argument("--sample-json-dumps", action="store_true")
    args = parser.parse_args()
    print(
        "     n |   build ms | node_json ms | total ms (dumps) | total ms (json.dumps) |   MB/doc"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        bench(size, args.sample_json_dumps)
    if args.sample_json_dumps:
        print("* extrapolated from", SAMPLE, "instances")


if __name__ == "__main__":
    main()
