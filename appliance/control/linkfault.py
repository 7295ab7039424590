"""``qkdn net fault link A-B down|up``: an emulated QKD link fault in a running network.

Both ends of an emulated link read one faults file (:mod:`hal.emulated.faults`, the
``faults=`` parameter of their device URLs). ``down`` appends an open-ended ``down``
fault starting :data:`LEAD_S` (emulated) from now; ``up`` ends every open ``down`` fault
of the link now. The link's clock is the one its ends use: the system clock, or the
shared scaled clock of ``--speedup`` (origin ``start=``, rate ``speedup=``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from appliance.config.node import NodeConfig
from appliance.errors import UsageError
from hal.emulated.faults import Fault, add_fault, read_faults, write_faults

LEAD_S = 0.001


def parse_pair(text: str) -> tuple[int, int]:
    """``A-B`` with two node IDs (UsageError otherwise)."""
    a, sep, b = text.partition("-")
    if not sep or not a.isdigit() or not b.isdigit() or len(text) > 9 or a == b:
        raise UsageError(f"link: expected A-B with two node IDs, got {text[:20]!r}")
    return int(a), int(b)


def inject(net_dir: Path, a: int, b: int, state: str) -> float:
    """Take the link between nodes ``a`` and ``b`` down or bring it up; the wall-clock
    time the change takes effect."""
    from appliance.kms.network import load_configs

    url = _qkdm_url(load_configs(net_dir), a, b)
    query = parse_qs(urlsplit(url).query)
    faults = query.get("faults", [""])[0]
    if not faults:
        raise UsageError(f"link {a}-{b}: its QKD modules take no faults (not emulated?)")
    start = float(query.get("start", ["0"])[0])
    speedup = float(query.get("speedup", ["1"])[0])
    wall = time.time()
    now = wall if speedup == 1.0 else start + (wall - start) * speedup
    path = Path(faults)
    if state == "down":
        add_fault(path, Fault(kind="down", start=now + LEAD_S * speedup, end=None))
        return wall + LEAD_S
    ended = [
        replace(f, end=max(f.start, now)) if f.kind == "down" and f.end is None else f
        for f in read_faults(path)
    ]
    write_faults(path, ended)
    return wall


def _qkdm_url(configs: dict[str, NodeConfig], a: int, b: int) -> str:
    for cfg in configs.values():
        if cfg.node.id != a:
            continue
        for nb in cfg.neighbours:
            if nb.node == b:
                return str(nb.qkdm)
    raise UsageError(f"link {a}-{b}: no such link in this network")
