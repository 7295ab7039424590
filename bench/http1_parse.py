"""Benchmark of the 014 server's HTTP/1.1 request handling (appliance/net/http1.py), before
and after a change, in one process.

For three requests as SAEs send them (the project's SAE client's enc_keys GET, a curl-like
GET with three more header fields, a dec_keys POST with a JSON body) it reports, in CPU time
of the process (``time.process_time``, so that other work on the machine adds little):
  * parse: microseconds per request fed to one parser, one request per feed (a keep-alive
    connection);
  * session: microseconds per request through a server session on a fake transport
    (``data_received``, the answer task, a trivial handler, the encoded response): what the
    server adds per request besides TLS and the 014 API.
"Before" is ``appliance/net/http1.py`` of a git revision (default: the last commit with the
hand-written parser), loaded beside the work tree's. Runs are interleaved, so noise from
other work on the machine hits both alike; figures are medians over the runs.

Usage: python bench/http1_parse.py [--before REV] [--runs 7] [--requests 20000] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import ssl
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from appliance.net import http1
from appliance.net.h2 import Request, Response

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"key_IDs": [{"key_ID": "6f1c2a9e-0a7b-4b8e-9f3e-6f2d0f6c1a11"}]}'
REQUESTS = {
    "sae_get": b"GET /api/v1/keys/sae-bonn-1/enc_keys HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "curl_get": (
        b"GET /api/v1/keys/sae-bonn-1/enc_keys?number=1&size=256 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:20001\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    ),
    "dec_post": (
        b"POST /api/v1/keys/sae-berlin-1/dec_keys HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    ),
}
REPLY = Response(200, b'{"keys": []}', {"content-type": "application/json"})


def load_before(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:appliance/net/http1.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType("http1_before")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{rev}:appliance/net/http1.py", "exec"), module.__dict__)
    return module


def parse_us(impl: types.ModuleType, raw: bytes, n: int) -> float:
    parser = impl.RequestParser()
    feed = parser.feed
    t0 = time.process_time()
    for _ in range(n):
        feed(raw)
    return (time.process_time() - t0) / n * 1e6


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def _reply(request: Request) -> Response:
    return REPLY


async def _session_run(impl: types.ModuleType, raw: bytes, n: int) -> float:
    server = impl.H1Server(_reply, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    session = server._session()
    session.connection_made(_Transport())
    t0 = time.process_time()
    for _ in range(n):
        session.data_received(raw)
        while session.task is not None:
            await asyncio.sleep(0)
    elapsed = time.process_time() - t0
    session.connection_lost(None)
    return elapsed / n * 1e6


def session_us(impl: types.ModuleType, raw: bytes, n: int) -> float:
    return asyncio.run(_session_run(impl, raw, n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="fef58d3", help="git revision of the old parser")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--json")
    args = parser.parse_args()
    impls = {"before": load_before(args.before), "after": http1}
    samples: dict[str, list[float]] = {}
    for run in range(args.runs):
        order = list(impls.items()) if run % 2 == 0 else list(reversed(impls.items()))
        for name, impl in order:
            for case, raw in REQUESTS.items():
                samples.setdefault(f"parse/{case}/{name}", []).append(
                    parse_us(impl, raw, args.requests)
                )
                samples.setdefault(f"session/{case}/{name}", []).append(
                    session_us(impl, raw, args.requests // 4)
                )
    out: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "before": args.before,
        "runs": args.runs,
        "us_per_request": {},
    }
    for kind in ("parse", "session"):
        for case in REQUESTS:
            before = statistics.median(samples[f"{kind}/{case}/before"])
            after = statistics.median(samples[f"{kind}/{case}/after"])
            out["us_per_request"][f"{kind}/{case}"] = {
                "before": round(before, 2),
                "after": round(after, 2),
                "ratio": round(after / before, 2),
            }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
