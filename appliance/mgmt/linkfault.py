"""Cut or restore an emulated QKD link of a running network, through the link's shared
fault file (``<net>/faults/<link>.json``, :mod:`hal.emulated.faults`), which both ends'
emulated QKD modules re-read when it changes.

A test and bench tool of the management plane (the controller's ``qkdn net fault`` does
the same for operators). Times are in the emulated modules' clock: the link's QKD module
URL names its ``start`` and ``speedup``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from appliance.kms.network import load_configs
from appliance.mgmt.errors import MgmtError
from hal.emulated import Fault, read_faults, write_faults

LEAD_S = 0.2
"""A fault starts this far ahead of now: keys distilled already cannot be taken back."""


def link_clock(net_dir: Path, link: str) -> float:
    """The emulated time of ``link`` now (its modules' clock)."""
    for cfg in load_configs(net_dir).values():
        for nb in cfg.neighbours:
            if nb.link == link:
                query = parse_qs(urlsplit(nb.qkdm).query)
                speedup = float(query.get("speedup", ["1"])[0])
                start = float(query.get("start", ["0"])[0])
                now = time.time()
                return now if speedup == 1.0 else start + (now - start) * speedup
    raise MgmtError(f"no link {link!r} in {net_dir}", code="MGMT-LINK")


def set_link(net_dir: Path, link: str, *, up: bool) -> None:
    """Cut ``link`` (an open-ended ``down`` fault from now) or restore it (end every
    open-ended ``down`` fault now)."""
    path = net_dir / "faults" / f"{link}.json"
    at = link_clock(net_dir, link) + LEAD_S
    faults = read_faults(path)
    if up:
        faults = [
            dataclasses.replace(f, end=max(at, f.start))
            if f.kind == "down" and f.end is None
            else f
            for f in faults
        ]
    else:
        faults.append(Fault(kind="down", start=at))
    write_faults(path, faults)
