"""Benchmark of load balancing under the QKDN Controller (issue 15): the sustained
end-to-end key rate over two paths against the max-flow of the link key rates.

The network of ``bench/topologies/twopaths.toml`` (two access nodes joined by two
disjoint two-link paths of 1 kb/s per link: max-flow 2 kb/s, one path 1 kb/s) runs as
OS processes under its controller, in OTP mode with ``--rate-limited`` (every store empty
at start) and ``--speedup`` (every rate scaled alike, so the ratio is the figure). Each
UKMS keeps a large KSA stock for the pair (both directions), so relays run back to back
all the time. Over a window after a warm-up:

* delivered: KSA key bits added to the two stocks, per second (what SAEs can take);
* max-flow: for each path the key bits its slower link distilled (``keys_produced`` of
  the link's QKD module, read over ``/v1/status`` with the manager's certificate), summed
  over the two paths, per second;
* one path: the larger of the two paths' terms (what the best single path could carry);
* moves: the controller's ``route moved for key availability`` log lines in the window.

Target: delivered >= 90 % of the max-flow.

Usage: python bench/control_balance.py [--speedup 20] [--warmup 60] [--window 180]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.cli import net
from appliance.config.render import find_free_base_port
from appliance.kms import messages as m
from appliance.kms.network import load_configs
from appliance.kms.node import MSGPACK
from appliance.net.h2 import H2Client
from appliance.pki import client_context
from appliance.tkey import call, endpoints

TOPOLOGY = Path(__file__).resolve().parent / "topologies" / "twopaths.toml"
PAIRS = [("sae-west-1", "sae-east-1"), ("sae-east-1", "sae-west-1")]
PATHS = [("link-2-3", "link-3-5"), ("link-2-4", "link-4-5")]
MASTERS = {"link-2-3": 2, "link-3-5": 3, "link-2-4": 2, "link-4-5": 4}


def stocked_keys(status: dict[str, Any]) -> int:
    total = 0
    for master, slave in PAIRS:
        m, _ = endpoints(status, master, slave)
        conn = m.connect()
        code, doc = call(conn, f"/api/v1/keys/{slave}/status")
        conn.close()
        if code == 200:
            total += int(doc["stored_key_count"])
    return total


def produced(net_dir: Path) -> dict[str, int]:
    """Key bits each carrier link has distilled so far (its master end's QKDM)."""
    configs = load_configs(net_dir)
    me = configs["qkdn-manager"].paths
    ctx = client_context(Path(me.cert), Path(me.key), Path(me.ca_cert), ("h2",))
    by_id = {c.node.id: c for c in configs.values() if c.node.id}

    async def ask(link: str) -> int:
        cfg = by_id[MASTERS[link]]
        service = next(x for x in ("ukms", "akms", "ckms") if x in cfg.listen)
        host, port = cfg.listen[service].rsplit(":", 1)
        client = H2Client(host, int(port), ctx, expect_peer=cfg.node.name, timeout=10.0)
        try:
            body = m.encode(m.StatusRequest())
            response = await client.request("POST", "/v1/status", body, MSGPACK)
            answer = m.decode(response.body, m.StatusAnswer)
        finally:
            await client.close()
        entry = next(x for x in answer.links if x.link == link)
        return int(entry.keys_produced) * int(entry.key_size)

    return {link: asyncio.run(ask(link)) for link in MASTERS}


def moves(net_dir: Path, since: float, until: float) -> int:
    count = 0
    with open(net_dir / "logs" / "controller.log", "rb") as fh:
        for line in fh.read(64 << 20).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            ts = float(entry.get("ts", 0))
            if entry.get("msg") == "route moved for key availability" and since <= ts <= until:
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=180.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": os.getloadavg(),
        "mode": "otp",
        "speedup": args.speedup,
    }
    with tempfile.TemporaryDirectory(prefix="qkdn-balance-") as tmp:
        net_dir = Path(tmp)
        up = argparse.Namespace(
            topology=str(TOPOLOGY), dir=net_dir, base_port=find_free_base_port(), mode="otp",
            rate_limited=True, speedup=args.speedup, patience=None, stock=50_000,
            timeout=120.0, json=False, controller=True,
        )  # fmt: skip
        net.bring_up(up)
        try:
            status = net.status_doc(net_dir)
            time.sleep(args.warmup)
            t0, s0, p0 = time.time(), stocked_keys(status), produced(net_dir)
            time.sleep(args.window)
            t1, s1, p1 = time.time(), stocked_keys(status), produced(net_dir)
            moved = moves(net_dir, t0, t1)
        finally:
            net.bring_down(net_dir)
    elapsed = t1 - t0
    rate = {link: (p1[link] - p0[link]) / elapsed for link in p0}
    per_path = [min(rate[a], rate[b]) for a, b in PATHS]
    delivered = (s1 - s0) * 256 / elapsed
    max_flow = sum(per_path)
    out.update(
        window_s=round(elapsed, 1),
        delivered_bps=round(delivered, 1),
        link_bps={k: round(v, 1) for k, v in rate.items()},
        max_flow_bps=round(max_flow, 1),
        one_path_bps=round(max(per_path), 1),
        ratio_to_max_flow=round(delivered / max_flow, 4) if max_flow else None,
        ratio_to_one_path=round(delivered / max(per_path), 4) if max(per_path) else None,
        route_moves=moved,
        load_after=os.getloadavg(),
    )
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
