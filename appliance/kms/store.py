"""A key store file: SQLite (WAL, ``synchronous=FULL``), keys grouped by session and kind,
records sealed at rest, takes pending until released.

What it is for: keeping the keys a UKMS holds for its SAEs (slave copies awaiting
dec_keys, a master's stock), exactly once, across crashes. :mod:`shards` spreads the
sessions of a node over a few of these files; :mod:`groupcommit` runs the operations of
many callers in one transaction. What it must never do: return a key twice to two
parties, keep key bits in clear on disk, or report stored or taken what did not commit.

Layout: the keys of one put form a **batch**: one sealed record holding, slot by slot,
each key's ID and bits, and one row per key in ``keys`` ((ID, kind) -> batch, slot) to
find it. Each batch belongs to one **session** (``014:MASTER:SLAVE`` for an ETSI 014 SAE
pair) and one **kind** (``ksa``, ``stock``). ``tally`` counts each session's available
keys per kind, ``total`` every key row (the capacity). Every call is one SQLite
transaction, so a crash leaves the old state or the new, never half of one.

* **Take** (:meth:`KeyStore.take_many`, for dec_keys) is *pending*: the rows are marked
  taken by this run (``run``, ``taken_at``) and the bits returned; the bits stay sealed on
  disk until :meth:`KeyStore.release` deletes the rows (the adapter releases once the
  SAE's reply is written). A crash between the take and the reply therefore loses no key:
  after the restart (a new run ID) the **same session** may take the same IDs again and
  gets the same bits, within :data:`REFETCH_WINDOW` seconds of the first take (the window
  is counted from the first take: a take again does not extend it). Nobody else ever: a
  second take in the same run, another session, or a take after the window is refused.
  The release commits a few milliseconds after the reply is written; a crash in that
  window too lets the same slave fetch the same bits again (once more, never another SAE):
  with no acknowledgement in ETSI 014, a UKMS cannot tell a reply received from one lost,
  and it chooses a repeat to the named slave over a lost key. For the same reason a take
  and a release commit without an fsync (``synchronous=NORMAL``; every other operation
  with one): a process crash loses neither, and a power cut that undoes them leaves the
  keys available to the same session again, as before the take.
  :meth:`KeyStore.purge_expired` deletes pending rows older than the window.
  The usual take names every key left in one batch (a dec_keys asks for the keys of one
  delivery): then the *batch* is marked pending (``batches.run``, ``taken_at``), one row
  written whatever the number of keys, its record opened once and checked to hold exactly
  the keys named; its release deletes the batch and its rows. Any other take, and a take
  again, release or restore of part of a pending batch, works key by key (a pending batch
  is first made pending key by key, with the same run and time), with the same promises.
* **Take oldest** (:meth:`KeyStore.take_oldest`, the stock lease) deletes at once.
* All or none: a take naming a key that is not available raises KeyUnavailable, whose
  ``missing`` lists the IDs not available, and takes nothing; a put beyond the capacity
  raises StoreFull and stores nothing. Expired keys are never returned.

Encryption at rest: each batch record is sealed under the node key (:class:`RecordKey`)
with the store name, the batch's session and kind and a random tag as associated data
(AES-256-GCM-SIV with a nonce derived from them for a key file). A record moved to
another batch, session, kind or store fails to open, and a key row naming a slot that
holds another ID fails the take (IntegrityFailure, nothing taken). A key-check record
sealed when the file is made tells at open a file sealed under another key
(StoreKeyMismatch). SQLite's own errors become coded StoreErrors: busy (StoreBusy), disk
full (StoreDiskFull), damaged file (StoreCorrupt).

Deletion: a release or an oldest-take re-seals the rest of the batch under a fresh tag
(the taken bits are in no live record) or deletes the batch; ``secure_delete`` makes
SQLite overwrite the old cells with zeros. Old page images (sealed records, not keys) stay
in the ``-wal`` file until :meth:`KeyStore.checkpoint` folds and truncates it (the node
runs it periodically and at shutdown). Key bits returned are ``bytearray`` for the caller
to erase; every copy the store makes is erased. Files are made mode 0600; the directory
of a key file 0700.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

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
from appliance.kms.storeops import (
    KSA,
    Op,
    Outcome,
    Put,
    Release,
    Restore,
    StoredKey,
    Take,
    TakeOldest,
    needs_fsync,
)

__all__ = ["REFETCH_WINDOW", "KeyStore", "NodeKey", "RecordKey", "StoredKey"]

REFETCH_WINDOW = 300.0
"""Seconds after its first take during which a pending key may be taken again by its own
session after a restart. An SAE's HTTP client gives up on a dec_keys after tens of
seconds and retries; a supervised UKMS is back within seconds; five minutes covers a
restart and a few retries with back-off, and bounds how long taken bits stay on disk."""
MAX_IDS = 10_000
"""Key IDs one operation may name."""
PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON", "temp_store=MEMORY")
"""Set on every connection. ``temp_store=MEMORY`` keeps SQLite's statement journals (the
pages a group commit's per-operation SAVEPOINT may have to roll back) in memory: on disk
they spilled past 64 KiB into a temporary file in ``/var/tmp``, created, written and
unlinked per transaction (a stocked UKMS made 1.7 times the page writes per key served)."""
SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE meta (
    name     TEXT PRIMARY KEY,
    value    BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE batches (
    seq      INTEGER PRIMARY KEY,
    session  TEXT NOT NULL,
    kind     TEXT NOT NULL,
    tag      TEXT NOT NULL,
    expires  REAL NOT NULL,
    left     INTEGER NOT NULL,
    record   BLOB NOT NULL,
    run      TEXT,
    taken_at REAL
);
CREATE INDEX batches_session ON batches (session, kind);
CREATE INDEX batches_expires ON batches (expires);
CREATE INDEX batches_pending ON batches (run, taken_at) WHERE run IS NOT NULL;
CREATE TABLE keys (
    id       TEXT NOT NULL,
    kind     TEXT NOT NULL,
    batch    INTEGER NOT NULL,
    slot     INTEGER NOT NULL,
    run      TEXT,
    taken_at REAL,
    PRIMARY KEY (id, kind)
) WITHOUT ROWID;
CREATE INDEX keys_batch ON keys (batch);
CREATE INDEX keys_pending ON keys (taken_at) WHERE run IS NOT NULL;
CREATE TABLE tally (
    session  TEXT NOT NULL,
    kind     TEXT NOT NULL,
    keys     INTEGER NOT NULL,
    PRIMARY KEY (session, kind)
) WITHOUT ROWID;
CREATE TABLE total (
    one      INTEGER PRIMARY KEY CHECK (one = 1),
    keys     INTEGER NOT NULL
);
INSERT INTO total VALUES (1, 0)
"""
"""``batches.left``: the batch's keys still available (neither taken nor pending);
``batches.run``/``taken_at``: set while the whole batch is pending (every key left in it;
its rows' own ``run`` is then NULL); ``keys.run``/``taken_at``: set while the key is
pending on its own; ``tally``: available keys per session and kind; ``total``: every key
row, pending included (the capacity)."""
UPGRADE_3 = """
ALTER TABLE batches ADD COLUMN run TEXT;
ALTER TABLE batches ADD COLUMN taken_at REAL;
CREATE INDEX batches_pending ON batches (run, taken_at) WHERE run IS NOT NULL
"""
"""Layout 3 to 4: whole batches may be pending (no batch was pending in layout 3)."""
KCV_PLAIN = b"qkdn key store key-check v1"
TAG_BYTES = 16
_COUNT = struct.Struct(">I")
_SLOT = struct.Struct(">BH")  # key ID length (0: taken), key length
_SESSION = re.compile(r"[\x21-\x7e]{1,256}")
_KIND = re.compile(r"[a-z0-9]{1,16}")

Entry = tuple[str, bytearray]
"""One slot of a batch record: key ID ("" once taken) and key bits."""
Step = Callable[[sqlite3.Connection], Outcome]
"""An operation's work inside a transaction (or savepoint)."""


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
        """Load the key. If the file is absent, create it (mode 0600, directory 0700) from
        ``create_with(32)``, but only in a fresh directory: when key stores (``*.db``) exist
        beside it, they were sealed under the missing key, and NodeKeyMissing is raised."""
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except FileNotFoundError:
            if create_with is None:
                raise StoreError(f"node key file {path} not found") from None
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"node key file {path}: unreadable ({exc.__class__.__name__})"
            ) from exc
        stores = sorted(p.name for p in path.parent.glob("*.db"))
        if stores:
            raise NodeKeyMissing(
                f"node key file {path} is missing but {len(stores)} key store file(s) sealed "
                f"under it exist ({', '.join(stores[:3])}); restore the key file"
            )
        private_dir(path.parent)
        _create_once(path, (create_with(32).hex() + "\n").encode())
        return cls.from_file(path)

    def seal(self, aad: bytes, plaintext: bytes | bytearray) -> bytes:
        return self._aead.encrypt(_nonce(aad), plaintext, aad)

    def open(self, aad: bytes, record: bytes) -> bytearray:
        plain = bytearray(max(0, len(record) - 16))
        try:
            self._aead.decrypt_into(_nonce(aad), record, aad, plain)
        except (InvalidTag, ValueError):
            _erase(plain)
            raise IntegrityFailure("key record failed authentication") from None
        return plain


def _nonce(aad: bytes) -> bytes:
    return hashlib.sha256(b"qkdn/store-nonce\0" + aad).digest()[:12]


def _create_once(path: Path, content: bytes) -> None:
    """Write ``path`` (0600) whole or not at all: written beside it, then linked in; if
    another process linked its own first, that one stands."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def private_dir(directory: Path) -> None:
    """Make ``directory`` (and its parents) if needed, and make it 0700."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


def _private_file(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (its -wal and -shm files then
    take the same mode), and tighten the mode of files already there."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.chmod(side, 0o600)


def store_error(where: str, exc: sqlite3.Error) -> StoreError:
    """The coded StoreError for an SQLite error: busy, disk full, damaged file, or other."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    kinds: dict[int | None, type[StoreError]] = {
        sqlite3.SQLITE_BUSY: StoreBusy,
        sqlite3.SQLITE_LOCKED: StoreBusy,
        sqlite3.SQLITE_FULL: StoreDiskFull,
        sqlite3.SQLITE_CORRUPT: StoreCorrupt,
        sqlite3.SQLITE_NOTADB: StoreCorrupt,
    }
    return kinds.get(primary, StoreError)(f"{where}: {exc}")


@dataclass(frozen=True, slots=True)
class Batch:
    """Keys put together, sealed as one record, ready to insert."""

    session: str
    kind: str
    tag: str
    expires: float
    ids: list[str]
    record: bytes


class KeyStore:
    """One SQLite key store file. Thread-safe; each call is one transaction.

    ``run_id`` names this opening of the store (a fresh random one by default): pending
    takes are marked with it. ``clock`` gives the time (seconds) for expiry and the
    refetch window."""

    def __init__(
        self,
        path: Path,
        name: str,
        node_key: RecordKey,
        *,
        capacity: int = 1_000_000,
        ttl: float = 7 * 86400.0,
        refetch_window: float = REFETCH_WINDOW,
        clock: Callable[[], float] = time.time,
        run_id: str | None = None,
    ) -> None:
        self.path, self.name, self.capacity, self.ttl = path, name, capacity, ttl
        self.refetch_window = refetch_window
        self.run_id = run_id or os.urandom(8).hex()
        self._key, self._clock = node_key, clock
        self._lock = threading.Lock()
        self._closed = False
        self._fsync = True
        """The connection's ``synchronous`` setting: FULL (True) or NORMAL."""
        try:
            _private_file(path)
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"key store {path}: cannot open ({exc})") from exc
        try:
            for pragma in PRAGMAS:
                self._db.execute(f"PRAGMA {pragma}")
            with self.transaction() as db:
                self._check_schema(db)
        except sqlite3.Error as exc:
            self._db.close()
            raise store_error(f"key store {path}", exc) from exc
        except BaseException:
            self._db.close()
            raise

    def _check_schema(self, db: sqlite3.Connection) -> None:
        """Make the schema and the key-check record in a fresh file; in one made before,
        check the schema version and that the key-check record opens under our key."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and not db.execute("SELECT 1 FROM sqlite_master").fetchone():
            for statement in SCHEMA.split(";"):
                db.execute(statement)
            kcv = self._key.seal(self._kcv_aad(), KCV_PLAIN)
            db.execute("INSERT INTO meta VALUES ('kcv', ?)", (kcv,))
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if version == 3:
            for statement in UPGRADE_3.split(";"):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"key store {self.path}: layout version {version}, this release reads "
                f"{SCHEMA_VERSION}",
                code="KMS-STORE-VERSION",
            )
        row = db.execute("SELECT value FROM meta WHERE name = 'kcv'").fetchone()
        try:
            plain = self._key.open(self._kcv_aad(), row[0]) if row else bytearray()
        except IntegrityFailure:
            plain = bytearray()
        if plain != KCV_PLAIN:
            raise StoreKeyMismatch(
                f"key store {self.path}: its key-check record does not open under this "
                "node key (sealed under another key)"
            )

    def _kcv_aad(self) -> bytes:
        return f"{self.name}\0key-check".encode()

    # -- the operations ----------------------------------------------------------------
    def put_many(
        self,
        session: str,
        keys: Iterable[tuple[str, bytes | bytearray]],
        *,
        kind: str = KSA,
        ttl: float | None = None,
    ) -> int:
        """Add keys to a session, all or none (StoreFull; StoreError for an ID already
        stored in this kind); how many."""
        return _count(self.run(Put(session=session, keys=list(keys), kind=kind, ttl=ttl)))

    def take_many(self, session: str, key_ids: list[str], *, kind: str = KSA) -> list[StoredKey]:
        """The named keys of the session, in that order, all or none, as pending takes of
        this run (see the module docstring); KeyUnavailable (with ``missing``) otherwise."""
        return _keys(self.run(Take(session=session, key_ids=list(key_ids), kind=kind)))

    def release(self, key_ids: list[str]) -> int:
        """Delete the named keys this run holds pending, their bits leaving the live
        records; how many (IDs not pending under this run are ignored)."""
        return _count(self.run(Release(session="-", key_ids=list(key_ids))))

    def take_oldest(self, session: str, kind: str, n: int) -> list[StoredKey]:
        """Up to ``n`` of the session's oldest available keys of ``kind``, deleted at once."""
        return _keys(self.run(TakeOldest(session=session, kind=kind, n=n)))

    def run(self, op: Op) -> Outcome:
        """Run one operation in a transaction of its own; its outcome, or its error. The
        bits of a take whose COMMIT fails are erased, and StoreError raised."""
        step = self.prepare(op)
        done: Outcome = 0
        try:
            with self.transaction(fsync=needs_fsync(op)) as db:
                done = step(db)
        except BaseException:
            erase_outcome(done)
            raise
        return done

    def prepare(self, op: Op, now: float | None = None) -> Step:
        """The operation's work, to run inside a transaction; what can be done before the
        store lock is done here (arguments checked, a put's batch sealed). Raises the
        operation's own error (a bad argument) at once."""
        now = self._clock() if now is None else now
        if isinstance(op, Release | Restore):
            ids = list(dict.fromkeys(op.key_ids))
            if len(ids) > MAX_IDS:
                raise StoreError(f"store {self.name}: {len(ids)} keys to settle, at most {MAX_IDS}")
            if isinstance(op, Restore):
                return lambda db: self._restore_rows(db, ids)
            return lambda db: self._release_rows(db, ids)
        _check_names(op.session, op.kind)
        if isinstance(op, Put):
            ttl = self.ttl if op.ttl is None else op.ttl
            batch = self._batch(op.session, op.kind, op.keys, now + ttl)
            return lambda db: self._put_rows(db, batch)
        if isinstance(op, Take):
            self._check_ids(op.key_ids)
            return lambda db: self._take_rows(db, op, now)
        if not 0 <= op.n <= MAX_IDS:
            raise StoreError(f"store {self.name}: cannot take {op.n} keys")
        return lambda db: self._oldest_rows(db, op, now)

    def _check_ids(self, key_ids: list[str]) -> None:
        """Refuse, before any transaction, a list no store could satisfy."""
        doubles = sorted(k for k, n in Counter(key_ids).items() if n > 1)
        if not 0 < len(key_ids) <= MAX_IDS or doubles:
            raise KeyUnavailable(
                f"store {self.name}: {len(key_ids)} key IDs asked for, {len(doubles)} twice",
                missing=doubles,
            )

    # -- put ---------------------------------------------------------------------------
    def _batch(
        self, session: str, kind: str, keys: Iterable[tuple[str, bytes | bytearray]], expires: float
    ) -> Batch:
        entries = [(key_id, bytearray(material)) for key_id, material in keys]
        try:
            ids = [key_id for key_id, _ in entries]
            if len(set(ids)) != len(ids):
                raise StoreError(f"store {self.name}: a key ID is listed twice")
            tag = os.urandom(TAG_BYTES).hex()
            record = self._seal(session, kind, tag, entries) if entries else b""
            return Batch(session, kind, tag, expires, ids, record)
        finally:
            for _, material in entries:
                _erase(material)

    def _put_rows(self, db: sqlite3.Connection, batch: Batch) -> int:
        """Insert the batch, or raise and insert none (the caller rolls back)."""
        n = len(batch.ids)
        if n == 0:
            return 0
        total = db.execute("SELECT keys FROM total").fetchone()[0]
        if total + n > self.capacity:
            raise StoreFull(
                f"store {self.name}: {total} + {n} keys exceed the capacity of {self.capacity}"
            )
        seq = db.execute(
            "INSERT INTO batches (session, kind, tag, expires, left, record) VALUES (?,?,?,?,?,?)",
            (batch.session, batch.kind, batch.tag, batch.expires, n, batch.record),
        ).lastrowid
        try:
            db.executemany(
                "INSERT INTO keys (id, kind, batch, slot) VALUES (?,?,?,?)",
                [(key_id, batch.kind, seq, slot) for slot, key_id in enumerate(batch.ids)],
            )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"store {self.name}: a key ID is already stored") from exc
        db.execute(
            "INSERT INTO tally VALUES (?,?,?) "
            "ON CONFLICT (session, kind) DO UPDATE SET keys = keys + excluded.keys",
            (batch.session, batch.kind, n),
        )
        db.execute("UPDATE total SET keys = keys + ?", (n,))
        return n

    # -- take (pending) ----------------------------------------------------------------
    def _take_rows(self, db: sqlite3.Connection, op: Take, now: float) -> list[StoredKey]:
        """Mark the named keys pending under this run and return their bits; KeyUnavailable
        if any is not available to this session now, IntegrityFailure if a record does not
        hold what its rows say (the caller rolls back either way: nothing taken)."""
        whole = self._take_batch(db, op, now)
        return whole if whole is not None else self._take_each(db, op, now)

    def _take_batch(self, db: sqlite3.Connection, op: Take, now: float) -> list[StoredKey] | None:
        """The usual take (a dec_keys names the keys of one delivery): every key left in
        one batch, marked pending as a whole (one row written, not one per key); None,
        having written nothing, when the take is not that one."""
        found = db.execute(
            "SELECT b.seq, b.tag, b.expires, b.left, b.run, b.taken_at, b.record "
            "FROM keys AS k JOIN batches AS b ON b.seq = k.batch "
            "WHERE k.kind = ? AND k.id = ? AND b.session = ? AND b.kind = ?",
            (op.kind, op.key_ids[0], op.session, op.kind),
        ).fetchone()
        if found is None:
            return None
        seq, tag, expires, left, run, taken_at, record = found
        if expires <= now or (run is None and left != len(op.key_ids)):
            return None
        if run is not None and (run == self.run_id or now >= taken_at + self.refetch_window):
            return None  # pending under this run, or past the refetch window
        taken = self._all_slots(op.session, op.kind, tag, record, op.key_ids)
        if taken is None:
            return None
        if run is None:
            db.execute(
                "UPDATE batches SET run = ?, taken_at = ?, left = 0 WHERE seq = ?",
                (self.run_id, now, seq),
            )
            self._count_out(db, op.session, op.kind, len(taken), total=False)
        else:  # taken again after a crash: the window still runs from the first take
            db.execute("UPDATE batches SET run = ? WHERE seq = ?", (self.run_id, seq))
        return taken

    def _all_slots(
        self, session: str, kind: str, tag: str, record: bytes, key_ids: list[str]
    ) -> list[StoredKey] | None:
        """The bits of ``key_ids`` (in that order) if the record holds exactly those keys
        (in any order), else None."""
        plain = self._key.open(self._aad(session, kind, tag), record)
        try:
            (count,), at = _COUNT.unpack_from(plain), _COUNT.size
            where: dict[bytes, tuple[int, int]] = {}
            for _ in range(count):
                id_len, size = _SLOT.unpack_from(plain, at)
                at += _SLOT.size
                if id_len:
                    where[bytes(plain[at : at + id_len])] = (at + id_len, size)
                at += id_len + size
            if len(where) != len(key_ids):
                return None
            taken: list[StoredKey] = []
            for key_id in key_ids:
                span = where.get(key_id.encode())
                if span is None:
                    erase_outcome(taken)
                    return None
                taken.append(StoredKey(key_id, plain[span[0] : span[0] + span[1]]))
            return taken
        except struct.error:
            raise IntegrityFailure("key record malformed") from None
        finally:
            _erase(plain)

    def _take_each(self, db: sqlite3.Connection, op: Take, now: float) -> list[StoredKey]:
        """:meth:`_take_rows` key by key (pending batches among them made pending key by
        key first)."""
        marks = ",".join("?" * len(op.key_ids))
        select = (
            "SELECT k.id, k.batch, k.slot, k.run, k.taken_at, b.session, b.expires, b.run "
            f"FROM keys AS k JOIN batches AS b ON b.seq = k.batch "
            f"WHERE k.kind = ? AND k.id IN ({marks})"
        )
        rows = db.execute(select, [op.kind, *op.key_ids]).fetchall()
        pending = {row[1] for row in rows if row[7] is not None}
        if pending:
            for seq in pending:
                self._unbatch(db, seq)
            rows = db.execute(select, [op.kind, *op.key_ids]).fetchall()
        ok = {row[0]: row for row in rows if self._takeable(row, op.session, now)}
        missing = [key_id for key_id in op.key_ids if key_id not in ok]
        if missing:
            mine = {row[0] for row in rows if row[5] == op.session}
            raise KeyUnavailable(
                f"store {self.name}: {len(missing)} of {len(op.key_ids)} keys not available",
                missing=missing,
                held=[key_id for key_id in missing if key_id in mine],
            )
        db.execute(
            f"UPDATE keys SET run = ?, taken_at = COALESCE(taken_at, ?) "
            f"WHERE kind = ? AND id IN ({marks})",
            [self.run_id, now, op.kind, *op.key_ids],
        )
        fresh: dict[int, int] = {}
        for _, seq, _, run, *_ in ok.values():
            if run is None:
                fresh[seq] = fresh.get(seq, 0) + 1
        for seq, n in fresh.items():
            db.execute("UPDATE batches SET left = left - ? WHERE seq = ?", (n, seq))
        self._count_out(db, op.session, op.kind, sum(fresh.values()), total=False)
        wanted: dict[int, dict[int, str]] = {}
        for key_id, seq, slot, *_ in ok.values():
            wanted.setdefault(seq, {})[slot] = key_id
        found: dict[str, bytearray] = {}
        try:
            for seq, slots in wanted.items():
                self._copy_slots(db, seq, slots, found)
        except BaseException:
            for material in found.values():
                _erase(material)
            raise
        return [StoredKey(key_id, found[key_id]) for key_id in op.key_ids]

    def _copy_slots(
        self, db: sqlite3.Connection, seq: int, slots: dict[int, str], into: dict[str, bytearray]
    ) -> None:
        """Copy the bits of the wanted ``slots`` (slot -> the key ID it must hold) of a batch
        into ``into``, straight from the opened record (a take: nothing else is copied)."""
        row = db.execute(
            "SELECT session, kind, tag, record FROM batches WHERE seq = ?", (seq,)
        ).fetchone()
        if row is None:
            raise IntegrityFailure("key store index names a missing record")
        session, kind, tag, record = row
        plain = self._key.open(self._aad(session, kind, tag), record)
        try:
            (count,), at = _COUNT.unpack_from(plain), _COUNT.size
            if max(slots) >= count:
                raise IntegrityFailure("key record failed authentication (ID mismatch)")
            for slot in range(max(slots) + 1):
                id_len, size = _SLOT.unpack_from(plain, at)
                at += _SLOT.size
                key_id = slots.get(slot)
                if key_id is not None:
                    if plain[at : at + id_len] != key_id.encode():
                        raise IntegrityFailure("key record failed authentication (ID mismatch)")
                    into[key_id] = plain[at + id_len : at + id_len + size]
                at += id_len + size
        except struct.error:
            raise IntegrityFailure("key record malformed") from None
        finally:
            _erase(plain)

    def _unbatch(self, db: sqlite3.Connection, seq: int) -> None:
        """A pending batch's keys made pending each on its own, as they were as a whole
        (before some of them are taken again or restored)."""
        run, taken_at = db.execute(
            "SELECT run, taken_at FROM batches WHERE seq = ?", (seq,)
        ).fetchone()
        db.execute("UPDATE keys SET run = ?, taken_at = ? WHERE batch = ?", (run, taken_at, seq))
        db.execute("UPDATE batches SET run = NULL, taken_at = NULL WHERE seq = ?", (seq,))

    def _takeable(self, row: tuple[object, ...], session: str, now: float) -> bool:
        """Available to ``session`` now: unexpired, and not pending, or pending under
        another run since less than the refetch window (a crash between take and reply)."""
        _, _, _, run, taken_at, owner, expires, _ = row
        if owner != session or not isinstance(expires, int | float) or expires <= now:
            return False
        if run is None:
            return True
        first = taken_at if isinstance(taken_at, int | float) else now - self.refetch_window
        return run != self.run_id and now < first + self.refetch_window

    # -- release -----------------------------------------------------------------------
    def _release_rows(self, db: sqlite3.Connection, key_ids: list[str]) -> int:
        """Delete the named rows pending under this run; re-seal their batches without them."""
        if not key_ids:
            return 0
        marks = ",".join("?" * len(key_ids))
        released = self._release_batch(db, key_ids, marks)
        if released:
            return released
        rows = db.execute(
            f"DELETE FROM keys WHERE id IN ({marks}) AND (run = ? OR (run IS NULL AND batch IN "
            "(SELECT seq FROM batches WHERE run = ?))) RETURNING id, batch, slot",
            [*key_ids, self.run_id, self.run_id],
        ).fetchall()
        self._drop_slots(db, rows)
        db.execute("UPDATE total SET keys = keys - ?", (len(rows),))
        return len(rows)

    def _release_batch(self, db: sqlite3.Connection, key_ids: list[str], marks: str) -> int:
        """The usual release (the keys of one take): every key of a batch pending as a whole
        under this run, its rows and record deleted, no record opened; how many, or 0
        having changed nothing when the release is not that one."""
        found = db.execute(
            "SELECT b.seq FROM keys AS k JOIN batches AS b ON b.seq = k.batch "
            "WHERE k.id = ? AND b.run = ?",
            (key_ids[0], self.run_id),
        ).fetchone()
        if found is None:
            return 0
        seq = found[0]
        if db.execute("SELECT COUNT(*) FROM keys WHERE batch = ?", (seq,)).fetchone()[0] != len(
            key_ids
        ):
            return 0
        db.execute("SAVEPOINT release")
        gone = db.execute(
            f"DELETE FROM keys WHERE batch = ? AND id IN ({marks})", [seq, *key_ids]
        ).rowcount
        if gone != len(key_ids):  # not all of them in that batch: undone, key by key then
            db.execute("ROLLBACK TO release")
            db.execute("RELEASE release")
            return 0
        db.execute("RELEASE release")
        db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
        db.execute("UPDATE total SET keys = keys - ?", (gone,))
        return gone

    def _restore_rows(self, db: sqlite3.Connection, key_ids: list[str]) -> int:
        """Make the named rows pending under this run available again, as before the take."""
        if not key_ids:
            return 0
        marks = ",".join("?" * len(key_ids))
        for (seq,) in db.execute(
            "SELECT DISTINCT k.batch FROM keys AS k JOIN batches AS b ON b.seq = k.batch "
            f"WHERE b.run = ? AND k.id IN ({marks})",
            [self.run_id, *key_ids],
        ).fetchall():
            self._unbatch(db, seq)
        rows = db.execute(
            f"UPDATE keys SET run = NULL, taken_at = NULL WHERE run = ? AND id IN ({marks}) "
            "RETURNING batch, kind",
            [self.run_id, *key_ids],
        ).fetchall()
        back: dict[int, int] = {}
        for seq, _ in rows:
            back[seq] = back.get(seq, 0) + 1
        for seq, n in back.items():
            db.execute("UPDATE batches SET left = left + ? WHERE seq = ?", (n, seq))
            db.execute(  # an upsert: a purge deletes the rows of sessions counting 0
                "INSERT INTO tally SELECT session, kind, ? FROM batches WHERE seq = ? "
                "ON CONFLICT (session, kind) DO UPDATE SET keys = keys + excluded.keys",
                (n, seq),
            )
        return len(rows)

    def _drop_slots(self, db: sqlite3.Connection, rows: list[tuple[str, int, int]]) -> None:
        """Blank the slots of deleted rows in their batches (re-sealed, or deleted when empty)."""
        by_batch: dict[int, list[tuple[str, int]]] = {}
        for key_id, seq, slot in rows:
            by_batch.setdefault(seq, []).append((key_id, slot))
        for seq, slots in by_batch.items():
            if not db.execute("SELECT 1 FROM keys WHERE batch = ? LIMIT 1", (seq,)).fetchone():
                db.execute("DELETE FROM batches WHERE seq = ?", (seq,))  # nothing left in it
                continue
            session, kind, entries = self._load(db, seq)
            try:
                for key_id, slot in slots:
                    _slot(entries, key_id, slot)
                    _erase(entries[slot][1])
                    entries[slot] = ("", bytearray())
                self._keep_rest(db, seq, session, kind, entries)
            finally:
                _erase_entries(entries)

    # -- take oldest (deleted at once) -------------------------------------------------
    def _oldest_rows(self, db: sqlite3.Connection, op: TakeOldest, now: float) -> list[StoredKey]:
        """Delete and return up to n of the session's oldest available unexpired keys."""
        found: list[StoredKey] = []
        try:
            seqs = db.execute(
                "SELECT seq FROM batches WHERE session = ? AND kind = ? AND expires > ? "
                "AND left > 0 ORDER BY seq LIMIT ?",
                (op.session, op.kind, now, op.n),
            ).fetchall()
            for (seq,) in seqs:
                if len(found) == op.n:
                    break
                found += self._take_from(db, seq, op.kind, op.n - len(found))
            self._count_out(db, op.session, op.kind, len(found), total=True)
        except BaseException:
            erase_outcome(found)
            raise
        return found

    def _take_from(self, db: sqlite3.Connection, seq: int, kind: str, n: int) -> list[StoredKey]:
        """Delete and return up to n available keys of one batch, in slot order."""
        rows = db.execute(
            "SELECT id, slot FROM keys WHERE batch = ? AND run IS NULL ORDER BY slot LIMIT ?",
            (seq, n),
        ).fetchall()
        if not rows:
            raise IntegrityFailure("key store index does not match its record")
        marks = ",".join("?" * len(rows))
        db.execute(
            f"DELETE FROM keys WHERE kind = ? AND id IN ({marks})",
            [kind, *(key_id for key_id, _ in rows)],
        )
        db.execute("UPDATE batches SET left = left - ? WHERE seq = ?", (len(rows), seq))
        session, _, entries = self._load(db, seq)
        taken: list[StoredKey] = []
        try:
            for key_id, slot in rows:
                taken.append(StoredKey(key_id, bytearray(_slot(entries, key_id, slot))))
                _erase(entries[slot][1])
                entries[slot] = ("", bytearray())
            self._keep_rest(db, seq, session, kind, entries)
        except BaseException:
            erase_outcome(taken)
            raise
        finally:
            _erase_entries(entries)
        return taken

    def _count_out(
        self, db: sqlite3.Connection, session: str, kind: str, n: int, *, total: bool
    ) -> None:
        """``n`` keys of the session are no longer available (and, with ``total``, gone)."""
        if n:
            db.execute(
                "UPDATE tally SET keys = keys - ? WHERE session = ? AND kind = ?",
                (n, session, kind),
            )
            if total:
                db.execute("UPDATE total SET keys = keys - ?", (n,))

    # -- records -----------------------------------------------------------------------
    def _load(self, db: sqlite3.Connection, seq: int) -> tuple[str, str, list[Entry]]:
        """A batch's session, kind and opened slots."""
        row = db.execute(
            "SELECT session, kind, tag, record FROM batches WHERE seq = ?", (seq,)
        ).fetchone()
        if row is None:
            raise IntegrityFailure("key store index names a missing record")
        session, kind, tag, record = row
        return session, kind, self._open(session, kind, tag, record)

    def _keep_rest(
        self, db: sqlite3.Connection, seq: int, session: str, kind: str, entries: list[Entry]
    ) -> None:
        """A batch after keys left it: deleted when none is left, else re-sealed without
        them under a fresh tag (the old cell is overwritten: secure_delete)."""
        if not any(key_id for key_id, _ in entries):
            db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            return
        tag = os.urandom(TAG_BYTES).hex()
        db.execute(
            "UPDATE batches SET tag = ?, record = ? WHERE seq = ?",
            (tag, self._seal(session, kind, tag, entries), seq),
        )

    def _seal(self, session: str, kind: str, tag: str, entries: list[Entry]) -> bytes:
        """A batch record: per slot, the key ID (empty once gone) and the key bits."""
        plain = bytearray(_COUNT.pack(len(entries)))
        try:
            for key_id, material in entries:
                raw_id = key_id.encode()
                if len(raw_id) > 255 or len(material) > 0xFFFF:
                    raise StoreError(f"store {self.name}: key ID or key too long")
                plain += _SLOT.pack(len(raw_id), len(material))
                plain += raw_id
                plain += material
            return self._key.seal(self._aad(session, kind, tag), plain)
        finally:
            _erase(plain)

    def _open(self, session: str, kind: str, tag: str, record: bytes) -> list[Entry]:
        plain = self._key.open(self._aad(session, kind, tag), record)
        entries: list[Entry] = []
        try:
            (count,), at = _COUNT.unpack_from(plain), _COUNT.size
            for _ in range(count):
                id_len, size = _SLOT.unpack_from(plain, at)
                at += _SLOT.size
                key_id = plain[at : at + id_len].decode()
                entries.append((key_id, plain[at + id_len : at + id_len + size]))
                at += id_len + size
        except (struct.error, UnicodeDecodeError):
            _erase_entries(entries)
            raise IntegrityFailure("key record malformed") from None
        finally:
            _erase(plain)
        return entries

    def _aad(self, session: str, kind: str, tag: str) -> bytes:
        return f"{self.name}\0{session}\0{kind}\0batch\0{tag}".encode()

    # -- counts and housekeeping -------------------------------------------------------
    def count(self, session: str, kind: str) -> int:
        """The session's available (unexpired, not pending) keys of ``kind``."""
        with self.transaction(write=False) as db:
            row = db.execute(
                "SELECT COALESCE((SELECT keys FROM tally WHERE session = ?1 AND kind = ?2), 0)"
                " - (SELECT COALESCE(SUM(left), 0) FROM batches"
                "    WHERE session = ?1 AND kind = ?2 AND expires <= ?3)",
                (session, kind, self._clock()),
            ).fetchone()
        return int(row[0])

    def levels(self, kind: str) -> dict[str, int]:
        """Available keys of ``kind`` per session holding any (for start-up)."""
        with self.transaction(write=False) as db:
            now = self._clock()
            levels = dict(db.execute("SELECT session, keys FROM tally WHERE kind = ?", (kind,)))
            for session, gone in db.execute(
                "SELECT session, SUM(left) FROM batches WHERE kind = ? AND expires <= ? "
                "GROUP BY session",
                (kind, now),
            ):
                levels[session] = levels.get(session, 0) - gone
        return {session: n for session, n in levels.items() if n > 0}

    def purge_expired(self) -> int:
        """Delete expired keys, and pending keys older than the refetch window; how many."""
        with self.transaction() as db:
            now = self._clock()
            gone = self._purge_expired(db, now)
            stale = db.execute(
                "DELETE FROM keys WHERE run IS NOT NULL AND taken_at <= ? "
                "RETURNING id, batch, slot",
                (now - self.refetch_window,),
            ).fetchall()
            self._drop_slots(db, stale)
            gone += len(stale)
            for (seq,) in db.execute(
                "DELETE FROM batches WHERE run IS NOT NULL AND taken_at <= ? RETURNING seq",
                (now - self.refetch_window,),
            ).fetchall():
                gone += db.execute("DELETE FROM keys WHERE batch = ?", (seq,)).rowcount
            db.execute("UPDATE total SET keys = keys - ?", (gone,))
            db.execute("DELETE FROM tally WHERE keys = 0")
        return gone

    def _purge_expired(self, db: sqlite3.Connection, now: float) -> int:
        """Delete the expired batches and their rows; how many rows (``total`` not updated)."""
        expired = db.execute(
            "SELECT seq, session, kind, left FROM batches WHERE expires <= ?", (now,)
        ).fetchall()
        gone = 0
        for seq, session, kind, left in expired:
            gone += db.execute("DELETE FROM keys WHERE batch = ?", (seq,)).rowcount
            db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
            self._count_out(db, session, kind, left, total=False)
        return gone

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it (see the module docstring)."""
        with self._locked() as db:
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise store_error(f"store {self.name}: checkpoint", exc) from exc

    def close(self) -> None:
        """Close the file; later calls raise StoreError (a plain one: the file is not at fault)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def transaction(self, *, write: bool = True, fsync: bool = True) -> _Transaction:
        """``BEGIN IMMEDIATE`` (``DEFERRED`` for reads) ... ``COMMIT`` under the store lock,
        ROLLBACK on error; SQLite errors become coded StoreErrors. ``fsync=False`` commits
        with ``synchronous=NORMAL``: durable against a process crash, not a power cut, until
        the next full commit or checkpoint syncs the WAL (:func:`storeops.needs_fsync`)."""
        return _Transaction(self, "BEGIN IMMEDIATE" if write else "BEGIN", fsync)

    def _locked(self) -> _Locked:
        return _Locked(self)


class _Locked:
    """The store lock, and the connection unless the store is closed."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._lock.acquire()
        if self._store._closed:
            self._store._lock.release()
            raise StoreError(f"store {self._store.name}: closed")
        return self._store._db

    def __exit__(self, *_: object) -> None:
        self._store._lock.release()


class _Transaction:
    def __init__(self, store: KeyStore, begin: str, fsync: bool) -> None:
        self._store, self._begin, self._fsync = store, begin, fsync
        self._locked = _Locked(store)

    def __enter__(self) -> sqlite3.Connection:
        db = self._locked.__enter__()
        try:
            if self._fsync != self._store._fsync:  # the connection keeps the last setting
                db.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
                self._store._fsync = self._fsync
            db.execute(self._begin)
        except sqlite3.Error as exc:
            self._locked.__exit__()
            raise store_error(f"store {self._store.name}", exc) from exc
        return db

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        """Commit, or roll back; SQLite errors (disk full, busy, damage) become StoreError."""
        db, name = self._store._db, self._store.name
        try:
            if db.in_transaction:
                db.execute("ROLLBACK" if kind is not None else "COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            raise store_error(f"store {name}", error) from error
        finally:
            self._locked.__exit__()
        if isinstance(exc, sqlite3.Error):
            raise store_error(f"store {name}", exc) from exc


def _count(outcome: Outcome) -> int:
    assert isinstance(outcome, int)
    return outcome


def _keys(outcome: Outcome) -> list[StoredKey]:
    assert isinstance(outcome, list)
    return outcome


def _check_names(session: str, kind: str) -> None:
    if not _SESSION.fullmatch(session):
        raise StoreError("store: a session is 1 to 256 printable ASCII characters, no space")
    if not _KIND.fullmatch(kind):
        raise StoreError("store: a kind is 1 to 16 lower-case letters or digits")


def _slot(entries: list[Entry], key_id: str, slot: int) -> bytearray:
    """The bits in ``slot``, which must hold ``key_id`` (else the index lies)."""
    if not 0 <= slot < len(entries) or entries[slot][0] != key_id:
        raise IntegrityFailure("key record failed authentication (ID mismatch)")
    return entries[slot][1]


def _erase(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def _erase_entries(entries: list[Entry]) -> None:
    for _, material in entries:
        _erase(material)


def erase_outcome(outcome: object) -> None:
    """Erase the bits of keys taken (a list of StoredKey) that nobody will receive."""
    if isinstance(outcome, list):
        for key in outcome:
            if isinstance(key, StoredKey):
                _erase(key.material)
