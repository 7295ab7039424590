"""ETSI 004 key streams on a running DemoQuanDT network: GET_KEY latency and throughput.

The network runs as ``qkdn net up --no-aaa`` starts it (16 processes, mutual TLS), here or
in ``--dir`` if one already runs there (without AAA: the DemoQuanDT contracts allow keys
of 256 bits, chunks of 32 bytes, and the throughput part reads chunks of 1,024). One
stream SAE Berlin -> SAE Bonn is opened by both; the source reads every chunk first (that
makes the network relay them all, and the destination's copies arrive at UKMS Bonn); then
the destination's GET_KEYs are measured on chunks already relayed:

* **latency**: one GET_KEY at a time (``--chunk-size 32`` bytes), p50/p90 over ``--gets``;
* **throughput**: GET_KEYs pipelined ``--window`` deep on one connection, chunks of 1,024
  bytes (the largest), key bits per second over ``--chunks`` chunks; and key bits per CPU
  second of the serving UKMS process (``/proc``), which the other work on a shared machine
  does not change.

Baselines in the same minutes, on the same connection pattern: an ETSI 014 ``status`` call
(one mutual-TLS HTTP round trip, no key store work) and an ETSI 014 ``dec_keys`` of one
key already relayed (the same store work as a GET_KEY: a pending take, then its release).
Runs alternate; figures are medians over ``--runs``.

Usage: python bench/etsi004.py [--dir DIR] [--runs 3] [--gets 300] [--chunks 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.cli.net import bring_down, status_doc
from appliance.config.render import find_free_base_port
from appliance.kms import frames004 as f
from appliance.kms.netproc import process_cpu_s
from appliance.sae004 import Client004
from appliance.tkey import call, endpoints

SOURCE, DESTINATION = "sae-berlin-1", "sae-bonn-1"


def client(status: dict[str, Any], sae: str) -> Client004:
    entry = next(s for s in status["saes"] if s["id"] == sae)
    host, port = entry["etsi004"].rsplit(":", 1)
    return Client004(
        host, int(port), cert=Path(entry["cert"]), key=Path(entry["key"]), ca=Path(entry["ca_cert"])
    )


def relayed_stream(status: dict[str, Any], chunk: int, n: int) -> tuple[Client004, bytes]:
    """A stream whose first ``n`` chunks are relayed (the source read them); the
    destination's client, joined."""
    qos = f.Qos(key_chunk_size=chunk, timeout=60_000, ttl=3600)
    src, dst = client(status, SOURCE), client(status, DESTINATION)
    ksid = src.open_connect(SOURCE, DESTINATION, qos).ksid
    assert dst.open_connect(SOURCE, DESTINATION, qos, ksid).ksid == ksid
    for start in range(0, n, 256):
        got = src.get_keys(ksid, list(range(start, min(n, start + 256))))
        bad = [a.status for a in got if a.status is not f.Status.SUCCESS]
        assert not bad, bad
    src.close(ksid)
    src.sock.close()
    time.sleep(0.5)  # the last deliveries to UKMS Bonn land (they run beside the relay)
    return dst, ksid


def latency_004(status: dict[str, Any], gets: int) -> list[float]:
    dst, ksid = relayed_stream(status, 32, gets)
    times = []
    for index in range(gets):
        t = time.perf_counter()
        answer = dst.get_key(ksid, index)
        times.append(time.perf_counter() - t)
        assert answer.status is f.Status.SUCCESS, answer
    dst.close(ksid)
    dst.sock.close()
    return times


def throughput_004(status: dict[str, Any], chunks: int, window: int) -> tuple[float, float]:
    """(key bits per second, key bits per CPU second of UKMS Bonn, which serves them)."""
    dst, ksid = relayed_stream(status, f.MAX_CHUNK, chunks)
    ukms = next(n for n in status["nodes"] if n["name"] == "ukms-bonn")["pid"]
    cpu = process_cpu_s(ukms)
    t = time.perf_counter()
    bits = 0
    for start in range(0, chunks, window):
        for answer in dst.get_keys(ksid, list(range(start, min(chunks, start + window)))):
            assert answer.status is f.Status.SUCCESS, answer
            bits += len(answer.key) * 8
    elapsed = time.perf_counter() - t
    cpu = process_cpu_s(ukms) - cpu
    dst.close(ksid)
    dst.sock.close()
    return bits / elapsed, bits / max(cpu, 1e-9)


def latency_014(status: dict[str, Any], n: int) -> tuple[list[float], list[float]]:
    """(status p, dec_keys p) of ``n`` calls each, one at a time, kept-alive connections."""
    master, slave = endpoints(status, SOURCE, DESTINATION)
    ids: list[str] = []
    with master.connect() as conn:
        while len(ids) < n:
            code, doc = call(conn, f"/api/v1/keys/{DESTINATION}/enc_keys?number=128&size=256")
            assert code == 200, doc
            ids += [k["key_ID"] for k in doc["keys"]]
    time.sleep(0.5)
    st, dec = [], []
    with slave.connect() as conn:
        for key_id in ids[:n]:
            t = time.perf_counter()
            code, doc = call(conn, f"/api/v1/keys/{SOURCE}/dec_keys?key_ID={key_id}")
            dec.append(time.perf_counter() - t)
            assert code == 200, doc
            t = time.perf_counter()
            code, _ = call(conn, f"/api/v1/keys/{SOURCE}/status")
            st.append(time.perf_counter() - t)
    return st, dec


def ms(values: list[float], q: float = 0.5) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="a network already running there")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gets", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    own = args.dir is None
    net_dir = args.dir or Path(tempfile.mkdtemp(prefix="bench004-"))
    if own:
        up = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "net", "up", "demoquandt", "--dir",
             str(net_dir), "--base-port", str(find_free_base_port()), "--stock", "0", "--no-aaa"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if up.returncode:
            print(up.stderr, file=sys.stderr)
            return 1
    try:
        status = status_doc(net_dir)
        names = ("p50_004", "p90_004", "p50_status", "p50_dec", "mbps_004", "mbps_per_ukms_cpu")
        rows: dict[str, list[float]] = {k: [] for k in names}
        for run in range(args.runs):
            st, dec = latency_014(status, args.gets)
            lat = latency_004(status, args.gets)
            rate, per_cpu = throughput_004(status, args.chunks, args.window)
            rows["p50_004"].append(ms(lat))
            rows["p90_004"].append(ms(lat, 0.9))
            rows["p50_status"].append(ms(st))
            rows["p50_dec"].append(ms(dec))
            rows["mbps_004"].append(rate / 1e6)
            rows["mbps_per_ukms_cpu"].append(per_cpu / 1e6)
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items()))
        medians = {k: statistics.median(v) for k, v in rows.items()}
        medians["ratio_get_to_status"] = medians["p50_004"] / medians["p50_status"]
        medians["ratio_get_to_dec"] = medians["p50_004"] / medians["p50_dec"]
        doc = {
            "machine": f"{platform.machine()} {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "args": {k: str(v) for k, v in vars(args).items()},
            "medians": medians,
        }
        print(json.dumps(doc, indent=2))
        if args.json:
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        if own:
            bring_down(net_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
