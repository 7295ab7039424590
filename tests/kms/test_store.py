"""Key store files: sessions and kinds, pending takes, expiry, capacity, sealing, errors."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    NodeKeyMissing,
    StoreBusy,
    StoreCorrupt,
    StoreDiskFull,
    StoreError,
    StoreFull,
    StoreKeyMismatch,
)
from appliance.kms.store import REFETCH_WINDOW, KeyStore, NodeKey
from appliance.kms.storeops import Restore

CANARY = bytes.fromhex("5eed" * 16)
NODE_KEY = NodeKey(bytes(range(32)))
S = "014:sae-1:sae-2"
OTHER = "014:sae-3:sae-2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def open_store(path: Path, clock: Clock, run_id: str = "run-1", **options: float) -> KeyStore:
    return KeyStore(path, "keys-0", NODE_KEY, clock=clock, run_id=run_id, **options)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> KeyStore:
    return open_store(tmp_path / "keys.db", clock, capacity=100, ttl=60.0)


def keys(n: int, prefix: str = "k") -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i}", bytes([i % 256]) * 32) for i in range(n)]


def bits(taken: list) -> list[tuple[str, bytes]]:
    return [(k.key_id, bytes(k.material)) for k in taken]


def rewrite(path: Path, sql: str, *params: object) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute(sql, params)
    db.close()


# -- sessions and kinds --------------------------------------------------------------------


def test_keys_are_counted_and_taken_per_session_and_kind(store):
    store.put_many(S, keys(3))
    store.put_many(OTHER, keys(2, "o"))
    store.put_many(S, keys(4, "s"), kind="stock")
    assert store.count(S, "ksa") == 3 and store.count(OTHER, "ksa") == 2
    assert store.count(S, "stock") == 4 and store.count(OTHER, "stock") == 0
    assert store.levels("ksa") == {S: 3, OTHER: 2} and store.levels("stock") == {S: 4}
    with pytest.raises(KeyUnavailable):
        store.take_many(OTHER, ["k0"])  # another session's key
    with pytest.raises(KeyUnavailable):
        store.take_many(S, ["s0"])  # a stock key is not a KSA copy
    assert bits(store.take_oldest(S, "stock", 2)) == [("s0", bytes(32)), ("s1", bytes([1]) * 32)]
    assert store.take_oldest(OTHER, "stock", 5) == []


def test_the_same_key_id_may_be_stored_once_per_kind(store):
    store.put_many(S, [("k", CANARY)])
    store.put_many(S, [("k", CANARY)], kind="stock")  # a pair served at one UKMS
    with pytest.raises(StoreError, match="already stored") as caught:
        store.put_many(OTHER, [("x", CANARY), ("k", CANARY)])
    assert type(caught.value) is StoreError and store.count(OTHER, "ksa") == 0


@pytest.mark.parametrize(
    ("session", "kind"),
    [("", "ksa"), ("a b", "ksa"), ("x" * 257, "ksa"), (S, "KSA"), (S, ""), (S, "a\0b")],
)
def test_bad_sessions_and_kinds_are_refused(store, session, kind):
    with pytest.raises(StoreError):
        store.put_many(session, keys(1), kind=kind)


# -- pending takes (issue 13, item 10) ------------------------------------------------------


def test_a_take_is_pending_until_released_and_then_gone(store):
    store.put_many(S, keys(3))
    assert bits(store.take_many(S, ["k1"])) == [("k1", bytes([1]) * 32)]
    assert store.count(S, "ksa") == 2  # pending keys are not available
    with pytest.raises(KeyUnavailable) as caught:
        store.take_many(S, ["k1"])  # the same run twice
    assert caught.value.missing == ["k1"]
    assert store.release(["k1", "k0", "nope"]) == 1  # only what this run holds pending
    with pytest.raises(KeyUnavailable):
        store.take_many(S, ["k1"])
    assert sorted(k.key_id for k in store.take_oldest(S, "ksa", 9)) == ["k0", "k2"]


def test_a_crash_between_take_and_release_loses_no_key(tmp_path, clock):
    """Take, "crash" (no release), reopen as a new run: the same session gets the same
    bits under the same IDs; nobody else; after the window, nobody."""
    path = tmp_path / "keys.db"
    first = open_store(path, clock, "run-1")
    first.put_many(S, [("a", CANARY), ("b", CANARY[::-1])])
    assert bits(first.take_many(S, ["a", "b"])) == [("a", CANARY), ("b", CANARY[::-1])]
    first.close()  # the crash: no release
    clock.now += REFETCH_WINDOW - 1
    second = open_store(path, clock, "run-2")
    with pytest.raises(KeyUnavailable) as caught:
        second.take_many(OTHER, ["a"])  # a third party
    assert caught.value.missing == ["a"]
    assert second.count(S, "ksa") == 0 and second.take_oldest(S, "ksa", 5) == []
    assert bits(second.take_many(S, ["b", "a"])) == [("b", CANARY[::-1]), ("a", CANARY)]
    with pytest.raises(KeyUnavailable):
        second.take_many(S, ["a"])  # now pending under run-2
    assert second.release(["a"]) == 1
    second.close()
    clock.now += 1  # the window since the first take is over: a take again did not extend it
    third = open_store(path, clock, "run-3")
    with pytest.raises(KeyUnavailable) as caught:
        third.take_many(S, ["b"])
    assert caught.value.missing == ["b"]
    assert third.purge_expired() == 1
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM keys").fetchone()[0] == 0


def test_a_restore_after_a_purge_counts_the_keys_again(store):
    """A purge drops the tally row of a session whose keys are all pending; restoring
    them must count them again (found by the store-model test, tests/kms/test_sim_models.py)."""
    store.put_many(S, [("k0", CANARY)])
    store.take_many(S, ["k0"])
    assert store.purge_expired() == 0
    assert store.run(Restore(session=S, key_ids=["k0"])) == 1
    assert store.count(S, "ksa") == 1 and store.levels("ksa") == {S: 1}


def pending_rows(path: Path) -> tuple[int, int]:
    """Batches pending as a whole, and key rows pending on their own."""
    db = sqlite3.connect(path)
    batches = db.execute("SELECT COUNT(*) FROM batches WHERE run IS NOT NULL").fetchone()[0]
    rows = db.execute("SELECT COUNT(*) FROM keys WHERE run IS NOT NULL").fetchone()[0]
    db.close()
    return batches, rows


def test_a_take_of_a_whole_batch_marks_the_batch_and_its_release_deletes_it(store):
    """The usual dec_keys (every key of one delivery) writes one batch row, not a row per
    key, and keeps the same promises: pending until released, refused twice in a run."""
    store.put_many(S, keys(5))
    store.put_many(S, keys(2, "x"))
    assert bits(store.take_many(S, ["k3", "k0", "k4", "k1", "k2"])) == [
        (f"k{i}", bytes([i]) * 32) for i in (3, 0, 4, 1, 2)
    ]
    assert pending_rows(store.path) == (1, 0)
    assert store.count(S, "ksa") == 2 and store.levels("ksa") == {S: 2}
    with pytest.raises(KeyUnavailable) as caught:
        store.take_many(S, ["k0", "k1", "k2", "k3", "k4"])
    assert caught.value.held == ["k0", "k1", "k2", "k3", "k4"]
    assert [k.key_id for k in store.take_oldest(S, "ksa", 1)] == ["x0"]  # pending: skipped
    assert store.release(["k4", "k3", "k2", "k1", "k0", "x1"]) == 5  # x1 is not pending
    assert pending_rows(store.path) == (0, 0)
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM keys").fetchone()[0] == 1  # x1
    assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 1


def test_part_of_a_pending_batch_is_taken_again_released_or_restored_key_by_key(tmp_path, clock):
    """After a crash the slave may take again some of a batch taken whole; a restore or a
    release may name some of it: the rest stays pending, from the first take's time."""
    path = tmp_path / "keys.db"
    first = open_store(path, clock, "run-1")
    first.put_many(S, keys(4))
    first.take_many(S, ["k0", "k1", "k2", "k3"])
    first.close()
    clock.now += 10
    second = open_store(path, clock, "run-2")
    assert bits(second.take_many(S, ["k2"])) == [("k2", bytes([2]) * 32)]
    assert pending_rows(path) == (0, 4)
    assert second.take_many(S, ["k0", "k1"])[1].key_id == "k1"
    assert second.run(Restore(session=S, key_ids=["k1"])) == 1
    assert second.count(S, "ksa") == 1
    assert second.release(["k0", "k2"]) == 2
    clock.now += REFETCH_WINDOW - 10  # k3: pending under run-1 since the first take
    with pytest.raises(KeyUnavailable) as caught:
        second.take_many(S, ["k3"])
    assert caught.value.held == ["k3"]
    assert second.purge_expired() == 1 and second.count(S, "ksa") == 1


def test_a_whole_batch_restored_or_left_pending_past_the_window(tmp_path, clock):
    store = open_store(tmp_path / "keys.db", clock, ttl=2 * REFETCH_WINDOW)
    store.put_many(S, keys(3))
    store.take_many(S, ["k0", "k1", "k2"])
    assert store.run(Restore(session=S, key_ids=["k2", "k1", "k0"])) == 3
    assert store.count(S, "ksa") == 3 and pending_rows(store.path) == (0, 0)
    store.take_many(S, ["k2", "k1", "k0"])
    assert store.run(Restore(session=S, key_ids=["k1"])) == 1  # the rest stays pending
    assert store.count(S, "ksa") == 1 and pending_rows(store.path) == (0, 2)
    store.put_many(S, keys(2, "y"))
    store.take_many(S, ["y0", "y1"])
    assert store.purge_expired() == 0
    clock.now += REFETCH_WINDOW
    assert store.purge_expired() == 4  # k0, k2 and the batch y
    assert bits(store.take_many(S, ["k1"])) == [("k1", bytes([1]) * 32)]


def test_a_store_of_layout_3_is_upgraded_and_keeps_its_keys(tmp_path, clock):
    path = tmp_path / "keys.db"
    open_store(path, clock).put_many(S, keys(2))
    db = sqlite3.connect(path)
    with db:
        db.execute("DROP INDEX batches_pending")
        db.execute("ALTER TABLE batches DROP COLUMN run")
        db.execute("ALTER TABLE batches DROP COLUMN taken_at")
        db.execute("PRAGMA user_version = 3")
    db.close()
    again = open_store(path, clock)
    assert bits(again.take_many(S, ["k1", "k0"])) == [("k1", bytes([1]) * 32), ("k0", bytes(32))]
    assert pending_rows(path) == (1, 0) and again.release(["k0", "k1"]) == 2


def test_concurrent_takes_of_one_id_have_exactly_one_winner(store):
    store.put_many(S, keys(40))
    winners: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(2)

    def taker(me: int) -> None:
        start.wait()
        for i in range(40):
            try:
                [key] = store.take_many(S, [f"k{i}"])
            except KeyUnavailable:
                continue
            with lock:
                assert key.key_id not in winners, "a key was taken twice"
                winners[key.key_id] = me

    threads = [threading.Thread(target=taker, args=(me,)) for me in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(winners) == sorted(f"k{i}" for i in range(40))


def test_take_many_is_all_or_none_and_names_what_is_missing(store):
    store.put_many(S, [("k0", CANARY), ("k1", CANARY)])
    with pytest.raises(KeyUnavailable) as caught:
        store.take_many(S, ["k0", "nope", "k1", "gone"])
    assert caught.value.missing == ["nope", "gone"] and caught.value.code == "KMS-NO-KEY"
    assert CANARY.hex() not in str(caught.value) and "k0" not in str(caught.value)
    assert store.count(S, "ksa") == 2
    assert [k.key_id for k in store.take_many(S, ["k1", "k0"])] == ["k1", "k0"]
    with pytest.raises(KeyUnavailable) as caught:
        store.take_many(S, ["a", "a"])
    assert caught.value.missing == ["a"]


def test_a_refused_take_says_which_keys_are_held_for_the_session(store, clock):
    """``held``: keys of the asking session that cannot be taken now (expired, or pending
    under this run); keys of another session look exactly like keys never stored."""
    store.put_many(S, [("old", CANARY)], ttl=1.0)
    store.put_many(S, [("busy", CANARY), ("free", CANARY)])
    store.put_many(OTHER, [("theirs", CANARY)])
    store.take_many(S, ["busy"])
    clock.now += 2
    with pytest.raises(KeyUnavailable) as caught:
        store.take_many(S, ["free", "theirs", "old", "never", "busy"])
    assert caught.value.missing == ["theirs", "old", "never", "busy"]
    assert caught.value.held == ["old", "busy"]


# -- oldest takes, capacity, expiry ----------------------------------------------------------


def test_take_oldest_is_fifo_up_to_n_and_skips_pending_keys(store):
    store.put_many(S, keys(2, "a"), kind="stock")
    store.put_many(S, keys(3, "b"), kind="stock")
    store.take_many(S, ["a1"], kind="stock")
    assert [k.key_id for k in store.take_oldest(S, "stock", 3)] == ["a0", "b0", "b1"]
    assert [k.key_id for k in store.take_oldest(S, "stock", 5)] == ["b2"]
    assert store.count(S, "stock") == 0
    assert store.release(["a1"]) == 1
    assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0


def test_capacity_is_all_or_none(store):
    store.put_many(S, keys(90))
    store.take_many(S, ["k0"])  # pending keys still take room
    with pytest.raises(StoreFull):
        store.put_many(OTHER, keys(11, "x"))
    assert store.count(OTHER, "ksa") == 0
    store.put_many(OTHER, keys(10, "x"))


def test_expired_keys_are_deleted_not_returned(store, clock):
    store.put_many(S, keys(3))
    store.put_many(S, [("late", CANARY)], ttl=500.0)
    store.take_many(S, ["k2"])
    clock.now += 61
    with pytest.raises(KeyUnavailable):
        store.take_many(S, ["k0"])
    assert store.count(S, "ksa") == 1 and store.levels("ksa") == {S: 1}
    assert [k.key_id for k in store.take_oldest(S, "ksa", 5)] == ["late"]
    assert store.purge_expired() == 3  # two available and one pending
    assert store.levels("ksa") == {} and store.count(S, "ksa") == 0


def test_levels_hold_with_only_pending_keys_left_to_expire(store, clock):
    store.put_many(S, keys(1))
    store.take_many(S, ["k0"])
    assert store.purge_expired() == 0  # pending, within the window; the session's tally is 0
    clock.now += 61
    assert store.levels("ksa") == {} and store.count(S, "ksa") == 0


def test_keys_survive_a_reopen(tmp_path, clock):
    path = tmp_path / "s.db"
    open_store(path, clock).put_many(S, keys(4))
    again = open_store(path, clock)
    assert again.count(S, "ksa") == 4 and bits(again.take_many(S, ["k3"])) == [
        ("k3", bytes([3]) * 32)
    ]


# -- sealing ---------------------------------------------------------------------------------


def test_records_hold_no_key_bits_in_clear(store, tmp_path):
    store.put_many(S, [("canary", CANARY)])
    store.checkpoint()
    for f in tmp_path.iterdir():
        assert CANARY not in f.read_bytes(), f"plaintext key in {f.name}"


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE keys SET id = 'moved' WHERE id = 'canary'",  # another ID
        f"UPDATE batches SET session = '{OTHER}'",  # another session
        "UPDATE batches SET kind = 'stock'; UPDATE keys SET kind = 'stock'",  # another kind
        "UPDATE batches SET tag = 'x' || tag",  # another batch
    ],
)
def test_a_record_moved_elsewhere_fails_to_open_and_nothing_is_taken(store, sql):
    store.put_many(S, [("canary", CANARY)])
    db = sqlite3.connect(store.path)
    with db:
        for statement in sql.split(";"):
            db.execute(statement)
    session = OTHER if "session" in sql else S
    key_id = "moved" if "moved" in sql else "canary"
    with pytest.raises(IntegrityFailure):
        if "stock" in sql:
            store.take_oldest(session, "stock", 1)
        else:
            store.take_many(session, [key_id])
    left = db.execute("SELECT COUNT(*) FROM keys WHERE run IS NULL").fetchone()[0]
    assert left == 1


def test_a_flipped_bit_in_a_record_fails_to_open(store):
    store.put_many(S, [("canary", CANARY)])
    record = bytearray(
        sqlite3.connect(store.path).execute("SELECT record FROM batches").fetchone()[0]
    )
    record[5] ^= 1
    rewrite(store.path, "UPDATE batches SET record = ?", bytes(record))
    with pytest.raises(IntegrityFailure):
        store.take_many(S, ["canary"])
    assert store.count(S, "ksa") == 1


def test_a_store_sealed_under_another_key_is_refused_at_open(tmp_path, clock):
    path = tmp_path / "s.db"
    open_store(path, clock).put_many(S, keys(1))
    with pytest.raises(StoreKeyMismatch) as caught:
        KeyStore(path, "keys-0", NodeKey(bytes([1]) * 32))
    assert caught.value.code == "KMS-STORE-KEY"
    with pytest.raises(StoreKeyMismatch):
        KeyStore(path, "keys-1", NODE_KEY)  # the store name is bound too


def test_a_file_that_is_not_a_database_is_corrupt(tmp_path):
    path = tmp_path / "s.db"
    path.write_bytes(b"not a database at all" * 300)
    with pytest.raises(StoreCorrupt) as caught:
        KeyStore(path, "keys-0", NODE_KEY)
    assert caught.value.code == "KMS-STORE-CORRUPT"


def test_release_reseals_the_rest_under_a_fresh_tag_and_zeroes_the_old(store):
    store.put_many(S, keys(3))
    db = sqlite3.connect(store.path)
    before = db.execute("SELECT tag, record FROM batches").fetchone()
    store.take_many(S, ["k1"])
    assert db.execute("SELECT tag, record FROM batches").fetchone() == before  # bits kept
    store.release(["k1"])
    after = db.execute("SELECT tag, left, record FROM batches").fetchone()
    assert after[0] != before[0] and after[1] == 2 and after[2] != before[1]
    store.checkpoint()
    assert before[1] not in store.path.read_bytes()
    wal = store.path.with_name(store.path.name + "-wal")
    assert not wal.exists() or before[1] not in wal.read_bytes()
    assert bits(store.take_many(S, ["k2", "k0"])) == [("k2", bytes([2]) * 32), ("k0", bytes(32))]
    store.release(["k2", "k0"])
    assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0


def test_a_key_row_pointing_elsewhere_fails_and_takes_nothing(store):
    store.put_many(S, keys(2))
    rewrite(store.path, "UPDATE keys SET slot = 1 WHERE id = 'k0'")
    with pytest.raises(IntegrityFailure):
        store.take_many(S, ["k0"])
    with pytest.raises(IntegrityFailure):
        store.take_oldest(S, "ksa", 1)  # the oldest key's row names the other slot
    assert store.count(S, "ksa") == 2
    assert bits(store.take_many(S, ["k1"])) == [("k1", bytes([1]) * 32)]


def test_a_taken_key_prints_without_its_bits(store):
    store.put_many(S, [("canary", CANARY)])
    [taken] = store.take_many(S, ["canary"])
    assert CANARY.hex() not in repr(taken) and "canary" in repr(taken)
    assert repr(bytes(CANARY)) not in repr(taken) and repr(taken) == str(taken)
    rich = dict(taken.__rich_repr__())  # what rich (and so pretty tracebacks) would print
    assert rich == {"key_id": "canary", "bits": "<redacted>"}


def test_the_connection_keeps_journals_in_memory_and_erases_deleted_cells(store):
    """WAL with an fsync per commit, deleted cells overwritten, and the statement journals
    of the group commit's savepoints in memory (on disk they went through a temporary file
    in /var/tmp per transaction: 1.7 times the writes per stocked key served)."""
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert db.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY


# -- SQLite's errors, coded ------------------------------------------------------------------


def test_a_full_disk_is_a_coded_error_and_stores_nothing(store):
    store._db.execute("PRAGMA max_page_count = 12")
    with pytest.raises(StoreDiskFull, match="full") as caught:
        store.put_many(S, [(f"z{i}", bytes(4000)) for i in range(50)])
    assert caught.value.code == "KMS-STORE-FULL-DISK"
    assert store.count(S, "ksa") == 0


def test_a_busy_database_is_a_coded_error(tmp_path):
    path = tmp_path / "busy.db"
    first = KeyStore(path, "busy", NODE_KEY)
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    first._db.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(StoreBusy, match="locked"):
        first.put_many(S, [("a", CANARY)])
    blocker.rollback()
    first.put_many(S, [("a", CANARY)])


def test_a_closed_store_refuses_with_a_plain_store_error(store):
    store.close()
    with pytest.raises(StoreError, match="closed") as caught:
        store.count(S, "ksa")
    assert type(caught.value) is StoreError


# -- files, modes and the node key (issue 13, items 6 and 9) ----------------------------------


def test_store_files_are_0600(tmp_path, clock):
    old = tmp_path / "old.db"
    old.touch(mode=0o644)
    os.chmod(old, 0o644)
    reopened = open_store(old, clock)  # held: a store left to the GC closes, and SQLite
    reopened.put_many(S, keys(1))  # then removes its -wal and -shm, whenever a collection runs
    fresh = open_store(tmp_path / "new.db", clock)
    fresh.put_many(S, keys(1))
    files = [p for p in tmp_path.iterdir() if p.name.endswith((".db", "-wal", "-shm"))]
    assert len(files) == 6
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name


def test_node_key_file_is_created_once_0600_in_a_0700_directory(tmp_path):
    path = tmp_path / "data" / "node.key"
    made = NodeKey.from_file(path, create_with=lambda n: bytes(range(n)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = NodeKey.from_file(path, create_with=lambda n: bytes(n))  # not made again
    assert again.open(b"a", made.seal(b"a", CANARY)) == CANARY
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]
    with pytest.raises(StoreError, match="not found"):
        NodeKey.from_file(tmp_path / "absent.key")
    (tmp_path / "bad.key").write_text("zz")
    with pytest.raises(StoreError, match="unreadable"):
        NodeKey.from_file(tmp_path / "bad.key")


def test_a_missing_node_key_beside_existing_stores_is_refused(tmp_path):
    """Issue 13, item 6: no silent new key that cannot open the stores."""
    path = tmp_path / "node.key"
    key = NodeKey.from_file(path, create_with=os.urandom)
    KeyStore(tmp_path / "keys-0.db", "keys-0", key).put_many(S, keys(1))
    path.unlink()
    with pytest.raises(NodeKeyMissing) as caught:
        NodeKey.from_file(path, create_with=os.urandom)
    assert caught.value.code == "KMS-NODE-KEY-MISSING" and str(path) in str(caught.value)
    assert not path.exists()
