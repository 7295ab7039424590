"""Benchmark of the QKDN Controller on a running DemoQuanDT network (separate processes,
mutual TLS, emulated QKD links; ``--stock 0``: every enc_keys crosses the network).

1. T_key with the controller in the loop against without, in the same run: two networks
   (``net up --controller`` and plain ``net up``), ``--rounds`` rounds of ``--requests``
   key requests on each in turn (appliance.tkey.measure: enc_keys + dec_keys); medians
   of the per-round p50s, and their difference. The path is installed before the timed
   requests (a warm path: the access node still asks the controller every time).
2. Protection switching, ``--switches`` times on the controller's network: requests run
   while the path's link next to node 8 (8-9 or 8-16) is taken down halfway
   (appliance.control.faultrun); from the injection: when a node at the link's ends
   heard of it from its QKD module (its log, ``link state change heard``), when the
   controller switched the routes over the link (its log, ``protection switch``), when
   the new path was in use (switched to at the head end, or installed at every hop), and
   switch_ms, the issue's figure: the first relay that succeeded on the new path (the CN
   key at the path's end, whose CKMS logs the first key of a pair to arrive over another
   path, ``relays arrive over a new path``); beside it the conservative
   switch_request_ms (the end of the first request that *started* after the new path was
   in use: the request in flight at the switch, then a whole T_key), with that request's
   T_key and the median T_key before the fault (appliance.control.faultrun). The link
   comes back up between repeats. ``--switch-only``: this part alone, one network.
   ``--keep DIR`` keeps the networks' directories (their logs) in DIR.
3. ``--cold N``: cold paths on the controller's network, before any key request: N
   times, a path request (``POST /v1/path``, HTTP/2, mutual TLS, as a source CKMS asks)
   for a pair of CKMS nodes never routed, 10-12 links apart (:data:`COLD_PAIRS`):
   computed and installed at every hop before the answer, which is what a cold path adds
   to T_key; and, on the same network, N requests for a pair already installed (a warm
   ask: the controller answers from its cache). Reported per request: the pair, its
   links, the time to the answer and, from the controller's log, the part of it its
   gNMI Sets took (first sent to last confirmed), and the CPU the network's processes
   spent from the ask to its answer (``cpu_ms``, the scheduler's run time of every
   thread, /proc/PID/task/TID/schedstat: a figure the machine's load does not inflate as
   it does the time; ``BENCH_CPU_BY_PROCESS=1`` prints it by process). Run it
   apart (``--switch-only --switches 0 --cold 12``): its routes stay installed, most over
   the link the switches cut, and each cut would then switch a dozen routes at once.

4. ``--cold-tkey N``: the issue's figure for a cold path, T_key with the path computed
   and installed inside it. On the controller's fresh network, before any other request:
   for sae-berlin-1 -> sae-bonn-1 (the network's first key request: its first path
   request, its agents' first Sets, its first relay) and then sae-bonn-1 -> sae-berlin-1
   (the other direction: a CN key path never routed, everything else warm), the SAEs'
   connections opened first (an 014 ``status`` call), one key request timed as
   appliance.tkey does (enc_keys at the master, dec_keys at the slave), then N more
   over the now installed path; reported per direction: the first T_key (``cold_ms``),
   the next ones' p50 (``warm_p50_ms``), the difference, the CPU the network's
   processes spent in the first (``cpu_ms``, schedstat as in 3.), the Sets' round trip
   of the paths the controller installed meanwhile and when the first of them began
   from the request's start (``install_at_ms``; its log). Run it apart from
   ``--cold`` (whose first pairs it routes). With ``--cold-baseline`` (kept under
   ``--switch-only``) the same two requests on the plain network right after, in the
   same minutes (``cold_tkey_plain``): its paths come from the topology, nothing is
   computed or installed, but a pair's first request opens its AKMS channel there too;
   the difference of the two networks' ``added_ms`` (``path_added_ms``) is what the
   cold *path* adds, the channel's opening being in both.

5. ``--cpu N``: on the controller's network, N sequential key requests on the installed
   path (no fault), and the CPU time (utime + stime, /proc) all the network's processes
   took per request, by process and in all, with the requests' T_key p50.

Usage: python bench/control_switch.py [--requests 200] [--rounds 3] [--switches 5]
       [--switch-requests 240] [--switch-only] [--cold N] [--cold-tkey N [--cold-baseline]]
       [--json PATH] [--keep DIR] [--cpu N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.cli import net
from appliance.config.render import find_free_base_port
from appliance.control.faultrun import current_cut, installed_path, measure_with_fault
from appliance.kms import netproc
from appliance.tkey import endpoints, measure


def up(net_dir: Path, controller: bool) -> None:
    net.bring_up(argparse.Namespace(
        topology="demoquandt", dir=net_dir, base_port=find_free_base_port(), mode="gcm",
        rate_limited=False, stock=0, timeout=120.0, json=False, aaa=False,
        controller=controller,
    ))  # fmt: skip


def all_up(net_dir: Path, timeout: float = 20.0) -> None:
    """Until the controller sees every link usable again (the last repeat's link is back)."""
    import asyncio

    from appliance.cli.controller import ask_routes

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(x["usable"] for x in asyncio.run(ask_routes(net_dir))["links"]):
            return
        time.sleep(0.2)


def wait_for_manager(net_dir: Path, timeout: float) -> None:
    """Until the controller logged the manager's first report and the manager's inventory
    holds every node as answering: under load its first poll round may find agents silent
    (they start after it) and hold their nodes down until a later round hears them, which a
    cold measurement must not meet (seen twice at load 14-15; and at load 22-28 a poll
    round 5 s after the start still missed one to five nodes, whose links the controller
    then held down in the middle of the measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if detected(net_dir, 0.0, "manager report") is not None and not silent_nodes(net_dir):
            return
        time.sleep(0.2)


def silent_nodes(net_dir: Path) -> list[str]:
    """The nodes the manager's inventory holds as not answering (read-only; all of them
    while it has not polled yet)."""
    import sqlite3

    path = net_dir / "mgmt" / "manager.db"
    if not path.exists():
        return ["(no inventory yet)"]
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT node, reachable FROM inventory").fetchall()
    except sqlite3.Error:
        return ["(inventory unreadable)"]
    return [str(node) for node, reachable in rows if not reachable] if rows else ["(empty)"]


def detected(
    net_dir: Path, since: float, msg: str = "protection switch", log: str = "controller.log"
) -> float | None:
    """The first time ``msg`` is logged in ``log`` (a glob of the network's logs) after
    ``since``."""
    found = []
    for path in (net_dir / "logs").glob(log):
        with open(path, "rb") as fh:
            for line in fh.read(16 << 20).splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("msg") == msg and float(entry.get("ts", 0)) >= since:
                    found.append(float(entry["ts"]))
                    break
    return min(found, default=None)


COLD_PAIRS = [(2, 14), (14, 2), (3, 14), (14, 3), (2, 13), (13, 2), (4, 14), (14, 4),
              (2, 12), (12, 2), (3, 13), (13, 3)]  # fmt: skip
"""Pairs of CKMS nodes 10-12 links apart, asked before any key request (2-14 and 14-2,
the access nodes' routes, first). DemoQuanDT has no 14-hop path: its longest carrier
path is 2-14, 12 links (13 nodes, 13 Sets), which is what the first two measure."""


def cold(net_dir: Path, rounds: int) -> dict[str, Any]:
    """Part 3 of the module docstring."""
    import asyncio

    from appliance.config.addresses import split_host_port
    from appliance.kms.network import load_configs
    from appliance.net.h2 import H2Client
    from appliance.pki import client_context

    cfg = next(c for c in load_configs(net_dir).values() if "controller" in c.node.role)
    ctx = client_context(Path(cfg.paths.cert), Path(cfg.paths.key), Path(cfg.paths.ca_cert),
                         ("h2",))  # fmt: skip

    async def ask(pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
        client = H2Client(*split_host_port(cfg.listen["api"]), ctx, timeout=10.0)
        out = []
        try:
            await client.request("POST", "/v1/routes", b"{}")  # the connection opened
            for src, dst in pairs:
                body = json.dumps({"src": src, "dst": dst}).encode()
                before = cpu_ns(net_dir)
                t0 = time.perf_counter()
                answer = await client.request("POST", "/v1/path", body)
                ms = (time.perf_counter() - t0) * 1000
                after = cpu_ns(net_dir)
                cpu = sum(after[n] - before[n] for n in after if n in before) / 1e6
                if os.environ.get("BENCH_CPU_BY_PROCESS"):  # where an ask's CPU went
                    print(
                        src,
                        dst,
                        {n: round((after[n] - before[n]) / 1e6, 1) for n in after if n in before},
                        file=sys.stderr,
                    )
                path = json.loads(answer.body).get("path", []) if answer.status == 200 else []
                out.append({"pair": [src, dst], "status": answer.status,
                            "links": max(len(path) - 1, 0), "ms": round(ms, 2),
                            "cpu_ms": round(cpu, 1)})  # fmt: skip
                await asyncio.sleep(0.5)  # the backup's pre-install (0.25 s later) done
        finally:
            await client.close()
        return out

    cold_asks = asyncio.run(ask(COLD_PAIRS[:rounds]))
    warm_asks = asyncio.run(ask([(2, 14)] * rounds))
    sets = installs(net_dir)
    for a in cold_asks:  # the Sets' round trip, as the controller measured it
        a["sets_ms"] = sets.get(tuple(a["pair"]))
    ok = [a["ms"] for a in cold_asks if a["status"] == 200]
    in_sets = [a["sets_ms"] for a in cold_asks if a["status"] == 200 and a["sets_ms"]]
    return {
        "cold_asks": cold_asks,
        "cold_ms_p50": statistics.median(ok) if ok else None,
        "cold_ms_max": max(ok) if ok else None,
        "cold_sets_ms_p50": statistics.median(in_sets) if in_sets else None,
        "warm_ask_ms_p50": statistics.median(a["ms"] for a in warm_asks),
    }


def cold_tkey(net_dir: Path, eps: Any, warm: int) -> dict[str, Any]:
    """Part 4 of the module docstring."""
    from appliance.tkey import call

    out = []
    for master, slave in (eps, eps[::-1]):
        a, b = master.connect(), slave.connect()
        try:
            for conn, peer in ((a, slave.sae), (b, master.sae)):  # TLS open, nothing routed
                status, _ = call(conn, f"/api/v1/keys/{peer}/status")
                assert status == 200, status
            since = time.time()
            times, cpu = [], []
            for i in range(1 + warm):
                before = cpu_ns(net_dir) if i < 2 else {}
                t0 = time.perf_counter()
                status, issued = call(a, f"/api/v1/keys/{slave.sae}/enc_keys")
                assert status == 200, issued
                ids = [{"key_ID": k["key_ID"]} for k in issued["keys"]]
                status, got = call(b, f"/api/v1/keys/{master.sae}/dec_keys", {"key_IDs": ids})
                times.append((time.perf_counter() - t0) * 1000)
                assert status == 200 and got["keys"] == issued["keys"], got
                if i < 2:  # the first request's CPU, and the next's (warm)
                    after = cpu_ns(net_dir)
                    cpu.append(sum(after[n] - before[n] for n in after if n in before) / 1e6)
                    if os.environ.get("BENCH_CPU_BY_PROCESS"):
                        print(master.sae, slave.sae, i, {n: round((after[n] - before[n]) / 1e6, 1)
                              for n in after if n in before and after[n] > before[n]},
                              file=sys.stderr)  # fmt: skip
                if i == 0:
                    time.sleep(0.5)  # the backup's pre-install (0.25 s later) done
        finally:
            a.close()
            b.close()
        warm_p50 = statistics.median(times[1:]) if warm else None
        window = {
            pair: (ms, at) for pair, (ms, at) in installs(net_dir, True).items()
            if since <= at <= since + times[0] / 1000 + 0.1
        }  # fmt: skip
        out.append({
            "saes": [master.sae, slave.sae], "cold_ms": round(times[0], 2),
            "cpu_ms": round(cpu[0], 1),
            "next_cpu_ms": round(cpu[1], 1) if warm else None,
            "warm_p50_ms": round(warm_p50, 2) if warm_p50 else None,
            "added_ms": round(times[0] - warm_p50, 2) if warm_p50 else None,
            "sets_ms": {f"{s}-{d}": ms for (s, d), (ms, _) in window.items()},
            # when the first install in it began (its Sets' first sent), from the request's
            # start: the phases before the path's ask (the channel's opening, the CN request)
            "install_at_ms": min(
                (round((at - ms / 1000 - since) * 1000, 2) for ms, at in window.values()),
                default=None,
            ),
        })  # fmt: skip
    return {"cold_tkey": out}


def cpu_ns(net_dir: Path) -> dict[str, int]:
    """CPU time of every process of the network, by name, in ns: the sum over its threads
    of the scheduler's run time (/proc/PID/task/TID/schedstat), finer than the 10 ms ticks
    of utime + stime for windows of tens of milliseconds. Its own reader, not
    ``netproc.cpu_ns``: this file runs against older revisions' packages too (the cold
    path's baseline, BENCHMARKS.md)."""
    from appliance.kms import netproc

    out = {}
    for pid, name in netproc.find_processes(net_dir).items():
        total = 0
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                    total += int(fh.read().split()[0])
        out[name] = total
    return out


def cpu_per_request(net_dir: Path, eps: Any, requests: int) -> dict[str, Any]:
    """Part 5 of the module docstring."""
    before = netproc.cpu_seconds(net_dir)
    got = measure(*eps, requests)
    after = netproc.cpu_seconds(net_dir)
    per = {n: round((after[n] - before[n]) * 1000 / requests, 3) for n in after if n in before}
    return {"cpu_ms_per_request": round(sum(per.values()), 2), "cpu_ms_by_process": per,
            "cpu_t_key_p50_ms": got["t_key_ms"]["p50"]}  # fmt: skip


def installs(net_dir: Path, at: bool = False) -> dict[tuple[int, int], Any]:
    """The first ``route installed`` of each pair in the controller's log: the time from
    its first Set sent to every hop's confirmation (``ms``; logged since the Sets run on
    the controller's event loop, absent before); with ``at``, (ms, its log time)."""
    out: dict[tuple[int, int], Any] = {}
    if not (net_dir / "logs" / "controller.log").exists():  # the plain network: no installs
        return out
    with open(net_dir / "logs" / "controller.log", "rb") as fh:
        for line in fh.read(16 << 20).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "route installed" and "ms" in entry:
                ms = float(entry["ms"])
                out.setdefault((entry["src"], entry["dst"]), (ms, float(entry["ts"])) if at else ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--switches", type=int, default=5)
    ap.add_argument(
        "--switch-requests", type=int, default=240,
        help="requests per switch, the fault before the middle one: the second half must "
        "outlast an emulated epoch (1 s), or the link never goes down",
    )  # fmt: skip
    ap.add_argument("--switch-only", action="store_true", help="no T_key comparison")
    ap.add_argument(
        "--cold", type=int, default=0, help="cold-path rounds (part 3; run it with --switches 0)"
    )
    ap.add_argument(
        "--cold-tkey", type=int, default=0, metavar="N",
        help="part 4: the first key request over a fresh path each way, then N warm ones",
    )  # fmt: skip
    ap.add_argument(
        "--cold-baseline", action="store_true",
        help="with --cold-tkey: the same requests on the plain network (topology paths)",
    )  # fmt: skip
    ap.add_argument("--cpu", type=int, default=0, help="requests of part 5 (CPU per request)")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--keep", type=Path, help="an empty directory: the networks' directories (their logs) "
        "are kept there instead of a temporary one",
    )  # fmt: skip
    args = ap.parse_args()
    # a SIGTERM (cold_ab.py's timeout, a kill) ends the run through its finally: the
    # networks it started are brought down, not left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "load_before": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with contextlib.ExitStack() as stack:
        tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ctl-"))
        dirs = {"controller": Path(tmp) / "ctl", "plain": Path(tmp) / "plain"}
        if args.switch_only and not args.cold_baseline:
            del dirs["plain"]
        for name, d in dirs.items():
            up(d, name == "controller")
        try:
            eps = {
                n: endpoints(net.status_doc(d), "sae-berlin-1", "sae-bonn-1")
                for n, d in dirs.items()
            }
            if args.cold_tkey or args.cold:  # the manager's first poll may find agents silent
                wait_for_manager(dirs["controller"], 60.0)
                all_up(dirs["controller"], 90.0)
            if args.cold_tkey:
                report.update(cold_tkey(dirs["controller"], eps["controller"], args.cold_tkey))
                if args.cold_baseline:
                    plain = cold_tkey(dirs["plain"], eps["plain"], args.cold_tkey)["cold_tkey"]
                    report["cold_tkey_plain"] = plain
                    for ctl, base in zip(report["cold_tkey"], plain, strict=True):
                        if ctl["added_ms"] is not None and base["added_ms"] is not None:
                            ctl["path_added_ms"] = round(ctl["added_ms"] - base["added_ms"], 2)
            if args.cold:
                report.update(cold(dirs["controller"], min(args.cold, len(COLD_PAIRS))))
            installed_path(dirs["controller"], *eps["controller"])
            if args.cpu:
                report.update(cpu_per_request(dirs["controller"], eps["controller"], args.cpu))
            p50s: dict[str, list[float]] = {"controller": [], "plain": []}
            for _ in range(0 if args.switch_only else args.rounds):
                for name in ("plain", "controller"):
                    got = measure(*eps[name], args.requests)
                    p50s[name].append(got["t_key_ms"]["p50"])
            report["t_key_p50_ms"] = {n: statistics.median(v) for n, v in p50s.items() if v}
            report["t_key_p50_rounds_ms"] = p50s
            if not args.switch_only:
                report["t_key_p50_added_ms"] = round(
                    report["t_key_p50_ms"]["controller"] - report["t_key_p50_ms"]["plain"], 3
                )
            switches = []
            for _ in range(args.switches):
                all_up(dirs["controller"])
                installed_path(dirs["controller"], *eps["controller"])
                got = measure_with_fault(
                    *eps["controller"], args.switch_requests, dirs["controller"],
                    lambda: current_cut(dirs["controller"]),  # routes move for key availability
                )  # fmt: skip
                seen = detected(dirs["controller"], got["fault_at"])
                heard = detected(dirs["controller"], got["fault_at"], "link state change heard",
                                 "*.log")  # fmt: skip
                done = got["new_path_installed_at"]
                switches.append({
                    "cut": got["cut"], "switch_ms": got["switch_ms"],
                    "switch_request_ms": got["switch_request_ms"],
                    "node_heard_ms": round((heard - got["fault_at"]) * 1000, 1) if heard else None,
                    "detected_ms": round((seen - got["fault_at"]) * 1000, 1) if seen else None,
                    "installed_ms": round((done - got["fault_at"]) * 1000, 1) if done else None,
                    "first_on_new_ms": got.get("first_on_new_ms"),
                    "t_key_before_ms": got.get("t_key_before_ms"),
                    "failed": got["failed_requests"], "lost": got["keys_lost"],
                    "duplicated": got["keys_duplicated"], "mismatched": got["keys_mismatched"],
                })  # fmt: skip
            report["switches"] = switches
            for name in ("switch_ms", "switch_request_ms"):
                ms = [s[name] for s in switches if s[name] is not None]
                report[f"{name}_p50"] = statistics.median(ms) if ms else None
                report[f"{name}_p99"] = max(ms) if ms else None  # few runs: the worst
                report[f"{name}_within_50"] = f"{sum(x <= 50 for x in ms)} of {len(switches)}"
            for name in ("node_heard_ms", "detected_ms", "installed_ms"):
                ms = [s[name] for s in switches if s[name] is not None]
                report[f"{name}_p50"] = statistics.median(ms) if ms else None
        finally:
            for d in dirs.values():
                net.bring_down(d)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
