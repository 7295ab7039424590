"""Explore seeded schedules of the whole-network simulation (appliance/kms/sim) and check
every invariant after each.

``--schedules N`` runs the schedules of seeds S..S+N-1 (``--seed S``, default 0), on
``--jobs J`` processes (each seed's schedule depends on its seed alone, so the results do
not depend on J or on the order the workers finish in). It reports the exploration rate
(schedules per second of wall clock, and per CPU second of the workers), the steps played,
the fault mix drawn, the outcomes of the SAE transactions (keys fetched, or refused by
reason) and every violated invariant with its seed and the command that replays it.
``--seed N --schedules 1 --verbose`` replays one schedule exactly and prints its story:
every step, the faults as they strike, the outcomes and the violations (never key bits).
``--json`` prints the report as one JSON document instead. Exit status 1 when any
schedule broke an invariant.

Usage: python bench/simulate.py --schedules N [--seed S] [--jobs J] [--json] [--verbose]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from appliance.kms.sim import World, violations

REPLAY = "python bench/simulate.py --seed {seed} --schedules 1 --verbose"


def explore(seed: int) -> dict[str, Any]:
    """One schedule: what it drew, how it ended, what it broke (picklable, for the pool)."""
    start = time.process_time()
    world = World(seed)
    obs = world.run()
    found = violations(obs, world.faults)
    return {
        "seed": seed,
        "cpu": time.process_time() - start,
        "steps": obs.steps,
        "end": obs.end,
        "mode": world.policy.mode.name,
        "stock": world.policy.stock,
        "faults": dataclasses.asdict(world.faults),
        "crashes": len(obs.crashes),
        "outcomes": [_reason(t.outcome) for t in obs.txns],
        "violations": found,
        "digest": obs.digest(),
    }


def _reason(outcome: str) -> str:
    """``fetched``, or the kind of failure and its code (``refused: KMS-NO-KEY``)."""
    return ":".join(outcome.split(":")[:2]).strip()


def run_all(seeds: range, jobs: int) -> Iterator[dict[str, Any]]:
    """Each seed's result, as workers finish."""
    if jobs <= 1:
        yield from map(explore, seeds)
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap_unordered(explore, seeds, chunksize=4)


def summarise(results: list[dict[str, Any]], wall: float, jobs: int) -> dict[str, Any]:
    faults: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for r in results:
        f = r["faults"]
        faults["message loss"] += f["loss"] > 0
        faults["duplication"] += f["duplicate"] > 0
        faults["long delays (50 ms)"] += f["max_delay"] >= 0.05
        faults["node crashes"] += r["crashes"]
        faults["links down"] += f["links_down"]
        faults["modules run dry"] += f["dry"]
        faults["SAE answers lost"] += f["sae_drops"] > 0
        faults[f"relay mode {r['mode']}"] += 1
        faults["stock kept" if r["stock"] else "no stock"] += 1
        outcomes.update(r["outcomes"])
    cpu = sum(r["cpu"] for r in results)
    steps = sum(r["steps"] for r in results)
    bad = [r for r in results if r["violations"]]
    return {
        "schedules": len(results),
        "seeds": [results[0]["seed"], results[-1]["seed"]] if results else [],
        "jobs": jobs,
        "wall_s": round(wall, 3),
        "schedules_per_s": round(len(results) / wall, 2) if wall else None,
        "cpu_s": round(cpu, 3),
        "schedules_per_cpu_s": round(len(results) / cpu, 2) if cpu else None,
        "steps": steps,
        "steps_per_cpu_s": round(steps / cpu) if cpu else None,
        "faults": dict(sorted(faults.items())),
        "outcomes": dict(outcomes.most_common()),
        "violations": [
            {"seed": r["seed"], "violations": r["violations"], "replay": REPLAY.format(**r)}
            for r in bad
        ],
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python", *sys.argv]),
    }


def _machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.node()} {model} x{os.cpu_count()}, Python {platform.python_version()}, "
        f"load average {load:.1f}"
    )


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['schedules']} schedules (seeds {report['seeds'][0]}..{report['seeds'][1]}), "
          f"{report['jobs']} job(s), {report['wall_s']:.1f} s")  # fmt: skip
    print(f"  explored: {report['schedules_per_s']} schedules/s "
          f"({report['schedules_per_cpu_s']} per CPU second; {report['steps']} steps, "
          f"{report['steps_per_cpu_s']} per CPU second)")  # fmt: skip
    print("  faults:   " + ", ".join(f"{k} {v}" for k, v in report["faults"].items()))
    print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in report["outcomes"].items()))
    print(f"  machine:  {report['machine']}")
    if not report["violations"]:
        print("  violations: none")
        return
    print(f"  violations in {len(report['violations'])} schedule(s):")
    for bad in report["violations"]:
        print(f"    seed {bad['seed']}: " + "; ".join(bad["violations"][:3]))
        print(f"      replay: {bad['replay']}")


def replay(seed: int, as_json: bool) -> int:
    """One schedule with its story."""
    world = World(seed, story=True)
    obs = world.run()
    found = violations(obs, world.faults)
    if as_json:
        doc = {
            "seed": seed,
            "story": world.story,
            "faults": dataclasses.asdict(world.faults),
            "outcomes": {t.id: t.outcome for t in obs.txns},
            "violations": found,
            "digest": obs.digest(),
        }
        print(json.dumps(doc, indent=1))
        return 1 if found else 0
    for line in world.story or []:
        print(line)
    print(f"\nseed {seed}: {obs.steps} steps, ended at {obs.end:.3f} s (virtual)")
    print(f"faults: {world.faults}")
    print(f"crashes: {', '.join(f'{n} at {t:.3f} s' for t, n in obs.crashes) or 'none'}")
    for t in obs.txns:
        print(f"txn {t.id} {t.master} -> {t.slave} x{t.number} ({t.size} bits): {t.outcome}")
    print(f"alarms: {obs.alarms or 'none'}")
    print(f"digest: {obs.digest()}")
    print("violations: " + ("none" if not found else ""))
    for v in found:
        print(f"  {v}")
    if found:
        print(f"replay: {REPLAY.format(seed=seed)}")
    return 1 if found else 0


def _progress(results: Iterable[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """Collect the results, with a progress bar when stderr is a terminal."""
    if not sys.stderr.isatty():
        return list(results)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    out = []
    columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("schedules", total=total)
        for r in results:
            out.append(r)
            bar.advance(task)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--verbose", action="store_true", help="one schedule's story")
    args = parser.parse_args(argv)
    if args.schedules < 1 or args.jobs < 1 or args.seed < 0:
        parser.error("--schedules and --jobs must be at least 1, --seed at least 0")
    if args.verbose:
        if args.schedules != 1:
            parser.error("--verbose tells one schedule: use it with --schedules 1")
        return replay(args.seed, args.json)
    seeds = range(args.seed, args.seed + args.schedules)
    start = time.perf_counter()
    results = _progress(run_all(seeds, args.jobs), len(seeds))
    wall = time.perf_counter() - start
    results.sort(key=lambda r: r["seed"])
    report = summarise(results, wall, args.jobs)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader left (| head): say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
