"""Benchmark of the SP 800-90B non-IID assessment (qrng.sp80090b.assess_non_iid).

Times whole assessments of NIST's 1,000,000-sample 8-bit test file (truerand_8bit.bin: the
bitstring track on 8,000,000 bits and the literal track on 1,000,000 bytes) and of a 1-bit
file (truerand_1bit.bin, 1,000,000 bits): the total with the default threads (two on a
multi-core machine), and the seconds of each estimator step in single-threaded runs, where
they do not overlap. Medians over repeats; machines are noisy, so the load average at the
start is recorded too. NIST's C++ tool takes about 25 s on the 8-bit file here.

Usage: python bench/entropy90b.py [--repeats N] [--vectors DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

from qrng.sp80090b import assess_non_iid

VECTORS = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "sp800-90b"
FILES = ("truerand_8bit.bin", "truerand_1bit.bin")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_file(path: Path, repeats: int) -> dict[str, object]:
    """Median wall seconds: whole assessment (default threads) and each step (one thread)."""
    data = path.read_bytes()
    totals: list[float] = []
    serial: list[float] = []
    steps: dict[str, list[float]] = defaultdict(list)
    final = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        final = assess_non_iid(data).min_entropy
        totals.append(time.perf_counter() - start)
        run: dict[str, float] = {}

        def timer(track: str, step: str, seconds: float, run: dict[str, float] = run) -> None:
            run[f"{track}/{step}"] = seconds

        start = time.perf_counter()
        assess_non_iid(data, timer=timer, workers=1)
        serial.append(time.perf_counter() - start)
        for name, seconds in run.items():
            steps[name].append(seconds)
    return {
        "samples": len(data),
        "repeats": repeats,
        "total_s": statistics.median(totals),
        "total_one_thread_s": statistics.median(serial),
        "steps_one_thread_s": {name: statistics.median(v) for name, v in sorted(steps.items())},
        "min_entropy": final,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per file (median)")
    parser.add_argument("--vectors", type=Path, default=VECTORS, help="folder of the .bin files")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()}, {cpu_model()}",
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    for name in FILES:
        outcome = bench_file(args.vectors / name, args.repeats)
        results[name] = outcome
        print(f"{name}: {outcome['samples']} samples, median of {outcome['repeats']} runs")
        steps = outcome["steps_one_thread_s"]
        assert isinstance(steps, dict)
        for step, seconds in steps.items():
            print(f"  {step:34} {seconds:8.3f} s")
        print(f"  {'total, one thread':34} {outcome['total_one_thread_s']:8.3f} s")
        print(f"  {'total, default threads':34} {outcome['total_s']:8.3f} s")
        print(f"  {'assessed min-entropy':34} {outcome['min_entropy']:.6f} bits/sample")
    print(
        f"machine: {results['machine']}, {results['cpus']} CPUs, Python {results['python']}, "
        f"load average {results['load_average_1min']:.2f} at start"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
