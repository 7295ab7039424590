"""Key stores: SQLite (WAL, ``synchronous=FULL``), records encrypted at rest.

One store file holds one kind of key: a link store (keys taken from one QKDM, awaiting
relay use) or a KSA store (keys for one SAE pair at a UKMS). Every operation that
changes the store is one SQLite transaction, so a crash leaves either the old or the new
state, never half of one. (:mod:`groupcommit` runs the puts and takes of many callers in
one transaction, each in a savepoint of its own, through the ``_put_rows``/``_take_rows``
helpers below.)

Layout: the keys of one ``put_many`` form a **batch**: one sealed record holding, slot by
slot, each key's ID and bits (a KSA delivery of 1,024 keys is one record, not 1,024), and
one row per key in ``keys`` (ID -> batch, slot) to find it. A ``tally`` row counts the keys.
Stores of the first layout (a sealed record per key) are upgraded when opened.

* **Take** is an atomic, exactly-once consume: ``DELETE ... RETURNING`` of the keys' rows
  in one transaction, and their batch re-sealed without them (or deleted when empty).
  Two takers of the same key ID: one gets it, the other ``KeyUnavailable``.
* **Expiry**: each batch has an expiry time; an expired key is deleted, never returned.
* **Capacity**: ``put`` refuses keys beyond the capacity (``StoreFull``) as a whole.

Encryption at rest: each batch record is sealed under the node key (:class:`RecordKey`),
with the store name and the batch's random tag as associated data: AES-256-GCM-SIV with
a nonce derived from them for a key file. A record moved to another batch or store fails
to open, and a key row pointing at a slot that holds another ID fails the take
(``IntegrityFailure``, nothing taken).

Deletion, what is overwritten and when: a take re-seals the rest of the batch under a
fresh tag, so the taken bits are in no live record. ``secure_delete`` makes SQLite
overwrite the old record's cells with zeros in the pages it writes. Until the next WAL
checkpoint the old page images (holding sealed records, not keys) remain in the ``-wal``
file; :meth:`KeyStore.checkpoint` (``wal_checkpoint(TRUNCATE)``) folds them into the
zeroed database and truncates the WAL. The node runs it periodically and at shutdown.
Without the node key, no copy on disk reveals a key. Key bytes returned to callers are
``bytearray``; callers erase them after use.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from appliance.kms.errors import IntegrityFailure, KeyExpired, KeyUnavailable, StoreError, StoreFull

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq      INTEGER PRIMARY KEY,
    tag      TEXT NOT NULL,
    expires  REAL NOT NULL,
    meta     TEXT NOT NULL DEFAULT '',
    left     INTEGER NOT NULL,
    record   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_expires ON batches (expires);
CREATE TABLE IF NOT EXISTS keys (
    id       TEXT PRIMARY KEY,
    batch    INTEGER NOT NULL,
    slot     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tally (
    one      INTEGER PRIMARY KEY CHECK (one = 1),
    keys     INTEGER NOT NULL
);
INSERT OR IGNORE INTO tally VALUES (1, 0);
"""
TAG_BYTES = 16
_COUNT = struct.Struct(">I")
_SLOT = struct.Struct(">BH")  # key ID length (0: taken), key length

Row = tuple[str, int, int]
"""An index row: key ID, batch, slot."""
Entry = tuple[str, bytearray]
"""One slot of a batch record: key ID ("" once taken) and key bits."""
Found = dict[str, tuple[str, bytearray, float]]
"""Keys taken in a transaction: ``{key ID: (meta, key bits, expiry time)}``."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Keys put together, sealed as one record, ready to insert."""

    tag: str
    expires: float
    meta: str
    ids: list[str]
    record: bytes


class RecordKey(Protocol):
    """What seals key-store records at rest: :class:`NodeKey` (a key file) or
    :class:`hsm.keystore.Pkcs11NodeKey` (a key-encryption key in the node's PKCS#11
    token; a node's ``devices.keystore`` URL chooses it). A record that fails to open
    raises IntegrityFailure."""

    def seal(self, aad: bytes, plaintext: bytes | bytearray) -> bytes: ...

    def open(self, aad: bytes, record: bytes) -> bytearray: ...


class NodeKey:
    """The node key from a file (mode 0600): AES-256-GCM-SIV with a deterministic nonce."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise StoreError("node key: expected 32 bytes")
        self._aead = AESGCMSIV(key)

    @classmethod
    def from_file(cls, path: Path, create_with: Callable[[int], bytes] | None = None) -> NodeKey:
        """Load the key; create it (mode 0600) from ``create_with(32)`` if the file is absent."""
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except FileNotFoundError:
            if create_with is None:
                raise StoreError(f"node key file {path} not found") from None
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"node key file {path}: unreadable ({exc.__class__.__name__})"
            ) from None
        key = create_with(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # the other process of a split node created it first
            time.sleep(0.1)
            return cls.from_file(path)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
        return cls(key)

    def seal(self, aad: bytes, plaintext: bytes | bytearray) -> bytes:
        return self._aead.encrypt(_nonce(aad), bytes(plaintext), aad)

    def open(self, aad: bytes, record: bytes) -> bytearray:
        try:
            return bytearray(self._aead.decrypt(_nonce(aad), record, aad))
        except InvalidTag:
            raise IntegrityFailure("key record failed authentication") from None


def _nonce(aad: bytes) -> bytes:
    return hashlib.sha256(b"qkdn/store-nonce\0" + aad).digest()[:12]


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A key taken from a store."""

    key_id: str
    material: bytearray
    meta: str = ""

    def __repr__(self) -> str:
        return f"StoredKey(key_id={self.key_id!r}, bits=<redacted>)"


class KeyStore:
    """One SQLite key store. Thread-safe; each call is one transaction."""

    def __init__(
        self,
        path: Path,
        name: str,
        node_key: RecordKey,
        *,
        capacity: int = 1_000_000,
        ttl: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path, self.name, self.capacity, self.ttl = path, name, capacity, ttl
        self._key, self._clock = node_key, clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON"):
                self._db.execute(f"PRAGMA {pragma}")
            with self._transaction() as db:
                self._upgrade(db)
        except sqlite3.Error as exc:
            raise StoreError(f"key store {path}: {exc}") from None

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Create the schema; a store of the first layout (one sealed record per key) has
        each key moved into a batch of its own, keeping its expiry and meta."""
        if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        columns = {row[1] for row in db.execute("PRAGMA table_info(keys)")}
        if "record" in columns:
            db.execute("ALTER TABLE keys RENAME TO keys_v1")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        if "record" in columns:
            old = db.execute("SELECT id, expires, meta, record FROM keys_v1 ORDER BY seq")
            for key_id, expires, meta, record in old.fetchall():
                material = self._key.open(f"{self.name}\0{key_id}".encode(), record)
                self._insert(db, self._batch([(key_id, material)], meta, expires))
                _erase(material)
            db.execute("DROP TABLE keys_v1")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- writing ----------------------------------------------------------------------
    def put_many(
        self,
        keys: Iterable[tuple[str, bytes | bytearray]],
        *,
        meta: str = "",
        ttl: float | None = None,
    ) -> int:
        """Add keys atomically: all of them, or none if the capacity would be exceeded."""
        batch = self._sealed(keys, meta, ttl)
        with self._transaction() as db:
            return self._put_rows(db, batch)

    def put(
        self, key_id: str, material: bytes | bytearray, *, meta: str = "", ttl: float | None = None
    ) -> None:
        self.put_many([(key_id, material)], meta=meta, ttl=ttl)

    def _sealed(
        self, keys: Iterable[tuple[str, bytes | bytearray]], meta: str, ttl: float | None
    ) -> Batch:
        """The batch to insert, sealed outside the store lock (sealing may be an HSM call)."""
        return self._batch(keys, meta, self._clock() + (self.ttl if ttl is None else ttl))

    def _batch(
        self, keys: Iterable[tuple[str, bytes | bytearray]], meta: str, expires: float
    ) -> Batch:
        entries = [(key_id, bytearray(material)) for key_id, material in keys]
        if len({key_id for key_id, _ in entries}) != len(entries):
            raise StoreError(f"store {self.name}: a key ID is listed twice")
        tag = os.urandom(TAG_BYTES).hex()
        record = self._seal(tag, entries) if entries else b""
        return Batch(tag, expires, meta, [key_id for key_id, _ in entries], record)

    def _put_rows(self, db: sqlite3.Connection, batch: Batch) -> int:
        """Inside a transaction (or savepoint): insert the batch, or raise and insert none."""
        if not batch.ids:
            return 0
        count = db.execute("SELECT keys FROM tally").fetchone()[0]
        if count + len(batch.ids) > self.capacity:
            raise StoreFull(
                f"store {self.name}: {count} + {len(batch.ids)} keys exceed the "
                f"capacity of {self.capacity}"
            )
        try:
            self._insert(db, batch)
        except sqlite3.IntegrityError:
            raise StoreError(f"store {self.name}: a key ID is already stored") from None
        return len(batch.ids)

    @staticmethod
    def _insert(db: sqlite3.Connection, batch: Batch) -> None:
        seq = db.execute(
            "INSERT INTO batches (tag, expires, meta, left, record) VALUES (?,?,?,?,?)",
            (batch.tag, batch.expires, batch.meta, len(batch.ids), batch.record),
        ).lastrowid
        db.executemany(
            "INSERT INTO keys (id, batch, slot) VALUES (?,?,?)",
            [(key_id, seq, slot) for slot, key_id in enumerate(batch.ids)],
        )
        db.execute("UPDATE tally SET keys = keys + ?", (len(batch.ids),))

    # -- taking -----------------------------------------------------------------------
    def take(self, key_id: str) -> StoredKey:
        """Remove and return the key ``key_id``: exactly once, whoever asks. An expired
        key is removed too, and KeyExpired raised."""
        now = self._clock()
        try:
            with self._transaction() as db:
                found = self._take_rows(db, [key_id], None)
        except KeyUnavailable:
            raise KeyUnavailable(f"store {self.name}: no key {key_id}") from None
        meta, material, expires = found[key_id]
        if expires <= now:
            _erase(material)
            raise KeyExpired(f"store {self.name}: key {key_id} expired")
        return StoredKey(key_id, material, meta)

    def take_many(self, key_ids: list[str]) -> list[StoredKey]:
        """Remove and return the named keys, all or none (KeyUnavailable naming none of them)."""
        now = self._clock()
        self._check_ids(key_ids)
        found: Found = {}
        try:
            with self._transaction() as db:
                found = self._take_rows(db, key_ids, now)
        except StoreError:  # the COMMIT failed: nothing was taken, nobody gets the bits
            erase_found(found)
            raise
        return self._as_named(key_ids, found)

    def _check_ids(self, key_ids: list[str]) -> None:
        """Refuse, before any transaction, a list no store could satisfy."""
        if not 0 < len(key_ids) <= 10_000 or len(set(key_ids)) != len(key_ids):
            raise KeyUnavailable(f"store {self.name}: not all {len(key_ids)} keys are here")

    def _take_rows(self, db: sqlite3.Connection, key_ids: list[str], now: float | None) -> Found:
        """Inside a transaction (or savepoint): delete the named keys and return
        ``{id: (meta, material, expires)}``; KeyUnavailable if any is missing or (with
        ``now``) expired, IntegrityFailure if a record does not hold what its rows say: the
        caller rolls back either way, so nothing is taken."""
        slots: dict[int, list[tuple[str, int]]] = {}
        for key_id, seq, slot in self._delete_rows(db, key_ids):
            slots.setdefault(seq, []).append((key_id, slot))
        found: Found = {}
        try:
            for seq, wanted in slots.items():
                self._take_slots(db, seq, wanted, self._load(db, seq), found, now)
        except BaseException:
            erase_found(found)
            raise
        return found

    def _delete_rows(self, db: sqlite3.Connection, key_ids: list[str]) -> list[Row]:
        """The keys' index rows, deleted: (ID, batch, slot); KeyUnavailable if any is missing."""
        marks = ",".join("?" * len(key_ids))
        rows = db.execute(
            f"DELETE FROM keys WHERE id IN ({marks}) RETURNING id, batch, slot",  # marks only
            key_ids,
        ).fetchall()
        if len(rows) != len(key_ids):
            raise KeyUnavailable(f"store {self.name}: not all {len(key_ids)} keys are here")
        db.execute("UPDATE tally SET keys = keys - ?", (len(rows),))
        return rows

    def _take_slots(
        self,
        db: sqlite3.Connection,
        seq: int,
        wanted: list[tuple[str, int]],
        loaded: tuple[float, str, list[Entry]],
        found: Found,
        now: float | None = None,
    ) -> None:
        """Move the wanted slots of an opened batch into ``found`` and keep the rest
        (KeyUnavailable if the batch expired by ``now``); the batch's opened copy is erased
        whatever happens."""
        expires, meta, entries = loaded
        try:
            if now is not None and expires <= now:
                raise KeyUnavailable(f"store {self.name}: not all the keys named are here")
            for key_id, slot in wanted:
                if not 0 <= slot < len(entries) or entries[slot][0] != key_id:
                    raise IntegrityFailure("key record failed authentication (ID mismatch)")
                found[key_id] = (meta, entries[slot][1], expires)
                entries[slot] = ("", bytearray())
            self._keep_rest(db, seq, entries)
        finally:
            for _, material in entries:
                _erase(material)

    def _as_named(self, key_ids: list[str], found: Found) -> list[StoredKey]:
        """The taken keys in the order they were named."""
        return [StoredKey(k, found[k][1], found[k][0]) for k in key_ids]

    def take_next(self, n: int = 1) -> list[StoredKey]:
        """Remove and return the ``n`` oldest unexpired keys, all or none."""
        if n < 1:
            raise StoreError(f"store {self.name}: cannot take {n} keys")
        with self._transaction() as db:
            taken = self._oldest(db, n)
            if len(taken) < n:
                for key in taken:
                    _erase(key.material)
                raise KeyUnavailable(f"store {self.name}: {len(taken)} keys in stock, {n} needed")
        return taken

    def take_up_to(self, n: int) -> list[StoredKey]:
        """Remove and return the oldest unexpired keys, at most ``n`` (maybe none)."""
        with self._transaction() as db:
            return self._oldest(db, max(0, n))

    def _oldest(self, db: sqlite3.Connection, n: int) -> list[StoredKey]:
        """Inside a transaction: drop expired keys, then take the n oldest (each batch is
        opened once; every batch holds a key, so at most n batches are read)."""
        self._purge(db)
        ids: list[str] = []
        found: Found = {}
        seqs = db.execute("SELECT seq FROM batches ORDER BY seq LIMIT ?", (n,)).fetchall()
        entries: list[Entry] = []
        try:
            for (seq,) in seqs:
                if len(ids) == n:
                    break
                loaded = self._load(db, seq)
                entries = loaded[2]
                wanted = [(k, slot) for slot, (k, _) in enumerate(entries) if k][: n - len(ids)]
                rows = self._delete_rows(db, [k for k, _ in wanted]) if wanted else []
                if not wanted or sorted(rows) != sorted((k, seq, s) for k, s in wanted):
                    raise IntegrityFailure("key store index does not match its record")
                self._take_slots(db, seq, wanted, loaded, found)
                ids += [k for k, _ in wanted]
        except BaseException:
            erase_found(found)
            for _, material in entries:  # a batch opened but not taken from
                _erase(material)
            raise
        return self._as_named(ids, found)

    def _load(self, db: sqlite3.Connection, seq: int) -> tuple[float, str, list[Entry]]:
        """A batch's expiry time, meta and opened slots."""
        tag, expires, meta, record = db.execute(
            "SELECT tag, expires, meta, record FROM batches WHERE seq = ?", (seq,)
        ).fetchone()
        return expires, meta, self._open(tag, record)

    def _keep_rest(self, db: sqlite3.Connection, seq: int, entries: list[Entry]) -> None:
        """A batch after a take: deleted when no key is left, else re-sealed without the
        taken keys' bits, under a fresh tag (the old cell is overwritten: secure_delete)."""
        left = sum(1 for key_id, _ in entries if key_id)
        if left == 0:
            db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            return
        tag = os.urandom(TAG_BYTES).hex()
        db.execute(
            "UPDATE batches SET tag = ?, left = ?, record = ? WHERE seq = ?",
            (tag, left, self._seal(tag, entries), seq),
        )

    # -- records ----------------------------------------------------------------------
    def _seal(self, tag: str, entries: list[Entry]) -> bytes:
        """A batch record: per slot, the key ID (empty once taken) and the key bits."""
        plain = bytearray(_COUNT.pack(len(entries)))
        try:
            for key_id, material in entries:
                raw_id = key_id.encode()
                if len(raw_id) > 255 or len(material) > 0xFFFF:
                    raise StoreError(f"store {self.name}: key ID or key too long")
                plain += _SLOT.pack(len(raw_id), len(material))
                plain += raw_id
                plain += material
            return self._key.seal(self._aad(tag), plain)
        finally:
            _erase(plain)

    def _open(self, tag: str, record: bytes) -> list[Entry]:
        plain = self._key.open(self._aad(tag), record)
        try:
            (count,), at, entries = _COUNT.unpack_from(plain), _COUNT.size, []
            for _ in range(count):
                id_len, size = _SLOT.unpack_from(plain, at)
                at += _SLOT.size
                key_id = plain[at : at + id_len].decode()
                entries.append((key_id, plain[at + id_len : at + id_len + size]))
                at += id_len + size
        except (struct.error, UnicodeDecodeError):
            raise IntegrityFailure("key record malformed") from None
        finally:
            _erase(plain)
        return entries

    def _aad(self, tag: str) -> bytes:
        return f"{self.name}\0batch\0{tag}".encode()

    # -- housekeeping -----------------------------------------------------------------
    def count(self) -> int:
        """Unexpired keys in the store."""
        with self._lock:
            row = self._db.execute(
                "SELECT keys - (SELECT COALESCE(SUM(left), 0) FROM batches WHERE expires <= ?) "
                "FROM tally",
                (self._clock(),),
            ).fetchone()
        return int(row[0])

    def purge_expired(self) -> int:
        """Delete expired keys; return how many."""
        with self._transaction() as db:
            return self._purge(db)

    def _purge(self, db: sqlite3.Connection) -> int:
        now = self._clock()
        gone = db.execute(
            "SELECT COALESCE(SUM(left), 0) FROM batches WHERE expires <= ?", (now,)
        ).fetchone()[0]
        if gone:
            db.execute(
                "DELETE FROM keys WHERE batch IN (SELECT seq FROM batches WHERE expires <= ?)",
                (now,),
            )
            db.execute("DELETE FROM batches WHERE expires <= ?", (now,))
            db.execute("UPDATE tally SET keys = keys - ?", (gone,))
        return int(gone)

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it (see the module docstring)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.name}: checkpoint: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the store lock; ROLLBACK on error."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._lock.acquire()
        try:
            self._store._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._store._lock.release()
            raise StoreError(f"store {self._store.name}: {exc}") from None
        return self._store._db

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        """Commit, or roll back; SQLite errors (disk full, busy) become StoreError."""
        db, name = self._store._db, self._store.name
        try:
            if db.in_transaction:
                db.execute("ROLLBACK" if kind is not None else "COMMIT")
        except sqlite3.Error as error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(f"store {name}: {error}") from None
        finally:
            self._store._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"store {name}: {exc}") from None


def _erase(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def erase_found(found: Found) -> None:
    """Erase the bits of keys taken in a transaction that did not stand."""
    for _, material, _ in found.values():
        _erase(material)
