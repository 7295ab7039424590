"""The main job, first stage: the emulated quantum layer of a whole network, measured.

Every QKD link of the topology gets an emulated QKDM pair (two independent driver
objects, opened by URL like any device). Emulated time advances in 30 s steps, as the
paper sampled its links for Table 3; at each step the measurement reads both ends' status:

* SKR is measured from the modules' distilled-key counters (keys x key size / interval),
  not read back from the model, and both ends must agree on the counter;
* QBER is the module's reading (absent while the link is down);
* every ``verify_every`` steps one key is taken at end A and fetched by ID at end B, and
  the two must be bit-identical. Both copies are erased right after the comparison.

The run is pure computation on an injected :class:`ManualClock`; ``speedup`` only paces it
against the wall clock (``None``: as fast as the machine goes).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import hal
from appliance.config.render import qkdm_url
from appliance.config.topology import ResolvedLink, Topology

log = logging.getLogger("qkdn.demo")

SKR_TOLERANCE = 0.05
"""Measured mean SKR must be within 5 % of the configured value."""
QBER_TOLERANCE_PP = 0.5
"""Measured mean QBER must be within 0.5 percentage points of the configured value."""


@dataclass
class LinkRun:
    """One link's emulated pair and what was measured on it."""

    link: ResolvedLink
    a: hal.Qkdm
    b: hal.Qkdm
    skr_bps: list[float] = field(default_factory=list)
    qber: list[float] = field(default_factory=list)
    produced: int = 0
    keys_verified: int = 0
    keys_mismatched: int = 0
    counter_disagreements: int = 0

    def summary(self) -> dict[str, Any]:
        skr = np.asarray(self.skr_bps)
        qber = np.asarray(self.qber)
        up = qber[~np.isnan(qber)]
        skr_mean = float(skr.mean()) if skr.size else 0.0
        qber_mean = float(up.mean()) if up.size else math.nan
        conf_skr, conf_qber = self.link.skr_kbps * 1000, self.link.qber_pct / 100
        skr_ok = abs(skr_mean - conf_skr) <= SKR_TOLERANCE * conf_skr if conf_skr else skr_mean == 0
        qber_ok = bool(up.size) and abs(qber_mean - conf_qber) * 100 <= QBER_TOLERANCE_PP
        return {
            "link": self.link.id,
            "a": self.link.a,
            "b": self.link.b,
            "kind": self.link.kind,
            "configured": {
                "skr_bps": conf_skr,
                "skr_std_bps": self.link.emulator.skr_std_kbps * 1000,
                "qber": conf_qber,
                "qber_std": self.link.emulator.qber_std_pct / 100,
            },
            "measured": {
                "skr_bps_mean": skr_mean,
                "skr_bps_std": float(skr.std()) if skr.size else 0.0,
                "qber_mean": qber_mean,
                "qber_std": float(up.std()) if up.size else math.nan,
                "samples": int(skr.size),
                "up_fraction": float(up.size / max(qber.size, 1)),
                "keys_distilled": self.produced,
            },
            "within_tolerance": {"skr": bool(skr_ok), "qber": bool(qber_ok)},
            "keys_verified": self.keys_verified,
            "keys_mismatched": self.keys_mismatched,
            "counter_disagreements": self.counter_disagreements,
        }


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    days: float = 7.0
    interval_s: float = 30.0
    seed: str = "demoquandt"
    speedup: float | None = None
    verify_every: int = 10


def open_pairs(topo: Topology, clock: hal.Clock, seed: str) -> list[LinkRun]:
    """An emulated QKDM pair for every link, both ends opened independently by URL."""
    runs = []
    for link in topo.links:
        a = hal.open_qkdm(qkdm_url(link, "a", seed=seed), clock=clock)
        b = hal.open_qkdm(qkdm_url(link, "b", seed=seed), clock=clock)
        runs.append(LinkRun(link, a, b))
    return runs


def _verify_one_key(run: LinkRun) -> None:
    """Take a key at end A, fetch it by ID at end B, compare, erase both."""
    try:
        key = run.a.get_key()
    except (hal.NoKeyAvailable, hal.LinkDownError):
        return
    try:
        peer = run.b.get_key_by_id(key.key_id)
    except hal.HalError as exc:
        run.keys_mismatched += 1
        log.warning(
            "key missing at end B",
            extra={"link": run.link.id, "key_id": key.key_id, "error": exc.code},
        )
        key.erase()
        return
    same = hmac.compare_digest(key.material, peer.material)
    key.erase()
    peer.erase()
    run.keys_verified += 1
    if not same:
        run.keys_mismatched += 1
        log.error("key mismatch between ends", extra={"link": run.link.id, "key_id": peer.key_id})


def _sample(run: LinkRun, interval_s: float, verify: bool) -> None:
    sa, sb = run.a.status(), run.b.status()
    if sa.keys_produced != sb.keys_produced:
        run.counter_disagreements += 1
    run.skr_bps.append((sa.keys_produced - run.produced) * sa.key_size / interval_s)
    run.qber.append(math.nan if sa.qber is None else sa.qber)
    run.produced = sa.keys_produced
    if verify:
        _verify_one_key(run)


def run_quantum_layer(
    topo: Topology, settings: DemoSettings, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Emulate every link for ``settings.days`` and return the report (samples + summary)."""
    clock = hal.ManualClock(0.0)
    runs = open_pairs(topo, clock, settings.seed)
    steps = int(settings.days * 86400 // settings.interval_s)
    wall_start = time.monotonic()
    log.info(
        "quantum layer started", extra={"links": len(runs), "steps": steps, "seed": settings.seed}
    )
    for step in range(1, steps + 1):
        clock.set(step * settings.interval_s)
        verify = step % settings.verify_every == 0
        for run in runs:
            _sample(run, settings.interval_s, verify)
        if settings.speedup:
            lag = wall_start + clock.now() / settings.speedup - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        if progress and (step % 200 == 0 or step == steps):
            progress(step, steps)
    elapsed = time.monotonic() - wall_start
    for run in runs:
        run.a.close()
        run.b.close()
    return {
        "topology": topo.name,
        "seed": settings.seed,
        "days": settings.days,
        "interval_s": settings.interval_s,
        "steps": steps,
        "wall_s": round(elapsed, 3),
        "speedup_achieved": round(steps * settings.interval_s / elapsed, 1) if elapsed else None,
        "tolerance": {"skr_rel": SKR_TOLERANCE, "qber_pp": QBER_TOLERANCE_PP},
        "links": [run.summary() for run in runs],
        "samples": {
            "t_s": [i * settings.interval_s for i in range(1, steps + 1)],
            "links": {
                run.link.id: {
                    "skr_bps": run.skr_bps,
                    "qber": [None if math.isnan(q) else q for q in run.qber],
                }
                for run in runs
            },
        },
    }
