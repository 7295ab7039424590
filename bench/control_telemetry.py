"""Benchmark of the QKDN Controller's telemetry cost (issue 15): N emulated SDN agents
streaming to one controller; the controller's CPU time per wall second.

A child process runs ``--agents`` gNMI agents (appliance.control.agent, mutual TLS, one
grpcio server each, on free loopback ports): agent ``n`` serves node ``n`` of a ring
(links to ``n-1`` and ``n+1``) and publishes a changed document every ``--interval``
seconds (its stored bits move), as a CKMS publishes its figures once a second. This
process runs the controller (appliance.control.controller.Controller: one STREAM
subscription per agent, ON_CHANGE with its 1 s heartbeat, the sans-IO core fed from the
event loop) and, after a warm-up, measures its process CPU time (every thread, grpcio's
included) over ``--window`` seconds, and the threads the process holds then.

Target (issue 15): 100 agents at 1 s intervals cost the controller < 10 % of one core.

Usage: python bench/control_telemetry.py [--agents 100] [--interval 1] [--warmup 10]
       [--window 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization

from appliance.control import agent, model
from appliance.control.controller import Agent, Controller
from appliance.pki import CertificateAuthority, write_pair

FIRST_NODE = 100


def make_pki(root: Path) -> None:
    """A CA, a server identity for the agents and one for the controller."""
    ca = CertificateAuthority.create("bench", os.urandom)
    (root / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    for name in ("agents", "qkdn-controller"):
        cert, key = ca.issue(name, os.urandom, server=True, hosts=("127.0.0.1", name))
        write_pair(cert, key, root / f"{name}.pem", root / f"{name}.key")


def tls(root: Path, name: str) -> tuple[Path, Path, Path]:
    return root / f"{name}.pem", root / f"{name}.key", root / "ca.pem"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def node_doc(node: int, count: int, bits: int) -> model.NodeTelemetry:
    def link(peer: int) -> model.PhysLink:
        a, b = sorted((node, peer))
        return model.PhysLink(
            link=f"L{a}-{b}", peer=peer, status=model.LinkStatus.ACTIVE, skr=1000, eskr=900,
            qber=0.02, available_bits=bits, rate_bps=1000,
        )  # fmt: skip

    last = FIRST_NODE + count - 1
    prev = node - 1 if node > FIRST_NODE else last
    nxt = node + 1 if node < last else FIRST_NODE
    return model.NodeTelemetry(node=node, links=(link(prev), link(nxt)), uptime_s=1)


def serve_agents(root: Path, ports: list[int], interval: float) -> None:
    """The child: every agent, publishing a changed document every ``interval`` s."""
    cert, key, ca = tls(root, "agents")
    count = len(ports)
    feeds, servers = [], []
    for i, port in enumerate(ports):
        node = FIRST_NODE + i
        feed = agent.Telemetry(node_doc(node, count, 0))
        servers.append(
            agent.serve(agent.GnmiAgent(feed), f"127.0.0.1:{port}", cert=cert, key=key, ca=ca)
        )
        feeds.append((node, feed))
    print("ready", flush=True)
    tick, parent = 0, os.getppid()
    while os.getppid() == parent:  # a bench child never outlives the bench
        tick += 1
        for node, feed in feeds:
            feed.publish(node_doc(node, count, 8192 * tick))
        time.sleep(interval)


async def measure(root: Path, ports: list[int], warmup: float, window: float) -> dict[str, Any]:
    agents = [Agent(FIRST_NODE + i, f"agent-{i}", f"127.0.0.1:{p}") for i, p in enumerate(ports)]
    controller = Controller(agents, tls(root, "qkdn-controller"), allowed={"qkdn-controller"})
    await controller.start(f"127.0.0.1:{free_ports(1)[0]}")
    try:
        await asyncio.sleep(warmup)
        usable = sum(1 for x in controller.core.links.values() if x.usable)
        w0, c0 = time.monotonic(), time.process_time()
        await asyncio.sleep(window)
        w1, c1 = time.monotonic(), time.process_time()
        threads = len(os.listdir("/proc/self/task"))
        heard = sum(1 for t in controller.core.heard.values() if time.monotonic() - t < 1.0)
    finally:
        await controller.close()
    return {
        "links_usable_after_warmup": usable,
        "agents_heard_in_last_second": heard,
        "window_s": round(w1 - w0, 1),
        "controller_cpu_s": round(c1 - c0, 2),
        "controller_core_share": round((c1 - c0) / (w1 - w0), 4),
        "controller_threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the child's PKI dir
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve_agents(args.serve, [int(p) for p in args.ports.split(",")], args.interval)
        return
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": os.getloadavg(),
        "agents": args.agents,
        "interval_s": args.interval,
    }
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        root = Path(tmp)
        make_pki(root)
        ports = free_ports(args.agents)
        cmd = [sys.executable, __file__, "--serve", str(root), "--ports", ",".join(map(str, ports)),
               "--interval", str(args.interval)]  # fmt: skip
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise SystemExit("the agents did not start")
            report.update(asyncio.run(measure(root, ports, args.warmup, args.window)))
        finally:
            child.kill()
            child.wait()
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
