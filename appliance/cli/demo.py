"""``qkdn demo``: the main job on emulated devices, with a Table-3-shaped report."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from appliance.cli import args as types
from appliance.cli.output import console, write_json
from appliance.errors import UsageError

if TYPE_CHECKING:
    from appliance.demo import DemoSettings

DESCRIPTION = """\
Bring up the emulated quantum layer of a whole network (DemoQuanDT by default): an
emulated QKDM pair on every link, at the configured secret key rate and QBER with
realistic fluctuation. Emulated time is sampled every 30 s, as the paper did for its
Table 3; SKR is measured from the modules' key counters, and keys are checked to be
identical at both ends. The report puts measured mean ± std next to the configured values.
"""
EPILOG = """\
examples:
  qkdn demo                              one emulated week, as fast as possible
  qkdn demo --days 1 --speedup 86400     one emulated day in about one second per day
  qkdn demo --seed lab-7 --json out.json reproducible run, samples saved for plotting
  qkdn demo --skip-quantum --requests 1000 --plot tkey.png   T_key histogram and store levels
  qkdn demo --skip-quantum --fault --requests 1000 --json f.json   link failure halfway
  qkdn demo --skip-quantum --fault --requests 400 --plot f.png   ... the switch on a timeline
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the main job on emulated devices",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--topology",
        type=types.topology,
        default="demoquandt",
        metavar="TOPOLOGY",
        help="topology file or shipped name (default: %(default)s)",
    )
    p.add_argument(
        "--days",
        type=types.number(0, 366, lo_open=True),
        default=7.0,
        help="emulated days, 0 < days <= 366 (default: 7)",
    )
    p.add_argument(
        "--interval",
        type=types.number(1, 86400),
        default=30.0,
        metavar="SECONDS",
        help="sampling interval in emulated seconds, 1..86400 (default: 30)",
    )
    p.add_argument(
        "--speedup",
        type=types.speedup_or_max,
        default="max",
        metavar="FACTOR",
        help="emulated seconds per wall-clock second, or 'max' (default)",
    )
    p.add_argument(
        "--seed",
        help="seed of the emulated links (default: a fresh random one, "
        "printed so a run can be repeated)",
    )
    p.add_argument(
        "--verify-every",
        type=types.integer(1, 1_000_000),
        default=10,
        metavar="N",
        help="check one key pair per link every N samples (default: 10)",
    )
    p.add_argument(
        "--json", type=types.path, metavar="PATH", help="write samples and per-link summary as JSON"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless every link is within tolerance and every key matched",
    )
    p.add_argument(
        "--requests",
        type=types.integer(1, 10_000_000),
        default=10_000,
        metavar="N",
        help="key requests SAE Berlin -> SAE Bonn across the running network "
        "(default: the paper's 10,000, about 5 minutes here; make demo runs 1,000)",
    )
    p.add_argument(
        "--mode",
        default="gcm",
        choices=["gcm", "otp"],
        help="how keys are protected on the links (default: gcm)",
    )
    p.add_argument(
        "--rate-limited", action="store_true", help="start the network with empty link key stores"
    )
    p.add_argument("--skip-quantum", action="store_true", help="skip the quantum-layer week")
    p.add_argument("--skip-network", action="store_true", help="skip the network T_key run")
    p.add_argument(
        "--fault",
        action="store_true",
        help="run the network under its QKDN Controller and take the path's link next to "
        "node 8 down halfway: the report adds switch_ms, keys_lost, keys_duplicated, "
        "keys_mismatched, the failed requests (docs/control.md) and the QKDN Manager's "
        "alarm of the cut link, raised and cleared (manager_alarm, docs/mgmt.md)",
    )
    p.add_argument(
        "--contracts",
        action="store_true",
        help="after T_key: one user runs out of its daily quota, another is suspended "
        "mid-run; every refusal is shown with its reason (the AAA device)",
    )
    p.add_argument(
        "--net-dir", type=types.path, help="network directory (default: a temporary one)"
    )
    p.add_argument(
        "--plot",
        type=types.path,
        metavar="PATH",
        help="save a PNG: the T_key distribution beside the paper's, and each link's "
        "key-store level over the run; with --fault, each request's T_key over time "
        "with the link failure and the first relay on the new path marked",
    )
    p.set_defaults(func=cmd_demo)


def _settings(args: argparse.Namespace) -> DemoSettings:
    from appliance.demo import DemoSettings

    if args.interval > args.days * 86400:
        raise UsageError(f"--interval: expected at most --days, got {args.interval:g} s")
    seed = args.seed if args.seed is not None else secrets.token_hex(8)
    return DemoSettings(
        days=args.days,
        interval_s=args.interval,
        seed=seed,
        speedup=args.speedup,
        verify_every=args.verify_every,
    )


KM_LAYER = {"ukms": "UKMS", "akms+ckms": "A/CKMS", "ckms": "CKMS"}


def _fmt(mean: float, std: float, scale: float, digits: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def report_table(report: dict[str, Any], roles: dict[int, str]) -> Table:
    """Table 3 of the paper, with the measured values beside the configured ones."""
    days = report["days"]
    table = Table(
        caption="set: configured mean ± std; SKR, QBER: measured mean ± std over the samples",
        title=f"Quantum layer of {report['topology']}: {days:g} emulated day(s), "
        f"sampled every {report['interval_s']:g} s (seed {report['seed']})",
    )
    for col, just in (
        ("Node", "right"),
        ("KM layer", "left"),
        ("Link", "left"),
        ("SKR set [kb/s]", "right"),
        ("SKR [kb/s]", "right"),
        ("ΔSKR", "right"),
        ("QBER set [%]", "right"),
        ("QBER [%]", "right"),
        ("ΔQBER", "right"),
        ("keys checked", "right"),
        ("", "left"),
    ):
        table.add_column(escape(col), justify=just)  # type: ignore[arg-type]
    for s in report["links"]:
        c, m = s["configured"], s["measured"]
        ok = all(s["within_tolerance"].values()) and s["keys_mismatched"] == 0
        node = s["b"]
        d_skr = (m["skr_bps_mean"] / c["skr_bps"] - 1) * 100 if c["skr_bps"] else math.nan
        table.add_row(
            str(node),
            KM_LAYER.get(roles[node], roles[node]),
            f"{s['a']}-{s['b']}",
            _fmt(c["skr_bps"], c["skr_std_bps"], 1e-3, 2),
            _fmt(m["skr_bps_mean"], m["skr_bps_std"], 1e-3, 2),
            f"{d_skr:+.1f} %",
            _fmt(c["qber"], c["qber_std"], 100, 2),
            _fmt(m["qber_mean"], m["qber_std"], 100, 2),
            f"{(m['qber_mean'] - c['qber']) * 100:+.2f} pp",
            f"{s['keys_verified']}",
            "[green]ok[/]" if ok else "[red]OUT[/]",
        )
    return table


def cmd_demo(args: argparse.Namespace) -> int:
    if args.plot:
        from appliance.plots import require_plots

        require_plots()
    report: dict[str, Any] = {}
    ok = True
    if not args.skip_quantum:
        ok = _quantum_stage(args, report) and ok
    if not args.skip_network:
        ok = _network_stage(args, report) and ok
    if args.json:
        write_json(args.json, report)
        console().print(f"report written to {args.json}")
    return 1 if args.check and not ok else 0


def _network_stage(args: argparse.Namespace, out_report: dict[str, Any]) -> bool:
    """Bring the network up as processes, measure T_key, bring it down."""
    import tempfile

    from appliance.cli import net
    from appliance.config.render import find_free_base_port
    from appliance.kms.monitor import LevelSampler
    from appliance.plots import demo_plot
    from appliance.tkey import endpoints, measure

    out = console()
    with tempfile.TemporaryDirectory(prefix="qkdn-demo-") as tmp:
        net_dir = args.net_dir or Path(tmp)
        up = argparse.Namespace(
            topology=args.topology,
            dir=net_dir,
            base_port=find_free_base_port(),
            mode=args.mode,
            rate_limited=args.rate_limited,
            stock=0,  # T_key measures the whole chain, not a stock lookup
            timeout=90.0,
            json=False,
            aaa=True,  # every request validated and accounted by the data centre's AAA
            controller=bool(getattr(args, "fault", False)),
        )
        out.print(f"starting the {args.topology} network as separate processes in {net_dir} ...")
        net.bring_up(up)
        try:
            status = net.status_doc(net_dir)
            master, slave = endpoints(status, "sae-berlin-1", "sae-bonn-1")
            if getattr(args, "fault", False):
                return _fault_stage(args, net_dir, master, slave, out_report)
            sampler = LevelSampler(net_dir).start() if args.plot else None
            with Progress(
                TextColumn("key requests"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=out,
                transient=True,
                disable=not out.is_terminal,
            ) as bar:
                task = bar.add_task("t_key", total=args.requests)
                try:
                    result = measure(
                        master,
                        slave,
                        args.requests,
                        progress=lambda done: bar.update(task, completed=done),
                    )
                finally:
                    levels = sampler.stop() if sampler else []
            accounted = _accounting_stage(args, status, net_dir, result, out_report)
        finally:
            net.bring_down(net_dir)
    if args.plot:
        demo_plot(args.plot, result["samples_ms"], levels)
        out.print(f"plot written to {args.plot}")
    out.print(tkey_table(result, args.requests, len(status["nodes"])))
    out_report["network"] = result
    clean = result["keys_mismatched"] == 0 and result["failed_requests"] == 0
    return bool(clean and accounted)


def _fault_stage(
    args: argparse.Namespace, net_dir: Path, master: Any, slave: Any, out_report: dict[str, Any]
) -> bool:
    """Key requests with a link failure halfway (appliance/control/faultrun.py)."""
    from appliance.control.faultrun import cut_of, installed_path, measure_with_fault
    from appliance.kms.monitor import LevelSampler

    out = console()
    path = installed_path(net_dir, master, slave)
    cut = cut_of(path)
    out.print(f"path {'-'.join(map(str, path))}; link {cut[0]}-{cut[1]} fails halfway ...")
    sampled_at = time.time()
    sampler = LevelSampler(net_dir).start() if args.plot else None
    try:
        result = measure_with_fault(master, slave, args.requests, net_dir, cut)
    finally:
        levels = sampler.stop() if sampler else []
    restored_at = time.time()  # the run's last step brought the link up again
    timeline = result.pop("timeline")
    out_report["fault"] = result
    if args.plot:
        _fault_plot(args.plot, result, timeline, levels, result["began_at"] - sampled_at)
        out.print(f"plot written to {args.plot}")
    for key in (
        "switch_ms",
        "switch_request_ms",
        "keys_lost",
        "keys_duplicated",
        "keys_mismatched",
        "failed_requests",
    ):
        out.print(f"{key}: {result[key]}")
    alarmed = _manager_alarm(net_dir, cut, result["fault_at"], restored_at, out_report)
    lost = result["keys_lost"] + result["keys_duplicated"] + result["keys_mismatched"]
    return lost == 0 and all(f["status"] == 503 for f in result["failed"]) and alarmed


def _fault_plot(
    path: Path, result: dict[str, Any], timeline: list[Any], levels: list[Any], lag: float
) -> None:
    """The fault run's timeline with the fault and the switch marked (times into the run;
    the store levels' clock started ``lag`` seconds before the requests')."""
    from appliance.plots import fault_plot

    began = result["began_at"]
    marks = [(result["fault_at"] - began, f"link {result['cut']} down")]
    if result["switch_ms"] is not None:
        at = result["fault_at"] - began + result["switch_ms"] / 1000
        marks.append((at, f"first relay on the new path (+{result['switch_ms']:.0f} ms)"))
    shifted = [(t - lag, level) for t, level in levels]
    fault_plot(path, timeline, marks, shifted)


def _manager_alarm(
    net_dir: Path,
    cut: tuple[int, int],
    fault_at: float,
    restored_at: float,
    out_report: dict[str, Any],
) -> bool:
    """The QKDN Manager's alarm of the cut link, raised and cleared (appliance/mgmt/demo.py);
    True if the network runs no manager."""
    from appliance.mgmt.demo import link_name, watch_alarm

    out = console()
    if not (net_dir / "mgmt" / "manager.toml").is_file():
        out.print("manager: not running (the topology has no manager node)")
        return True
    alarm = watch_alarm(net_dir, link_name(net_dir, *cut), fault_at, restored_at)
    out_report["manager_alarm"] = alarm.to_json()
    if not alarm.id:
        out.print(f"manager: NO alarm for {alarm.link}")
        return False
    raised = f"raised {_clock(alarm.raised_at)} (+{alarm.raised_after_ms} ms after the fault)"
    cleared = (
        f"cleared {_clock(alarm.cleared_at)} (+{alarm.cleared_after_ms} ms after the restore)"
        if alarm.cleared_at
        else "NOT cleared"
    )
    out.print(f"manager alarm #{alarm.id} {alarm.link}: {raised}, {cleared}")
    out.print(f"  reported by {', '.join(alarm.sources)} ({alarm.reports} reports, one alarm)")
    return alarm.cleared_at is not None


def _clock(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M:%S.%f")[:-3]


def _accounting_stage(
    args: argparse.Namespace,
    status: dict[str, Any],
    net_dir: Path,
    result: dict[str, Any],
    out_report: dict[str, Any],
) -> bool:
    """AAA's accounting of the run per contract, beside what the SAEs received (with
    ``--contracts``, after the quota and suspension scenario)."""
    from appliance.aaa import demo as aaa_demo

    out = console()
    issued = result["keys_matched"] + result["keys_mismatched"] + result["warmup_keys"]
    received = {"demo-2026": aaa_demo.Received(keys=issued, bits=issued * aaa_demo.KEY_BITS)}
    if args.contracts:
        out.print(
            "contracts: example-bank runs out of its daily quota, demo-encryptors is "
            "suspended half way ..."
        )
        scenario = aaa_demo.contracts_scenario(status, net_dir)
        for contract, got in scenario.items():
            mine = received.setdefault(contract, aaa_demo.Received())
            mine.keys += got.keys
            mine.bits += got.bits
            mine.refusals.update(got.refusals)
        out.print(aaa_demo.refusals_table(scenario))
    table, ok = aaa_demo.accounting_table(received, net_dir)
    out.print(table)
    out_report["accounting"] = {
        "billed": aaa_demo.billed(net_dir),
        "received": {
            c: {
                "keys": r.keys,
                "bits": r.bits,
                "refusals": [
                    {"status": code, "reason": why, "requests": n}
                    for (code, why), n in r.refusals.items()
                ],
            }
            for c, r in received.items()
        },
        "equal": ok,
    }
    return ok


def tkey_table(result: dict[str, Any], requests: int, nodes: int) -> Table:
    t = result["t_key_ms"]
    table = Table(
        title=f"T_key, SAE Berlin -> SAE Bonn, {nodes} KMS processes, {requests} requests"
    )
    for col in ("", "p50", "p90", "p99", "mean ± std", "keys/s", "keys matched"):
        table.add_column(col, justify="right")
    table.add_row(
        "this network",
        f"{t['p50']:.1f} ms",
        f"{t['p90']:.1f} ms",
        f"{t['p99']:.1f} ms",
        f"{t['mean']:.1f} ± {t['std']:.1f} ms",
        f"{result['keys_per_s']:.1f}",
        f"{result['keys_matched']} (mismatched {result['keys_mismatched']})",
    )
    table.add_row("paper (DemoQuanDT)", "", "", "", "17340 ± 1620 ms", "", "")
    table.caption = f"{result['speedup_vs_paper']}x faster than the paper's mean"
    return table


def _quantum_stage(args: argparse.Namespace, out_report: dict[str, Any]) -> bool:
    from appliance.config.topology import load_topology
    from appliance.demo import run_quantum_layer

    settings = _settings(args)
    topo = load_topology(args.topology)
    out = console()
    steps = int(settings.days * 86400 // settings.interval_s)
    with Progress(
        TextColumn("emulating {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} samples"),
        TimeElapsedColumn(),
        console=out,
        transient=True,
        disable=not out.is_terminal,
    ) as bar:
        task = bar.add_task(f"{len(topo.links)} links", total=steps)
        report = run_quantum_layer(
            topo, settings, progress=lambda done, _total: bar.update(task, completed=done)
        )
    roles = {n.id: n.role for n in topo.spec.nodes}
    out.print(report_table(report, roles))
    good = [
        s
        for s in report["links"]
        if all(s["within_tolerance"].values()) and s["keys_mismatched"] == 0
    ]
    checked = sum(s["keys_verified"] for s in report["links"])
    out.print(
        f"{len(good)}/{len(report['links'])} links within tolerance (mean SKR ± "
        f"{report['tolerance']['skr_rel']:.0%}, mean QBER ± {report['tolerance']['qber_pp']} pp); "
        f"{checked} keys identical at both ends; {report['steps'] * settings.interval_s / 86400:g} "
        f"emulated days in {report['wall_s']:.1f} s ({report['speedup_achieved']:g}x)"
    )
    out_report["quantum"] = report
    return len(good) == len(report["links"])
