"""The AKMS's durable outbox of accounting reports, replayed until AAA has them.

Each request an AKMS decided (delivered, failed, refused) becomes one row here, committed
*before* the AKMS answers its UKMS; a sender takes rows out only once AAA has acknowledged
the report (an SNMP SET of aaaUsageTable, idempotent by request ID at AAA). So a report
survives ``kill -9`` of the AKMS (the row is on disk: SQLite WAL, ``synchronous=NORMAL``
keeps a commit through a process crash, not through a power cut of the machine) and of
AAA (the row stays until acknowledged), and a report sent twice counts once.

A commit here writes the WAL and syncs nothing; SQLite's automatic checkpoint (which
fsyncs the WAL and the database) is off, so that no request's commit pays for one: the
sender calls :meth:`Outbox.checkpoint` in a thread of its own every
:data:`CHECKPOINT_WRITES` commits.

No key material: a row holds SAE names, counts, a reason and a grant number.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from appliance.aaa.errors import AccountingError
from appliance.aaa.ledger import Reason

MAX_ROWS = 1_000_000
"""Rows the outbox holds at most; beyond, new reports are refused (and so are requests:
the AKMS fails closed rather than serve keys it cannot account for)."""
CHECKPOINT_WRITES = 500
"""Commits after which the sender copies the WAL into the database (off the key path)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Pending:
    """One report waiting for AAA's acknowledgement."""

    ukms: int
    request: str
    master: str
    slave: str
    outcome: str
    reason: Reason = Reason.NONE
    keys: int = 0
    bits: int = 0
    grant: int = 0


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (ukms INTEGER NOT NULL, request TEXT NOT NULL,"
                " master TEXT NOT NULL, slave TEXT NOT NULL, outcome TEXT NOT NULL,"
                " reason INTEGER NOT NULL, keys INTEGER NOT NULL, bits INTEGER NOT NULL,"
                " grant_id INTEGER NOT NULL, PRIMARY KEY (ukms, request))"
            )
            self.count = int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])
            self.writes = 0
            """Commits since the last checkpoint."""
        except sqlite3.Error as exc:
            raise AccountingError(f"{path}: {exc}", code="AAA-OUTBOX") from exc

    def add(self, p: Pending) -> None:
        """Commit one report (a second one for the same request is ignored)."""
        if self.count >= MAX_ROWS:
            raise AccountingError(f"{self.path}: the outbox is full", code="AAA-OUTBOX-FULL")
        try:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO outbox VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    p.ukms,
                    p.request,
                    p.master,
                    p.slave,
                    p.outcome,
                    int(p.reason),
                    p.keys,
                    p.bits,
                    p.grant,
                ),
            )
        except sqlite3.Error as exc:
            raise AccountingError(f"{self.path}: {exc}", code="AAA-OUTBOX") from exc
        self.count += cur.rowcount
        self.writes += 1

    def due(self, limit: int) -> list[Pending]:
        """Up to ``limit`` reports not yet acknowledged, oldest first."""
        rows = self.db.execute(
            "SELECT ukms, request, master, slave, outcome, reason, keys, bits, grant_id"
            " FROM outbox ORDER BY rowid LIMIT ?",
            (limit,),
        ).fetchall()
        out = [
            Pending(
                ukms=r[0],
                request=r[1],
                master=r[2],
                slave=r[3],
                outcome=r[4],
                reason=Reason(r[5]),
                keys=r[6],
                bits=r[7],
                grant=r[8],
            )
            for r in rows
        ]
        return out

    def done(self, keys: list[tuple[int, str]]) -> None:
        """AAA has these reports (ukms, request): forget them, in one transaction."""
        gone = 0
        try:
            self.db.execute("BEGIN")
            for ukms, request in keys:
                cur = self.db.execute(
                    "DELETE FROM outbox WHERE ukms=? AND request=?", (ukms, request)
                )
                gone += cur.rowcount
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise AccountingError(f"{self.path}: {exc}", code="AAA-OUTBOX") from exc
        self.count -= gone
        self.writes += 1

    def checkpoint(self) -> None:
        """Copy the WAL into the database (fsyncs both), over a connection of its own:
        safe to run in another thread while :meth:`add` commits (a passive checkpoint
        never blocks a writer)."""
        self.writes = 0
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise AccountingError(f"{self.path}: {exc}", code="AAA-OUTBOX") from exc

    def close(self) -> None:
        self.db.close()
