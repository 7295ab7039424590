"""Client CPU per 014 call: ``http.client`` (the former transport) vs ``appliance.sae_http``.

In the T_key benches the SAE clients share the machine's cores with the node processes, so
their CPU per request is part of the budget. This bench serves one fixed JSON answer from a
separate process (mutual TLS 1.3, a throwaway CA, the headers the KME's HTTP/1.1 server
sends) and times, in the client process only (``time.process_time``), keep-alive GETs
through each client, JSON decoding included, as ``tkey.call`` does. Runs alternate between
the two clients; the figure is the median over runs.

Usage: python bench/sae_client.py [--requests 2000] [--runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import socket
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from appliance.pki import CertificateAuthority, server_context, write_pair
from appliance.tkey import SaeEndpoint, call

SMALL = {"keys": [{"key_ID": "2c3e8a55-0a7b-4b8e-9f3e-6f2d0f6c1a11", "key": "A" * 88}]}
"""About 150 bytes of JSON: one 512-bit key, as ``enc_keys`` answers with number = 1."""


def batch(n: int) -> dict[str, Any]:
    return {
        "keys": [
            {"key_ID": f"{i:08x}-0a7b-4b8e-9f3e-6f2d0f6c1a11", "key": "A" * 44} for i in range(n)
        ]
    }


def answer(doc: dict[str, Any]) -> bytes:
    body = json.dumps(doc).encode()
    head = (
        f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\ncontent-type: application/json\r\n\r\n"
    )
    return head.encode() + body


def serve(listener: socket.socket, ctx: ssl.SSLContext, reply: bytes) -> None:
    """One connection at a time: answer every request head with ``reply``."""
    while True:
        raw, _ = listener.accept()
        try:
            with ctx.wrap_socket(raw, server_side=True) as sock:
                buf = b""
                while data := sock.recv(65536):
                    buf += data
                    while (end := buf.find(b"\r\n\r\n")) >= 0:
                        buf = buf[end + 4 :]
                        sock.sendall(reply)
        except OSError:
            raw.close()


def pki(root: Path) -> SaeEndpoint:
    ca = CertificateAuthority.create("bench", os.urandom)
    (root / "ca.pem").write_bytes(ca.cert.public_bytes(Encoding.PEM))
    for name in ("kme", "sae"):
        cert, key = ca.issue(name, os.urandom, server=True, hosts=("127.0.0.1",))
        write_pair(cert, key, root / f"{name}.pem", root / f"{name}.key")
    return SaeEndpoint("sae", 0, root / "sae.pem", root / "sae.key", root / "ca.pem")


def stdlib_get(sae: SaeEndpoint) -> tuple[Callable[[str], object], Callable[[], None]]:
    """The former ``tkey`` transport: ``http.client`` and the same TLS set-up."""
    ctx = ssl.create_default_context(cafile=str(sae.ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(sae.cert, sae.key)
    conn = http.client.HTTPSConnection("127.0.0.1", sae.port, context=ctx, timeout=30)

    def get(path: str) -> object:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    return get, conn.close


def lean_get(sae: SaeEndpoint) -> tuple[Callable[[str], object], Callable[[], None]]:
    conn = sae.connect()
    return (lambda path: call(conn, path)), conn.close


def cpu_per_request(make: Callable[..., Any], sae: SaeEndpoint, requests: int) -> float:
    """Client CPU (µs) per keep-alive GET, connection set-up and one warm-up excluded."""
    get, close = make(sae)
    get("/api/v1/keys/sae-2/enc_keys")
    t0 = time.process_time()
    for _ in range(requests):
        get("/api/v1/keys/sae-2/enc_keys")
    cpu = time.process_time() - t0
    close()
    return cpu / requests * 1e6


def compare(
    sae: SaeEndpoint, kme: Path, doc: dict[str, Any], requests: int, runs: int
) -> dict[str, Any]:
    listener = socket.create_server(("127.0.0.1", 0))
    ctx = server_context(kme.with_suffix(".pem"), kme.with_suffix(".key"), sae.ca, ())
    server = multiprocessing.get_context("fork").Process(
        target=serve, args=(listener, ctx, answer(doc)), daemon=True
    )
    server.start()
    sae = SaeEndpoint(sae.sae, listener.getsockname()[1], sae.cert, sae.key, sae.ca)
    samples: dict[str, list[float]] = {"http.client": [], "sae_http": []}
    try:
        for _ in range(runs):
            samples["http.client"].append(cpu_per_request(stdlib_get, sae, requests))
            samples["sae_http"].append(cpu_per_request(lean_get, sae, requests))
    finally:
        server.kill()
        listener.close()
    medians = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    return {
        "body_bytes": len(json.dumps(doc)),
        "requests_per_run": requests,
        "runs": runs,
        "cpu_us_per_request_median": medians,
        "cpu_us_per_request_runs": {k: [round(x, 1) for x in v] for k, v in samples.items()},
        "ratio": round(medians["http.client"] / medians["sae_http"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sae = pki(Path(tmp))
        out = {
            "python": platform.python_version(),
            "small": compare(sae, Path(tmp) / "kme", SMALL, args.requests, args.runs),
            "batch_1024": compare(
                sae, Path(tmp) / "kme", batch(1024), args.requests // 10, args.runs
            ),
        }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
