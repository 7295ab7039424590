"""Group commit: the same outcomes as one call at a time, fewer commits, failures kept apart.

Groups are made deterministic without timing: while a test holds the store lock, the
worker waits at ``BEGIN`` with whatever it took, and every operation submitted
meanwhile queues for the next group.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kms import groupcommit
from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    KmsError,
    StoreCorrupt,
    StoreDiskFull,
    StoreError,
    StoreFull,
)
from appliance.kms.groupcommit import CommitWorkers, GroupCommitter, commit_group
from appliance.kms.store import KeyStore, NodeKey
from appliance.kms.storeops import Op, Put, Release, StoredKey, Take, TakeOldest

NODE_KEY = NodeKey(bytes(range(32)))
A, B = "014:a:b", "014:c:d"


def material(key_id: str) -> bytes:
    return hashlib.sha256(key_id.encode()).digest()


def new_store(path: Path, capacity: int = 10_000) -> KeyStore:
    return KeyStore(path, "keys-0", NODE_KEY, capacity=capacity, clock=lambda: 1000.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    s = new_store(tmp_path / "keys.db")
    yield s
    s.close()


def put(session: str, *ids: str, kind: str = "ksa") -> Put:
    return Put(session=session, keys=[(k, material(k)) for k in ids], kind=kind)


@contextmanager
def held(store: KeyStore) -> Iterator[None]:
    """Keep the worker waiting at the store lock while operations queue up."""
    store._lock.acquire()
    try:
        yield
    finally:
        store._lock.release()


async def queued_together(committer: GroupCommitter, ops: list[Op]) -> list[Any]:
    """Submit in order while the worker waits, all in one group (the worker cannot take
    the queue before all are in); outcomes (results or exceptions) in order."""
    with held(committer.store), committer._lock:
        tasks = [asyncio.ensure_future(committer.submit(op)) for op in ops]
        await asyncio.sleep(0)  # each task runs up to its await: its operation is queued
    return await asyncio.gather(*tasks, return_exceptions=True)


def remaining(store: KeyStore, session: str = A, kind: str = "ksa") -> list[str]:
    return sorted(k.key_id for k in store.take_oldest(session, kind, 10_000))


# -- concurrency ------------------------------------------------------------------------


def test_two_hundred_callers_take_each_key_once_all_or_none(store):
    """Each task stores its key, then takes it with its neighbour's: the pairs compete."""
    ids = [f"k{i:03d}" for i in range(200)]

    async def caller(c: GroupCommitter, i: int) -> list[StoredKey] | KmsError:
        await c.submit(put(A, ids[i]))
        try:
            got = await c.submit(Take(session=A, key_ids=[ids[i], ids[(i + 1) % 200]]))
        except KeyUnavailable as exc:
            return exc
        assert isinstance(got, list)
        await c.submit(Release(session=A, key_ids=[k.key_id for k in got]))
        return got

    async def main() -> tuple[GroupCommitter, list[list[StoredKey] | KmsError]]:
        c = GroupCommitter(store)
        got = await asyncio.gather(*(caller(c, i) for i in range(200)))
        c.close()
        return c, got

    committer, got = asyncio.run(main())
    taken = [k for result in got if isinstance(result, list) for k in result]
    for i, result in enumerate(got):
        if isinstance(result, list):  # both keys, in the order named, with their material
            assert [k.key_id for k in result] == [ids[i], ids[(i + 1) % 200]]
    assert all(isinstance(k.material, bytearray) for k in taken)
    assert all(bytes(k.material) == material(k.key_id) for k in taken)
    assert len({k.key_id for k in taken}) == len(taken)  # exactly once
    assert sorted([*(k.key_id for k in taken), *remaining(store)]) == ids  # nothing lost
    assert committer.commits < committer.ops


def test_many_sessions_and_kinds_share_one_group(store):
    async def main() -> tuple[GroupCommitter, list[Any]]:
        c = GroupCommitter(store)
        store.put_many(B, [("old", material("old"))], kind="stock")
        got = await queued_together(
            c,
            [
                *(put(f"014:m{i}:s", f"k{i}") for i in range(30)),
                TakeOldest(session=B, kind="stock", n=5),
                Take(session="014:m3:s", key_ids=["k3"]),
                Release(session="014:m3:s", key_ids=["k3"]),
            ],
        )
        c.close()
        return c, got

    committer, got = asyncio.run(main())
    assert got[:30] == [1] * 30
    assert [k.key_id for k in got[30]] == ["old"] and [k.key_id for k in got[31]] == ["k3"]
    assert got[32] == 1
    assert committer.ops == 33 and committer.commits == 1
    assert store.count("014:m3:s", "ksa") == 0 and store.count("014:m4:s", "ksa") == 1


def test_queued_releases_ride_on_the_next_group(store):
    store.put_many(A, [(k, material(k)) for k in "abc"])

    async def main() -> GroupCommitter:
        c = GroupCommitter(store)
        taken = await c.submit(Take(session=A, key_ids=["a", "b"]))
        assert [k.key_id for k in taken] == ["a", "b"]  # type: ignore[union-attr]
        with held(store), c._lock:  # both in the next group
            c.queue(Release(session=A, key_ids=["a", "b"]))
            other = asyncio.ensure_future(c.submit(Take(session=A, key_ids=["c"])))
            await asyncio.sleep(0)
        assert [k.key_id for k in await other] == ["c"]  # type: ignore[union-attr]
        c.close()
        return c

    committer = asyncio.run(main())
    assert committer.ops == 3 and committer.commits == 2
    rows = sqlite3.connect(store.path).execute("SELECT id FROM keys").fetchall()
    assert rows == [("c",)]  # a and b released; c pending until its own release


def test_a_lone_release_goes_at_once(store):
    """A release nobody awaits does not wait for company: while it waits its keys stay
    pending, and a crash then would let their slave fetch them again."""
    store.put_many(A, [(k, material(k)) for k in "ab"])

    async def main() -> GroupCommitter:
        c = GroupCommitter(store)
        await c.submit(Take(session=A, key_ids=["a"]))
        c.queue(Release(session=A, key_ids=["a"]))
        for _ in range(1000):  # bounded: the worker commits it with no other operation
            if c.commits == 2:
                break
            await asyncio.sleep(0.01)
        assert c.commits == 2 and c.ops == 2
        return c

    committer = asyncio.run(main())
    committer.close()
    assert remaining(store) == ["b"]


# -- failures stay with their operation --------------------------------------------------


def test_a_failing_operation_leaves_the_rest_of_its_group_alone(tmp_path):
    store = new_store(tmp_path / "small.db", capacity=5)
    store.put_many(A, [(k, material(k)) for k in ("a", "b", "c")])
    ops: list[Op] = [
        Take(session=A, key_ids=["a"]),
        Take(session=A, key_ids=["b", "missing"]),  # all or none: b stays
        put(A, "d"),
        put(A, "x0", "x1", "x2"),  # 3 + 4 > 5
        put(B, "c"),  # c is already stored
        Take(session=A, key_ids=["c", "d"]),  # sees d, put by this group
        Take(session=A, key_ids=["a"]),  # pending above
        Release(session=A, key_ids=["a", "c"]),
        TakeOldest(session=A, kind="ksa", n=0),
    ]
    out = commit_group(store, ops)
    assert [k.key_id for k in out[0]] == ["a"]
    assert isinstance(out[1], KeyUnavailable) and out[1].missing == ["missing"]
    assert out[2] == 1 and isinstance(out[3], StoreFull) and type(out[4]) is StoreError
    assert [(k.key_id, bytes(k.material)) for k in out[5]] == [(k, material(k)) for k in "cd"]
    assert isinstance(out[6], KeyUnavailable) and out[7] == 2 and out[8] == []
    assert remaining(store) == ["b"]


def test_bad_requests_fail_alone_before_the_transaction(store):
    store.put_many(A, [("a", material("a"))])
    out = commit_group(
        store,
        [
            Take(session=A, key_ids=[]),
            Take(session=A, key_ids=["a", "a"]),
            put("no session", "x"),
            TakeOldest(session=A, kind="ksa", n=-1),
            Take(session=A, key_ids=["a"]),
        ],
    )
    assert isinstance(out[0], KeyUnavailable) and isinstance(out[1], KeyUnavailable)
    assert type(out[2]) is StoreError and type(out[3]) is StoreError
    assert [k.key_id for k in out[4]] == ["a"]


def test_a_record_that_fails_to_open_fails_alone_and_is_reported(store):
    store.put_many(A, [("a", material("a"))])
    store.put_many(B, [("b", material("b"))])
    db = sqlite3.connect(store.path)
    with db:
        db.execute("UPDATE batches SET tag = 'x' WHERE session = ?", (A,))
    reported: list[tuple[KeyStore, KmsError]] = []

    async def main() -> list[Any]:
        c = GroupCommitter(store, on_error=lambda s, e: reported.append((s, e)))
        try:
            return await queued_together(
                c, [Take(session=A, key_ids=["a"]), Take(session=B, key_ids=["b"])]
            )
        finally:
            c.close()

    got = asyncio.run(main())
    assert isinstance(got[0], IntegrityFailure) and [k.key_id for k in got[1]] == ["b"]
    assert reported == [(store, got[0])]


def deny_commit(action: int, arg: str | None, *_: object) -> int:
    if action == sqlite3.SQLITE_TRANSACTION and arg == "COMMIT":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def test_a_failed_commit_fails_every_operation_of_the_group(store, monkeypatch):
    store.put_many(A, [(k, material(k)) for k in ("a", "b")])
    store._db.set_authorizer(deny_commit)
    erased: list[Any] = []
    erase = groupcommit.erase_outcome
    monkeypatch.setattr(groupcommit, "erase_outcome", lambda o: (erase(o), erased.append(o)))

    async def main() -> list[Any]:
        c = GroupCommitter(store)
        try:
            return await queued_together(
                c, [Take(session=A, key_ids=["a"]), put(A, "n"), Take(session=A, key_ids=["zz"])]
            )
        finally:
            c.close()

    got = asyncio.run(main())
    assert [type(g) for g in got] == [StoreError] * 3
    store._db.set_authorizer(None)
    assert remaining(store) == ["a", "b"]  # nothing taken, nothing stored
    [key] = next(o for o in erased if isinstance(o, list) and o)
    assert key.key_id == "a" and key.material == bytearray(32)  # the bits nobody got


def test_a_busy_database_fails_the_group_cleanly(store):
    store.put_many(A, [("a", material("a"))])
    blocker = sqlite3.connect(store.path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    store._db.execute("PRAGMA busy_timeout = 50")
    out = commit_group(store, [Take(session=A, key_ids=["a"]), put(A, "b")])
    assert all(o.code == "KMS-STORE-BUSY" and "locked" in str(o) for o in out)
    blocker.rollback()
    assert remaining(store) == ["a"]


def test_a_full_disk_reports_only_what_was_committed(store):
    store.put_many(A, [("a", material("a"))])
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    ops: list[Op] = [
        put(A, "small"),
        Put(session=A, keys=[(f"big{i}", bytes(4000)) for i in range(20)]),
        Take(session=A, key_ids=["a"]),
    ]
    out = commit_group(store, ops)
    assert isinstance(out[1], StoreDiskFull) and "full" in str(out[1])
    store._db.execute("PRAGMA max_page_count = 1073741823")
    left = sqlite3.connect(store.path).execute("SELECT id, run FROM keys").fetchall()
    ids = {key_id for key_id, run in left if run is None}
    assert ("small" in ids) == (out[0] == 1)  # stored if and only if reported stored
    assert ("a" in ids) == isinstance(out[2], Exception)  # pending if reported taken
    assert not any(k.startswith("big") for k, _ in left)


def test_a_damaged_file_fails_the_whole_group_and_is_reported_once(store):
    """Damage found by one operation: no operation of the group is reported done."""
    store.put_many(A, [("a", material("a"))])
    original = store.prepare
    corrupt = sqlite3.DatabaseError("database disk image is malformed")
    corrupt.sqlite_errorcode = sqlite3.SQLITE_CORRUPT  # type: ignore[attr-defined]

    def raise_corrupt(db: sqlite3.Connection) -> Any:
        raise corrupt

    store.prepare = lambda op, now=None: (  # type: ignore[method-assign]
        raise_corrupt if isinstance(op, Take) else original(op, now)
    )
    reported: list[KmsError] = []

    async def main() -> list[Any]:
        c = GroupCommitter(store, on_error=lambda s, e: reported.append(e))
        try:
            return await queued_together(
                c, [put(A, "b"), Take(session=A, key_ids=["a"]), put(B, "c")]
            )
        finally:
            c.close()

    got = asyncio.run(main())
    assert [type(g) for g in got] == [StoreCorrupt] * 3
    assert all(g.code == "KMS-STORE-CORRUPT" for g in got)
    assert len(reported) == 3  # the hook hears of each; shards.py quarantines once
    store.prepare = original  # type: ignore[method-assign]
    assert remaining(store) == ["a"] and remaining(store, B) == []


# -- close and cancellation --------------------------------------------------------------


def test_close_runs_the_queued_operations_then_refuses_more(store):
    async def main() -> list[Any]:
        c = GroupCommitter(store)
        with held(store):
            tasks = [asyncio.ensure_future(c.submit(put(A, f"k{i}"))) for i in range(20)]
            await asyncio.sleep(0)
        c.close()  # blocks until the worker has run them all
        with pytest.raises(StoreError, match="closed"):
            await c.submit(Take(session=A, key_ids=["k0"]))
        with pytest.raises(StoreError, match="closed"):
            c.queue(Release(session=A, key_ids=["k0"]))
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [1] * 20
    assert store.count(A, "ksa") == 20


async def begun(c: GroupCommitter, ops: int) -> None:
    """Wait until the worker has begun a group holding the ``ops``-th operation (the worker
    is a thread: bounded polling)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while c.ops < ops:
        assert loop.time() < deadline, f"the worker never began operation {ops}"
        await asyncio.sleep(0.001)


def test_a_take_cancelled_before_its_group_is_skipped(store):
    store.put_many(A, [("k", material("k"))])

    async def main() -> GroupCommitter:
        c = GroupCommitter(store)
        with held(store):
            first = asyncio.ensure_future(c.submit(put(A, "other")))
            await begun(c, 1)  # the worker holds `first`, waiting for the lock
            take = asyncio.ensure_future(c.submit(Take(session=A, key_ids=["k"])))
            await asyncio.sleep(0)
            take.cancel()
        c.close()
        assert await first == 1 and take.cancelled()
        return c

    assert asyncio.run(main()).ops == 1
    assert remaining(store) == ["k", "other"]  # the cancelled take took nothing


def test_a_take_cancelled_after_its_group_began_erases_the_keys(store, monkeypatch):
    """The keys are taken (pending); nobody gets them: erased."""
    store.put_many(A, [("k", material("k"))])
    erased: list[Any] = []
    erase = groupcommit.erase_outcome
    monkeypatch.setattr(groupcommit, "erase_outcome", lambda o: (erase(o), erased.append(o)))

    async def main() -> None:
        c = GroupCommitter(store)
        with held(store):
            take = asyncio.ensure_future(c.submit(Take(session=A, key_ids=["k"])))
            await begun(c, 1)
            take.cancel()
        c.close()
        await asyncio.sleep(0)  # the worker's result reaches the loop
        assert take.cancelled()

    asyncio.run(main())
    assert store.count(A, "ksa") == 0
    [[key]] = erased
    assert key.key_id == "k" and key.material == bytearray(32)


def test_a_result_for_a_closed_loop_is_erased():
    loop = asyncio.new_event_loop()
    op = groupcommit._Op(Take(session=A, key_ids=["k"]), loop.create_future(), loop)
    loop.close()
    key = StoredKey("k", bytearray(material("k")))
    groupcommit._deliver(op, [key])
    assert key.material == bytearray(32)


# -- the same outcomes as the synchronous store, one call at a time ---------------------

IDS = st.sampled_from("abcdef")
SESSIONS = st.sampled_from([A, B])
PUTS = st.builds(
    Put,
    session=SESSIONS,
    keys=st.lists(IDS.map(lambda k: (k, material(k))), max_size=3),
    kind=st.sampled_from(["ksa", "stock"]),
)
TAKES = st.builds(Take, session=SESSIONS, key_ids=st.lists(IDS, max_size=3))
OLDEST = st.builds(
    TakeOldest, session=SESSIONS, kind=st.sampled_from(["ksa", "stock"]), n=st.integers(0, 3)
)
RELEASES = st.builds(Release, session=SESSIONS, key_ids=st.lists(IDS, max_size=3))


def outcome(value: Any) -> Any:
    """Comparable form: an error's class, or the keys taken with their bits."""
    if isinstance(value, BaseException):
        return type(value)
    if isinstance(value, list):
        return [(k.key_id, bytes(k.material)) for k in value]
    return value


def one_at_a_time(store: KeyStore, op: Op) -> Any:
    try:
        return store.run(op)
    except KmsError as exc:
        return exc


def everything(store: KeyStore) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(store.path)
    rows = db.execute(
        "SELECT k.id, k.kind, b.session, k.run IS NULL FROM keys k JOIN batches b ON seq = batch"
        " ORDER BY 1, 2"
    ).fetchall()
    db.close()
    return rows


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(PUTS, TAKES, OLDEST, RELEASES), min_size=1, max_size=16))
def test_grouped_outcomes_equal_those_of_one_call_at_a_time(ops):
    with tempfile.TemporaryDirectory() as tmp:
        grouped, single = new_store(Path(tmp) / "g.db", 4), new_store(Path(tmp) / "s.db", 4)
        single.run_id = grouped.run_id

        async def main() -> list[Any]:
            c = GroupCommitter(grouped)
            try:
                return await queued_together(c, ops)
            finally:
                c.close()

        got = asyncio.run(main())
        expected = [one_at_a_time(single, op) for op in ops]
        assert [outcome(g) for g in got] == [outcome(e) for e in expected]
        assert everything(grouped) == everything(single)
        grouped.close()
        single.close()


# -- which groups reach the disk before their callers hear of them -------------------------
def _synchronous(store: KeyStore) -> int:
    """The connection's setting the last group committed under (2 FULL, 1 NORMAL)."""
    with store.transaction(write=False, fsync=store._fsync) as db:
        value: int = db.execute("PRAGMA synchronous").fetchone()[0]
    return value


def test_a_group_of_slave_takes_and_releases_commits_without_fsync(store: KeyStore) -> None:
    assert commit_group(store, [put(A, "k1", "k2")]) == [2]
    assert _synchronous(store) == 2
    taken = commit_group(store, [Take(session=A, key_ids=["k1"])])
    assert [k.key_id for k in taken[0]] == ["k1"]  # type: ignore[union-attr]
    assert _synchronous(store) == 1
    assert commit_group(store, [Release(session=A, key_ids=["k1"])]) == [1]
    assert _synchronous(store) == 1


@pytest.mark.parametrize(
    "durable",
    [put(B, "s1"), TakeOldest(session=A, kind="ksa", n=1)],
    ids=["put", "oldest-take"],
)
def test_any_durable_operation_makes_its_group_fsync(store: KeyStore, durable: Op) -> None:
    assert commit_group(store, [put(A, "k1", "k2")]) == [2]
    commit_group(store, [Take(session=A, key_ids=["k1"])])
    assert _synchronous(store) == 1
    results = commit_group(store, [Release(session=A, key_ids=["k1"]), durable])
    assert not any(isinstance(r, KmsError) for r in results)
    assert _synchronous(store) == 2


# -- workers shared by several stores ------------------------------------------------------


def test_shared_workers_serve_many_stores_with_their_threads_only(tmp_path, monkeypatch):
    """Eight stores, two workers: every operation runs, in one thread of the two, and the
    groups of one store never run at the same time."""
    stores = [new_store(tmp_path / f"keys-{i}.db") for i in range(8)]
    workers = CommitWorkers(2)
    running: dict[int, int] = {}
    overlapped: list[int] = []
    threads: set[int] = set()
    commit = groupcommit.commit_group

    def watched(store: KeyStore, ops: list[Op]) -> list[Any]:
        i = stores.index(store)
        running[i] = running.get(i, 0) + 1
        if running[i] > 1:
            overlapped.append(i)
        threads.add(threading.get_ident())
        try:
            return commit(store, ops)
        finally:
            running[i] -= 1

    monkeypatch.setattr(groupcommit, "commit_group", watched)

    async def main() -> list[Any]:
        committers = [GroupCommitter(s, workers=workers) for s in stores]
        got = await asyncio.gather(
            *(c.submit(put(A, f"k{n}")) for n in range(50) for c in committers)
        )
        for c in committers:
            c.close()
        return got

    assert asyncio.run(main()) == [1] * 400
    workers.close()
    assert overlapped == [] and 1 <= len(threads) <= 2
    assert all(s.count(A, "ksa") == 50 for s in stores)
    for s in stores:
        s.close()


def test_shared_workers_serve_ready_stores_in_turn(tmp_path, monkeypatch):
    """One worker, a store with two groups' worth queued and another with one operation:
    the second store's group runs between the first's two (first ready, first served; the
    first goes to the back with what it has left)."""
    stores = [new_store(tmp_path / f"keys-{i}.db") for i in range(2)]
    workers = CommitWorkers(1)
    order: list[tuple[int, int]] = []
    commit = groupcommit.commit_group

    def recorded(store: KeyStore, ops: list[Op]) -> list[Any]:
        order.append((stores.index(store), len(ops)))
        return commit(store, ops)

    monkeypatch.setattr(groupcommit, "commit_group", recorded)
    many = GroupCommitter.MAX_GROUP + 10

    async def main() -> None:
        first, second = (GroupCommitter(s, workers=workers) for s in stores)
        with workers.lock:  # the worker takes nothing before all are queued
            tasks = [asyncio.ensure_future(first.submit(put(A, f"k{n}"))) for n in range(many)]
            tasks.append(asyncio.ensure_future(second.submit(put(B, "b"))))
            await asyncio.sleep(0)
        assert await asyncio.gather(*tasks) == [1] * (many + 1)
        first.close()
        second.close()

    asyncio.run(main())
    workers.close()
    assert order == [(0, GroupCommitter.MAX_GROUP), (1, 1), (0, 10)]
    for s in stores:
        s.close()


def test_a_store_on_closed_workers_refuses_operations(store):
    workers = CommitWorkers(1)
    c = GroupCommitter(store, workers=workers)
    workers.close()
    with pytest.raises(StoreError, match="closed"):
        c.queue(Release(session=A, key_ids=["k0"]))
    with pytest.raises(StoreError, match="1 to 64"):
        CommitWorkers(0)
