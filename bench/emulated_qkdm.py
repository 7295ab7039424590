"""Benchmark of the emulated quantum layer (issue 2).

Measures, on this machine and in one run:
  * the per-key cost of the emulated QKDM (master get_key, slave get_key_by_id, status),
    and per key of a 64-key run read at once (``get_keys(64)``, as a grant reads), next to
    a baseline: the raw AES-256-CTR call that derives one key, the crypto floor;
  * how fast one link and the whole DemoQuanDT network emulate a week sampled every 30 s;
  * the import time of the driver (paid by every node process at start-up).
Medians over repeats; machines are noisy.
Usage: python bench/emulated_qkdm.py [--keys-only] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import hal
from appliance.config.topology import load_topology
from appliance.demo import DemoSettings, run_quantum_layer

REPEATS = 5
URL = "emulated://bench?skr=1e6&skr_std=1e5&qber=0.02&qber_std=0.005&seed=bench&end={end}"


def per_op(fn: Callable[[], object], n: int) -> float:
    """Median seconds per call of ``fn`` over REPEATS batches of ``n`` calls."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times)


def bench_keys() -> dict[str, float]:
    clock = hal.ManualClock(0.0)
    a = hal.open_qkdm(URL.format(end="a"), clock=clock)
    b = hal.open_qkdm(URL.format(end="b"), clock=clock)
    clock.set(600)  # 600 s at 1 Mb/s: enough keys for every batch
    key = b"k" * 32

    def baseline() -> bytes:
        enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        return enc.update(bytes(32))

    ids: list[str] = []

    def master() -> None:
        ids.append(a.get_key().key_id)

    slave_ids = iter(ids)
    n = 2000
    out = {
        "baseline_aes_ctr_us": per_op(baseline, n) * 1e6,
        "master_get_key_us": per_op(master, n) * 1e6,
    }
    out["master_get_keys64_per_key_us"] = per_op(lambda: a.get_keys(64), n // 64) * 1e6 / 64
    out["get_keys64_speedup"] = out["master_get_key_us"] / out["master_get_keys64_per_key_us"]
    out["slave_get_key_by_id_us"] = per_op(lambda: b.get_key_by_id(next(slave_ids)), n) * 1e6
    out["status_us"] = per_op(a.status, n) * 1e6
    out["pair_ratio_to_baseline"] = (
        out["master_get_key_us"] + out["slave_get_key_by_id_us"]
    ) / out["baseline_aes_ctr_us"]
    return out


def bench_week_one_link() -> float:
    times = []
    for _ in range(3):
        clock = hal.ManualClock(0.0)
        q = hal.open_qkdm(URL.format(end="a"), clock=clock)
        start = time.perf_counter()
        for step in range(1, 7 * 86400 // 30 + 1):
            clock.set(step * 30.0)
            q.status()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_demo_week() -> dict[str, float]:
    topo = load_topology("demoquandt")
    walls = [
        run_quantum_layer(topo, DemoSettings(days=7, seed=f"b{i}"))["wall_s"] for i in range(3)
    ]
    wall = statistics.median(walls)
    return {"demo_week_wall_s": wall, "demo_week_speedup": 7 * 86400 / wall}


def bench_import() -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import hal.emulated"], check=True)
        times.append(time.perf_counter() - start)
    baseline = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - start)
    return statistics.median(times) - statistics.median(baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keys-only", action="store_true", help="the per-key costs only")
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    results.update(bench_keys())
    if not args.keys_only:
        results["week_one_link_s"] = bench_week_one_link()
        results.update(bench_demo_week())
        results["import_hal_emulated_s"] = bench_import()
    for name, value in results.items():
        print(f"{name:28} {value:.3f}" if isinstance(value, float) else f"{name:28} {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
