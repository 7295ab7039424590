"""The main job, second stage: T_key across the running network, as the paper measured it.

T_key is the time from SAE A's ``enc_keys`` request at its UKMS until SAE B holds the same
key through ``dec_keys`` at its UKMS: here, both 014 calls over HTTPS with mutual TLS, as
any SAE would make them. Every key is compared bit for bit at both ends. The paper's
figure (DemoQuanDT, 10,000 requests, full key stores): 17.34 +- 1.62 s.
"""

from __future__ import annotations

import json
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.sae_http import HttpResponseError, HttpsConnection

PAPER_T_KEY_S = (17.34, 1.62)
WARMUP = 5
"""Requests made (and checked, but not timed) before the measurement."""


@dataclass(frozen=True)
class SaeEndpoint:
    sae: str
    port: int
    cert: Path
    key: Path
    ca: Path

    def connect(self) -> HttpsConnection:
        """A keep-alive connection to this SAE's KME (opened on the first request)."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.check_hostname = False  # the private CA names nodes, not hosts
        ctx.load_cert_chain(self.cert, self.key)
        return HttpsConnection("127.0.0.1", self.port, ctx, timeout=30)


def endpoints(status: dict[str, Any], master: str, slave: str) -> tuple[SaeEndpoint, SaeEndpoint]:
    """The two SAEs' endpoints from ``qkdn net status --json``."""
    found = {}
    for sae in status["saes"]:
        url = sae["etsi014_base_url"]
        port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        found[sae["id"]] = SaeEndpoint(
            sae["id"], port, Path(sae["cert"]), Path(sae["key"]), Path(sae["ca_cert"])
        )
    return found[master], found[slave]


def call(
    conn: HttpsConnection, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """One 014 call: GET ``path``, or POST ``body`` as JSON; (status, the JSON answer).

    Raises OSError (timeout, reset), HttpResponseError (not HTTP) or ValueError (not JSON).
    """
    if body is None:
        response = conn.request("GET", path)
    else:
        response = conn.request("POST", path, json.dumps(body).encode())
    return response.status, json.loads(response.body)


def measure(
    master: SaeEndpoint,
    slave: SaeEndpoint,
    requests: int,
    *,
    number: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``requests`` key requests; return the report (T_key percentiles, matches, rate)."""
    a, b = master.connect(), slave.connect()
    warm = 0
    for _ in range(WARMUP):  # opens the TLS connections along the whole chain; not counted
        warm += _warm_up(a, b, master.sae, slave.sae)
    latencies: list[float] = []
    matched = mismatched = failed = 0
    start = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        try:
            status, issued = call(a, f"/api/v1/keys/{slave.sae}/enc_keys?number={number}")
        except (OSError, HttpResponseError, ValueError):  # timeout, reset, garbage
            a.close()  # the next request opens a fresh connection
            failed += 1
            continue
        if status != 200:
            failed += 1
            continue
        ids = [{"key_ID": k["key_ID"]} for k in issued["keys"]]
        try:
            status, got = call(b, f"/api/v1/keys/{master.sae}/dec_keys", {"key_IDs": ids})
        except (OSError, HttpResponseError, ValueError):
            b.close()
            failed += 1
            continue
        latencies.append(time.perf_counter() - t0)
        if status == 200 and got["keys"] == issued["keys"]:
            matched += len(issued["keys"])
        else:
            mismatched += len(issued["keys"])
        if progress:
            progress(i + 1)
    elapsed = time.perf_counter() - start
    a.close()
    b.close()
    doc = report(latencies, requests, matched, mismatched, failed, elapsed)
    end = time.time()
    doc["window"] = [end - elapsed, end]  # wall-clock span of the timed requests
    doc["warmup_keys"] = warm  # issued to the SAE too (accounting counts them)
    return doc


def _warm_up(a: HttpsConnection, b: HttpsConnection, master: str, slave: str) -> int:
    """One uncounted request; a failure only closes the connections (the next call opens
    them again), as a timed request's would. Returns the keys the master SAE got."""
    got = 0
    try:
        status, issued = call(a, f"/api/v1/keys/{slave}/enc_keys")
        if status == 200:
            got = len(issued["keys"])
            call(b, f"/api/v1/keys/{master}/dec_keys?key_ID={issued['keys'][0]['key_ID']}")
    except (OSError, HttpResponseError, ValueError, LookupError, TypeError):
        a.close()
        b.close()
    return got


def report(
    latencies: list[float],
    requests: int,
    matched: int,
    mismatched: int,
    failed: int,
    elapsed: float,
) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 3) if ms else float("nan")

    return {
        "t_key_ms": {
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "mean": round(statistics.fmean(ms), 3) if ms else float("nan"),
            "std": round(statistics.pstdev(ms), 3) if len(ms) > 1 else 0.0,
        },
        "requests": requests,
        "failed_requests": failed,
        "keys_matched": matched,
        "keys_mismatched": mismatched,
        "keys_per_s": round(matched / elapsed, 2) if elapsed else 0.0,
        "paper_t_key_s": {"mean": PAPER_T_KEY_S[0], "std": PAPER_T_KEY_S[1]},
        "speedup_vs_paper": round(PAPER_T_KEY_S[0] * 1000 / statistics.fmean(ms), 1)
        if ms
        else None,
        "samples_ms": [round(x, 3) for x in ms],
    }
