"""Sharded key stores: bounded files and descriptors, stable placement, quarantine, alarms."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    NodeKeyMissing,
    StoreCorrupt,
    StoreDiskFull,
    StoreError,
)
from appliance.kms.shards import COMMIT_THREADS, MAX_REMEMBERED, ShardedStore, shard_index
from appliance.kms.store import KeyStore, NodeKey
from appliance.kms.storeops import Put, Release, Take

NODE_KEY = NodeKey(bytes(range(32)))
OTHER_KEY = NodeKey(bytes([7]) * 32)
CANARY = bytes.fromhex("5eed" * 16)


class Alarms(list[tuple[str, str]]):
    def __call__(self, code: str, reason: str) -> None:
        self.append((code, reason))


def sessions_in(shard: int, n: int, shards: int = 8) -> list[str]:
    """The first ``n`` sessions ``014:m{i}:s`` that land in ``shard``."""
    found, i = [], 0
    while len(found) < n:
        session = f"014:m{i}:s"
        if shard_index(session, shards) == shard:
            found.append(session)
        i += 1
    return found


def open_shards(
    directory: Path, alarms: Alarms, key: NodeKey = NODE_KEY, **kw: Any
) -> ShardedStore:
    return ShardedStore(directory, key, alarm=alarms, **kw)


def fill(store: ShardedStore, sessions: list[str]) -> None:
    for session in sessions:
        store.run(Put(session=session, keys=[(f"{session}/k", CANARY)]))


def descriptors_in(directory: Path) -> int:
    """Open descriptors of this process on files in ``directory``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(f"{directory}/")
    return count


# -- placement, files, modes ----------------------------------------------------------------


def test_a_session_lands_in_the_same_shard_in_every_process():
    sessions = [f"014:sae-{i}:sae-{i + 1}" for i in range(50)]
    here = [shard_index(s, 8) for s in sessions]
    code = (
        "import sys; from appliance.kms.shards import shard_index; "
        "print([shard_index(f'014:sae-{i}:sae-{i + 1}', 8) for i in range(50)])"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == str(here)
    assert len(set(here)) == 8


def test_ten_thousand_sessions_spread_evenly():
    counts = Counter(shard_index(f"014:master-{i}:slave-{i}", 8) for i in range(10_000))
    assert sorted(counts) == list(range(8))
    assert all(1_100 <= n <= 1_400 for n in counts.values()), counts


def test_a_store_remembers_shards_within_its_bound_and_always_answers_the_hash(tmp_path):
    store = open_shards(tmp_path / "keys", Alarms())
    try:
        sessions = [f"014:m{i}:s" for i in range(MAX_REMEMBERED + 10)]
        for _ in range(2):  # the second pass: answered from memory, then past the bound
            assert [store.shard_of(s) for s in sessions] == [shard_index(s, 8) for s in sessions]
            assert len(store._shard_of) <= MAX_REMEMBERED
    finally:
        store.close()


def test_keys_are_found_again_after_a_reopen(tmp_path):
    alarms = Alarms()
    store = open_shards(tmp_path, alarms)
    sessions = [f"014:m{i}:s" for i in range(40)]
    fill(store, sessions)
    store.close()
    again = open_shards(tmp_path, alarms)
    assert again.levels("ksa") == {s: 1 for s in sessions}
    assert all(again.count(s, "ksa") == 1 for s in sessions)
    again.close()
    assert alarms == []


def test_shard_files_are_0600_in_a_0700_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    store = open_shards(data, Alarms())
    fill(store, [f"014:m{i}:s" for i in range(20)])
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = sorted(p.name for p in data.iterdir())
    assert files == sorted(f"keys-{i}.db{x}" for i in range(8) for x in ("", "-wal", "-shm"))
    for f in data.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
    store.close()


def test_ten_thousand_sessions_cost_three_descriptors_per_shard_and_share_commits(tmp_path):
    """Issue 12, scale with users: 10,000 sessions put, take and release through group
    commit; the process holds at most 3 descriptors per shard on the store files."""
    store = open_shards(tmp_path, Alarms())
    sessions = [f"014:master-{i}:slave-{i}" for i in range(10_000)]

    async def main() -> int:
        puts = [Put(session=s, keys=[(f"id-{i}", CANARY)]) for i, s in enumerate(sessions)]
        assert await asyncio.gather(*(store.submit(p) for p in puts)) == [1] * len(puts)
        taken = await asyncio.gather(
            *(store.submit(Take(session=s, key_ids=[f"id-{i}"])) for i, s in enumerate(sessions))
        )
        assert all(bytes(k.material) == CANARY for got in taken for k in got)  # type: ignore[union-attr]
        for i, s in enumerate(sessions):
            store.queue(Release(session=s, key_ids=[f"id-{i}"]))
        return descriptors_in(tmp_path)

    peak = asyncio.run(main())
    committers = list(store._committers.values())
    assert peak <= 3 * store.shards, f"{peak} descriptors for {store.shards} shards"
    store.close()  # runs the queued releases
    ops = sum(c.ops for c in committers)
    commits = sum(c.commits for c in committers)
    assert ops == 30_000 and commits <= ops / 20, f"{commits} commits for {ops} operations"
    assert len(store._workers._workers) <= COMMIT_THREADS  # 8 shards, 2 commit threads
    again = open_shards(tmp_path, Alarms())
    assert again.levels("ksa") == {}
    assert all(
        KeyStore(tmp_path / f"keys-{i}.db", f"keys-{i}", NODE_KEY).purge_expired() == 0
        for i in range(8)
    )  # nothing left pending either
    again.close()


# -- pending takes through the shards -------------------------------------------------------


def test_a_pending_take_survives_a_restart_for_its_session_only(tmp_path):
    first = open_shards(tmp_path, Alarms(), run_id="run-1")
    first.run(Put(session="014:a:b", keys=[("k", CANARY)]))
    [key] = first.run(Take(session="014:a:b", key_ids=["k"]))  # type: ignore[misc]
    first.close()  # no release: the reply may not have reached the SAE
    second = open_shards(tmp_path, Alarms(), run_id="run-2")
    with pytest.raises(KeyUnavailable):
        second.run(Take(session="014:x:b", key_ids=["k"]))
    [again] = second.run(Take(session="014:a:b", key_ids=["k"]))  # type: ignore[misc]
    assert (
        (again.key_id, bytes(again.material)) == ("k", CANARY) == (key.key_id, bytes(key.material))
    )
    assert second.run(Release(session="014:a:b", key_ids=["k"])) == 1
    second.close()


# -- trust at open: another key, a damaged file (issue 13, items 6 and 7) --------------------


def test_a_shard_sealed_under_another_key_is_quarantined_and_the_others_go_on(tmp_path):
    alarms = Alarms()
    store = open_shards(tmp_path, alarms)
    keep, lost = sessions_in(2, 3), sessions_in(5, 3)
    fill(store, keep + lost)
    store.close()
    shard5 = tmp_path / "keys-5.db"
    shard5.unlink()
    KeyStore(shard5, "keys-5", OTHER_KEY).close()  # shard 5 now sealed under another key
    again = open_shards(tmp_path, alarms)
    [(code, reason)] = alarms
    assert code == "KMS-STORE-KEY" and "keys-5.db" in reason and "quarantined" in reason
    assert [again.count(s, "ksa") for s in keep] == [1, 1, 1]
    assert [again.count(s, "ksa") for s in lost] == [0, 0, 0]
    fill(again, lost)  # the fresh shard 5 works
    assert [again.count(s, "ksa") for s in lost] == [1, 1, 1]
    aside = [p.name for p in tmp_path.glob("keys-5.db*.quarantined-*")]
    assert len(aside) == 1 and aside[0].startswith("keys-5.db.quarantined-")
    again.close()


def test_a_shard_with_its_header_overwritten_is_quarantined_with_its_wal(tmp_path):
    alarms = Alarms()
    store = open_shards(tmp_path, alarms)
    keep, lost = sessions_in(0, 2), sessions_in(3, 2)
    fill(store, keep + lost)
    store.close()
    live = KeyStore(tmp_path / "keys-3.db", "keys-3", NODE_KEY)  # a -wal and -shm exist
    live.checkpoint()
    with open(tmp_path / "keys-3.db", "r+b") as f:
        f.write(b"\xa5" * 100)
    again = open_shards(tmp_path, alarms)
    [(code, reason)] = alarms
    assert code == "KMS-STORE-CORRUPT" and "keys-3.db" in reason
    aside = sorted(p.name.split(".quarantined-")[0] for p in tmp_path.glob("*.quarantined-*"))
    assert aside == ["keys-3.db", "keys-3.db-shm", "keys-3.db-wal"]
    assert [again.count(s, "ksa") for s in keep] == [1, 1]
    assert [again.count(s, "ksa") for s in lost] == [0, 0]
    fill(again, lost)
    again.close()
    live.close()


def test_a_changed_shard_count_or_a_vanished_shard_is_refused(tmp_path):
    open_shards(tmp_path, Alarms()).close()
    with pytest.raises(StoreError) as caught:
        open_shards(tmp_path, Alarms(), shards=4)
    assert caught.value.code == "KMS-STORE-LAYOUT"
    with pytest.raises(StoreError):
        open_shards(tmp_path, Alarms(), shards=16)
    (tmp_path / "keys-6.db").unlink()
    with pytest.raises(StoreError) as caught:
        open_shards(tmp_path, Alarms())
    assert caught.value.code == "KMS-STORE-LAYOUT"


def test_a_missing_node_key_beside_shards_refuses_to_start(tmp_path):
    key_file = tmp_path / "node.key"
    key = NodeKey.from_file(key_file, create_with=os.urandom)
    open_shards(tmp_path, Alarms(), key=key).close()
    key_file.unlink()
    with pytest.raises(NodeKeyMissing) as caught:
        NodeKey.from_file(key_file, create_with=os.urandom)
    assert caught.value.code == "KMS-NODE-KEY-MISSING" and str(key_file) in caught.value.message


# -- trouble during an operation ------------------------------------------------------------


def damage_pages(path: Path) -> None:
    """Overwrite every page after the schema and the key-check record (pages 1 and 2)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(8192)
        f.write(b"\x5a" * (size - 8192))


def damaged_shard(tmp_path: Path, alarms: Alarms) -> tuple[ShardedStore, list[str], list[str]]:
    """Shards whose shard 4 opens (its key-check record is intact) but is damaged inside."""
    store = open_shards(tmp_path, alarms)
    keep, lost = sessions_in(1, 2), sessions_in(4, 20)
    fill(store, keep + lost)
    store.close()
    damage_pages(tmp_path / "keys-4.db")
    return open_shards(tmp_path, alarms), keep, lost


def test_damage_found_by_an_operation_fails_it_quarantines_and_alarms_once(tmp_path):
    alarms = Alarms()
    store, keep, lost = damaged_shard(tmp_path, alarms)
    assert alarms == []  # the damage is not visible at open
    with pytest.raises(StoreCorrupt) as caught:
        store.run(Take(session=lost[0], key_ids=[f"{lost[0]}/k"]))
    assert caught.value.code == "KMS-STORE-CORRUPT"
    [(code, reason)] = alarms
    assert code == "KMS-STORE-CORRUPT" and "keys-4.db" in reason
    assert store.count(lost[1], "ksa") == 0  # the fresh shard
    fill(store, lost[:1])
    assert store.count(lost[0], "ksa") == 1 and store.count(keep[0], "ksa") == 1
    assert len(alarms) == 1 and len(list(tmp_path.glob("keys-4.db.quarantined-*"))) == 1
    store.close()


def test_damage_found_in_a_group_commit_fails_the_group_and_alarms_once(tmp_path):
    alarms = Alarms()
    store, keep, lost = damaged_shard(tmp_path, alarms)

    async def main() -> list[Any]:
        committer = store._committer(4)
        with committer._lock:  # all in one group
            tasks = [
                asyncio.ensure_future(store.submit(Take(session=s, key_ids=[f"{s}/k"])))
                for s in lost[:5]
            ]
            await asyncio.sleep(0)
        got = await asyncio.gather(*tasks, return_exceptions=True)
        after = await store.submit(Put(session=lost[0], keys=[("new", CANARY)]))
        return [*got, after]

    got = asyncio.run(main())
    assert [type(g) for g in got[:5]] == [StoreCorrupt] * 5
    assert got[5] == 1  # the retry meets the fresh shard
    assert [code for code, _ in alarms] == ["KMS-STORE-CORRUPT"]
    assert store.count(keep[1], "ksa") == 1
    store.close()


def test_a_full_disk_is_an_error_not_damage(tmp_path):
    alarms = Alarms()
    store = open_shards(tmp_path, alarms)
    [session] = sessions_in(6, 1)
    store._stores[6]._db.execute("PRAGMA max_page_count = 12")
    with pytest.raises(StoreDiskFull):
        store.run(Put(session=session, keys=[(f"z{i}", bytes(4000)) for i in range(50)]))

    async def grouped() -> None:
        with pytest.raises(StoreDiskFull):
            await store.submit(
                Put(session=session, keys=[(f"y{i}", bytes(4000)) for i in range(50)])
            )

    asyncio.run(grouped())
    assert alarms == [] and not list(tmp_path.glob("*.quarantined-*"))
    store.close()


def test_a_tampered_record_is_an_integrity_alarm_and_takes_nothing(tmp_path):
    """Issue 13, item 8: one flipped byte in a sealed record."""
    alarms = Alarms()
    store = open_shards(tmp_path, alarms)
    [a, b] = sessions_in(7, 2)
    store.run(Put(session=a, keys=[("a", CANARY)]))
    store.run(Put(session=b, keys=[("b", CANARY)]))
    db = sqlite3.connect(tmp_path / "keys-7.db")
    record = bytearray(
        db.execute("SELECT record FROM batches WHERE session = ?", (a,)).fetchone()[0]
    )
    record[3] ^= 0x10
    with db:
        db.execute("UPDATE batches SET record = ? WHERE session = ?", (bytes(record), a))
    with pytest.raises(IntegrityFailure):
        store.run(Take(session=a, key_ids=["a"]))

    async def grouped() -> Any:
        with pytest.raises(IntegrityFailure):
            await store.submit(Take(session=a, key_ids=["a"]))
        return await store.submit(Take(session=b, key_ids=["b"]))

    [key] = asyncio.run(grouped())
    assert bytes(key.material) == CANARY
    assert [code for code, _ in alarms] == ["KMS-INTEGRITY"] * 2
    assert CANARY.hex() not in str(alarms)
    assert store.count(a, "ksa") == 1 and not list(tmp_path.glob("*.quarantined-*"))
    store.close()
