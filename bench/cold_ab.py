"""A/B of the cold path's first T_key (issue 15) between two source trees, same window.

Runs ``bench/control_switch.py --switch-only --switches 0 --cold-tkey N`` (this
repository's bench file) once per tree and round, rotating which tree goes first, each
tree's code run from its own directory (working directory and ``PYTHONPATH`` set to it,
so that the bench and every node process import that tree's ``appliance`` and ``hal``:
``python -m`` puts the working directory first on the path). Prints, per run, the load
before and after and, per direction, ``added_ms``, ``cpu_ms``, ``next_cpu_ms`` and
``sets_ms`` (the slowest install the controller logged meanwhile); then per tree the
medians and the ratios to the base tree (the first ``--tree``). Export each commit to a
directory of its own (``git archive COMMIT | tar -x -C DIR``) rather than run a working
tree that may change meanwhile.

With ``--baseline`` each run also times the same two requests on a plain network (paths
from the topology, nothing installed; its pairs' AKMS channels open as cold as the
controller network's): ``plain_added_ms``, and ``path_added_ms``, the controller
network's ``added_ms`` less the plain one's: what the cold path alone adds.

Usage: python bench/cold_ab.py --tree base=DIR --tree new=DIR [--tree ...] [--rounds 3]
       [--tkey 20] [--out DIR] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "control_switch.py"
FIELDS = (
    "added_ms", "cpu_ms", "next_cpu_ms", "sets_ms", "install_at_ms", "plain_added_ms",
    "path_added_ms",
)  # fmt: skip
RUN_TIMEOUT_S = 600


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def check_tree(tree: Path) -> str:
    """Where ``appliance`` resolves when run from ``tree`` (it must be inside it)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", "import appliance, hal; print(appliance.__file__, hal.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if any(not f.startswith(str(tree)) for f in out.split()):
        raise SystemExit(f"{tree}: imports resolve elsewhere: {out}")
    return out


def run(tree: Path, tkey: int, out: Path, baseline: bool) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = load()
    cmd = [sys.executable, str(BENCH), "--switch-only", "--switches", "0"]
    cmd += ["--cold-tkey", str(tkey), "--json", str(out)]
    if baseline:
        cmd.append("--cold-baseline")
    with subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # SIGTERM: the bench brings its networks down
            proc.terminate()
            proc.communicate(timeout=120)
            return {"error": f"timed out after {RUN_TIMEOUT_S} s", "load": (before, load())}
    after = load()
    if proc.returncode != 0 or not out.exists():
        return {"error": stderr[-800:], "load": (before, after)}
    report = json.loads(out.read_text())
    dirs = []
    plain = report.get("cold_tkey_plain") or [{}, {}]
    for d, p in zip(report.get("cold_tkey", []), plain, strict=False):
        row = {k: d.get(k) for k in ("saes", "cold_ms", "warm_p50_ms", *FIELDS)}
        row["plain_added_ms"] = p.get("added_ms")
        sets = d.get("sets_ms") or {}  # by installed pair: the slowest (the path, its backup)
        row["sets_ms"] = max(sets.values()) if sets else None
        dirs.append(row)
    return {"dirs": dirs, "load": (before, after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=DIR, base first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tkey", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("/tmp/cold_ab"))
    ap.add_argument(
        "--baseline", action="store_true",
        help="also the plain network's cold request (control_switch.py --cold-baseline): "
        "plain_added_ms, and path_added_ms = added_ms - plain_added_ms",
    )  # fmt: skip
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trees = {}
    for item in args.tree:
        name, _, tree = item.partition("=")
        trees[name] = Path(tree).resolve()
    names = list(trees)
    for name, tree in trees.items():
        print(f"{name}: {check_tree(tree)}", flush=True)
    results: dict[str, list[dict[str, object]]] = {name: [] for name in names}
    for rnd in range(args.rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            stamp = time.strftime("%H:%M:%S", time.gmtime())
            res = run(trees[name], args.tkey, args.out / f"{rnd}-{name}.json", args.baseline)
            results[name].append(res)
            print(f"{stamp} round {rnd} {name}: {json.dumps(res)}", flush=True)
    medians: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        medians[name] = {}
        for direction in (0, 1):
            for field in FIELDS:
                values = [
                    float(r["dirs"][direction][field])  # type: ignore[index]
                    for r in runs
                    if "dirs" in r
                    and len(r["dirs"]) > direction  # type: ignore[arg-type]
                    and r["dirs"][direction].get(field) is not None  # type: ignore[index]
                ]
                if values:
                    medians[name][f"{direction}.{field}"] = statistics.median(values)
    print("\nmedians (direction 0: the network's first request; 1: the other direction)")
    base = names[0]
    for key in medians[base]:
        row = f"  {key:18}"
        for name in names:
            value = medians[name].get(key)
            row += f"  {name} {'-' if value is None else f'{value:.1f}':>7}"
            if name != base and value is not None and medians[base][key]:
                row += f" ({value / medians[base][key]:.2f})"
        print(row)


if __name__ == "__main__":
    main()
