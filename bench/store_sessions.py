"""Benchmark of the sharded key store with many sessions (appliance/kms/shards.py).

What a slave's UKMS does per dec_keys request, for many SAE pairs at once: ``--tasks``
asyncio tasks (the concurrent requesters) each run ``--n`` rounds; a round picks one of
``--sessions`` sessions, stores one key in it (the delivery), takes it back by ID (the
dec_keys, a pending take) and queues its release (after the reply), through the shards'
group commit (WAL, ``synchronous=FULL``, sealed records). Before the timed rounds every
session is given ``--prefill`` keys, so that the tables have the size such a node has.

An operation is one put or one take, as ``bench/store_groupcommit.py`` counts them (the
releases ride along in the same groups; their cost is included). Reported, as medians
over interleaved runs (a fresh directory each): operations per second, process CPU per
operation (``time.process_time``, every thread), operations per commit, and the peak
descriptors the process holds on the store files, with the number of files. The loop
is uvloop's, as in the running network.

Usage: python bench/store_sessions.py [--sessions 1,10000] [--tasks 16] [--n 200]
       [--prefill 4] [--shards 8] [--runs 5] [--dir PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from appliance.kms.shards import ShardedStore
from appliance.kms.store import NodeKey
from appliance.kms.storeops import Put, Release, Take


def descriptors_in(directory: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{directory}/")
        except OSError:
            continue
    return count


async def prefill(store: ShardedStore, sessions: list[str], per: int) -> None:
    for at in range(0, len(sessions), 1000):
        await asyncio.gather(
            *(
                store.submit(
                    Put(session=s, keys=[(f"{s}/p{j}", os.urandom(32)) for j in range(per)])
                )
                for s in sessions[at : at + 1000]
            )
        )


async def requester(store: ShardedStore, sessions: list[str], me: int, n: int, seed: int) -> None:
    pick = random.Random(seed * 1000 + me)
    for i in range(n):
        session, key_id = pick.choice(sessions), f"{me}-{i}"
        await store.submit(Put(session=session, keys=[(key_id, os.urandom(32))]))
        [key] = await store.submit(Take(session=session, key_ids=[key_id]))  # type: ignore[misc]
        key.material[:] = bytes(len(key.material))
        store.queue(Release(session=session, key_ids=[key_id]))


async def one_run(where: Path, args: argparse.Namespace, count: int, seed: int) -> dict[str, float]:
    store = ShardedStore(where, NodeKey(os.urandom(32)), alarm=print, shards=args.shards)
    sessions = [f"014:master-{i}:slave-{i}" for i in range(count)]
    await prefill(store, sessions, args.prefill)
    committers = [store._committer(i) for i in range(store.shards)]
    before = sum(c.commits for c in committers)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(
        *(requester(store, sessions, me, args.n, seed) for me in range(args.tasks))
    )
    fds, files = descriptors_in(where), len(list(where.iterdir()))
    store.close()  # the last releases
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ops = 2 * args.tasks * args.n
    commits = sum(c.commits for c in committers) - before
    return {
        "ops_per_s": ops / wall,
        "cpu_us_per_op": cpu / ops * 1e6,
        "ops_per_commit": ops / commits,
        "descriptors": fds,
        "files": files,
    }


def run(args: argparse.Namespace, count: int, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        return uvloop.run(one_run(Path(tmp), args, count, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", default="1,10000", help="session counts, comma-separated")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--n", type=int, default=200, help="rounds per task")
    parser.add_argument("--prefill", type=int, default=4, help="keys per session beforehand")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(c) for c in args.sessions.split(",")]
    samples: dict[int, list[dict[str, float]]] = {c: [] for c in counts}
    for seed in range(args.runs):  # interleaved, so drift in the machine hits all alike
        for count, out in samples.items():
            out.append(run(args, count, seed))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    report: dict[str, Any] = {
        "machine": machine,
        "load_avg_1m": os.getloadavg()[0],
        "tasks": args.tasks,
        "rounds_per_task": args.n,
        "prefill": args.prefill,
        "shards": args.shards,
        "runs": args.runs,
    }
    print(f"{machine}; {args.tasks} tasks x {args.n} put+take(+release), {args.runs} runs")
    print(
        f"{'sessions':>8} {'ops/s':>8} {'CPU us/op':>10} {'ops/commit':>11} {'fds':>4} {'files':>5}"
    )
    for count, out in samples.items():
        med = {k: statistics.median(s[k] for s in out) for k in out[0]}
        report[f"sessions_{count}"] = med
        print(
            f"{count:8d} {med['ops_per_s']:8.0f} {med['cpu_us_per_op']:10.0f} "
            f"{med['ops_per_commit']:11.1f} {med['descriptors']:4.0f} {med['files']:5.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
