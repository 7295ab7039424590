"""Key stores: SQLite (WAL, ``synchronous=FULL``), records encrypted at rest.

One store file holds one kind of key: a link store (keys taken from one QKDM, awaiting
relay use) or a KSA store (keys for one SAE pair at a UKMS). Every operation that
changes the store is one SQLite transaction, so a crash leaves either the old or the new
state, never half of one. (:mod:`groupcommit` runs the puts and takes of many callers in
one transaction, each in a savepoint of its own, through the ``_put_rows``/``_take_rows``
helpers below.)

* **Take** is an atomic, exactly-once consume: ``DELETE ... RETURNING`` in one
  transaction. Two takers of the same key ID: one gets it, the other ``KeyUnavailable``.
* **Expiry**: each key has an expiry time; an expired key is deleted, never returned.
* **Capacity**: ``put`` refuses keys beyond the capacity (``StoreFull``) as a whole.

Encryption at rest: each record is sealed with AES-256-GCM-SIV under the node key, with
the store name and key ID as associated data and a nonce derived from them. GCM-SIV is
nonce-misuse resistant, so the deterministic nonce needs no random number per record; a
record moved to another ID or store fails to open (``IntegrityFailure``).

Deletion, what is overwritten and when: ``secure_delete`` makes SQLite overwrite deleted
record cells with zeros in the page it writes. Until the next WAL checkpoint the old page
images (holding the sealed record, not the key) remain in the ``-wal`` file;
:meth:`KeyStore.checkpoint` (``wal_checkpoint(TRUNCATE)``) folds them into the zeroed
database and truncates the WAL. The node runs it periodically and at shutdown. Without
the node key, no copy on disk reveals a key. Key bytes returned to callers are
``bytearray``; callers erase them after use.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from appliance.kms.errors import IntegrityFailure, KeyExpired, KeyUnavailable, StoreError, StoreFull

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    id       TEXT NOT NULL UNIQUE,
    expires  REAL NOT NULL,
    meta     TEXT NOT NULL DEFAULT '',
    record   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_expires ON keys (expires);
"""

Row = tuple[str, float, str, bytes]
"""A row to insert: key ID, expiry time, meta, sealed record."""


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
            for pragma in (
                "journal_mode=WAL",
                "synchronous=FULL",
                "secure_delete=ON",
                "foreign_keys=ON",
            ):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"key store {path}: {exc}") from None

    def _aad(self, key_id: str) -> bytes:
        return f"{self.name}\0{key_id}".encode()

    # -- writing ----------------------------------------------------------------------
    def put_many(
        self,
        keys: Iterable[tuple[str, bytes | bytearray]],
        *,
        meta: str = "",
        ttl: float | None = None,
    ) -> int:
        """Add keys atomically: all of them, or none if the capacity would be exceeded."""
        rows = self._sealed(keys, meta, ttl)
        with self._transaction() as db:
            return self._put_rows(db, rows)

    def _sealed(
        self, keys: Iterable[tuple[str, bytes | bytearray]], meta: str, ttl: float | None
    ) -> list[Row]:
        """The rows to insert, sealed outside the store lock (sealing may be an HSM call)."""
        expires = self._clock() + (self.ttl if ttl is None else ttl)
        return [
            (key_id, expires, meta, self._key.seal(self._aad(key_id), material))
            for key_id, material in keys
        ]

    def _put_rows(self, db: sqlite3.Connection, rows: list[Row]) -> int:
        """Inside a transaction (or savepoint): insert all rows, or raise and insert none."""
        count = db.execute("SELECT COUNT(*) FROM keys").fetchone()[0]
        if count + len(rows) > self.capacity:
            raise StoreFull(
                f"store {self.name}: {count} + {len(rows)} keys exceed the "
                f"capacity of {self.capacity}"
            )
        try:
            db.executemany("INSERT INTO keys (id, expires, meta, record) VALUES (?,?,?,?)", rows)
        except sqlite3.IntegrityError:
            raise StoreError(f"store {self.name}: a key ID is already stored") from None
        return len(rows)

    def put(
        self, key_id: str, material: bytes | bytearray, *, meta: str = "", ttl: float | None = None
    ) -> None:
        self.put_many([(key_id, material)], meta=meta, ttl=ttl)

    # -- taking -----------------------------------------------------------------------
    def take(self, key_id: str) -> StoredKey:
        """Remove and return the key ``key_id``: exactly once, whoever asks."""
        with self._transaction() as db:
            row = db.execute(
                "DELETE FROM keys WHERE id = ? RETURNING expires, meta, record", (key_id,)
            ).fetchone()
        if row is None:
            raise KeyUnavailable(f"store {self.name}: no key {key_id}")
        expires, meta, record = row
        if expires <= self._clock():
            raise KeyExpired(f"store {self.name}: key {key_id} expired")
        return StoredKey(key_id, self._key.open(self._aad(key_id), record), meta)

    def take_many(self, key_ids: list[str]) -> list[StoredKey]:
        """Remove and return the named keys, all or none (KeyUnavailable naming none of them)."""
        now = self._clock()
        self._check_ids(key_ids)
        with self._transaction() as db:
            found = self._take_rows(db, key_ids, now)
        return self._opened_as_named(key_ids, found)

    def _check_ids(self, key_ids: list[str]) -> None:
        """Refuse, before any transaction, a list no store could satisfy."""
        if not 0 < len(key_ids) <= 10_000 or len(set(key_ids)) != len(key_ids):
            raise KeyUnavailable(f"store {self.name}: not all {len(key_ids)} keys are here")

    def _take_rows(
        self, db: sqlite3.Connection, key_ids: list[str], now: float
    ) -> dict[str, tuple[str, bytes]]:
        """Inside a transaction (or savepoint): delete the named unexpired keys and return
        ``{id: (meta, record)}``; KeyUnavailable if any is missing (the caller rolls back)."""
        marks = ",".join("?" * len(key_ids))
        found = db.execute(
            f"DELETE FROM keys WHERE id IN ({marks}) AND expires > ? "  # placeholders only
            "RETURNING id, meta, record",
            (*key_ids, now),
        ).fetchall()
        if len(found) != len(key_ids):
            raise KeyUnavailable(f"store {self.name}: not all {len(key_ids)} keys are here")
        return {key_id: (meta, record) for key_id, meta, record in found}

    def _opened_as_named(
        self, key_ids: list[str], found: dict[str, tuple[str, bytes]]
    ) -> list[StoredKey]:
        """Open taken records, outside the store lock, in the order they were named."""
        return [
            StoredKey(k, self._key.open(self._aad(k), found[k][1]), found[k][0]) for k in key_ids
        ]

    def take_next(self, n: int = 1) -> list[StoredKey]:
        """Remove and return the ``n`` oldest unexpired keys, all or none."""
        if n < 1:
            raise StoreError(f"store {self.name}: cannot take {n} keys")
        with self._transaction() as db:
            rows = self._oldest(db, n)
            if len(rows) < n:
                db.execute("ROLLBACK")
                raise KeyUnavailable(f"store {self.name}: {len(rows)} keys in stock, {n} needed")
        return self._opened(rows)

    def take_up_to(self, n: int) -> list[StoredKey]:
        """Remove and return the oldest unexpired keys, at most ``n`` (maybe none)."""
        with self._transaction() as db:
            rows = self._oldest(db, max(0, n))
        return self._opened(rows)

    def _oldest(self, db: sqlite3.Connection, n: int) -> list[tuple[int, str, str, bytes]]:
        """Inside a transaction: drop expired keys, then delete and return the n oldest."""
        db.execute("DELETE FROM keys WHERE expires <= ?", (self._clock(),))
        return db.execute(
            "DELETE FROM keys WHERE seq IN (SELECT seq FROM keys ORDER BY seq LIMIT ?) "
            "RETURNING seq, id, meta, record",
            (n,),
        ).fetchall()

    def _opened(self, rows: list[tuple[int, str, str, bytes]]) -> list[StoredKey]:
        return [
            StoredKey(key_id, self._key.open(self._aad(key_id), record), meta)
            for _, key_id, meta, record in sorted(rows)
        ]

    # -- housekeeping -----------------------------------------------------------------
    def count(self) -> int:
        """Unexpired keys in the store."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM keys WHERE expires > ?", (self._clock(),)
            ).fetchone()
        return int(row[0])

    def purge_expired(self) -> int:
        """Delete expired keys; return how many."""
        with self._transaction() as db:
            return db.execute("DELETE FROM keys WHERE expires <= ?", (self._clock(),)).rowcount

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
