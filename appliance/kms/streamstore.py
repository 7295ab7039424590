"""The ETSI 004 key streams of a UKMS on disk, so that a stream survives a restart.

One SQLite file, ``streams.sqlite`` in the node's data directory (WAL, ``synchronous=FULL``,
mode 0600; not ``*.db``, the name of the files sealed under the node key), one row per
stream: KSID, the two SAE IDs, the granted QoS, when it was opened here, which ends have
it open, and the next index (source side: the first not yet asked of the network;
destination side: one past the highest received). It holds no key material: the chunks
live in the node's key stores (:mod:`shards`), sealed, under the stream's session
``004:KSID``. Rows change on OPEN, CLOSE, expiry, before each supply request (the reserved
indices are written first, so a crash never asks for an index twice) and as deliveries
arrive. Thread-safe; each call one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from appliance.kms.errors import StoreError
from appliance.kms.store import private_dir, store_error
from appliance.kms.streams import Stream

T = TypeVar("T")
SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    ksid        BLOB PRIMARY KEY,
    source      TEXT NOT NULL,
    destination TEXT NOT NULL,
    qos         TEXT NOT NULL,
    created     REAL NOT NULL,
    opened      TEXT NOT NULL,
    next        INTEGER NOT NULL
) WITHOUT ROWID
"""


class StreamStore:
    """The streams table of one UKMS."""

    def __init__(self, directory: Path) -> None:
        private_dir(directory)
        self.path = directory / "streams.sqlite"
        self._lock = threading.Lock()
        try:
            self.path.touch(mode=0o600, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode=WAL", "synchronous=FULL"):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"stream store {self.path}: cannot open ({exc})") from exc

    def load(self, now: float) -> list[Stream]:
        with self._lock:
            rows = self._run(lambda: self._db.execute("SELECT * FROM streams").fetchall())
        return [Stream.from_row(row, now) for row in rows]

    def save(self, stream: Stream) -> None:
        row = stream.to_row()
        with self._lock:
            self._run(
                lambda: self._db.execute(
                    "INSERT OR REPLACE INTO streams VALUES (?,?,?,?,?,?,?)", row
                )
            )

    def delete(self, ksid: bytes) -> None:
        with self._lock:
            self._run(lambda: self._db.execute("DELETE FROM streams WHERE ksid = ?", (ksid,)))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, work: Callable[[], T]) -> T:
        try:
            return work()
        except sqlite3.Error as exc:
            raise store_error(f"stream store {self.path}", exc) from exc
