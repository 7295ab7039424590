"""Benchmark of group commit for a UKMS's KSA store (appliance/kms/groupcommit.py).

16 asyncio tasks (the concurrent requesters) each store one key and then take it back by
ID, N times, against one key store on disk (WAL, ``synchronous=FULL``, sealed records),
as the UKMS of a slave SAE does per request (``_on_deliver``, then ``dec_keys``), all in
one session; the take is released right after (a third call):

* ``thread``: ``asyncio.to_thread(store.put_many / take_many / release)``, one
  transaction and one fsync per call;
* ``group``: a :class:`GroupCommitter`, every call queued at once in one transaction
  (the release queued, riding on the next group).

An operation is one put_many or one take_many call (the releases ride along, their cost
included), as counted before takes became pending. ``bench/store_sessions.py`` measures
the sharded store with many sessions. Reported, as medians over interleaved
runs (a fresh store each): operations per second, process CPU per operation
(``time.process_time``, every thread of the process), and for ``group`` the operations per
commit. The loop is uvloop's, as in the running network.

Usage: python bench/store_groupcommit.py [--n 200] [--tasks 16] [--runs 5] [--dir PATH]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from appliance.kms import storeops
from appliance.kms.groupcommit import GroupCommitter
from appliance.kms.store import KeyStore, NodeKey

Put = Callable[[list[tuple[str, bytes]]], Awaitable[int]]
Take = Callable[[list[str]], Awaitable[list[Any]]]
SESSION = "014:sae-a:sae-b"


async def requester(put: Put, take: Take, me: int, n: int) -> None:
    for i in range(n):
        key_id = f"{me}-{i}"
        await put([(key_id, os.urandom(32))])
        [key] = await take([key_id])
        key.material[:] = bytes(len(key.material))


async def one_run(mode: str, store: KeyStore, tasks: int, n: int) -> dict[str, float]:
    committer = GroupCommitter(store)
    if mode == "group":

        async def put(keys: list[tuple[str, bytes]]) -> int:
            return await committer.submit(storeops.Put(session=SESSION, keys=keys))  # type: ignore[return-value]

        async def take(ids: list[str]) -> list[Any]:
            got = await committer.submit(storeops.Take(session=SESSION, key_ids=ids))
            committer.queue(storeops.Release(session=SESSION, key_ids=ids))
            return got  # type: ignore[return-value]

    else:

        async def put(keys: list[tuple[str, bytes]]) -> int:
            return await asyncio.to_thread(store.put_many, SESSION, keys)

        async def take(ids: list[str]) -> list[Any]:
            got = await asyncio.to_thread(store.take_many, SESSION, ids)
            await asyncio.to_thread(store.release, ids)
            return got

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(requester(put, take, me, n) for me in range(tasks)))
    committer.close()  # the last releases
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    ops = 2 * tasks * n
    return {
        "ops_per_s": ops / wall,
        "cpu_us_per_op": cpu / ops * 1e6,
        "ops_per_commit": ops / committer.commits if committer.commits else 1.0,
    }


def run(mode: str, where: Path, tasks: int, n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        store = KeyStore(Path(tmp) / "ksa.db", "ksa/a/b", NodeKey(os.urandom(32)))
        try:
            return uvloop.run(one_run(mode, store, tasks, n))
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="put+take rounds per task")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    samples: dict[str, list[dict[str, float]]] = {"thread": [], "group": []}
    for _ in range(args.runs):  # interleaved, so drift in the machine hits both alike
        for mode, out in samples.items():
            out.append(run(mode, args.dir, args.tasks, args.n))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    report: dict[str, Any] = {
        "machine": f"{machine}, Python {platform.python_version()}",
        "tasks": args.tasks,
        "rounds_per_task": args.n,
        "runs": args.runs,
    }
    print(f"{report['machine']}; {args.tasks} tasks x {args.n} put+take, {args.runs} runs")
    print(f"{'mode':8} {'ops/s':>9} {'CPU us/op':>10} {'ops/commit':>11}")
    for mode, out in samples.items():
        med = {k: statistics.median(s[k] for s in out) for k in out[0]}
        report[mode] = med
        print(
            f"{mode:8} {med['ops_per_s']:9.0f} {med['cpu_us_per_op']:10.0f} "
            f"{med['ops_per_commit']:11.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
