"""What a node's SNMP agent costs to start (issue 17): CPU seconds of a fresh process for
the imports of the agent's process (`qkdn node agent`, `appliance.mgmt.sidecar`, which
runs beside its node and does not import the node), and for its set-up (two pysnmp
engines, users, views, receivers) with its first look at a node reading. Each run is a
new process, so that imports and pysnmp's MIB modules are loaded as a starting agent
process loads them.

Usage: python bench/agent_start.py [--runs 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one() -> dict[str, float]:
    """In this process: the agent process's imports, then the agent's start."""
    import asyncio

    import uvloop

    t0 = cpu()
    from appliance.mgmt import sidecar  # noqa: F401 - what `qkdn node agent` imports
    from appliance.mgmt.agent import Agent, AgentConfig, AgentUser, Receiver
    from appliance.mgmt.nodeview import LinkReading, NodeReading

    imports = cpu() - t0
    link = LinkReading(peer=9, name="link-8-9", state="up", level=500)

    def reading() -> NodeReading:
        return NodeReading(id=8, name="ckms-minden", role="ckms", software="qkdn", links=(link,))

    async def start() -> float:
        c0 = cpu()
        cfg = AgentConfig(
            users=[
                AgentUser(user="manager-8", auth="manager-auth-8", priv="manager-priv-8"),
                AgentUser(
                    user="monitor-8", auth="monitor-auth-8", priv="monitor-priv-8", role="monitor"
                ),
            ],
            inform=Receiver(
                user="notify-8", auth="notify-auth-8", priv="notify-priv-8", address="127.0.0.1:9"
            ),
        )
        agent = Agent("ckms-minden", reading, cfg)
        await agent.start()
        await asyncio.sleep(0.05)  # its first look at the node
        spent = cpu() - c0
        await agent.close()
        return spent

    return {"imports_s": round(imports, 3), "start_s": round(uvloop.run(start()), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one()))
        return
    runs: list[dict[str, Any]] = []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, __file__, "--one"], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout))
        print(out.stdout.strip(), flush=True)
    doc = {
        "runs": runs,
        "median_total_s": statistics.median(r["imports_s"] + r["start_s"] for r in runs),
    }
    print(json.dumps({"median_total_s": round(doc["median_total_s"], 3)}))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
