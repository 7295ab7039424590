"""What the AAA device (issue 14) or the management plane (issue 17) adds to ``qkdn net
up``: DemoQuanDT networks started with and without it, alternately, and for each the wall
time of the start and the CPU seconds (utime + stime from /proc) every process of the
network had spent when ``net up`` returned. Wall time follows the machine's load; CPU
seconds much less so: the AAA process's own, the AKMSs', the manager's, the total.

``--what aaa`` (the default) runs management in both; ``--what mgmt`` runs AAA in neither
(with management, ``net up`` returns once every node's agent answers as well).

Usage: python bench/net_up_cost.py [--what aaa|mgmt] [--rounds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.cli import net
from appliance.config.render import find_free_base_port
from appliance.kms import netproc


def one_start(aaa: bool, mgmt: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qkdn-up-cost-") as tmp:
        args = argparse.Namespace(
            topology="demoquandt",
            dir=Path(tmp),
            base_port=find_free_base_port(),
            mode="gcm",
            rate_limited=False,
            stock=None,
            timeout=600.0,
            json=False,
            aaa=aaa,
            mgmt=mgmt,
        )
        load = os.getloadavg()[0]
        began = time.monotonic()
        net.bring_up(args)
        try:
            wall = time.monotonic() - began
            per = netproc.cpu_seconds(Path(tmp))
        finally:
            net.bring_down(Path(tmp))
    return {
        "aaa": aaa,
        "mgmt": mgmt,
        "load": round(load, 1),
        "wall_s": round(wall, 1),
        "cpu_total_s": round(sum(per.values()), 2),
        "cpu_aaa_s": per.get("aaa", 0.0),
        "cpu_akms_s": round(sum(v for k, v in per.items() if k.startswith("akms")), 2),
        "cpu_manager_s": per.get("manager", 0.0),
        "processes": len(per),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["aaa", "mgmt"], default="aaa")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    key = args.what
    starts = [
        (x, True) if key == "aaa" else (False, x) for _ in range(args.rounds) for x in (True, False)
    ]
    runs = [one_start(aaa, mgmt) for aaa, mgmt in starts]
    for run in runs:
        print(json.dumps(run), flush=True)

    def median(name: str, with_it: bool) -> float:
        return float(statistics.median(r[name] for r in runs if r[key] is with_it))

    doc = {
        "runs": runs,
        "median": {
            k: {"with": median(k, True), "without": median(k, False)}
            for k in ("wall_s", "cpu_total_s", "cpu_aaa_s", "cpu_akms_s", "cpu_manager_s")
        },
    }
    print(json.dumps(doc["median"]))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
