"""Benchmark of the QKDN Controller's path computation (appliance/control/graph.py).

A synthetic backbone of ``--nodes`` nodes and ``--links`` links (a ring, so that it is
connected, plus random chords; seeded), every link usable with a weight from random key
availability and rate. Timed per request, cache emptied before each:

1. the shortest path alone (one Dijkstra over the whole graph);
2. a path with its backup (Dijkstra, then Dijkstra with the primary's links penalised);
3. the baseline in the same run: today's TopologyPaths-style Dijkstra over the same
   graph's plain lengths (``appliance.kms.routing`` style), as the heap work itself.

Usage: python bench/control_paths.py [--nodes 1000] [--links 3000] [--requests 300]
       [--seed 15] [--json PATH]
Targets (issue 15): p50 <= 5 ms shortest, <= 20 ms with a disjoint backup.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.control.graph import Core, Weights, shortest


def backbone(nodes: int, links: int, seed: int) -> Core:
    rng = random.Random(seed)  # topology shape only: no key material
    pairs = {(i, (i + 1) % nodes) for i in range(nodes)}
    while len(pairs) < links:
        a, b = rng.randrange(nodes), rng.randrange(nodes)
        if a != b and (a, b) not in pairs and (b, a) not in pairs:
            pairs.add((a, b))
    core = Core(weights=Weights())
    for i, (a, b) in enumerate(sorted(pairs)):
        weight = core.weights.of(rng.randrange(1 << 22), rng.randrange(20_000))
        core.set_link(f"l{i}", a, b, weight)
    return core


def timed(fn, requests: list[tuple[int, int]]) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for src, dst in requests:
        t0 = time.perf_counter()
        fn(src, dst)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--links", type=int, default=3000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    core = backbone(args.nodes, args.links, args.seed)
    rng = random.Random(args.seed + 1)
    requests = [tuple(rng.sample(range(args.nodes), 2)) for _ in range(args.requests)]
    adj = core.adjacency()
    plain = {a: [(b, 1.0) for b, _ in nbs] for a, nbs in adj.items()}

    def primary(src: int, dst: int) -> None:
        core.cache.clear()
        core.path(src, dst, backup=False)

    def both(src: int, dst: int) -> None:
        core.cache.clear()
        core.path(src, dst, backup=True)

    results = {
        "baseline_dijkstra_ms": timed(lambda s, d: shortest(plain, s, d), requests),
        "shortest_ms": timed(primary, requests),
        "with_backup_ms": timed(both, requests),
    }
    shared = []
    for src, dst in requests[:50]:
        core.cache.clear()
        shared.append(core.path(src, dst).shared)
    report = {
        "nodes": args.nodes, "links": len(core.links), "requests": args.requests,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "load": os.getloadavg(),
        **{k: {"p50": statistics.median(v), "p99": sorted(v)[int(0.99 * (len(v) - 1))]}
           for k, v in results.items()},
        "backup_shared_links_p50": statistics.median(shared),
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
