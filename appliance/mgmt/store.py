"""The QKDN Manager's records in SQLite: alarms, performance history, inventory, security
events. No I/O but the database; the manager process and the ``qkdn manager`` command
both use it (WAL: one writer, readers alongside).

Alarms follow ITU-T X.733: each has a perceived severity; a notification with severity
``cleared`` clears the open alarm it matches, and one alarm stands for one problem:

* a link problem is keyed by (kind, link name): both ends of a link reporting it and the
  QKDN Controller's telemetry (:mod:`appliance.mgmt.control`) make one alarm, whose
  ``reports`` counts the reports and ``sources`` names the reporters (agent names, the
  controller's name), in the order they first reported;
* any other problem is keyed by (kind, node).

``kind`` is the notification family: ``link`` (qkdnLinkDown, cleared by qkdnLinkUp),
``qber``, ``keys``, ``rng``, ``card``, ``integrity``, ``rollback``. An acknowledged alarm
stays until cleared; a cleared one stays in the history. qkdnAuthFailure and refused
senders are security events, not alarms.

History keeps raw samples for :data:`RAW_KEEP_S`, then folds them into buckets of
:data:`BUCKET_S` (mean SKR, QBER and key level, min key level): a week at 30 s sampling is
~20 rows per link and hour. The T_key history per node (the node's enc_keys service time,
median and 99th percentile over its last 1,000 requests, as QKDN-MIB reports it at each
poll) is kept and folded the same way (means of both; ``served``: the node's count).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.mgmt.accounting import AcctRow
from appliance.mgmt.errors import StoreError

RAW_KEEP_S = 3600.0
BUCKET_S = 900.0
KINDS = {
    "qkdnLinkDown": "link",
    "qkdnLinkUp": "link",
    "qkdnQberHigh": "qber",
    "qkdnKeyStoreLow": "keys",
    "qkdnRngHealthFailure": "rng",
    "qkdnCardRemoved": "card",
    "qkdnIntegrityAlarm": "integrity",
    "qkdnSlotRollback": "rollback",
    "qkdnNodeUnreachable": "node",
    "qkdnNodeReachable": "node",
}
"""Notification -> alarm kind; the last two are the manager's own (an agent that stops or
starts answering its polls)."""
LINK_KINDS = {"link", "qber", "keys"}
SEVERITIES = ("cleared", "indeterminate", "critical", "major", "minor", "warning")
MAX_TEXT = 255

SCHEMA = """
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    resource TEXT NOT NULL,
    node TEXT NOT NULL,
    severity TEXT NOT NULL,
    text TEXT NOT NULL,
    raised REAL NOT NULL,
    updated REAL NOT NULL,
    cleared REAL,
    acked_by TEXT,
    acked REAL,
    reports INTEGER NOT NULL DEFAULT 1,
    sources TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS alarms_open ON alarms (kind, resource) WHERE cleared IS NULL;
CREATE TABLE IF NOT EXISTS samples (
    ts REAL NOT NULL,
    span REAL NOT NULL,
    node TEXT NOT NULL,
    link TEXT NOT NULL,
    skr REAL NOT NULL,
    qber_ppm REAL NOT NULL,
    level REAL NOT NULL,
    level_min INTEGER NOT NULL,
    n INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_link ON samples (link, ts);
CREATE TABLE IF NOT EXISTS node_samples (
    ts REAL NOT NULL,
    span REAL NOT NULL,
    node TEXT NOT NULL,
    tkey_p50_us REAL NOT NULL,
    tkey_p99_us REAL NOT NULL,
    served INTEGER NOT NULL,
    n INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS node_samples_node ON node_samples (node, ts);
CREATE TABLE IF NOT EXISTS inventory (
    node TEXT PRIMARY KEY,
    id INTEGER NOT NULL,
    role TEXT NOT NULL,
    software TEXT NOT NULL,
    slot TEXT NOT NULL,
    address TEXT NOT NULL,
    cert_expiry REAL,
    reachable INTEGER NOT NULL,
    last_seen REAL
);
CREATE TABLE IF NOT EXISTS links (
    node TEXT NOT NULL,
    peer INTEGER NOT NULL,
    link TEXT NOT NULL,
    state TEXT NOT NULL,
    skr INTEGER NOT NULL,
    qber_ppm INTEGER NOT NULL,
    level INTEGER NOT NULL,
    capacity INTEGER NOT NULL,
    consumed INTEGER NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (node, peer)
);
CREATE TABLE IF NOT EXISTS accounting (
    user TEXT NOT NULL,
    contract TEXT NOT NULL,
    master TEXT NOT NULL,
    slave TEXT NOT NULL,
    allowed INTEGER NOT NULL,
    refused_limits INTEGER NOT NULL,
    refused_unauthorised INTEGER NOT NULL,
    refused_quota INTEGER NOT NULL,
    keys INTEGER NOT NULL,
    bits INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (contract, master, slave)
);
CREATE TABLE IF NOT EXISTS security (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL
);
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Alarm:
    id: int
    kind: str
    resource: str
    node: str
    severity: str
    text: str
    raised: float
    updated: float
    cleared: float | None
    acked_by: str | None
    acked: float | None
    reports: int
    sources: str
    """The reporters, comma-separated, in the order they first reported."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkSample:
    node: str
    link: str
    peer: int
    state: str
    skr: int
    qber_ppm: int
    level: int
    capacity: int
    consumed: int


class Store:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(SCHEMA)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(alarms)")}
            if "sources" not in columns:  # a database of before the controller link
                self.db.execute("ALTER TABLE alarms ADD COLUMN sources TEXT NOT NULL DEFAULT ''")
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the manager's database: {exc}") from exc
        self.db.row_factory = sqlite3.Row

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The statements inside in one transaction (one sync to disk); a transaction
        already open takes them (nested: the outermost commits)."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # -- alarms --------------------------------------------------------------------------
    def notify(
        self, notification: str, node: str, severity: str, resource: str, text: str
    ) -> int | None:
        """Record one notification; return the alarm it raised, updated or cleared (None
        for a clear that matches no open alarm, or a notification that is no alarm)."""
        kind = KINDS.get(notification)
        if kind is None or severity not in SEVERITIES:
            return None
        key = resource[:64] if kind in LINK_KINDS else node[:64]
        now, text = self.clock(), text[:MAX_TEXT]
        row = self.db.execute(
            "SELECT id, sources FROM alarms WHERE kind = ? AND resource = ? AND cleared IS NULL",
            (kind, key),
        ).fetchone()
        if severity == "cleared" or notification in ("qkdnLinkUp", "qkdnNodeReachable"):
            if row is None:
                return None
            self.db.execute(
                "UPDATE alarms SET cleared = ?, updated = ?, text = ?, severity = 'cleared' "
                "WHERE id = ?",
                (now, now, text, row["id"]),
            )
            return int(row["id"])
        if row is not None:
            sources = _add_source(row["sources"], node)
            self.db.execute(
                "UPDATE alarms SET severity = ?, text = ?, updated = ?, reports = reports + 1, "
                "sources = ? WHERE id = ?",
                (severity, text, now, sources, row["id"]),
            )
            return int(row["id"])
        cur = self.db.execute(
            "INSERT INTO alarms (kind, resource, node, severity, text, raised, updated, sources) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, key, node[:64], severity, text, now, now, _add_source("", node)),
        )
        return int(cur.lastrowid or 0)

    def ack(self, alarm: int, who: str) -> bool:
        """Acknowledge an alarm; False if there is no such alarm or it was acknowledged."""
        cur = self.db.execute(
            "UPDATE alarms SET acked_by = ?, acked = ? WHERE id = ? AND acked IS NULL",
            (who[:64], self.clock(), alarm),
        )
        return cur.rowcount == 1

    def alarms(self, *, include_cleared: bool = False, limit: int = 500) -> list[Alarm]:
        where = "" if include_cleared else "WHERE cleared IS NULL"
        rows = self.db.execute(
            f"SELECT * FROM alarms {where} ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [Alarm(**dict(r)) for r in rows]

    def alarm(self, alarm: int) -> Alarm | None:
        row = self.db.execute("SELECT * FROM alarms WHERE id = ?", (alarm,)).fetchone()
        return Alarm(**dict(row)) if row is not None else None

    # -- security events ---------------------------------------------------------------
    def security(self, source: str, kind: str, text: str) -> None:
        self.db.execute(
            "INSERT INTO security (ts, source, kind, text) VALUES (?, ?, ?, ?)",
            (self.clock(), source[:64], kind[:32], text[:MAX_TEXT]),
        )

    def security_events(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM security ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    # -- inventory and link state ------------------------------------------------------
    def seen(self, node: str, **fields: Any) -> None:
        cols = ("id", "role", "software", "slot", "address", "cert_expiry", "reachable")
        values = [fields.get(c) for c in cols]
        self.db.execute(
            "INSERT INTO inventory (node, id, role, software, slot, address, cert_expiry, "
            "reachable, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (node) DO UPDATE SET id = excluded.id, role = excluded.role, "
            "software = excluded.software, slot = excluded.slot, address = excluded.address, "
            "cert_expiry = excluded.cert_expiry, reachable = excluded.reachable, "
            "last_seen = COALESCE(excluded.last_seen, inventory.last_seen)",
            (node, *values, self.clock() if fields.get("reachable") else None),
        )

    def unreachable(self, node: str) -> None:
        self.db.execute("UPDATE inventory SET reachable = 0 WHERE node = ?", (node,))

    def inventory(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM inventory ORDER BY id")]

    def record(self, samples: list[LinkSample]) -> None:
        """The links' current state, and one history sample each."""
        now = self.clock()
        with self.transaction():
            for s in samples:
                self.db.execute(
                    "INSERT OR REPLACE INTO links VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        s.node,
                        s.peer,
                        s.link,
                        s.state,
                        s.skr,
                        s.qber_ppm,
                        s.level,
                        s.capacity,
                        s.consumed,
                        now,
                    ),
                )
                self.db.execute(
                    "INSERT INTO samples VALUES (?, 0, ?, ?, ?, ?, ?, ?, 1)",
                    (now, s.node, s.link, s.skr, s.qber_ppm, s.level, s.level),
                )

    def link_state(self, node: str, peer: int, state: str) -> None:
        """A link end's state as a notification reports it (between two polls)."""
        self.db.execute(
            "UPDATE links SET state = ?, seen = ? WHERE node = ? AND peer = ?",
            (state[:16], self.clock(), node, peer),
        )

    def links(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM links ORDER BY link, node")]

    # -- accounting (the AAA device's export) -------------------------------------------
    def set_accounting(self, rows: list[AcctRow]) -> None:
        """The AAA device's accounting as last walked (replaces the last view)."""
        now = self.clock()
        with self.transaction():
            self.db.execute("DELETE FROM accounting")
            self.db.executemany(
                "INSERT OR REPLACE INTO accounting VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.user[:64], r.contract[:64], r.master[:64], r.slave[:64],
                        r.allowed, r.refused_limits, r.refused_unauthorised, r.refused_quota,
                        r.keys, r.bits, r.failed, now,
                    )
                    for r in rows
                ],
            )  # fmt: skip

    def accounting(self) -> list[AcctRow]:
        rows = self.db.execute(
            "SELECT * FROM accounting ORDER BY user, contract, master, slave"
        ).fetchall()
        out = []
        for r in rows:
            fields = dict(r)
            fields.pop("seen")
            out.append(AcctRow(**fields))
        return out

    # -- history -----------------------------------------------------------------------
    def record_tkey(self, node: str, p50_us: int, p99_us: int, served: int) -> None:
        """One T_key sample of a node (a poll of a node that served enc_keys)."""
        self.db.execute(
            "INSERT INTO node_samples VALUES (?, 0, ?, ?, ?, ?, 1)",
            (self.clock(), node[:64], p50_us, p99_us, served),
        )

    def tkey_history(
        self, node: str, since: float = 0.0, limit: int = 2000
    ) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT ts, span, tkey_p50_us, tkey_p99_us, served, n FROM node_samples "
            "WHERE node = ? AND ts >= ? ORDER BY ts DESC LIMIT ?",
            (node[:64], since, limit),
        ).fetchall()
        return [dict(r) for r in reversed(rows)]

    def tkey_nodes(self) -> list[str]:
        """Nodes with a T_key history."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT node FROM node_samples")]

    def downsample(self) -> int:
        """Fold raw samples older than RAW_KEEP_S into BUCKET_S buckets; rows folded."""
        cutoff = self.clock() - RAW_KEEP_S
        with self.transaction():
            self.db.execute(
                "INSERT INTO node_samples SELECT CAST(ts / ? AS INTEGER) * ?, ?, node, "
                "AVG(tkey_p50_us), AVG(tkey_p99_us), MAX(served), SUM(n) FROM node_samples "
                "WHERE span = 0 AND ts < ? GROUP BY node, CAST(ts / ? AS INTEGER)",
                (BUCKET_S, BUCKET_S, BUCKET_S, cutoff, BUCKET_S),
            )
            self.db.execute("DELETE FROM node_samples WHERE span = 0 AND ts < ?", (cutoff,))
            self.db.execute(
                "INSERT INTO samples SELECT CAST(ts / ? AS INTEGER) * ?, ?, node, link, "
                "AVG(skr), AVG(qber_ppm), AVG(level), MIN(level_min), SUM(n) FROM samples "
                "WHERE span = 0 AND ts < ? GROUP BY node, link, CAST(ts / ? AS INTEGER)",
                (BUCKET_S, BUCKET_S, BUCKET_S, cutoff, BUCKET_S),
            )
            n = self.db.execute("DELETE FROM samples WHERE span = 0 AND ts < ?", (cutoff,)).rowcount
        return n

    def history(self, link: str, since: float = 0.0, limit: int = 2000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT ts, span, node, skr, qber_ppm, level, level_min, n FROM samples "
            "WHERE link = ? AND ts >= ? ORDER BY ts DESC LIMIT ?",
            (link[:32], since, limit),
        ).fetchall()
        return [dict(r) for r in reversed(rows)]


def _add_source(sources: str, node: str) -> str:
    """``sources`` with ``node`` added once (bounded: the list stops growing at MAX_TEXT)."""
    names = [n for n in sources.split(",") if n]
    name = node[:64].replace(",", ";")
    if name in names:
        return sources
    joined = ",".join([*names, name])
    return joined if len(joined) <= MAX_TEXT else sources
