"""Benchmark of the AAA device on the key path (issue 14): two demoquandt networks side by
side, one without AAA (the topology's contracts, the baseline) and one with
(``qkdn net up --aaa``), both without stock (every enc_keys crosses the network).

1. T_key p50 (enc_keys + dec_keys, one key) in alternating rounds on the two networks,
   so that both see the same machine load: the ratio and the difference per round.
2. Suspensions: both AKMSs hold quota for the demo contract; the user is suspended (a
   registry commit, as ``qkdn aaa user suspend`` does); the time from the commit to the
   revocation's arrival at *each* access node (its log line), p50/p99; then resumed.
3. 16 concurrent requesters on a fresh AAA network (both directions, both contracts): how
   long the AKMSs' validations waited on AAA (each AKMS logs its validations' waits when
   it stops: count, how many waited at all, p50, p99, max; this network serves nothing
   but the 16 requesters, so the figures are theirs), and the refusals, if any.

``--suspensions-only`` runs step 2 alone, on one network with AAA.

4. ``--one-at-a-time N``: instead of all the above, each network alone (the other one
   down), 20 warm-up then N T_key requests, and the CPU time (utime + stime) every process
   of the network spent on them: what AAA costs per request, and where.

``--stock N`` starts both networks with UKMS stocks of N keys per pair: T_key then times
requests served from the stock (each allowed and accounted by the AKMS under AAA: one
UKMS -> AKMS round trip). ``--tkey-only`` runs step 1 alone.

Usage: python bench/aaa_path.py [--rounds 5] [--requests 40] [--load 800] [--suspensions 10]
       [--one-at-a-time N] [--stock N] [--tkey-only | --suspensions-only] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from appliance.aaa.registry import Registry
from appliance.cli import net
from appliance.config.render import find_free_base_port
from appliance.kms import netproc
from appliance.tkey import call, endpoints, measure

DEMO = ("sae-berlin-1", "sae-bonn-1")
BANK = ("sae-berlin-2", "sae-bonn-2")
AKMS = ("akms-berlin", "akms-bonn")
REVOKED = ("aaa: quota revoked", "demo-2026")
WAITS = "aaa: validations"


def up(folder: Path, aaa: bool, stock: int = 0) -> None:
    args = argparse.Namespace(
        topology="demoquandt",
        dir=folder,
        base_port=find_free_base_port(),
        mode="gcm",
        rate_limited=False,
        stock=stock,
        timeout=300.0,
        json=False,
        aaa=aaa,
    )
    net.bring_up(args)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def log_lines(path: Path, start: int = 0) -> list[dict[str, Any]]:
    with open(path, "rb") as fh:
        fh.seek(start)
        out = []
        for line in fh.read().decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out


def tkey_rounds(base: Path, aaa: Path, rounds: int, requests: int) -> dict[str, Any]:
    pairs = {
        name: endpoints(net.status_doc(folder), *DEMO)
        for name, folder in (("without", base), ("with", aaa))
    }
    p50: dict[str, list[float]] = {"without": [], "with": []}
    failed = 0
    for _ in range(rounds):
        for name in ("without", "with"):
            doc = measure(*pairs[name], requests)
            p50[name].append(doc["t_key_ms"]["p50"])
            failed += doc["failed_requests"]
    diffs = [w - b for w, b in zip(p50["with"], p50["without"], strict=True)]
    return {
        "p50_ms_without": p50["without"],
        "p50_ms_with": p50["with"],
        "median_p50_without": statistics.median(p50["without"]),
        "median_p50_with": statistics.median(p50["with"]),
        "median_difference_ms": statistics.median(diffs),
        "ratio": statistics.median(p50["with"]) / statistics.median(p50["without"]),
        "failed": failed,
    }


def load(folder: Path, total: int, workers: int = 16) -> dict[str, Any]:
    status = net.status_doc(folder)
    pairs = [DEMO, BANK, DEMO[::-1], BANK[::-1]]
    counts: dict[int, int] = {}
    lock = threading.Lock()
    left = [total]

    def work(i: int) -> None:
        master, slave = endpoints(status, *pairs[i % len(pairs)])
        conn = master.connect()
        while True:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            try:
                code, _ = call(conn, f"/api/v1/keys/{slave.sae}/enc_keys?number=1")
            except (OSError, ValueError):
                conn.close()
                code = 0
            with lock:
                counts[code] = counts.get(code, 0) + 1
        conn.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    return {"requests": total, "statuses": counts, "per_s": round(total / elapsed, 1)}


def keys_flow(folder: Path) -> None:
    """One key each way for the demo contract (both AKMSs then hold its quota)."""
    status = net.status_doc(folder)
    for pair in (DEMO, DEMO[::-1]):
        master, slave = endpoints(status, *pair)
        conn = master.connect()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                code, _ = call(conn, f"/api/v1/keys/{slave.sae}/enc_keys?number=1")
            except (OSError, ValueError):
                conn.close()
                code = 0
            if code == 200:
                break
            time.sleep(0.05)
        conn.close()


def suspensions(folder: Path, times: int) -> dict[str, Any]:
    lat: dict[str, list[float]] = {n: [] for n in AKMS}
    logs = {n: folder / "logs" / f"{n}.log" for n in AKMS}
    for _ in range(times):
        keys_flow(folder)
        marks = {n: p.stat().st_size for n, p in logs.items()}
        reg = Registry(folder / "aaa" / "registry.db")
        t0 = time.time()
        reg.set_user("demo-encryptors", suspended=True)
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 10
        while len(seen) < len(AKMS) and time.monotonic() < deadline:
            for n in AKMS:
                if n in seen:
                    continue
                for rec in log_lines(logs[n], marks[n]):
                    if (
                        rec.get("msg") == "aaa: quota revoked"
                        and rec.get("contract") == "demo-2026"
                    ):
                        seen[n] = rec["ts"] - t0
                        break
            time.sleep(0.01)
        for n, s in seen.items():
            lat[n].append(s)
        reg.set_user("demo-encryptors", suspended=False)
        reg.close()
        time.sleep(0.3)
    return {
        n: {
            "seen": len(v),
            "of": times,
            "p50_ms": round(pct(v, 0.5) * 1000, 1) if v else None,
            "p99_ms": round(pct(v, 0.99) * 1000, 1) if v else None,
            "over_1s": sum(1 for x in v if x > 1.0),
            "ms": [round(x * 1000, 1) for x in v],
        }
        for n, v in lat.items()
    }


def one_at_a_time(tmp: Path, requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, aaa in (("without", False), ("with", True)):
        folder = tmp / name
        up(folder, aaa)
        try:
            master, slave = endpoints(net.status_doc(folder), *DEMO)
            measure(master, slave, 20)
            before = netproc.cpu_seconds(folder)
            doc = measure(master, slave, requests)
            after = netproc.cpu_seconds(folder)
        finally:
            net.bring_down(folder)
        per = {k: round((v - before.get(k, 0.0)) / requests * 1000, 2) for k, v in after.items()}
        out[name] = {
            "t_key_ms": doc["t_key_ms"],
            "cpu_ms_per_request": {k: v for k, v in per.items() if v > 0.5},
            "cpu_ms_per_request_total": round(sum(per.values()), 2),
        }
    return out


def load16(folder: Path, total: int, stock: int) -> dict[str, Any]:
    """16 requesters on a fresh AAA network; what its AKMSs waited on AAA meanwhile."""
    up(folder, True, stock)
    try:
        doc = {"load_average_before": os.getloadavg(), **load(folder, total)}
        doc["load_average_after"] = os.getloadavg()
    finally:
        net.bring_down(folder)
    doc["akms_wait_on_aaa"] = {n: waits(folder, n) for n in AKMS}
    return doc


def waits(folder: Path, node: str) -> dict[str, Any] | None:
    """The AKMS's last "aaa: validations" summary (logged when it stops)."""
    found = [r for r in log_lines(folder / "logs" / f"{node}.log") if r.get("msg") == WAITS]
    if not found:
        return None
    return {k: v for k, v in found[-1].items() if k not in ("ts", "level", "logger", "msg")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--load", type=int, default=800)
    p.add_argument("--suspensions", type=int, default=10)
    p.add_argument("--one-at-a-time", type=int, metavar="N")
    p.add_argument("--stock", type=int, default=0, metavar="N")
    p.add_argument("--tkey-only", action="store_true")
    p.add_argument("--suspensions-only", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    doc: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "load_average": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="qkdn-aaa-path-") as tmp:
        if args.one_at_a_time:
            doc["one_at_a_time"] = one_at_a_time(Path(tmp), args.one_at_a_time)
            doc["load_average_after"] = os.getloadavg()
            text = json.dumps(doc, indent=1)
            print(text)
            if args.json:
                args.json.write_text(text)
            return
        if args.suspensions_only:
            folder = Path(tmp) / "with"
            up(folder, True, args.stock)
            try:
                doc["suspension"] = suspensions(folder, args.suspensions)
            finally:
                net.bring_down(folder)
            doc["load_average_after"] = os.getloadavg()
            text = json.dumps(doc, indent=1)
            print(text)
            if args.json:
                args.json.write_text(text)
            return
        base, aaa = Path(tmp) / "without", Path(tmp) / "with"
        doc["stock"] = args.stock
        up(base, False, args.stock)
        try:
            up(aaa, True, args.stock)
            try:
                doc["t_key"] = tkey_rounds(base, aaa, args.rounds, args.requests)
                net.bring_down(base)
                if not args.tkey_only:
                    doc["suspension"] = suspensions(aaa, args.suspensions)
            finally:
                net.bring_down(aaa)
            doc["akms_wait_on_aaa"] = {n: waits(aaa, n) for n in AKMS}
        finally:
            net.bring_down(base)
        if not args.tkey_only:
            doc["load16"] = load16(Path(tmp) / "load16", args.load, args.stock)
    doc["load_average_after"] = os.getloadavg()
    text = json.dumps(doc, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
