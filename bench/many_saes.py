"""Scale benchmark (issue 12, "scale with users"): N SAE pairs on one UKMS pair.

For each N of ``--pairs``, generates a topology of four KMS nodes, ``ukms-a - akms-a -
akms-b - ukms-b`` (the access nodes run AKMS and CKMS), with N users, each with one
contract and two SAEs (one at each UKMS): N pairs stocked at each UKMS. Starts each
network as OS processes (as ``qkdn net up`` does) and waits until its stocks are full
before it starts the next, then reports per UKMS:

  * RSS (``VmRSS``), open descriptors (all, and those of key stores: ``keys-*.db*``),
    after the fill and after the load;
  * idle CPU: the share of one core each UKMS used over ``--idle-window`` seconds with
    every stock full and no request, every network idle in the same window (from
    ``/proc/<pid>/stat``; the default window spans the 60 s housekeeping);
  * the time to fill every stock (from the network answering until the stores hold
    N x stock keys; read from the shard files, read-only);
  * T_key (enc_keys at the master, dec_keys of the same key at the slave, both 014 over
    HTTPS) for one pair while ``--load`` processes request keys for other pairs picked at
    random (a few requests each, each pair on its own SAE connections; another seed each
    round, so that every round meets pairs not drawn on before, as the first does): ``--rounds``
    rounds per network, interleaved across the networks in a rotating order so that every
    N sees the same machine; the medians of the rounds' p50 and p99.

Every phase is bounded in time (``--up-timeout``, ``--fill-timeout``, ``--idle-window``,
``--requests`` x ``--rounds``), and every network is stopped at the end, whatever happens.
With ``--dir`` the networks' directories (and their PKI, slow to issue for 10,000 pairs)
are kept for the next run; the stores are made afresh each run.
Usage: python bench/many_saes.py [--pairs 2,200,10000] [--stock S] [--requests R]
         [--rounds K] [--load W] [--idle-window S] [--fill-timeout S] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.cli import net
from appliance.config.render import find_free_base_port
from appliance.kms.netproc import process_cpu_s
from appliance.tkey import SaeEndpoint, call, measure

MAX_PAIRS = 20_000
UKMS = ("ukms-a", "ukms-b")


def topology_toml(pairs: int) -> str:
    """The topology of the benchmark: four nodes, ``pairs`` users with two SAEs each."""
    out = [
        "[network]",
        f'name = "many-saes-{pairs}"',
        "key_size = 256",
        "",
        "[link_defaults]",
        'kind = "simulated"',
        "skr_kbps = 1000.0",
        "qber_pct = 1.0",
        "[link_defaults.emulator]",
        "buffer_keys = 1000000",
        "",
    ]
    for node_id, name, role in (
        (1, "ukms-a", "ukms"),
        (2, "akms-a", "akms+ckms"),
        (3, "akms-b", "akms+ckms"),
        (4, "ukms-b", "ukms"),
    ):
        out += ["[[nodes]]", f"id = {node_id}", f'name = "{name}"', 'site = "bench"']
        out += [f'role = "{role}"', ""]
    for a, b in ((1, 2), (2, 3), (3, 4)):
        out += ["[[links]]", f"a = {a}", f"b = {b}", "length_km = 10.0", ""]
    for i in range(pairs):
        user = f"user-{i}"
        out += ["[[users]]", f'id = "{user}"', f'name = "User {i}"', ""]
        out += ["[[contracts]]", f'id = "c-{i}"', f'user = "{user}"', ""]
        for node, side in ((1, "a"), (4, "b")):
            out += [
                "[[saes]]",
                f'id = "sae-{side}-{i}"',
                f"node = {node}",
                f'user = "{user}"',
                f'contract = "c-{i}"',
                "",
            ]
    return "\n".join(out)


# -- measures from /proc and the stores -----------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def descriptors(pid: int, data_dir: Path) -> dict[str, int]:
    """Open descriptors of a process: all, and those of its key stores (files under its
    data directory whose name starts with ``keys-``)."""
    total = stores = 0
    prefix = str(data_dir.resolve()) + "/keys-"
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        total += 1
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        stores += target.startswith(prefix)
    files = sum(1 for p in data_dir.iterdir() if p.is_file())
    return {"fds": total, "store_fds": stores, "data_files": files}


def stocked(data_dir: Path) -> int:
    """Keys in the stock of every pair of a UKMS, read from its shard files (read-only)."""
    total = 0
    for shard in sorted(data_dir.glob("keys-*.db")):
        try:
            db = sqlite3.connect(f"file:{shard}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error:
            continue
        try:
            row = db.execute("SELECT COALESCE(SUM(keys), 0) FROM tally WHERE kind = 'stock'")
            total += int(row.fetchone()[0])
        except sqlite3.Error:
            pass
        finally:
            db.close()
    return total


# -- the load: requests for other pairs ----------------------------------------------------
def _endpoint(net_dir: Path, sae: str, port: int) -> SaeEndpoint:
    pki = net_dir / "pki"
    return SaeEndpoint(
        sae, port, pki / "saes" / f"{sae}.pem", pki / "saes" / f"{sae}.key", pki / "ca.pem"
    )


def _load(
    net_dir: str, ports: tuple[int, int], pairs: int, seed: int, stop: Any, counter: Any
) -> None:
    """Until ``stop`` is set: pick a pair at random (never pair 0, the measured one), make
    ``PER_PAIR`` requests on fresh connections of its two SAEs, and so on."""
    rng = random.Random(seed)
    base = Path(net_dir)
    while not stop.is_set():
        i = rng.randrange(1, pairs)
        a = _endpoint(base, f"sae-a-{i}", ports[0]).connect()
        b = _endpoint(base, f"sae-b-{i}", ports[1]).connect()
        try:
            for _ in range(PER_PAIR):
                status, issued = call(a, f"/api/v1/keys/sae-b-{i}/enc_keys")
                if status != 200:
                    continue
                key_id = issued["keys"][0]["key_ID"]
                call(b, f"/api/v1/keys/sae-a-{i}/dec_keys?key_ID={key_id}")
                with counter.get_lock():
                    counter.value += 1
        except (OSError, ValueError):
            pass
        finally:
            a.close()
            b.close()


PER_PAIR = 5
"""Requests the load makes for one pair before it moves to another."""


# -- the run --------------------------------------------------------------------------------
def wait_filled(data_dirs: dict[str, Path], want: int, timeout: float) -> dict[str, Any]:
    """Seconds until each UKMS's stores hold ``want`` stock keys (None: not within
    ``timeout``), and the levels reached."""
    start = time.monotonic()
    done: dict[str, float | None] = dict.fromkeys(data_dirs)
    levels = dict.fromkeys(data_dirs, 0)
    while time.monotonic() - start < timeout and any(v is None for v in done.values()):
        for name, data in data_dirs.items():
            if done[name] is None:
                levels[name] = stocked(data)
                if levels[name] >= want:
                    done[name] = round(time.monotonic() - start, 2)
        time.sleep(0.5)
    return {"fill_s": done, "stock_keys": levels, "wanted": want}


def per_ukms(pids: dict[str, int], data_dirs: dict[str, Path]) -> dict[str, Any]:
    return {
        name: {"rss_mb": rss_mb(pid), **descriptors(pid, data_dirs[name])}
        for name, pid in pids.items()
    }


def idle_cpu(pids: dict[str, int], window: float) -> dict[str, float]:
    """Percent of one core each process used over ``window`` seconds."""
    before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    return {
        name: round(100 * (process_cpu_s(pid) - before[name]) / elapsed, 2)
        for name, pid in pids.items()
    }


def t_key_under_load(net: Network, args: argparse.Namespace, round_no: int) -> dict[str, Any]:
    """T_key of pair 0 while ``args.load`` processes serve pairs picked at random (seeded by
    round and process: a round that repeated an earlier round's pairs would find their
    stocks topped up and their leases in memory, and measure less than the first)."""
    ctx = multiprocessing.get_context("fork")
    stop, counter = ctx.Event(), ctx.Value("q", 0)
    workers = [
        ctx.Process(
            target=_load,
            args=(str(net.dir), net.ports, net.pairs, 1000 * (round_no + 1) + w, stop, counter),
        )
        for w in range(args.load if net.pairs > 1 else 0)
    ]
    for w in workers:
        w.start()
    try:
        master = _endpoint(net.dir, "sae-a-0", net.ports[0])
        slave = _endpoint(net.dir, "sae-b-0", net.ports[1])
        cpu0 = {name: process_cpu_s(pid) for name, pid in net.nodes.items()}
        t0 = time.monotonic()
        result = measure(master, slave, args.requests)
        elapsed = time.monotonic() - t0
        cpu = {name: process_cpu_s(pid) - cpu0[name] for name, pid in net.nodes.items()}
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
    return {
        **result["t_key_ms"],
        "failed": result["failed_requests"],
        "mismatched": result["keys_mismatched"],
        "load_per_s": round(counter.value / elapsed, 1),
        # CPU of every node process per request served in the round (measured and load):
        # what the load makes the network do beside the measured pair
        "node_cpu_ms_per_request": {
            name: round(1000 * used / (args.requests + counter.value), 2)
            for name, used in cpu.items()
        },
    }


class Network:
    """One benchmark network: its directory, its UKMS processes and 014 ports."""

    def __init__(self, root: Path, pairs: int, args: argparse.Namespace) -> None:
        self.pairs, self.dir = pairs, root / f"net-{pairs}"
        self.report: dict[str, Any] = {"pairs": pairs, "stock": args.stock, "t_key": []}
        self.pids: dict[str, int] = {}
        self.nodes: dict[str, int] = {}  # every node process (UKMSes and access nodes)
        self.data = {name: self.dir / "data" / name for name in UKMS}
        self.ports = (0, 0)
        self.up = False

    def start(self, args: argparse.Namespace) -> None:
        """Start the network on fresh stores (the PKI of an earlier run is kept), and wait
        until every stock is full."""
        topo = self.dir.parent / f"many-saes-{self.pairs}.toml"
        if not topo.exists():
            topo.write_text(topology_toml(self.pairs))
        shutil.rmtree(self.dir / "data", ignore_errors=True)
        up = argparse.Namespace(
            topology=str(topo),
            dir=self.dir,
            base_port=find_free_base_port(range(1, 5)),
            mode="gcm",
            rate_limited=False,
            stock=args.stock,
            timeout=args.up_timeout,
            json=False,
        )
        t0 = time.monotonic()
        net.bring_up(up)
        self.up = True
        self.report["up_s"] = round(time.monotonic() - t0, 1)
        nodes = {n["name"]: n for n in net.status_doc(self.dir)["nodes"]}
        self.pids = {name: nodes[name]["pid"] for name in UKMS}
        self.nodes = {name: node["pid"] for name, node in nodes.items()}
        a, b = (int(nodes[name]["endpoints"]["etsi014"].rsplit(":", 1)[1]) for name in UKMS)
        self.ports = (a, b)
        self.report["started"] = self.measure()
        self.report["fill"] = wait_filled(self.data, self.pairs * args.stock, args.fill_timeout)
        self.report["filled"] = self.measure()

    def measure(self) -> dict[str, Any]:
        return per_ukms(self.pids, self.data)

    def stop(self) -> None:
        if self.up:
            self.report["restarts"] = sum(n["restarts"] for n in net.status_doc(self.dir)["nodes"])
            net.bring_down(self.dir)
            self.up = False


def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Each network started and filled in turn (the others idle meanwhile), the idle CPU of
    all in one window, then T_key rounds interleaved across the networks (each round in
    another order), so that every N sees the same machine."""
    nets = [Network(root, n, args) for n in args.pairs]
    try:
        for n in nets:
            n.start(args)
        pids = {f"{n.pairs}/{name}": pid for n in nets for name, pid in n.pids.items()}
        idle = idle_cpu(pids, args.idle_window)
        for n in nets:
            n.report["idle_cpu_pct"] = {name: idle[f"{n.pairs}/{name}"] for name in UKMS}
        for r in range(args.rounds):
            order = nets[r % len(nets) :] + nets[: r % len(nets)]
            for n in order:
                n.report["t_key"].append(t_key_under_load(n, args, r))
        for n in nets:
            n.report["after_load"] = n.measure()
            rounds = n.report["t_key"]
            n.report["t_key_p50_median_ms"] = statistics.median(t["p50"] for t in rounds)
            n.report["t_key_p99_median_ms"] = statistics.median(t["p99"] for t in rounds)
    finally:
        for n in nets:
            n.stop()
    return [n.report for n in nets]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pairs", default="2,200", help=f"SAE pair counts, comma-separated, each 2..{MAX_PAIRS}"
    )
    parser.add_argument("--stock", type=int, default=256, help="stock keys per pair")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="T_key rounds per network")
    parser.add_argument("--load", type=int, default=2, help="processes serving other pairs")
    parser.add_argument("--idle-window", type=float, default=65.0, help="seconds")
    parser.add_argument("--fill-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument("--up-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--dir", type=Path, help="keep the networks here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    # a SIGTERM (a timeout, a kill) ends the run through its finally: the networks it
    # started are brought down, not left running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        args.pairs = [int(x) for x in args.pairs.split(",")]
    except ValueError:
        parser.error("--pairs: comma-separated integers")
    if not all(2 <= n <= MAX_PAIRS for n in args.pairs) or len(set(args.pairs)) != len(args.pairs):
        parser.error(f"--pairs: distinct counts, each 2..{MAX_PAIRS}")
    if not (1 <= args.stock <= 100_000 and 1 <= args.rounds <= 20):
        parser.error("--stock 1..100000, --rounds 1..20")
    if not (0 < args.requests <= 100_000 and 0 <= args.load <= 8 and args.idle_window > 0):
        parser.error("--requests 1..100000, --load 0..8, --idle-window > 0")
    out: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.system()}, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(sys.argv),
    }
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        out["networks"] = run(args, args.dir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="qkdn-many-") as tmp:
            out["networks"] = run(args, Path(tmp))
    text = json.dumps(out, indent=1)
    if not args.json:
        for n in out["networks"]:
            print(
                f"N={n['pairs']}: RSS {[u['rss_mb'] for u in n['after_load'].values()]} MB, "
                f"store fds {[u['store_fds'] for u in n['after_load'].values()]}, "
                f"idle CPU {list(n['idle_cpu_pct'].values())} %, "
                f"fill {list(n['fill']['fill_s'].values())} s, "
                f"T_key p50 median {n['t_key_p50_median_ms']} ms",
                file=sys.stderr,
            )
    print(text)


if __name__ == "__main__":
    main()
