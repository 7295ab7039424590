"""Key stores: exactly-once take, expiry, capacity, encryption at rest, clean errors."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.kms.errors import IntegrityFailure, KeyExpired, KeyUnavailable, StoreError, StoreFull
from appliance.kms.store import KeyStore, NodeKey

CANARY = bytes.fromhex("5eed" * 16)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> KeyStore:
    return KeyStore(
        tmp_path / "link.db",
        "link-1-2",
        NodeKey(bytes(range(32))),
        capacity=100,
        ttl=60.0,
        clock=clock,
    )


def keys(n: int, prefix: str = "k") -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i}", bytes([i % 256]) * 32) for i in range(n)]


def test_take_is_exactly_once(store):
    store.put_many(keys(3))
    assert bytes(store.take("k1").material) == bytes([1]) * 32
    with pytest.raises(KeyUnavailable):
        store.take("k1")
    assert store.count() == 2


def test_concurrent_takers_of_one_key_get_it_once(store):
    store.put_many(keys(50))
    got: list[str] = []
    lock = threading.Lock()

    def taker() -> None:
        for i in range(50):
            try:
                key = store.take(f"k{i}")
            except KeyUnavailable:
                continue
            with lock:
                got.append(key.key_id)

    threads = [threading.Thread(target=taker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(f"k{i}" for i in range(50))


def test_take_next_is_fifo_and_all_or_none(store):
    store.put_many(keys(5))
    assert [k.key_id for k in store.take_next(2)] == ["k0", "k1"]
    with pytest.raises(KeyUnavailable, match="3 keys in stock, 4 needed"):
        store.take_next(4)
    assert store.count() == 3  # nothing was taken by the refused request


def test_capacity_is_all_or_none(store):
    store.put_many(keys(90))
    with pytest.raises(StoreFull):
        store.put_many(keys(11, "x"))
    assert store.count() == 90
    store.put_many(keys(10, "x"))


def test_expired_keys_are_deleted_not_returned(store, clock):
    store.put_many(keys(3))
    store.put("late", CANARY, ttl=500.0)
    clock.now += 61
    with pytest.raises(KeyExpired):
        store.take("k0")
    assert store.count() == 1
    assert [k.key_id for k in store.take_next(1)] == ["late"]
    store.put_many(keys(2, "y"))
    clock.now += 61
    assert store.purge_expired() == 2


def test_keys_survive_a_reopen(tmp_path, clock):
    path, key = tmp_path / "s.db", NodeKey(bytes(32))
    KeyStore(path, "s", key, clock=clock).put_many(keys(4))
    again = KeyStore(path, "s", key, clock=clock)
    assert again.count() == 4 and bytes(again.take("k3").material) == bytes([3]) * 32


def test_records_are_encrypted_and_bound_to_their_id(store, tmp_path):
    store.put("canary", CANARY)
    store.checkpoint()
    for f in tmp_path.iterdir():
        assert CANARY not in f.read_bytes(), f"plaintext key in {f.name}"
    db = sqlite3.connect(store.path)
    db.execute("UPDATE keys SET id = 'moved' WHERE id = 'canary'")
    db.commit()
    with pytest.raises(IntegrityFailure):
        store.take("moved")
    other = KeyStore(tmp_path / "o.db", "o", NodeKey(bytes(32)))
    other.put("a", CANARY)
    db = sqlite3.connect(other.path)
    db.commit()
    wrong_key = KeyStore(tmp_path / "o.db", "o", NodeKey(bytes([1]) * 32))
    with pytest.raises(IntegrityFailure):
        wrong_key.take("a")


def test_taken_records_are_zeroed_after_checkpoint(store):
    store.put("gone", CANARY)
    sealed = (
        sqlite3.connect(store.path)
        .execute("SELECT record FROM batches JOIN keys ON batch = seq WHERE id = 'gone'")
        .fetchone()[0]
    )
    store.take("gone")
    store.checkpoint()
    assert sealed not in store.path.read_bytes()
    wal = store.path.with_name(store.path.name + "-wal")
    assert not wal.exists() or sealed not in wal.read_bytes()


def test_a_full_disk_is_a_clean_error(store):
    store._db.execute("PRAGMA max_page_count = 3")
    with pytest.raises(StoreError, match="full"):
        store.put_many([(f"z{i}", bytes(4000)) for i in range(50)])
    assert store.count() == 0


def test_a_busy_database_is_a_clean_error(tmp_path):
    path = tmp_path / "busy.db"
    first = KeyStore(path, "busy", NodeKey(bytes(32)))
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    first._db.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(StoreError, match="locked"):
        first.put("a", CANARY)
    blocker.rollback()
    first.put("a", CANARY)


def test_node_key_file_is_created_once_with_0600(tmp_path):
    path = tmp_path / "node.key"
    made = NodeKey.from_file(path, create_with=lambda n: bytes(range(n)))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = NodeKey.from_file(path)
    assert again.open(b"a", made.seal(b"a", CANARY)) == CANARY
    with pytest.raises(StoreError, match="not found"):
        NodeKey.from_file(tmp_path / "absent.key")
    (tmp_path / "bad.key").write_text("zz")
    with pytest.raises(StoreError, match="unreadable"):
        NodeKey.from_file(tmp_path / "bad.key")


def test_a_taken_key_prints_without_its_bits(store):
    store.put("canary", CANARY)
    taken = store.take("canary")
    assert CANARY.hex() not in repr(taken) and "canary" in repr(taken)


def test_take_many_is_all_or_none(store):
    store.put_many(keys(4))
    with pytest.raises(KeyUnavailable):
        store.take_many(["k0", "k1", "nope"])
    assert store.count() == 4
    assert [k.key_id for k in store.take_many(["k2", "k0"])] == ["k2", "k0"]
    assert store.count() == 2


def test_a_stock_lease_hands_out_each_key_once_and_gives_the_rest_back(tmp_path):
    """Keys leased from a stock are gone from the store before anyone gets one; takes
    are served from memory, in order, one transaction per lease; the rest goes back."""
    import asyncio
    import os

    from appliance.kms.stocklease import StockLease

    s = KeyStore(tmp_path / "stock.db", "stock/a/b", NodeKey(os.urandom(32)))
    s.put_many([(f"k{i:03d}", bytes([i]) * 32) for i in range(20)])
    lease = StockLease(s, lease=8)

    async def main() -> list:
        return await asyncio.gather(*(lease.take(n) for n in (3, 4, 2)))

    taken = [k.key_id for batch in asyncio.run(main()) for k in batch]
    assert taken == [f"k{i:03d}" for i in range(9)]
    assert lease.transactions <= 2 and s.count() + len(lease) == 11
    with pytest.raises(KeyUnavailable):
        asyncio.run(lease.take(12))  # more than stock and lease hold together
    assert lease.give_back() == 11  # the failed take leased all that was left
    assert s.count() == 11 and len(lease) == 0
    assert sorted(k.key_id for k in s.take_up_to(100)) == [f"k{i:03d}" for i in range(9, 20)]


# -- the batch layout: keys put together share one sealed record -------------------------


def test_a_partial_take_reseals_the_rest_under_a_fresh_tag(store):
    store.put_many(keys(3))
    db = sqlite3.connect(store.path)
    before = db.execute("SELECT tag, record FROM batches").fetchone()
    assert bytes(store.take("k1").material) == bytes([1]) * 32
    after = db.execute("SELECT tag, left, record FROM batches").fetchone()
    assert after[0] != before[0] and after[1] == 2 and after[2] != before[1]
    assert [bytes(k.material) for k in store.take_many(["k2", "k0"])] == [
        bytes([2]) * 32,
        bytes([0]) * 32,
    ]
    assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0


def test_a_key_row_pointing_elsewhere_fails_and_takes_nothing(store):
    store.put_many(keys(2))
    db = sqlite3.connect(store.path)
    with db:
        db.execute("UPDATE keys SET slot = 1 WHERE id = 'k0'")
    with pytest.raises(IntegrityFailure):
        store.take_many(["k0"])
    with pytest.raises(IntegrityFailure):
        store.take_next(1)  # the oldest key's row names the other slot
    assert store.count() == 2
    assert bytes(store.take("k1").material) == bytes([1]) * 32


def test_oldest_keys_come_first_across_batches(store):
    store.put_many(keys(2, "a"))
    store.put_many(keys(1, "b"))
    store.take("a0")
    assert [k.key_id for k in store.take_next(2)] == ["a1", "b0"]
    assert store.take_up_to(5) == [] and store.count() == 0


def test_a_store_of_the_first_layout_is_upgraded_with_its_keys(tmp_path, clock):
    path, node_key = tmp_path / "old.db", NodeKey(bytes(32))
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE keys (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,"
        " expires REAL NOT NULL, meta TEXT NOT NULL DEFAULT '', record BLOB NOT NULL);"
    )
    for i, expires in enumerate([2000.0, 500.0, 3000.0]):
        record = node_key.seal(f"s\0old{i}".encode(), bytes([i]) * 32)
        db.execute(
            "INSERT INTO keys (id, expires, meta, record) VALUES (?,?,?,?)",
            (f"old{i}", expires, f"m{i}", record),
        )
    db.commit()
    db.close()
    store = KeyStore(path, "s", node_key, clock=clock)
    assert store.count() == 2  # old1 had expired
    taken = store.take_next(2)
    assert [(k.key_id, k.meta, bytes(k.material)) for k in taken] == [
        ("old0", "m0", bytes([0]) * 32),
        ("old2", "m2", bytes([2]) * 32),
    ]
    again = KeyStore(path, "s", node_key, clock=clock)  # already upgraded: opens as is
    assert again.count() == 0
