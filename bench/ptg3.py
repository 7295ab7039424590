"""Benchmark of the PTG.3 pipeline (issue 3).

Sections (medians over repeats; machines are noisy):
  throughput  PTG.3 output on one core from an unthrottled emulated 16-bit source, with
              health tests on every raw sample, next to two baselines measured in the same
              run: the raw source alone, and AES-256-CTR (the DRBG's output floor);
  health      health tests alone, samples per second (8- and 16-bit sources);
  memory      peak RSS of a process running the generator;
  alarms      false-alarm rates of the RCT and APT on a healthy source (>= 10^8 samples)
              against alpha and against the exact rate from the model's distribution;
  latency     samples from fault onset until a health test trips, per fault type.
Usage: python bench/ptg3.py [--section NAME ...] [--samples N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import hal
from hal.emulated.noise import normal_cdf
from qrng.health import (
    ONLINE_WINDOW,
    STARTUP_SAMPLES,
    HealthConfig,
    HealthMonitor,
    HealthState,
)
from qrng.ptg3 import Ptg3Generator

SOURCE16 = "emulated-qrng://bench?seed=1&bits=16"
SOURCE8 = "emulated-qrng://bench?seed=1&bits=8"


def median_time(fn: Any, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def monitor(src: hal.EntropySource, alpha_exp: int = 40) -> HealthMonitor:
    st = src.status()
    return HealthMonitor(
        HealthConfig(
            bits=st.bits_per_sample,
            claimed_entropy=st.model_min_entropy,
            mean=st.expected_mean,
            std=st.expected_std,
            rho=st.expected_rho,
            alpha_exp=alpha_exp,
        )
    )


def bench_throughput() -> dict[str, float]:
    gen = Ptg3Generator(hal.open_entropy_source(SOURCE16))
    chunk = 8 << 20
    gen.random_bytes(chunk)  # warm up
    ptg3 = median_time(lambda: gen.random_bytes(chunk))
    src = hal.open_entropy_source(SOURCE16)
    samples = gen.monitor.counters.samples_tested // (gen.bytes_out // chunk + 1) or chunk
    raw = median_time(lambda: src.read(4 * ONLINE_WINDOW * 16))
    ctr = Cipher(algorithms.AES(bytes(32)), modes.CTR(bytes(16))).encryptor()
    aes = median_time(lambda: ctr.update(bytes(chunk)))
    return {
        "ptg3_mbit_s": chunk * 8 / ptg3 / 1e6,
        "baseline_aes_ctr_mbit_s": chunk * 8 / aes / 1e6,
        "raw_source_ns_per_sample": raw / (4 * ONLINE_WINDOW * 16) * 1e9,
        "raw_samples_per_output_byte": samples / chunk,
        "health_state": float(gen.state is not HealthState.FAILED),
    }


def bench_health() -> dict[str, float]:
    out = {}
    for name, url in (("8bit", SOURCE8), ("16bit", SOURCE16)):
        src = hal.open_entropy_source(url)
        mon = monitor(src)
        mon.startup(src.read(STARTUP_SAMPLES))
        block = src.read(64 * ONLINE_WINDOW)
        seconds = median_time(lambda m=mon, b=block: m.check(b))
        out[f"health_{name}_msamples_s"] = len(block) / seconds / 1e6
    return out


MEMORY_PROBE = f"""
import resource, hal
from qrng.ptg3 import Ptg3Generator
gen = Ptg3Generator(hal.open_entropy_source({SOURCE16!r}))
for _ in range(200):
    gen.random_bytes(1 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def bench_memory() -> dict[str, float]:
    """Peak RSS of a fresh process that produced 200 MiB of PTG.3 output."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True
    )
    return {"generator_peak_rss_mb_after_200_mib": float(out.stdout.strip())}


def model_pmf(src: hal.EntropySource) -> np.ndarray:
    p = src.params  # type: ignore[attr-defined]
    top = (1 << p.bits) - 1
    cdf = normal_cdf((np.arange(1, top + 1) - p.offset) / p.gain)
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


def exact_apt_rate(pmf: np.ndarray, w: int, c: int) -> float:
    """P(the window's first sample occurs >= c times among the w samples)."""
    total = 0.0
    for p in pmf[pmf > 1e-12]:
        k = np.arange(c - 1, w)
        logs = (
            np.array([math.lgamma(w) - math.lgamma(i + 1) - math.lgamma(w - i) for i in k])
            + k * math.log(p)
            + (w - 1 - k) * math.log1p(-p)
        )
        total += p * float(np.exp(logs).sum())
    return total


def count_alarms(src: hal.EntropySource, mon: HealthMonitor, samples: int) -> tuple[int, int]:
    """RCT runs reaching the cutoff, APT windows reaching theirs, over ``samples``."""
    rct = apt = 0
    carry: int | None = None
    run = 0
    block = 16 * ONLINE_WINDOW
    for _ in range(samples // block):
        x = src.read(block)
        same = np.concatenate([[carry == x[0]], x[1:] == x[:-1]])
        # run lengths of identical samples, continuing the previous block's last run
        edges = np.flatnonzero(np.diff(np.concatenate([[0], same.view(np.int8), [0]])))
        starts, ends = edges[::2], edges[1::2]
        lengths = ends - starts + 1
        if len(starts) and starts[0] == 0:
            lengths[0] += run - 1
        rct += int(np.count_nonzero(lengths >= mon.rct_cutoff))
        run = int(lengths[-1]) if len(ends) and ends[-1] == block else 1
        carry = int(x[-1])
        w = x.reshape(-1, mon.apt_window)
        apt += int(np.count_nonzero(np.count_nonzero(w == w[:, :1], axis=1) >= mon.apt_cutoff))
    return rct, apt


def bench_alarms(samples: int) -> list[dict[str, float]]:
    rows = []
    for alpha_exp in (8, 12):
        src = hal.open_entropy_source(f"emulated-qrng://alarms?seed={alpha_exp}&bits=8")
        mon = monitor(src, alpha_exp)
        pmf = model_pmf(src)
        n = -(-samples // (16 * ONLINE_WINDOW)) * 16 * ONLINE_WINDOW  # at least `samples`
        rct, apt = count_alarms(src, mon, n)
        windows = n // mon.apt_window
        # A run reaches C at a given position when C samples in a row are equal (and the
        # one before differs, so each run counts once).
        c = mon.rct_cutoff
        rct_exact = float(np.sum(pmf**c * (1 - pmf)))
        rows.append(
            {
                "alpha": 2.0**-alpha_exp,
                "samples": n,
                "rct_cutoff": c,
                "rct_alarms": rct,
                "rct_rate": rct / n,
                "rct_exact_rate": rct_exact,
                "rct_bound": 2.0 ** (-mon.config.claimed_entropy * (c - 1)),
                "apt_cutoff": mon.apt_cutoff,
                "apt_windows": windows,
                "apt_alarms": apt,
                "apt_rate": apt / windows,
                "apt_exact_rate": exact_apt_rate(pmf, mon.apt_window, mon.apt_cutoff),
            }
        )
    return rows


def bench_latency(repeats: int = 5) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for url in (SOURCE8, SOURCE16):
        for kind in ("stuck", "total", "saturation", "drift", "correlation", "burst"):
            lat, tests = [], set()
            for seed in range(repeats):
                src = hal.open_entropy_source(url.replace("seed=1", f"seed={seed + 10}"))
                mon = monitor(src)
                mon.startup(src.read(STARTUP_SAMPLES))
                onset = STARTUP_SAMPLES + 12345 * (seed + 1)
                src.inject(kind, at=onset)  # type: ignore[attr-defined]
                while mon.state is not HealthState.FAILED:
                    first = src.status().samples_read
                    finding = mon.check(src.read(ONLINE_WINDOW))
                assert finding is not None
                lat.append(first + finding.index - onset)
                tests.add(finding.test)
            out[f"{url.split('bits=')[1]}bit/{kind}"] = {
                "median_samples": statistics.median(lat),
                "max_samples": max(lat),
                "detected_by": ",".join(sorted(tests)),
            }  # type: ignore[dict-item]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--section",
        action="append",
        choices=["throughput", "health", "memory", "alarms", "latency"],
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=100_000_000,
        help="samples for the false-alarm section (default 10^8)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    sections = args.section or ["throughput", "health", "memory", "alarms", "latency"]
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    runners = {
        "throughput": bench_throughput,
        "health": bench_health,
        "memory": bench_memory,
        "alarms": lambda: bench_alarms(args.samples),
        "latency": bench_latency,
    }
    for name in sections:
        results[name] = runners[name]()
        print(name, json.dumps(results[name], indent=1, default=float))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
