"""``qkdn demo``: one emulated week of DemoQuanDT reproduces the configured Table 3."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from appliance import cli
from appliance.errors import ApplianceError
from tests.appliance.test_topology import TABLE_3


@pytest.fixture(scope="module")
def week(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "week.json"
    status = cli.main(
        ["demo", "--skip-network", "--seed", "ci-week", "--json", str(path), "--check"]
    )
    return status, json.loads(path.read_text())["quantum"]


def test_a_week_matches_the_configuration(week):
    status, report = week
    assert status == 0
    assert report["steps"] == 7 * 86400 // 30
    assert len(report["links"]) == 16
    for link in report["links"]:
        c, m = link["configured"], link["measured"]
        assert abs(m["skr_bps_mean"] / c["skr_bps"] - 1) <= 0.05, link["link"]
        assert abs(m["qber_mean"] - c["qber"]) * 100 <= 0.5, link["link"]
        assert link["keys_verified"] == 2016 and link["keys_mismatched"] == 0
        assert link["counter_disagreements"] == 0
        assert m["up_fraction"] == 1.0


def test_table_3_links_fluctuate_like_the_paper(week):
    _, report = week
    by_pair = {(x["a"], x["b"]): x for x in report["links"]}
    for pair, (skr_kbps, _) in TABLE_3.items():
        measured = by_pair[pair]["measured"]
        configured_std = by_pair[pair]["configured"]["skr_std_bps"]
        assert measured["skr_bps_mean"] == pytest.approx(skr_kbps * 1000, rel=0.05)
        # 30 s averages of a 300 s correlated process keep most of its spread.
        assert 0.7 * configured_std <= measured["skr_bps_std"] <= 1.2 * configured_std


def test_samples_are_written_for_plotting(week):
    _, report = week
    samples = report["samples"]
    assert len(samples["t_s"]) == report["steps"]
    series = samples["links"]["link-9-10"]
    assert len(series["skr_bps"]) == len(series["qber"]) == report["steps"]


def test_report_table_is_printed(capsys):
    status = cli.main(["demo", "--skip-network", "--days", "0.5", "--seed", "table"])
    out = capsys.readouterr().out
    assert status == 0
    for header in ("SKR set [kb/s]", "SKR [kb/s]", "QBER [%]", "A/CKMS", "9-10", "16-10"):
        assert header in out
    assert "16/16 links within tolerance" in out


def test_speedup_paces_emulated_time(tmp_path):
    path = tmp_path / "paced.json"
    # 1200 emulated seconds at 4000x must take at least 0.3 s of wall time.
    assert (
        cli.main(
            [
                "demo",
                "--skip-network",
                "--days",
                str(1200 / 86400),
                "--speedup",
                "4000",
                "--json",
                str(path),
                "--seed",
                "pace",
            ]
        )
        == 0
    )
    report = json.loads(path.read_text())["quantum"]
    assert report["wall_s"] >= 0.29
    assert report["speedup_achieved"] <= 4100


def test_the_network_stage_measures_t_key_across_processes(tmp_path, capsys):
    """Issue 5's main job: the network as processes, N requests, every key matched."""
    path, png = tmp_path / "net.json", tmp_path / "tkey.png"
    argv = ["demo", "--skip-quantum", "--requests", "20", "--json", str(path), "--check"]
    assert cli.main([*argv, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    report = json.loads(path.read_text())["network"]
    assert set(report["t_key_ms"]) == {"p50", "p90", "p99", "mean", "std"}
    assert report["requests"] == 20 and report["keys_matched"] == 20
    assert report["keys_mismatched"] == 0 and report["failed_requests"] == 0
    assert 0 < report["t_key_ms"]["p50"] < 17_340 and report["keys_per_s"] > 0
    assert "faster than the paper" in capsys.readouterr().out


@contextlib.contextmanager
def drawn_axes() -> Iterator[dict[str, Any]]:
    """The axes of the figure a plot function saves (its ``"axes"``), the real savefig
    still writing the file."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    drawn: dict[str, Any] = {}
    real_savefig = pyplot.Figure.savefig

    def keep(fig, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn["axes"] = fig.axes
        return real_savefig(fig, *args, **kwargs)

    pyplot.Figure.savefig = keep
    try:
        yield drawn
    finally:
        pyplot.Figure.savefig = real_savefig


def test_the_plot_shows_t_key_and_every_links_level(tmp_path):
    """The figure itself, from known data: both panels drawn, one line per link."""
    from appliance.plots import demo_plot

    with drawn_axes() as drawn:
        levels = [(t * 0.5, {"link-1-2": 1000 - t, "link-2-3": 900 - 2 * t}) for t in range(10)]
        demo_plot(tmp_path / "p.png", [40.0, 45.0, 52.0, 300.0], levels)
    left, right = drawn["axes"]
    assert left.get_xscale() == "log" and sum(p.get_height() for p in left.patches) >= 4
    assert sorted(line.get_label() for line in right.get_lines()) == ["link-1-2", "link-2-3"]
    with pytest.raises(ApplianceError):
        demo_plot(tmp_path / "missing-dir" / "p.png", [1.0], levels)


def test_the_fault_plot_marks_the_fault_and_the_switch(tmp_path):
    """``demo --fault --plot``: each request's T_key over time, failures apart, and the two
    moments marked on both panels at their times."""
    from appliance.plots import fault_plot

    with drawn_axes() as drawn:
        timeline = [(i * 0.02, 20.0 + i % 3, i != 51) for i in range(100)]
        levels = [(t * 0.5, {"link-8-9": 1000 - t, "link-8-16": 900}) for t in range(5)]
        marks = [(1.0, "link 8-16 down"), (1.04, "first relay on the new path (+40 ms)")]
        fault_plot(tmp_path / "f.png", timeline, marks, levels)
    top, below = drawn["axes"]
    assert [len(c.get_offsets()) for c in top.collections] == [99, 1]
    for ax in (top, below):
        xs = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert xs == [1.0, 1.04]
    assert [t.get_text() for t in top.texts] == [label for _, label in marks]
    assert (tmp_path / "f.png").stat().st_size > 0
