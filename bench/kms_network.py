"""Benchmark of the KMS network (issue 5): the DemoQuanDT network as 16 OS processes.

Measures, in one run on a fresh network with full link key stores:
  * T_key, sequential requests SAE Berlin -> SAE Bonn (p50/p90/p99), next to the paper;
  * relays/s and T_key with 16 concurrent requesters (each request relays one CN key);
  * 256-bit keys/s end to end with batched requests (number = 1024, 4 requesters);
  * enc_keys served from a UKMS stock (a second network): requests/s, p50, and the CPU
    time of the master's UKMS per request (robust to other load on the machine);
  * RSS of every node process;
  * the CPU time (user + system, /proc) of each node process per request of each phase
    (warm-up requests included), which other load on the machine disturbs less.
Usage: python bench/kms_network.py [--requests N] [--concurrent N] [--batches N]
                                   [--mode gcm|otp] [--stock-only] [--stock-keys N]
                                   [--json PATH]
(``--stock-only``: the stocked network alone, e.g. to compare the 014 server of two trees;
``--stock-keys``: enc_keys each of its two requesters asks, 2000 by default.)
The networks are the KMS nodes alone: no QKDN Manager or SNMP agents, no AAA, no
controller (their costs are measured by bench/mgmt.py, bench/aaa_path.py and
bench/control_switch.py against this same network).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.cli import net
from appliance.config.render import find_free_base_port
from appliance.tkey import call, endpoints, measure

MAX_STOCK_KEYS = 100_000
"""Keys each stocked requester may ask for at most (the run stays bounded)."""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far. Its own reader, not
    ``netproc.cpu_ns``: this file runs against older revisions' packages too (the baseline)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NodeCpu:
    """CPU time of every node process over a phase, per request: less sensitive to other
    load on the machine than the wall-clock figures."""

    def __init__(self, nodes: list[dict[str, Any]]) -> None:
        self.pids = {n["name"]: n["pid"] for n in nodes if n.get("alive", True)}
        self.start = {name: cpu_s(pid) for name, pid in self.pids.items()}

    def per_request(self, requests: int) -> dict[str, Any]:
        """CPU ms per request: all nodes together, and each node."""
        used = {name: cpu_s(pid) - self.start[name] for name, pid in self.pids.items()}
        each = {name: round(sec * 1000 / max(1, requests), 4) for name, sec in used.items()}
        return {"all_ms": round(sum(used.values()) * 1000 / max(1, requests), 3), "nodes": each}


def _worker(fn: Any, args: tuple[Any, ...], barrier: Any, queue: Any) -> None:
    barrier.wait()
    t0 = time.time()
    result = fn(*args)
    queue.put((t0, time.time(), result))


def in_processes(workers: int, fn: Any, args: tuple[Any, ...]) -> list[tuple[float, float, Any]]:
    """Run ``fn(*args)`` in ``workers`` processes started together (the client must not be
    one Python process: its GIL would cap the load); (start, end, result) of each."""
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, args, barrier, queue)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return results


def concurrent(
    master: Any, slave: Any, workers: int, per_worker: int, number: int
) -> dict[str, float]:
    runs = in_processes(workers, _measure_n, (master, slave, per_worker, number))
    results = [r for _, _, r in runs]
    # from the first measured request to the last (connections and warm-up excluded; the
    # rate is conservative: early on, some requesters are still warming up)
    elapsed = max(r["window"][1] for r in results) - min(r["window"][0] for r in results)
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


def _measure_n(master: Any, slave: Any, requests: int, number: int) -> dict[str, Any]:
    return measure(master, slave, requests, number=number)


def _enc_only(master: Any, slave: Any, requests: int) -> list[float]:
    """enc_keys latencies (ms) on one keep-alive connection: served from the stock."""
    out = []
    with master.connect() as conn:
        for _ in range(requests):
            t0 = time.perf_counter()
            code, _ = call(conn, f"/api/v1/keys/{slave.sae}/enc_keys")
            if code == 200:
                out.append((time.perf_counter() - t0) * 1000)
    return out


def stock_phase(tmp: Path, mode: str, workers: int, per_worker: int) -> dict[str, Any]:
    """A second network whose UKMSes keep a stock: enc_keys rate and latency from it."""
    net_dir = tmp / "stocked"
    up = argparse.Namespace(
        topology="demoquandt",
        dir=net_dir,
        base_port=find_free_base_port(),
        mode=mode,
        rate_limited=False,
        stock=workers * per_worker + 1000,
        timeout=120.0,
        json=False,
        mgmt=False,
    )
    net.bring_up(up)
    try:
        status = net.status_doc(net_dir)
        master, slave = endpoints(status, "sae-berlin-1", "sae-bonn-1")
        deadline = time.monotonic() + 120
        with master.connect() as conn:
            while time.monotonic() < deadline:
                _, doc = call(conn, f"/api/v1/keys/{slave.sae}/status")
                if doc.get("stored_key_count", 0) >= up.stock:
                    break
                time.sleep(0.5)
        ukms = next(s["ukms"] for s in status["saes"] if s["id"] == master.sae)
        pid = next(n["pid"] for n in status["nodes"] if n["name"] == ukms)
        cpu_before = cpu_s(pid)
        runs = in_processes(workers, _enc_only, (master, slave, per_worker))
        ukms_cpu = cpu_s(pid) - cpu_before
    finally:
        net.bring_down(net_dir)
    elapsed = max(end for _, end, _ in runs) - min(start for start, _, _ in runs)
    samples = sorted(x for _, _, r in runs for x in r)
    return {
        "workers": workers,
        "requests": len(samples),
        "requests_per_s": len(samples) / elapsed,
        "p50_ms": samples[len(samples) // 2],
        "p99_ms": samples[int(0.99 * (len(samples) - 1))],
        "ukms_cpu_us_per_request": ukms_cpu / len(samples) * 1e6,
    }


def full_network(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The first network: sequential, concurrent and batched requests, RSS."""
    out: dict[str, Any] = {}
    up = argparse.Namespace(
        topology="demoquandt",
        dir=tmp,
        base_port=find_free_base_port(),
        mode=args.mode,
        rate_limited=False,
        timeout=120.0,
        json=False,
        mgmt=False,
    )
    net.bring_up(up)
    try:
        status = net.status_doc(tmp)
        master, slave = endpoints(status, "sae-berlin-1", "sae-bonn-1")
        nodes = status["nodes"]
        cpu = NodeCpu(nodes)
        seq = measure(master, slave, args.requests)
        seq.pop("samples_ms")
        seq["cpu_per_request"] = cpu.per_request(seq["requests"])
        out["sequential"] = seq
        per = max(1, args.concurrent // 16)
        cpu = NodeCpu(nodes)
        out["concurrent_16"] = concurrent(master, slave, 16, per, 1)
        out["concurrent_16"]["cpu_per_request"] = cpu.per_request(16 * per)
        cpu = NodeCpu(nodes)
        out["batched_1024"] = concurrent(master, slave, 4, args.batches // 4, 1024)
        out["batched_1024"]["cpu_per_request"] = cpu.per_request(4 * (args.batches // 4))
        rss = [rss_mb(n["pid"]) for n in net.status_doc(tmp)["nodes"] if n["alive"]]
        out["node_rss_mb"] = {"max": max(rss), "median": statistics.median(rss)}
    finally:
        net.bring_down(tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="sequential requests")
    parser.add_argument(
        "--concurrent", type=int, default=1600, help="requests of the 16 concurrent requesters"
    )
    parser.add_argument(
        "--batches", type=int, default=80, help="requests of 1024 keys (4 requesters)"
    )
    parser.add_argument("--mode", default="gcm", choices=["gcm", "otp"])
    parser.add_argument("--stock-only", action="store_true", help="only the stocked network")
    parser.add_argument(
        "--stock-keys",
        type=int,
        default=2000,
        help="enc_keys each of the stocked phase's 2 requesters asks",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    # a SIGTERM (a timeout, a kill) ends the run through its finally: the networks it
    # started are brought down, not left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not 1 <= args.stock_keys <= MAX_STOCK_KEYS:
        parser.error(f"--stock-keys: 1 to {MAX_STOCK_KEYS}")
    out: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "mode": args.mode,
    }
    with tempfile.TemporaryDirectory(prefix="qkdn-bench-") as tmp:
        if not args.stock_only:
            out.update(full_network(Path(tmp), args))
        out["stock_enc_keys"] = stock_phase(Path(tmp), args.mode, 2, args.stock_keys)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
