"""A/B of ``bench/kms_network.py`` between two source trees, in alternating pairs.

Runs this tree's ``bench/kms_network.py`` N times against each tree's package (``PYTHONPATH``
set to the tree, the working directory in it: the node processes, started with the same
interpreter, inherit both), alternating which tree goes first in each pair, so that both
see the same load; one bench file for both, so both are measured alike (it reads the CPU
of the node processes from ``/proc`` itself: it runs against older packages). Writes each
run's JSON and the load average before and after it into ``OUT``, then prints the medians
of each tree and the ratio B/A:

    python bench/ab_trees.py --a /work/wt/base-fef58d3 --b . --pairs 3 --out /tmp/ab \\
        -- --requests 300 --concurrent 1600 --batches 40

An A tree has to be complete (``git archive REV | tar -x -C DIR``); the interpreter is
this one (``sys.executable``), so both trees run with the same libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().with_name("kms_network.py")

FIGURES: dict[str, tuple[str, ...]] = {
    "T_key p50, ms (sequential)": ("sequential", "t_key_ms", "p50"),
    "T_key p99, ms (sequential)": ("sequential", "t_key_ms", "p99"),
    "relays/s, 16 requesters": ("concurrent_16", "relays_per_s"),
    "T_key p50, ms (16 requesters)": ("concurrent_16", "t_key_p50_ms"),
    "T_key p99, ms (16 requesters)": ("concurrent_16", "t_key_p99_ms"),
    "keys/s, batched 1024": ("batched_1024", "keys_per_s"),
    "enc_keys/s from stock": ("stock_enc_keys", "requests_per_s"),
    "stocked enc_keys, UKMS CPU µs": ("stock_enc_keys", "ukms_cpu_us_per_request"),
    "CPU ms/request, sequential": ("sequential", "cpu_per_request", "all_ms"),
    "CPU ms/request, 16 requesters": ("concurrent_16", "cpu_per_request", "all_ms"),
    "CPU ms/request, batched": ("batched_1024", "cpu_per_request", "all_ms"),
}
"""What is compared: a label and the path to the figure in the bench's JSON."""


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(tree: Path, bench_args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """One bench run against ``tree``'s package; its JSON, with the load around it."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    before, started = load(), time.time()
    subprocess.run(
        [sys.executable, str(BENCH), *bench_args, "--json", str(out)],
        cwd=tree,
        env=env,
        check=True,
        timeout=timeout,
        stdout=subprocess.DEVNULL,
    )
    doc: dict[str, Any] = json.loads(out.read_text())
    doc["ab"] = {
        "tree": str(tree),
        "load_before": before,
        "load_after": load(),
        "started": time.strftime("%H:%M:%S", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
    }
    out.write_text(json.dumps(doc, indent=1))
    return doc


def figure(doc: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = doc
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="tree A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="tree B (the change)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSONs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run at most")
    parser.add_argument("bench_args", nargs="*", help="after --: kms_network.py's options")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    for tree in trees.values():
        if not (tree / "appliance" / "__init__.py").exists():
            parser.error(f"{tree}: no appliance package")
    docs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    for pair in range(args.pairs):
        order = ("A", "B") if pair % 2 == 0 else ("B", "A")
        for side in order:
            out = args.out / f"{side}-{pair + 1}.json"
            doc = run(trees[side], args.bench_args, out, args.timeout)
            docs[side].append(doc)
            ab = doc["ab"]
            rate = figure(doc, FIGURES["relays/s, 16 requesters"])
            print(
                f"pair {pair + 1} {side} {ab['started']} UTC, {ab['seconds']} s, load"
                f" {ab['load_before']:.1f}-{ab['load_after']:.1f}: relays/s (16) {rate}",
                flush=True,
            )
    print(f"\nA = {trees['A']}\nB = {trees['B']}\nmedians of {args.pairs} runs each")
    print(f"{'figure':34} {'A':>10} {'B':>10} {'B/A':>6}  B/A by pair")
    for label, path in FIGURES.items():
        a = [v for v in (figure(d, path) for d in docs["A"]) if v is not None]
        b = [v for v in (figure(d, path) for d in docs["B"]) if v is not None]
        if not a or not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        pairs = " ".join(f"{y / x:.2f}" for x, y in zip(a, b, strict=False) if x)
        print(f"{label:34} {ma:10.3f} {mb:10.3f} {mb / ma if ma else 0:6.3f}  {pairs}")

    print("\nCPU ms per request by node, 16 requesters (medians), B/A")
    names = sorted({n for d in docs["A"] + docs["B"] for n in _nodes(d)})
    for name in names:
        a = [_nodes(d)[name] for d in docs["A"] if name in _nodes(d)]
        b = [_nodes(d)[name] for d in docs["B"] if name in _nodes(d)]
        if a and b and statistics.median(a):
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"  {name:24} {ma:8.3f} {mb:8.3f} {mb / ma:6.3f}")


def _nodes(doc: dict[str, Any]) -> dict[str, float]:
    return dict(doc.get("concurrent_16", {}).get("cpu_per_request", {}).get("nodes", {}))


if __name__ == "__main__":
    main()
