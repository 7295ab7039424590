"""Plots people would rather look at than read: ``qkdn demo --plot PATH`` (PNG).

Left: the T_key distribution of the run (log time axis) beside the paper's 17.34 ± 1.62 s.
Right: each link's key count at its master end over the run, sampled from the nodes'
``/v1/status``. With ``--fault`` (:func:`fault_plot`): each request's T_key over time and
the store levels below, the link's failure and the first relay on the new path marked.
matplotlib (the ``plots`` extra) with the Agg backend (no display needed).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

    _levels(right, levels, "keys in the QKDM store (master end)", ncol=2)
    right.set_title("Link key-store levels")
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Write ``fig`` as ``path`` and free it (an unwritable path: a one-line IO error)."""
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ApplianceError(f"cannot write the plot {path}: {exc.strerror}", code="IO") from None
    finally:
        plt.close(fig)


def _levels(ax: Any, levels: Sequence[Sample], ylabel: str, *, ncol: int) -> None:
    """Each link's store level over the run, one line per link, on ``ax``."""
    links = sorted({link for _, level in levels for link in level}, key=_link_order)
    for link in links:
        points = [(t, level[link]) for t, level in levels if link in level]
        ax.plot([t for t, _ in points], [k for _, k in points], label=link, linewidth=1)
    ax.set_xlabel("time into the run [s]")
    ax.set_ylabel(ylabel)
    if links:
        ax.legend(fontsize="x-small", ncol=ncol, loc="best")


def fault_plot(
    path: Path,
    timeline: Sequence[tuple[float, float, bool]],
    marks: Sequence[tuple[float, str]],
    levels: Sequence[Sample],
) -> None:
    """Write the PNG of a run with a link failure: ``timeline`` holds each request's start
    (s into the run), T_key (ms) and whether it succeeded; ``marks`` the moments to mark
    (s into the run, label: the fault, the switch); ``levels`` the store levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, below) = plt.subplots(
        2, 1, figsize=(12, 7), sharex=True, constrained_layout=True, height_ratios=(3, 2)
    )
    for ok, colour, label in ((True, "tab:blue", "succeeded"), (False, "tab:red", "failed")):
        points = [(t, ms) for t, ms, good in timeline if good is ok]
        if points:
            top.scatter([t for t, _ in points], [ms for _, ms in points], s=6, color=colour,
                        label=f"{label} ({len(points)})")  # fmt: skip
    top.set_yscale("log")
    top.set_ylabel("T_key [ms] (log scale)")
    top.set_title("Key requests, SAE Berlin -> SAE Bonn, with a link failure")
    _levels(below, levels, "keys in the QKDM store", ncol=4)
    for (at, label), colour in zip(marks, ("tab:red", "tab:green", "tab:purple"), strict=False):
        for ax in (top, below):
            ax.axvline(at, color=colour, linestyle="--", linewidth=1.2)
        top.annotate(label, (at, 1), xycoords=("data", "axes fraction"), rotation=90,
                     va="top", ha="right", fontsize="small", color=colour)  # fmt: skip
    top.legend(loc="upper left", fontsize="small")
    _save(plt, fig, path)


def _link_order(link: str) -> tuple[int, ...]:
    return tuple(int(x) for x in link.split("-")[1:] if x.isdigit())
