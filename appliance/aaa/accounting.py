"""Accounting: what each contract and SAE pair was allowed, refused and delivered.

Records are appended to SQLite (WAL, ``synchronous=FULL``: a committed record survives
``kill -9``) by the AAA service only, one per reported request; the reports of one SET
are committed together (:meth:`Accounting.batch`: one fsync, not one per record), before
the SET is answered:

* a request counts once: its ID (the UKMS and the AKMS's request ID) is unique, so a
  retried report is a no-op, and the same ID with other content is a conflict;
* only ``delivered`` records carry keys and bits (a failed request is not billed);
* each record holds the SHA-256 of the one before it (a hash chain), and a day's *head*
  (the hash of its last record) is signed with the data centre's Ed25519 key, so that
  a changed, removed or reordered record no longer verifies (:func:`verify`).

Records hold SAE names, counts and reasons; never key material.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.aaa.errors import AccountingError
from appliance.aaa.ledger import Reason

GENESIS = "0" * 64
OUTCOMES = ("delivered", "failed", "refused")
CATEGORY = {
    Reason.LIMITS: "limits",
    Reason.UNKNOWN_PAIR: "unauthorised",
    Reason.WRONG_NODE: "unauthorised",
    Reason.SUSPENDED: "unauthorised",
    Reason.OUTSIDE_WINDOW: "unauthorised",
    Reason.QUOTA: "quota",
    Reason.RATE: "quota",
    Reason.UNREACHABLE: "quota",
}
"""How a refusal reason is counted (and which ETSI 014 status the SAE got: 400/401/503)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
  seq INTEGER PRIMARY KEY, request TEXT NOT NULL UNIQUE, at REAL NOT NULL, day TEXT NOT NULL,
  contract TEXT NOT NULL, user TEXT NOT NULL, master TEXT NOT NULL, slave TEXT NOT NULL,
  outcome TEXT NOT NULL, reason INTEGER NOT NULL, keys INTEGER NOT NULL, bits INTEGER NOT NULL,
  grant_id INTEGER NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS records_day ON records(day);
CREATE TABLE IF NOT EXISTS heads (
  day TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL, signature TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """One request as its AKMS reports it."""

    request: str
    """Unique per request: '<ukms>:<request ID>'."""
    contract: str
    user: str
    master: str
    slave: str
    outcome: str
    reason: Reason = Reason.NONE
    keys: int = 0
    bits: int = 0
    grant: int = 0

    def check(self) -> Report:
        if self.outcome not in OUTCOMES:
            raise AccountingError(f"outcome: expected one of {OUTCOMES}", code="AAA-VALUE")
        if (self.keys or self.bits) and self.outcome != "delivered":
            raise AccountingError("only a delivered request carries keys", code="AAA-VALUE")
        if self.outcome == "refused" and self.reason == Reason.NONE:
            raise AccountingError("a refusal needs a reason", code="AAA-VALUE")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """Accounting of one contract and SAE pair over one period (a billing line)."""

    period: str
    contract: str
    user: str
    master: str
    slave: str
    allowed: int = 0
    refused_limits: int = 0
    refused_unauthorised: int = 0
    refused_quota: int = 0
    keys: int = 0
    bits: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Verified:
    records: int
    heads: int
    last: str
    """The hash of the last record (the chain's current head)."""


def _digest(prev: str, fields: tuple[object, ...]) -> str:
    body = json.dumps([prev, *fields], separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest()


def head_message(day: str, seq: int, digest: str) -> bytes:
    """What a day's head signature covers."""
    return f"qkdn-aaa-accounting-head|{day}|{seq}|{digest}".encode()


class Accounting:
    """The accounting database (one writer: the AAA service)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise AccountingError(f"{path}: cannot open: {exc}", code="AAA-DB") from exc
        self._batch = False

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Records appended inside the block are committed together when it ends, also
        when it ends in an error: exactly the records :meth:`record` accepted (what the
        service counted), as if each had been committed on its own."""
        if self._batch:
            yield
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise AccountingError(f"{self.path}: {exc}", code="AAA-DB") from exc
        self._batch = True
        try:
            yield
        finally:
            self._batch = False
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise AccountingError(f"{self.path}: {exc}", code="AAA-DB") from exc

    def record(self, report: Report, now: float) -> bool:
        """Append ``report``; False if the same report was recorded before."""
        report.check()
        fields = (
            report.request,
            report.contract,
            report.user,
            report.master,
            report.slave,
            report.outcome,
            int(report.reason),
            report.keys,
            report.bits,
            report.grant,
        )
        if self._batch:
            try:
                return self._append(fields, now)
            except sqlite3.Error as exc:
                raise AccountingError(f"{self.path}: {exc}", code="AAA-DB") from exc
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                done = self._append(fields, now)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise AccountingError(f"{self.path}: {exc}", code="AAA-DB") from exc
        return done

    def _append(self, fields: tuple[object, ...], now: float) -> bool:
        old = self.db.execute(
            "SELECT request, contract, user, master, slave, outcome, reason, keys, bits, "
            "grant_id FROM records WHERE request=?",
            (fields[0],),
        ).fetchone()
        if old is not None:
            if tuple(old) != fields:
                raise AccountingError(
                    f"request {fields[0]} was reported before with other content",
                    code="AAA-CONFLICT",
                )
            return False
        last = self.db.execute("SELECT hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        prev = last[0] if last else GENESIS
        day = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
        digest = _digest(prev, (now, day, *fields))
        self.db.execute(
            "INSERT INTO records (request, at, day, contract, user, master, slave, outcome, "
            "reason, keys, bits, grant_id, prev, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (fields[0], now, day, *fields[1:], prev, digest),
        )
        return True

    # -- signed daily heads ------------------------------------------------------------
    def seal(self, key: Ed25519PrivateKey, *, before: str) -> list[str]:
        """Sign the head of every day before ``before`` (ISO date) not yet sealed."""
        sealed = {r[0] for r in self.db.execute("SELECT day FROM heads")}
        days = [
            r[0]
            for r in self.db.execute(
                "SELECT DISTINCT day FROM records WHERE day < ? ORDER BY day", (before,)
            )
        ]
        out = []
        for day in days:
            if day in sealed:
                continue
            seq, digest = self.db.execute(
                "SELECT seq, hash FROM records WHERE day=? ORDER BY seq DESC LIMIT 1", (day,)
            ).fetchone()
            signature = key.sign(head_message(day, seq, digest)).hex()
            self.db.execute("INSERT INTO heads VALUES (?,?,?,?)", (day, seq, digest, signature))
            out.append(day)
        return out

    # -- reading -----------------------------------------------------------------------------
    def rows(
        self, start: dt.date, end: dt.date, *, user: str | None = None, by: str = "day"
    ) -> list[Row]:
        """Billing lines from ``start`` to ``end`` (inclusive), per day or per month."""
        width = 10 if by == "day" else 7
        sql = (
            "SELECT substr(day, 1, ?), contract, user, master, slave, outcome, reason, "
            "count(*), sum(keys), sum(bits) FROM records WHERE day BETWEEN ? AND ?"
            + (" AND user = ?" if user else "")
            + " GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 2, 4, 5"
        )
        params: list[object] = [width, start.isoformat(), end.isoformat()]
        if user:
            params.append(user)
        return _fold(self.db.execute(sql, params))

    def totals(self) -> list[Row]:
        """Counters since records began, per contract and SAE pair (the MIB's aaaAcctTable)."""
        return _fold(
            self.db.execute(
                "SELECT '', contract, user, master, slave, outcome, reason, count(*), "
                "sum(keys), sum(bits) FROM records GROUP BY 2, 3, 4, 5, 6, 7 ORDER BY 2, 4, 5"
            )
        )

    def recorded(self, request: str) -> Report | None:
        r = self.db.execute(
            "SELECT request, contract, user, master, slave, outcome, reason, keys, bits, "
            "grant_id FROM records WHERE request=?",
            (request,),
        ).fetchone()
        if r is None:
            return None
        return Report(
            request=r[0],
            contract=r[1],
            user=r[2],
            master=r[3],
            slave=r[4],
            outcome=r[5],
            reason=Reason(r[6]),
            keys=r[7],
            bits=r[8],
            grant=r[9],
        )

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM records").fetchone()[0])


def _fold(cursor: Iterable[tuple[object, ...]]) -> list[Row]:
    acc: dict[tuple[str, ...], dict[str, int]] = {}
    for period, contract, user, master, slave, outcome, reason, n, keys, bits in cursor:
        key = (str(period), str(contract), str(user), str(master), str(slave))
        c = acc.setdefault(
            key,
            dict.fromkeys(
                (
                    "allowed",
                    "refused_limits",
                    "refused_unauthorised",
                    "refused_quota",
                    "keys",
                    "bits",
                    "failed",
                ),
                0,
            ),
        )
        count = int(n)  # type: ignore[call-overload]
        if outcome == "refused":
            c["refused_" + CATEGORY[Reason(int(reason))]] += count  # type: ignore[call-overload]
        else:
            c["allowed"] += count
            c["failed"] += count if outcome == "failed" else 0
            c["keys"] += int(keys or 0)  # type: ignore[call-overload]
            c["bits"] += int(bits or 0)  # type: ignore[call-overload]
    return [
        Row(period=k[0], contract=k[1], user=k[2], master=k[3], slave=k[4], **v)
        for k, v in acc.items()
    ]


def verify(path: Path, public_key: Ed25519PublicKey) -> Verified:
    """Recompute the chain and check every signed head; AccountingError at the first fault."""
    if not path.is_file():
        raise AccountingError(f"{path}: no accounting database", code="AAA-DB")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        last, count = GENESIS, 0
        hashes: dict[int, tuple[str, str]] = {}
        for row in _records(db):
            seq, request, at, day, *fields, prev, digest = row
            if prev != last or _digest(prev, (at, day, request, *fields)) != digest:
                raise AccountingError(f"record {seq} ({request}) breaks the hash chain")
            hashes[int(seq)] = (str(day), str(digest))  # type: ignore[call-overload]
            last, count = digest, count + 1
        heads = db.execute("SELECT day, seq, hash, signature FROM heads ORDER BY day").fetchall()
        for day, seq, digest, signature in heads:
            if hashes.get(seq) != (day, digest):
                raise AccountingError(f"the head of {day} names no record of the chain")
            nxt = hashes.get(seq + 1)
            if nxt is not None and nxt[0] == day:
                raise AccountingError(f"the head of {day} is not that day's last record")
            try:
                public_key.verify(bytes.fromhex(signature), head_message(day, seq, digest))
            except (InvalidSignature, ValueError) as exc:
                raise AccountingError(f"the head of {day} has a bad signature") from exc
        return Verified(records=count, heads=len(heads), last=last)
    except sqlite3.Error as exc:
        raise AccountingError(f"{path}: {exc}", code="AAA-DB") from exc
    finally:
        db.close()


def _records(db: sqlite3.Connection) -> Iterator[tuple[object, ...]]:
    yield from db.execute(
        "SELECT seq, request, at, day, contract, user, master, slave, outcome, reason, keys, "
        "bits, grant_id, prev, hash FROM records ORDER BY seq"
    )


def export(rows: list[Row], fmt: str, billing: dict[str, str]) -> str:
    """Billing lines as CSV or JSON, each with its user's billing reference."""
    docs = [{**asdict(r), "billing": billing.get(r.user, "")} for r in rows]
    if fmt == "json":
        return json.dumps(docs, indent=2) + "\n"
    out = io.StringIO()
    fields = [*Row.__dataclass_fields__, "billing"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(docs)
    return out.getvalue()


GRANTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
  id INTEGER PRIMARY KEY, month TEXT NOT NULL, body TEXT NOT NULL,
  used_keys INTEGER, used_bits INTEGER);
"""


class GrantStore:
    """Grants survive a restart of the AAA service: each is committed before its AKMS
    hears of it, and settled when closed, so a restarted ledger charges what it charged
    before and never grants twice what a contract allows.

    Its own file, in WAL mode with ``synchronous=NORMAL``: a commit is in the operating
    system's hands before the answer leaves, so it survives ``kill -9`` of the service
    (not a power cut of the machine); an fsync per grant (~5 ms here) would cap the
    service at ~200 grants per second."""

    def __init__(self, path: Path) -> None:
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(GRANTS_SCHEMA)
        except sqlite3.Error as exc:
            raise AccountingError(f"{path}: cannot open: {exc}", code="AAA-DB") from exc

    def close(self) -> None:
        self.db.close()

    def save(self, body: dict[str, object]) -> None:
        self.db.execute(
            "INSERT INTO grants (id, month, body) VALUES (?,?,?)",
            (body["id"], str(body["day"])[:7], json.dumps(body)),
        )

    def settle(self, grant_id: int, keys: int, bits: int) -> None:
        self.db.execute(
            "UPDATE grants SET used_keys=?, used_bits=? WHERE id=?", (keys, bits, grant_id)
        )

    def load(self, month: str) -> list[tuple[dict[str, object], tuple[int, int] | None]]:
        """Grants charged to ``month`` (YYYY-MM) or later, each with its use if settled."""
        rows = self.db.execute(
            "SELECT body, used_keys, used_bits FROM grants WHERE month >= ? ORDER BY id", (month,)
        )
        return [(json.loads(b), None if k is None else (k, u)) for b, k, u in rows]

    def next_id(self) -> int:
        return int(self.db.execute("SELECT coalesce(max(id), 0) + 1 FROM grants").fetchone()[0])
