"""Benchmark of the KMS network (issue 5): the DemoQuanDT network as 16 OS processes.

Measures, in one run on a fresh network with full link key stores:
  * T_key, sequential requests SAE Berlin -> SAE Bonn (p50/p90/p99), next to the paper;
  * relays/s and T_key with 16 concurrent requesters (each request relays one CN key);
  * 256-bit keys/s end to end with batched requests (number = 128);
  * RSS of every node process.
Usage: python bench/kms_network.py [--requests N] [--mode gcm|otp] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from appliance.cli import net
from appliance.config.render import find_free_base_port
from appliance.tkey import endpoints, measure


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def concurrent(
    master: Any, slave: Any, workers: int, per_worker: int, number: int
) -> dict[str, float]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def work() -> None:
        r = measure(master, slave, per_worker, number=number)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    samples = sorted(x for r in results for x in r["samples_ms"])
    requests = sum(r["requests"] - r["failed_requests"] for r in results)
    return {
        "workers": workers,
        "requests": requests,
        "relays_per_s": requests / elapsed,
        "keys_per_s": sum(r["keys_matched"] for r in results) / elapsed,
        "t_key_p50_ms": samples[len(samples) // 2],
        "t_key_p99_ms": samples[int(0.99 * (len(samples) - 1))],
        "mismatched": sum(r["keys_mismatched"] for r in results),
        "failed": sum(r["failed_requests"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--mode", default="gcm", choices=["gcm", "otp"])
    parser.add_argument("--json")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "mode": args.mode,
    }
    with tempfile.TemporaryDirectory(prefix="qkdn-bench-") as tmp:
        up = argparse.Namespace(
            topology="demoquandt",
            dir=Path(tmp),
            base_port=find_free_base_port(),
            mode=args.mode,
            rate_limited=False,
            timeout=120.0,
            json=False,
        )
        net.bring_up(up)
        try:
            status = net.status_doc(Path(tmp))
            master, slave = endpoints(status, "sae-berlin-1", "sae-bonn-1")
            seq = measure(master, slave, args.requests)
            seq.pop("samples_ms")
            out["sequential"] = seq
            out["concurrent_16"] = concurrent(master, slave, 16, max(1, args.requests // 16), 1)
            out["batched_128"] = concurrent(master, slave, 4, 10, 128)
            rss = [rss_mb(n["pid"]) for n in net.status_doc(Path(tmp))["nodes"] if n["alive"]]
            out["node_rss_mb"] = {"max": max(rss), "median": statistics.median(rss)}
        finally:
            net.bring_down(Path(tmp))
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
