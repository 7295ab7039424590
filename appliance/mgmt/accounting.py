"""The accounting view of the manager: what the AAA device exports in QKDN-AAA-MIB, per
user, contract and SAE pair.

The manager walks the AAA agent's ``aaaAcctTable`` (counters per contract and SAE pair,
since records began) and ``aaaContractUser`` (which user holds each contract) with the
AAA device's operator user (SNMPv3 authPriv; the network's ``<net>/aaa/aaa.toml``), at
every poll round, and keeps the last view in its database (:meth:`Store.accounting`).
:func:`parse` is the sans-IO part: varbinds in, :class:`AcctRow` out. No key material:
the table holds SAE names and counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from appliance.aaa import mib as aaa_mib

COLUMNS = (
    "allowed",
    "refused_limits",
    "refused_unauthorised",
    "refused_quota",
    "keys",
    "bits",
    "failed",
)
"""aaaAcctAllowed .. aaaAcctFailed (columns 4..10), in MIB order."""
MAX_ROWS = 10_000


@dataclass(frozen=True, kw_only=True, slots=True)
class AcctRow:
    user: str
    contract: str
    master: str
    slave: str
    allowed: int = 0
    refused_limits: int = 0
    refused_unauthorised: int = 0
    refused_quota: int = 0
    keys: int = 0
    bits: int = 0
    failed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def roots() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two subtrees the manager walks: the accounting table, the contracts' users."""
    return aaa_mib.oid("aaaAcctEntry"), aaa_mib.oid("aaaContractUser")


def strings(entry: str, suffix: tuple[int, ...]) -> list[str] | None:
    """The OCTET STRING index values of a row of ``entry`` in ``suffix``, decoded by the
    MIB's own index reader (None if the suffix is not a valid index of that entry)."""
    objects = aaa_mib.load()
    values = aaa_mib.decode_index([objects[n] for n in objects[entry].index], suffix)
    if values is None or not all(isinstance(v, bytes) for v in values):
        return None
    return [v.decode("utf-8", "replace") for v in values if isinstance(v, bytes)]


def parse(binds: list[tuple[tuple[int, ...], Any]]) -> list[AcctRow]:
    """The rows of an ``aaaAcctTable`` and ``aaaContractUser`` walk, each with its user
    (``?`` for a contract the walk did not name), sorted by user, contract, pair."""
    entry, user_col = roots()
    users: dict[str, str] = {}
    counters: dict[tuple[str, str, str], dict[str, int]] = {}
    for oid, value in binds:
        if oid[: len(user_col)] == user_col:
            key = strings("aaaContractEntry", oid[len(user_col) :])
            if key is not None:
                users[key[0]] = bytes(value).decode("utf-8", "replace")
        elif oid[: len(entry)] == entry and len(oid) > len(entry) + 1:
            column = oid[len(entry)]
            parts = strings("aaaAcctEntry", oid[len(entry) + 1 :])
            if parts is None or not 4 <= column < 4 + len(COLUMNS):
                continue
            row = counters.setdefault((parts[0], parts[1], parts[2]), {})
            if len(counters) > MAX_ROWS:
                break
            try:
                row[COLUMNS[column - 4]] = int(value)
            except (TypeError, ValueError):
                continue
    rows = [
        AcctRow(user=users.get(c, "?"), contract=c, master=m, slave=s, **values)
        for (c, m, s), values in counters.items()
    ]
    return sorted(rows, key=lambda r: (r.user, r.contract, r.master, r.slave))


def per_user(rows: list[AcctRow]) -> list[dict[str, Any]]:
    """Totals per user: requests allowed and refused, keys and bits delivered, failures."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        total = out.setdefault(
            r.user, {"user": r.user, "contracts": set(), **dict.fromkeys(COLUMNS, 0)}
        )
        total["contracts"].add(r.contract)
        for c in COLUMNS:
            total[c] += getattr(r, c)
    return [{**t, "contracts": sorted(t["contracts"])} for _, t in sorted(out.items())]
