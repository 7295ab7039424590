"""ETSI 014 enc_keys served from stock at a UKMS: HTTP/2 against HTTP/1.1, in the same run.

The network runs as ``qkdn net up`` starts it (DemoQuanDT, 16 processes, mutual TLS) with
a large stock, so that every enc_keys is served from the pair's stock (sae-berlin-1 ->
sae-bonn-1, one 256-bit key each). ``--streams`` requests are kept in flight:

* **h2**: one HTTP/2 connection (ALPN ``h2``), each request on a stream of its own, through
  the project's HTTP/2 client (:class:`appliance.net.h2.H2Client`);
* **h1**: ``--streams`` keep-alive HTTP/1.1 connections (ALPN ``http/1.1``), one request
  at a time on each, through a minimal asyncio client (a request line, a Host, a read of
  the head and ``content-length`` bytes).

Rounds alternate between the two, ``--requests`` each, after the stock has refilled (so
both are served from stock; a round that would have drawn on the network is rejected by
the check that the stock never ran dry). Reported per round: requests/s and p50/p90 of
the request latency; the summary gives medians over rounds and the ratio h2/h1.

Usage: python bench/sae_h2.py [--requests 2000] [--rounds 6] [--streams 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.cli.net import bring_down, status_doc
from appliance.config.render import find_free_base_port
from appliance.net.h2 import H2Client
from appliance.pki import client_context

MASTER, SLAVE = "sae-berlin-1", "sae-bonn-1"
PATH = f"/api/v1/keys/{SLAVE}/enc_keys?number=1"
STATUS = f"/api/v1/keys/{SLAVE}/status"


class H1Connection:
    """One keep-alive HTTP/1.1 connection; GET and read the answer (content-length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, ctx: ssl.SSLContext) -> H1Connection:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
        return cls(reader, writer)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: kme\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def round_h2(host: str, port: int, ctx: ssl.SSLContext, n: int, streams: int) -> list[float]:
    client = H2Client(host, port, ctx, timeout=30.0)
    await client.request("GET", STATUS)  # connected before the clock starts
    todo = iter(range(n))
    latencies: list[float] = []

    async def worker() -> None:
        for _ in todo:
            began = time.perf_counter()
            answer = await client.request("GET", PATH)
            latencies.append(time.perf_counter() - began)
            if answer.status != 200:
                raise RuntimeError(f"h2 enc_keys answered {answer.status}: {answer.body[:200]!r}")

    try:
        await asyncio.gather(*(worker() for _ in range(streams)))
    finally:
        await client.close()
    return latencies


async def round_h1(host: str, port: int, ctx: ssl.SSLContext, n: int, streams: int) -> list[float]:
    conns = [await H1Connection.open(host, port, ctx) for _ in range(streams)]
    for conn in conns:
        await conn.get(STATUS)
    todo = iter(range(n))
    latencies: list[float] = []

    async def worker(conn: H1Connection) -> None:
        for _ in todo:
            began = time.perf_counter()
            status, body = await conn.get(PATH)
            latencies.append(time.perf_counter() - began)
            if status != 200:
                raise RuntimeError(f"h1 enc_keys answered {status}: {body[:200]!r}")

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    return latencies


async def stored(host: str, port: int, ctx: ssl.SSLContext) -> int:
    conn = await H1Connection.open(host, port, ctx)
    try:
        status, body = await conn.get(STATUS)
        assert status == 200, body
        return int(json.loads(body)["stored_key_count"])
    finally:
        conn.close()


async def refilled(host: str, port: int, ctx: ssl.SSLContext, want: int) -> int:
    for _ in range(600):
        have = await stored(host, port, ctx)
        if have >= want:
            return have
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the stock did not refill to {want} keys")


def contexts(entry: dict[str, Any]) -> dict[str, ssl.SSLContext]:
    cert, key, ca = Path(entry["cert"]), Path(entry["key"]), Path(entry["ca_cert"])
    return {
        "h2": client_context(cert, key, ca, ("h2",)),
        "h1": client_context(cert, key, ca, ("http/1.1",)),
    }


def ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def measure(status: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    entry = next(s for s in status["saes"] if s["id"] == MASTER)
    host, port = entry["etsi014_base_url"].split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    ctxs = contexts(entry)
    rows: dict[str, list[dict[str, float]]] = {"h2": [], "h1": []}
    for r in range(args.rounds):
        for proto in ("h2", "h1") if r % 2 == 0 else ("h1", "h2"):
            before = await refilled(host, int(port), ctxs["h1"], args.requests + 64)
            runner = round_h2 if proto == "h2" else round_h1
            began = time.perf_counter()
            lat = await runner(host, int(port), ctxs[proto], args.requests, args.streams)
            elapsed = time.perf_counter() - began
            row = {
                "rps": len(lat) / elapsed,
                "p50_ms": ms(lat, 0.5),
                "p90_ms": ms(lat, 0.9),
                "stock_before": before,
            }
            rows[proto].append(row)
            print(f"round {r + 1} {proto}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    medians = {
        proto: {k: statistics.median(row[k] for row in got) for k in ("rps", "p50_ms", "p90_ms")}
        for proto, got in rows.items()
    }
    return {
        "medians": medians,
        "ratio_rps_h2_over_h1": medians["h2"]["rps"] / medians["h1"]["rps"],
        "ratio_p50_h2_over_h1": medians["h2"]["p50_ms"] / medians["h1"]["p50_ms"],
        "rounds": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="a network already running there")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stock", type=int, default=6000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    own = args.dir is None
    net_dir = args.dir or Path(tempfile.mkdtemp(prefix="bench-sae-h2-"))
    if own:
        up = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "net", "up", "demoquandt", "--dir",
             str(net_dir), "--base-port", str(find_free_base_port()),
             "--stock", str(args.stock)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if up.returncode:
            print(up.stderr, file=sys.stderr)
            return 1
    try:
        result = asyncio.run(measure(status_doc(net_dir), args))
        doc = {
            "machine": f"{platform.machine()} {platform.python_version()} {os.cpu_count()} cpus",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": os.getloadavg(),
            "args": {k: str(v) for k, v in vars(args).items()},
            **result,
        }
        print(json.dumps({k: v for k, v in doc.items() if k != "rounds"}, indent=2))
        if args.json:
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        if own:
            bring_down(net_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
