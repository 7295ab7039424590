"""Plots people would rather look at than read: ``qkdn demo --plot PATH`` (PNG).

Left: the T_key distribution of the run (log time axis) beside the paper's 17.34 ± 1.62 s.
Right: each link's key count at its master end over the run, sampled from the nodes'
``/v1/status``. matplotlib (the ``plots`` extra) with the Agg backend (no display needed).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import ApplianceError, MissingExtra
from appliance.kms.monitor import Sample
from appliance.tkey import PAPER_T_KEY_S


def require_plots() -> None:
    """Raise :class:`MissingExtra` now if matplotlib (the ``plots`` extra) is not installed,
    so that ``demo --plot`` refuses before its run instead of after it."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtra("plots", "matplotlib")


def demo_plot(path: Path, samples_ms: Sequence[float], levels: Sequence[Sample]) -> None:
    """Write the two-panel PNG; an unwritable path is a clean error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    paper_ms, paper_std_ms = (v * 1000 for v in PAPER_T_KEY_S)
    if samples_ms:
        lo = max(min(samples_ms) / 2, 0.1)
        bins = np.geomspace(lo, paper_ms * 2, 80)
        left.hist(
            samples_ms, bins=bins, color="tab:blue", label=f"this network (n={len(samples_ms)})"
        )
        p50 = float(np.median(samples_ms))
        left.axvline(p50, color="tab:blue", linestyle="--", label=f"p50 {p50:.1f} ms")
    left.axvspan(paper_ms - paper_std_ms, paper_ms + paper_std_ms, color="tab:red", alpha=0.25)
    left.axvline(paper_ms, color="tab:red", label="DemoQuanDT paper: 17.34 ± 1.62 s")
    left.set_xscale("log")
    left.set_xlabel("T_key [ms] (log scale)")
    left.set_ylabel("requests")
    left.set_title("T_key, SAE Berlin -> SAE Bonn")
    left.legend(loc="upper center", fontsize="small")

    links = sorted({link for _, level in levels for link in level}, key=_link_order)
    for link in links:
        points = [(t, level[link]) for t, level in levels if link in level]
        right.plot([t for t, _ in points], [k for _, k in points], label=link, linewidth=1)
    right.set_xlabel("time into the run [s]")
    right.set_ylabel("keys in the QKDM store (master end)")
    right.set_title("Link key-store levels")
    if links:
        right.legend(fontsize="x-small", ncol=2, loc="best")
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ApplianceError(f"cannot write the plot {path}: {exc.strerror}", code="IO") from None
    finally:
        plt.close(fig)


def _link_order(link: str) -> tuple[int, ...]:
    return tuple(int(x) for x in link.split("-")[1:] if x.isdigit())
