"""The AAA registry in SQLite: users, SAEs, UKMS -> AKMS attachments and contracts.

The database runs in WAL mode with ``synchronous=FULL``: a committed change survives a
``kill -9`` or a power cut. Every write goes through :class:`Registry`, which checks each
value (bounded names and numbers, references that exist) before it reaches SQL, raising
:class:`RegistryError` with a code. Readers take a :class:`Snapshot`: an immutable,
typed copy of the whole registry that the ledger and the agent decide from; the agent
notices another process's commit through ``PRAGMA data_version`` (:meth:`Registry.changed`).

The registry knows users and access nodes (UKMS, AKMS), never carrier nodes, links or
routes, and never key material.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.aaa.errors import NotFound, RegistryError

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}", re.ASCII)
"""Users, SAEs and contracts: what an SNMP index (SnmpAdminString 1..32) can carry."""
FINGERPRINT = re.compile(r"(?:[0-9a-f]{64})?", re.ASCII)
"""SHA-256 of the SAE's DER certificate, lower-case hex, or empty (not yet known)."""
MAX_TEXT = 128
MAX_COUNT = 2**53
MAX_KEY_BITS = 8192
MAX_NODE = 999
MODES = ("gcm", "otp")
POLICIES = ("balanced", "fewest-hops", "most-key")
"""A contract's routing policy class (the QKDN Controller weighs links per class)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
  id TEXT PRIMARY KEY, customer TEXT NOT NULL, billing TEXT NOT NULL,
  suspended INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS akms (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS ukms (
  id INTEGER PRIMARY KEY, akms INTEGER NOT NULL REFERENCES akms(id));
CREATE TABLE IF NOT EXISTS saes (
  id TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(id),
  ukms INTEGER NOT NULL REFERENCES ukms(id), fingerprint TEXT NOT NULL,
  suspended INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS contracts (
  id TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(id),
  max_key_size INTEGER NOT NULL, keys_per_request INTEGER NOT NULL,
  keys_per_day INTEGER NOT NULL, bits_per_day INTEGER NOT NULL,
  keys_per_month INTEGER NOT NULL, bits_per_month INTEGER NOT NULL,
  max_rate INTEGER NOT NULL, valid_from TEXT, valid_until TEXT,
  relay_mode TEXT NOT NULL, priority INTEGER NOT NULL,
  suspended INTEGER NOT NULL DEFAULT 0,
  route_policy TEXT NOT NULL DEFAULT 'balanced');
CREATE TABLE IF NOT EXISTS pairs (
  master TEXT NOT NULL REFERENCES saes(id), slave TEXT NOT NULL REFERENCES saes(id),
  contract TEXT NOT NULL REFERENCES contracts(id), PRIMARY KEY (master, slave));
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class User:
    id: str
    customer: str
    """Who the user is (the customer's name)."""
    billing: str = ""
    """The billing reference accounting exports carry."""
    suspended: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Sae:
    id: str
    user: str
    ukms: int
    """The SAE's home UKMS (node ID)."""
    fingerprint: str = ""
    """SHA-256 of its certificate (hex), empty until known."""
    suspended: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Contract:
    id: str
    user: str
    max_key_size: int = 256
    """Largest key, in bits."""
    keys_per_request: int = 128
    keys_per_day: int = 1_000_000
    bits_per_day: int = 256_000_000
    keys_per_month: int = 31_000_000
    bits_per_month: int = 7_936_000_000
    max_rate: int = 10_000
    """Keys per second, at most."""
    valid_from: dt.date | None = None
    valid_until: dt.date | None = None
    """Inclusive (UTC days)."""
    relay_mode: str = "gcm"
    route_policy: str = "balanced"
    """Routing policy class of :data:`POLICIES`, passed to the controller per request."""
    priority: int = 0
    suspended: bool = False
    pairs: tuple[tuple[str, str], ...] = ()
    """(master SAE, slave SAE) pairs this contract covers."""

    def valid_on(self, day: dt.date) -> bool:
        return (self.valid_from is None or self.valid_from <= day) and (
            self.valid_until is None or day <= self.valid_until
        )


LIMITS = {
    "max_key_size": (8, MAX_KEY_BITS),
    "keys_per_request": (1, 100_000),
    "keys_per_day": (0, MAX_COUNT),
    "bits_per_day": (0, MAX_COUNT),
    "keys_per_month": (0, MAX_COUNT),
    "bits_per_month": (0, MAX_COUNT),
    "max_rate": (1, 1_000_000),
    "priority": (0, 255),
}
"""Bounds of each numeric contract field (inclusive)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole registry at one instant, as plain values (what decisions are made from)."""

    users: dict[str, User]
    saes: dict[str, Sae]
    ukms: dict[int, int]
    """UKMS -> the AKMS it hangs off."""
    akms: frozenset[int]
    contracts: dict[str, Contract]
    pairs: dict[tuple[str, str], str]
    """(master, slave) -> contract ID."""


def check_name(kind: str, value: str) -> str:
    if not NAME.fullmatch(value):
        raise RegistryError(
            f"{kind}: expected 1..32 of a-z, 0-9 and '-' (not first), got {value[:40]!r}",
            code="AAA-VALUE",
        )
    return value


def check_text(kind: str, value: str) -> str:
    if len(value) > MAX_TEXT or not value.isprintable():
        raise RegistryError(f"{kind}: expected printable text of at most {MAX_TEXT} characters")
    return value


def check_node(kind: str, value: int) -> int:
    if not 1 <= value <= MAX_NODE:
        raise RegistryError(f"{kind}: expected a node ID 1..{MAX_NODE}, got {value}")
    return value


def check_contract(c: Contract) -> Contract:
    check_name("contract", c.id)
    check_name("user", c.user)
    for field, (lo, hi) in LIMITS.items():
        value = getattr(c, field)
        if not lo <= value <= hi:
            raise RegistryError(f"contract {c.id}: {field} expected {lo}..{hi}, got {value}")
    if c.max_key_size % 8:
        raise RegistryError(f"contract {c.id}: max_key_size must be a multiple of 8")
    if c.relay_mode not in MODES:
        raise RegistryError(f"contract {c.id}: relay_mode expected gcm or otp")
    if c.route_policy not in POLICIES:
        raise RegistryError(
            f"contract {c.id}: route_policy expected one of {', '.join(POLICIES)}",
            code="AAA-VALUE",
        )
    if c.valid_from and c.valid_until and c.valid_until < c.valid_from:
        raise RegistryError(f"contract {c.id}: valid_until is before valid_from")
    for master, slave in c.pairs:
        if master == slave:
            raise RegistryError(f"contract {c.id}: a pair needs two SAEs, got {master}:{slave}")
    return c


class Registry:
    """The registry database; one instance per process (not shared between threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            _upgrade(self.db)
        except (sqlite3.Error, OSError) as exc:
            raise RegistryError(f"{path}: cannot open the registry: {exc}", code="AAA-DB") from exc
        self._version = self._data_version()

    def close(self) -> None:
        self.db.close()

    # -- change detection ----------------------------------------------------------------
    def _data_version(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def changed(self) -> bool:
        """True once after another connection committed a change."""
        now = self._data_version()
        if now == self._version:
            return False
        self._version = now
        return True

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            raise RegistryError(f"refused by the registry: {exc}", code="AAA-CONFLICT") from exc
        except sqlite3.Error as exc:
            raise RegistryError(f"{self.path}: {exc}", code="AAA-DB") from exc

    # -- writes ----------------------------------------------------------------------------
    def add_user(self, user: User) -> User:
        check_name("user", user.id)
        check_text("customer", user.customer)
        check_text("billing", user.billing)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE id=?", (user.id,)).fetchone():
                raise RegistryError(f"user {user.id} exists", code="AAA-EXISTS")
            db.execute(
                "INSERT INTO users VALUES (?,?,?,?)",
                (user.id, user.customer, user.billing, int(user.suspended)),
            )
        return user

    def set_user(self, user_id: str, **changes: Any) -> User:
        user = dataclasses.replace(self.user(user_id), **changes)
        check_text("customer", user.customer)
        check_text("billing", user.billing)
        with self._tx() as db:
            db.execute(
                "UPDATE users SET customer=?, billing=?, suspended=? WHERE id=?",
                (user.customer, user.billing, int(user.suspended), user.id),
            )
        return user

    def add_akms(self, akms: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO akms VALUES (?)", (check_node("akms", akms),))

    def attach(self, ukms: int, akms: int) -> None:
        """Attach a UKMS to the AKMS it hangs off (the AKMS is registered if new)."""
        check_node("ukms", ukms)
        check_node("akms", akms)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO akms VALUES (?)", (akms,))
            db.execute("INSERT OR REPLACE INTO ukms VALUES (?,?)", (ukms, akms))

    def add_sae(self, sae: Sae) -> Sae:
        self._check_sae(sae)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM saes WHERE id=?", (sae.id,)).fetchone():
                raise RegistryError(f"SAE {sae.id} exists", code="AAA-EXISTS")
            db.execute(
                "INSERT INTO saes VALUES (?,?,?,?,?)",
                (sae.id, sae.user, sae.ukms, sae.fingerprint, int(sae.suspended)),
            )
        return sae

    def set_sae(self, sae_id: str, **changes: Any) -> Sae:
        sae = dataclasses.replace(self.sae(sae_id), **changes)
        self._check_sae(sae)
        with self._tx() as db:
            db.execute(
                "UPDATE saes SET user=?, ukms=?, fingerprint=?, suspended=? WHERE id=?",
                (sae.user, sae.ukms, sae.fingerprint, int(sae.suspended), sae.id),
            )
        return sae

    def _check_sae(self, sae: Sae) -> None:
        check_name("sae", sae.id)
        check_name("user", sae.user)
        check_node("ukms", sae.ukms)
        if not FINGERPRINT.fullmatch(sae.fingerprint):
            raise RegistryError("fingerprint: expected 64 lower-case hex digits (SHA-256)")
        self.user(sae.user)
        if not self.db.execute("SELECT 1 FROM ukms WHERE id=?", (sae.ukms,)).fetchone():
            raise NotFound(f"UKMS {sae.ukms} is not attached to an AKMS (qkdn aaa ukms attach)")

    def add_contract(self, contract: Contract) -> Contract:
        check_contract(contract)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM contracts WHERE id=?", (contract.id,)).fetchone():
                raise RegistryError(f"contract {contract.id} exists", code="AAA-EXISTS")
            self._write_contract(db, contract)
        return contract

    def set_contract(self, contract_id: str, **changes: Any) -> Contract:
        contract = check_contract(dataclasses.replace(self.contract(contract_id), **changes))
        with self._tx() as db:
            db.execute("DELETE FROM pairs WHERE contract=?", (contract.id,))
            db.execute("DELETE FROM contracts WHERE id=?", (contract.id,))
            self._write_contract(db, contract)
        return contract

    def _write_contract(self, db: sqlite3.Connection, c: Contract) -> None:
        self.user(c.user)
        db.execute(
            "INSERT INTO contracts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                c.id,
                c.user,
                c.max_key_size,
                c.keys_per_request,
                c.keys_per_day,
                c.bits_per_day,
                c.keys_per_month,
                c.bits_per_month,
                c.max_rate,
                c.valid_from.isoformat() if c.valid_from else None,
                c.valid_until.isoformat() if c.valid_until else None,
                c.relay_mode,
                c.priority,
                int(c.suspended),
                c.route_policy,
            ),
        )
        for master, slave in c.pairs:
            for sae_id in (master, slave):
                if self.sae(sae_id).user != c.user:
                    raise RegistryError(f"contract {c.id}: SAE {sae_id} is not of user {c.user}")
            taken = db.execute(
                "SELECT contract FROM pairs WHERE master=? AND slave=?", (master, slave)
            ).fetchone()
            if taken:
                raise RegistryError(
                    f"pair {master}:{slave} is already under contract {taken[0]}",
                    code="AAA-EXISTS",
                )
            db.execute("INSERT INTO pairs VALUES (?,?,?)", (master, slave, c.id))

    # -- reads -------------------------------------------------------------------------------
    def user(self, user_id: str) -> User:
        row = self.db.execute("SELECT * FROM users WHERE id=?", (user_id,)).fetchone()
        if row is None:
            raise NotFound(f"no user {user_id[:40]!r}")
        return User(id=row[0], customer=row[1], billing=row[2], suspended=bool(row[3]))

    def sae(self, sae_id: str) -> Sae:
        row = self.db.execute("SELECT * FROM saes WHERE id=?", (sae_id,)).fetchone()
        if row is None:
            raise NotFound(f"no SAE {sae_id[:40]!r}")
        return _sae(row)

    def contract(self, contract_id: str) -> Contract:
        found = self.snapshot().contracts.get(contract_id)
        if found is None:
            raise NotFound(f"no contract {contract_id[:40]!r}")
        return found

    def snapshot(self) -> Snapshot:
        db = self.db
        users = {
            r[0]: User(id=r[0], customer=r[1], billing=r[2], suspended=bool(r[3]))
            for r in db.execute("SELECT * FROM users")
        }
        saes = {r[0]: _sae(r) for r in db.execute("SELECT * FROM saes")}
        pairs: dict[tuple[str, str], str] = {}
        by_contract: dict[str, list[tuple[str, str]]] = {}
        for master, slave, cid in db.execute("SELECT * FROM pairs ORDER BY master, slave"):
            pairs[(master, slave)] = cid
            by_contract.setdefault(cid, []).append((master, slave))
        contracts = {
            r[0]: _contract(r, tuple(by_contract.get(r[0], ())))
            for r in db.execute("SELECT * FROM contracts")
        }
        return Snapshot(
            users=users,
            saes=saes,
            ukms=dict(db.execute("SELECT id, akms FROM ukms").fetchall()),
            akms=frozenset(r[0] for r in db.execute("SELECT id FROM akms")),
            contracts=contracts,
            pairs=pairs,
        )


def _upgrade(db: sqlite3.Connection) -> None:
    """Bring a registry written by an older release up to :data:`SCHEMA` (columns added
    since are appended with their defaults)."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(contracts)")}
    if "route_policy" not in columns:
        db.execute("ALTER TABLE contracts ADD COLUMN route_policy TEXT NOT NULL DEFAULT 'balanced'")


def _sae(row: tuple[Any, ...]) -> Sae:
    return Sae(id=row[0], user=row[1], ukms=row[2], fingerprint=row[3], suspended=bool(row[4]))


def _date(text: str | None) -> dt.date | None:
    return dt.date.fromisoformat(text) if text else None


def _contract(r: tuple[Any, ...], pairs: tuple[tuple[str, str], ...]) -> Contract:
    return Contract(
        id=r[0],
        user=r[1],
        max_key_size=r[2],
        keys_per_request=r[3],
        keys_per_day=r[4],
        bits_per_day=r[5],
        keys_per_month=r[6],
        bits_per_month=r[7],
        max_rate=r[8],
        valid_from=_date(r[9]),
        valid_until=_date(r[10]),
        relay_mode=r[11],
        priority=r[12],
        suspended=bool(r[13]),
        route_policy=r[14],
        pairs=pairs,
    )
