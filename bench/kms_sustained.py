"""Benchmark of the sustained key rate (issue 5): stores start empty, links at Table 3 rates.

The DemoQuanDT network runs as 16 processes in OTP mode with ``--rate-limited`` (every
link key store empty at start, keys arriving at the link's SKR). Each UKMS keeps a large
KSA stock per SAE pair, so the stock keepers relay batches back to back for the whole
run, in both directions. Over a window after a warm-up, the bench compares:

* delivered: KSA key bits added to all stocks (the keys SAEs can take), per second;
* bottleneck: key bits the slowest link on the relay path distilled, per second (its
  QKDM's ``keys_produced`` counter, read over ``/v1/status`` with the manager node's
  certificate).

Target: delivered >= 95 % of the bottleneck's rate. ``--speedup X`` runs the emulated
links X times faster than real time (the shortest Berlin-Bonn path crosses link 9-10 at
0.3 kb/s, about one key per second, too slow to measure in minutes); every rate scales
alike, so the ratio is the figure.

Usage: python bench/kms_sustained.py [--speedup 20] [--warmup 60] [--window 180] [--json P]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.cli import net
from appliance.config.render import find_free_base_port
from appliance.config.topology import load_topology
from appliance.kms import messages as m
from appliance.kms.network import load_configs
from appliance.kms.node import MSGPACK
from appliance.kms.routing import shortest_path
from appliance.net.h2 import H2Client
from appliance.pki import client_context
from appliance.tkey import call, endpoints

PAIRS = [
    ("sae-berlin-1", "sae-bonn-1"),
    ("sae-berlin-2", "sae-bonn-2"),
    ("sae-bonn-1", "sae-berlin-1"),
    ("sae-bonn-2", "sae-berlin-2"),
]


def stocked_keys(status: dict[str, Any]) -> int:
    """KSA keys in stock over every SAE pair (ETSI 014 status at each master's UKMS)."""
    total = 0
    for master, slave in PAIRS:
        m, _ = endpoints(status, master, slave)
        conn = m.connect()
        code, doc = call(conn, f"/api/v1/keys/{slave}/status")
        conn.close()
        if code == 200:
            total += int(doc["stored_key_count"])
    return total


def bottleneck(net_dir: Path) -> tuple[str, int, str]:
    """(link ID, its master node ID, its master's ckms address) of the slowest path link."""
    topo = load_topology(str(net_dir / "topology.toml"))
    a, b = (topo.nodes_with("akms")[i].id for i in (0, 1))
    path = shortest_path(topo, a, b)
    hops = [
        next(link for link, peer in topo.neighbours(x) if peer.id == y)
        for x, y in itertools.pairwise(path)
    ]
    slowest = min(hops, key=lambda link: link.skr_kbps)
    configs = {c.node.id: c for c in load_configs(net_dir).values()}
    master = min(slowest.a, slowest.b)
    return slowest.id, master, configs[master].listen["ckms"]


def produced_bits(net_dir: Path, link: str, address: str, master: int) -> tuple[int, int]:
    """Key bits the link has distilled so far, and bits waiting in its buffer, from its
    master end's QKDM (the end every key of the link is first taken from)."""
    configs = load_configs(net_dir)
    me = configs["qkdn-manager"].paths
    ctx = client_context(Path(me.cert), Path(me.key), Path(me.ca_cert), ("h2",))
    host, port = address.rsplit(":", 1)
    name = next(c.node.name for c in configs.values() if c.node.id == master)

    async def ask() -> tuple[int, int]:
        client = H2Client(host, int(port), ctx, expect_peer=name, timeout=10.0)
        try:
            body = m.encode(m.StatusRequest())
            response = await client.request("POST", "/v1/status", body, MSGPACK)
        finally:
            await client.close()
        entry = next(e for e in m.decode(response.body, m.StatusAnswer).links if e.link == link)
        return entry.keys_produced * entry.key_size, entry.qkdm_keys * entry.key_size

    return asyncio.run(ask())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=180.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "mode": "otp",
        "speedup": args.speedup,
    }
    with tempfile.TemporaryDirectory(prefix="qkdn-sustained-") as tmp:
        net_dir = Path(tmp)
        up = argparse.Namespace(
            topology="demoquandt",
            dir=net_dir,
            base_port=find_free_base_port(),
            mode="otp",
            rate_limited=True,
            speedup=args.speedup,
            patience=None,
            stock=50_000,
            timeout=120.0,
            json=False,
        )
        net.bring_up(up)
        try:
            status = net.status_doc(net_dir)
            link, master, address = bottleneck(net_dir)
            time.sleep(args.warmup)
            t0, s0, p0 = (
                time.time(),
                stocked_keys(status),
                produced_bits(net_dir, link, address, master),
            )
            time.sleep(args.window)
            t1, s1, p1 = (
                time.time(),
                stocked_keys(status),
                produced_bits(net_dir, link, address, master),
            )
        finally:
            net.bring_down(net_dir)
    elapsed = t1 - t0
    delivered, distilled = (s1 - s0) * 256 / elapsed, (p1[0] - p0[0]) / elapsed
    used = (p1[0] - p0[0] + p0[1] - p1[1]) / elapsed  # distilled, plus what the buffer gave
    out.update(
        bottleneck_link=link,
        window_s=round(elapsed, 1),
        delivered_bps=round(delivered, 1),
        bottleneck_bps=round(distilled, 1),
        bottleneck_buffer_bits={"start": p0[1], "end": p1[1]},
        ratio_to_bottleneck_rate=round(delivered / distilled, 4) if distilled else None,
        ratio_to_bottleneck_keys_used=round(delivered / used, 4) if used else None,
    )
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
