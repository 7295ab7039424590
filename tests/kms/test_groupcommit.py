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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kms import groupcommit
from appliance.kms.errors import KeyUnavailable, KmsError, StoreError, StoreFull
from appliance.kms.groupcommit import GroupCommitter, Put, Take, commit_group
from appliance.kms.store import KeyStore, NodeKey, StoredKey

NODE_KEY = NodeKey(bytes(range(32)))


def material(key_id: str) -> bytes:
    return hashlib.sha256(key_id.encode()).digest()


def new_store(path: Path, capacity: int = 10_000) -> KeyStore:
    return KeyStore(path, "ksa/a/b", NODE_KEY, capacity=capacity, clock=lambda: 1000.0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    s = new_store(tmp_path / "ksa.db")
    yield s
    s.close()


@contextmanager
def held(store: KeyStore) -> Iterator[None]:
    """Keep the worker waiting at the store lock while operations queue up."""
    store._lock.acquire()
    try:
        yield
    finally:
        store._lock.release()


async def submit(committer: GroupCommitter, request: Put | Take) -> Any:
    if isinstance(request, Put):
        return await committer.put_many(request.keys, meta=request.meta)
    return await committer.take_many(request.key_ids)


async def queued_together(committer: GroupCommitter, requests: list[Put | Take]) -> list[Any]:
    """Submit in order while the worker waits; outcomes (results or exceptions) in order."""
    with held(committer.store):
        tasks = [asyncio.ensure_future(submit(committer, r)) for r in requests]
        await asyncio.sleep(0)  # each task runs up to its await: its operation is queued
    return await asyncio.gather(*tasks, return_exceptions=True)


def remaining(store: KeyStore) -> list[str]:
    return sorted(k.key_id for k in store.take_up_to(100_000))


# -- concurrency ------------------------------------------------------------------------


def test_two_hundred_callers_take_each_key_once_all_or_none(store):
    """Each task stores its key, then takes it with its neighbour's: the pairs compete."""
    ids = [f"k{i:03d}" for i in range(200)]

    async def caller(c: GroupCommitter, i: int) -> list[StoredKey] | KmsError:
        await c.put_many([(ids[i], material(ids[i]))])
        try:
            return await c.take_many([ids[i], ids[(i + 1) % 200]])
        except KeyUnavailable as exc:
            return exc

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
    assert committer.ops == 400 and committer.commits < 400


def test_a_group_of_n_operations_commits_fewer_than_n_times(store):
    async def main() -> GroupCommitter:
        c = GroupCommitter(store)
        got = await queued_together(
            c, [Put(keys=[(f"k{i}", material(f"k{i}"))]) for i in range(50)]
        )
        assert got == [1] * 50
        c.close()
        return c

    committer = asyncio.run(main())
    assert committer.ops == 50 and committer.commits <= 2  # what the worker held, the rest
    assert store.count() == 50


# -- failures stay with their operation --------------------------------------------------


def test_a_failing_operation_leaves_the_rest_of_its_group_alone(tmp_path):
    store = new_store(tmp_path / "small.db", capacity=5)
    store.put_many([(k, material(k)) for k in ("a", "b", "c")])
    requests: list[Put | Take] = [
        Take(key_ids=["a"]),
        Take(key_ids=["b", "missing"]),  # all or none: b stays
        Put(keys=[("d", material("d"))]),
        Put(keys=[(f"x{i}", bytes(32)) for i in range(3)]),  # 3 + 3 > 5
        Put(keys=[("c", bytes(32))]),  # c is already stored
        Take(key_ids=["c", "d"]),  # sees d, put by this group
        Take(key_ids=["a"]),  # taken above
    ]
    out = commit_group(store, requests)
    assert [k.key_id for k in out[0]] == ["a"]
    assert isinstance(out[1], KeyUnavailable) and isinstance(out[3], StoreFull)
    assert out[2] == 1 and type(out[4]) is StoreError
    assert [(k.key_id, bytes(k.material)) for k in out[5]] == [(k, material(k)) for k in "cd"]
    assert isinstance(out[6], KeyUnavailable)
    assert remaining(store) == ["b"]


def test_bad_requests_fail_alone_before_the_transaction(store):
    store.put("a", material("a"))
    out = commit_group(store, [Take(key_ids=[]), Take(key_ids=["a", "a"]), Take(key_ids=["a"])])
    assert isinstance(out[0], KeyUnavailable) and isinstance(out[1], KeyUnavailable)
    assert [k.key_id for k in out[2]] == ["a"]


def deny_commit(action: int, arg: str | None, *_: object) -> int:
    if action == sqlite3.SQLITE_TRANSACTION and arg == "COMMIT":
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def test_a_failed_commit_fails_every_operation_of_the_group(store):
    store.put_many([(k, material(k)) for k in ("a", "b")])
    store._db.set_authorizer(deny_commit)

    async def main() -> list[Any]:
        c = GroupCommitter(store)
        try:
            return await queued_together(
                c, [Take(key_ids=["a"]), Put(keys=[("n", bytes(32))]), Take(key_ids=["zz"])]
            )
        finally:
            c.close()

    got = asyncio.run(main())
    assert [type(g) for g in got] == [StoreError] * 3
    store._db.set_authorizer(None)
    assert remaining(store) == ["a", "b"]  # nothing taken, nothing stored


def test_a_busy_database_fails_the_group_cleanly(store):
    store.put("a", material("a"))
    blocker = sqlite3.connect(store.path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    store._db.execute("PRAGMA busy_timeout = 50")
    out = commit_group(store, [Take(key_ids=["a"]), Put(keys=[("b", bytes(32))])])
    assert all(type(o) is StoreError and "locked" in str(o) for o in out)
    blocker.rollback()
    assert remaining(store) == ["a"]


def test_a_full_disk_reports_only_what_was_committed(store):
    store.put("a", material("a"))
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    requests: list[Put | Take] = [
        Put(keys=[("small", bytes(32))]),
        Put(keys=[(f"big{i}", bytes(4000)) for i in range(20)]),
        Take(key_ids=["a"]),
    ]
    out = commit_group(store, requests)
    assert isinstance(out[1], StoreError) and "full" in str(out[1])
    store._db.execute("PRAGMA max_page_count = 1073741823")
    left = remaining(store)
    assert ("small" in left) == (out[0] == 1)  # stored if and only if reported stored
    assert ("a" in left) == isinstance(out[2], Exception)
    assert not any(k.startswith("big") for k in left)


# -- close and cancellation --------------------------------------------------------------


def test_close_runs_the_queued_operations_then_refuses_more(store):
    async def main() -> list[Any]:
        c = GroupCommitter(store)
        with held(store):
            tasks = [asyncio.ensure_future(c.put_many([(f"k{i}", bytes(32))])) for i in range(20)]
            await asyncio.sleep(0)
        c.close()  # blocks until the worker has run them all
        with pytest.raises(StoreError, match="closed"):
            await c.take_many(["k0"])
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [1] * 20
    assert store.count() == 20


async def begun(c: GroupCommitter, ops: int) -> None:
    """Wait until the worker has begun a group holding the ``ops``-th operation (the worker
    is a thread: bounded polling)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while c.ops < ops:
        assert loop.time() < deadline, f"the worker never began operation {ops}"
        await asyncio.sleep(0.001)


def test_a_take_cancelled_before_its_group_is_skipped(store):
    store.put("k", material("k"))

    async def main() -> GroupCommitter:
        c = GroupCommitter(store)
        with held(store):
            first = asyncio.ensure_future(c.put_many([("other", bytes(32))]))
            await begun(c, 1)  # the worker holds `first`, waiting for the lock
            take = asyncio.ensure_future(c.take_many(["k"]))
            await asyncio.sleep(0)
            take.cancel()
        c.close()
        assert await first == 1 and take.cancelled()
        return c

    assert asyncio.run(main()).ops == 1
    assert remaining(store) == ["k", "other"]  # the cancelled take took nothing


def test_a_take_cancelled_after_its_group_began_erases_the_keys(store, monkeypatch):
    """The keys are gone from the store (exactly once); nobody gets them: erased."""
    store.put("k", material("k"))
    erased: list[Any] = []
    erase = groupcommit._erase
    monkeypatch.setattr(groupcommit, "_erase", lambda o: (erase(o), erased.append(o)))

    async def main() -> None:
        c = GroupCommitter(store)
        with held(store):
            take = asyncio.ensure_future(c.take_many(["k"]))
            await begun(c, 1)
            take.cancel()
        c.close()
        await asyncio.sleep(0)  # the worker's result reaches the loop
        assert take.cancelled()

    asyncio.run(main())
    assert store.count() == 0
    [[key]] = erased
    assert key.key_id == "k" and key.material == bytearray(32)


def test_a_result_for_a_closed_loop_is_erased():
    loop = asyncio.new_event_loop()
    op = groupcommit._Op(Take(key_ids=["k"]), loop.create_future(), loop)
    loop.close()
    key = StoredKey("k", bytearray(material("k")))
    groupcommit._deliver(op, [key])
    assert key.material == bytearray(32)


# -- the same outcomes as the synchronous store, one call at a time ---------------------

IDS = st.sampled_from("abcdef")
PUTS = st.builds(
    Put, keys=st.lists(IDS.map(lambda k: (k, material(k))), max_size=3), meta=st.sampled_from("xy")
)
TAKES = st.builds(Take, key_ids=st.lists(IDS, max_size=3))


def outcome(value: Any) -> Any:
    """Comparable form: an error's class, or the keys taken with material and meta."""
    if isinstance(value, BaseException):
        return type(value)
    if isinstance(value, list):
        return [(k.key_id, bytes(k.material), k.meta) for k in value]
    return value


def one_at_a_time(store: KeyStore, request: Put | Take) -> Any:
    try:
        if isinstance(request, Put):
            return store.put_many(request.keys, meta=request.meta)
        return store.take_many(request.key_ids)
    except KmsError as exc:
        return exc


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(PUTS, TAKES), min_size=1, max_size=16))
def test_grouped_outcomes_equal_those_of_one_call_at_a_time(requests):
    with tempfile.TemporaryDirectory() as tmp:
        grouped, single = new_store(Path(tmp) / "g.db", 4), new_store(Path(tmp) / "s.db", 4)

        async def main() -> list[Any]:
            c = GroupCommitter(grouped)
            try:
                return await queued_together(c, requests)
            finally:
                c.close()

        got = asyncio.run(main())
        expected = [one_at_a_time(single, r) for r in requests]
        assert [outcome(g) for g in got] == [outcome(e) for e in expected]
        assert remaining(grouped) == remaining(single)
        grouped.close()
        single.close()
