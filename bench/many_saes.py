"""Scale benchmark (issue 12, "scale with users"): N SAE pairs on one UKMS pair.

Generates a topology of four KMS nodes, ``ukms-a - akms-a - akms-b - ukms-b`` (the access
nodes run AKMS and CKMS), with N users, each with one contract and two SAEs (one at each
UKMS): N pairs stocked at each UKMS. Starts the network as OS processes (as ``qkdn net
up`` does), waits until every stock is full, and reports per UKMS:

  * RSS (``VmRSS``), open descriptors (all, and those of key stores: ``keys-*.db*``);
  * idle CPU: the share of one core the process used over ``--idle-window`` seconds with
    every stock full and no request (from ``/proc/<pid>/stat``);
  * the time to fill every stock (from the network answering until the stores hold
    N x stock keys; read from the shard files, read-only);
  * T_key (enc_keys at the master, dec_keys of the same key at the slave, both 014 over
    HTTPS) for one pair while ``--load`` other processes request keys for other pairs
    picked at random (a few requests each, each pair on its own SAE connections).

Every phase is bounded in time (``--fill-timeout``, ``--idle-window``, ``--requests``),
and the network is stopped at the end, whatever happens.
Usage: python bench/many_saes.py --pairs N [--stock S] [--requests R] [--load W]
                                 [--idle-window S] [--fill-timeout S] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.cli import net
from appliance.config.render import find_free_base_port
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


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    return {
        name: round(100 * (cpu_s(pid) - before[name]) / elapsed, 2) for name, pid in pids.items()
    }


def t_key_under_load(net_dir: Path, ports: tuple[int, int], args: argparse.Namespace) -> Any:
    ctx = multiprocessing.get_context("fork")
    stop, counter = ctx.Event(), ctx.Value("q", 0)
    workers = [
        ctx.Process(target=_load, args=(str(net_dir), ports, args.pairs, 1000 + w, stop, counter))
        for w in range(args.load if args.pairs > 1 else 0)
    ]
    for w in workers:
        w.start()
    try:
        master = _endpoint(net_dir, "sae-a-0", ports[0])
        slave = _endpoint(net_dir, "sae-b-0", ports[1])
        t0 = time.monotonic()
        result = measure(master, slave, args.requests)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
    result.pop("samples_ms", None)
    result.pop("paper_t_key_s", None)
    result.pop("speedup_vs_paper", None)
    result.pop("window", None)
    result["load_requests"] = counter.value
    result["load_requests_per_s"] = round(counter.value / elapsed, 1)
    return result


def run(args: argparse.Namespace, net_dir: Path) -> dict[str, Any]:
    topo = net_dir.parent / f"many-saes-{args.pairs}.toml"
    if not topo.exists():
        topo.write_text(topology_toml(args.pairs))
    up = argparse.Namespace(
        topology=str(topo),
        dir=net_dir,
        base_port=find_free_base_port(range(1, 5)),
        mode="gcm",
        rate_limited=False,
        stock=args.stock,
        timeout=args.up_timeout,
        json=False,
    )
    out: dict[str, Any] = {"pairs": args.pairs, "stock": args.stock}
    shutil.rmtree(net_dir / "data", ignore_errors=True)  # fresh stores; PKI kept for reuse
    t0 = time.monotonic()
    net.bring_up(up)
    out["up_s"] = round(time.monotonic() - t0, 1)
    try:
        status = net.status_doc(net_dir)
        nodes = {n["name"]: n for n in status["nodes"]}
        pids = {name: nodes[name]["pid"] for name in UKMS}
        data = {name: net_dir / "data" / name for name in UKMS}
        ports = tuple(int(nodes[name]["endpoints"]["etsi014"].rsplit(":", 1)[1]) for name in UKMS)
        out["started"] = per_ukms(pids, data)
        out["fill"] = wait_filled(data, args.pairs * args.stock, args.fill_timeout)
        out["filled"] = per_ukms(pids, data)
        out["idle_cpu_pct"] = idle_cpu(pids, args.idle_window)
        out["t_key"] = t_key_under_load(net_dir, (ports[0], ports[1]), args)
        out["after_load"] = per_ukms(pids, data)
        out["restarts"] = sum(n["restarts"] for n in net.status_doc(net_dir)["nodes"])
    finally:
        net.bring_down(net_dir)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help=f"SAE pairs, 2..{MAX_PAIRS}")
    parser.add_argument("--stock", type=int, default=256, help="stock keys per pair")
    parser.add_argument("--requests", type=int, default=300, help="timed T_key requests")
    parser.add_argument("--load", type=int, default=2, help="processes serving other pairs")
    parser.add_argument("--idle-window", type=float, default=20.0, help="seconds")
    parser.add_argument("--fill-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument("--up-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--dir", type=Path, help="keep the network here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    if not 2 <= args.pairs <= MAX_PAIRS or not 1 <= args.stock <= 100_000:
        parser.error(f"--pairs 2..{MAX_PAIRS}, --stock 1..100000")
    if not (0 < args.requests <= 100_000 and 0 <= args.load <= 8):
        parser.error("--requests 1..100000, --load 0..8")
    out: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {platform.system()}, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        out.update(run(args, args.dir.resolve() / "net"))
    else:
        with tempfile.TemporaryDirectory(prefix="qkdn-many-") as tmp:
            out.update(run(args, Path(tmp) / "net"))
    text = json.dumps(out, indent=1)
    if not args.json:
        print(f"many_saes: {args.pairs} pairs", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
