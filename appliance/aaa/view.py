"""QKDN-AAA-MIB's instances over the AAA service: GET, GETNEXT and SET without SNMP.

Sans-IO: OIDs are tuples of ints, values are ``(syntax, int | bytes)`` with the syntax the
MIB gives the object. :mod:`appliance.aaa.agent` wraps this for pysnmp (types, access
control, error statuses); the tests drive it directly.

* Directory, contract, grant and accounting tables are walkable (GETNEXT in OID order).
* ``aaaQuotaTable`` rows exist only when asked for: a GET of any column of an index asks
  the ledger (once per request ID: the answer is cached) and returns that column.
* ``aaaUsageTable``: a SET of a row's columns in one PDU records one report; a GET reads
  what was recorded.
* ``aaaGrantTable``: a SET of ``aaaGrantState = closed(3)`` (with the use) settles a grant.
* The operator's SETs on users, SAEs and contracts change the registry and revoke the
  quota granted under them (the revoked grants are returned, for the INFORMs).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable
from typing import Any

from appliance.aaa import mib
from appliance.aaa.errors import AaaError
from appliance.aaa.ledger import Ask, Grant, Reason, Refusal
from appliance.aaa.registry import check_contract
from appliance.aaa.service import AaaService

Value = tuple[str, int | bytes]
Oid = tuple[int, ...]
U32 = 2**32 - 1
TRUTH = {True: 1, False: 2}
MODES = {"gcm": 1, "otp": 2}
POLICY_NUMBERS = {"balanced": 1, "fewest-hops": 2, "most-key": 3}
"""aaaContractRoutePolicy's and aaaQuotaRoutePolicy's enumeration (none(0): refused)."""


class SetFailure(AaaError):
    """A SET the view refuses; ``status`` is the SNMP error status, ``index`` the varbind."""

    code = "AAA-SET"

    def __init__(self, status: str, index: int, message: str = "") -> None:
        super().__init__(message or status)
        self.status, self.index = status, index


RECORD_COLUMNS = (
    "aaaUsageMaster",
    "aaaUsageSlave",
    "aaaUsageOutcome",
    "aaaUsageReason",
    "aaaUsageKeys",
    "aaaUsageBits",
    "aaaUsageGrant",
)
"""aaaUsageRecord's fields, in order."""


def _sat(n: int) -> int:
    return min(n, U32)


class MibView:
    def __init__(self, service: AaaService) -> None:
        self.service = service
        self.m = mib.load()
        self._columns = {o.oid: o for o in self.m.values() if o.macro == "OBJECT-TYPE"}
        self._lengths = sorted({len(k) for k in self._columns}, reverse=True)
        self._entries = {o.oid: o.name for o in self.m.values()}
        self._built = -1
        self._oids: list[Oid] = []
        self._values: dict[Oid, Value] = {}

    # -- lookups -------------------------------------------------------------------------
    def locate(self, oid: Oid) -> tuple[mib.MibObject, Oid] | None:
        """The MIB object (column or scalar) ``oid`` names, and the index after it."""
        for n in self._lengths:
            obj = self._columns.get(oid[:n])
            if obj is not None:
                return obj, oid[n:]
        return None

    def _index_kinds(self, entry: str) -> list[mib.MibObject]:
        return [self.m[n] for n in self.m[entry].index]

    def _entry_of(self, column: mib.MibObject) -> str:
        return self._entries[column.oid[:-1]]

    # -- GET ---------------------------------------------------------------------------------
    def get(self, oid: Oid, akms: int | None) -> Value | None:
        found = self.locate(oid)
        if found is None:
            return None
        obj, suffix = found
        if obj.name.startswith("aaaQuota") and obj.access == "read-only":
            return self._quota(obj, suffix, akms)
        if obj.name.startswith("aaaUsage") and obj.access == "read-write":
            return self._usage(obj, suffix)
        self._build()
        return self._values.get(oid)

    def _quota(self, obj: mib.MibObject, suffix: Oid, akms: int | None) -> Value | None:
        values = mib.decode_index(self._index_kinds("aaaQuotaEntry"), suffix)
        if values is None or akms is None:
            return None
        ukms, rid, master, slave, keys, bits = values
        ask = Ask(
            akms=akms,
            ukms=int(ukms),
            request_id=int(rid),
            master=_text(master),
            slave=_text(slave),
            keys=int(keys),
            bits=int(bits),
        )
        answer = self.service.ask(ask)
        return (obj.syntax, quota_columns(answer, self.service.clock())[obj.name])

    def _usage(self, obj: mib.MibObject, suffix: Oid) -> Value | None:
        values = mib.decode_index(self._index_kinds("aaaUsageEntry"), suffix)
        if values is None:
            return None
        rep = self.service.recorded(int(values[0]), _text(values[1]))
        if rep is None:
            return None
        cols: dict[str, int | bytes] = {
            "aaaUsageMaster": rep.master.encode(),
            "aaaUsageSlave": rep.slave.encode(),
            "aaaUsageOutcome": self.m["aaaUsageOutcome"].enums[rep.outcome],
            "aaaUsageReason": int(rep.reason),
            "aaaUsageKeys": rep.keys,
            "aaaUsageBits": _sat(rep.bits),
            "aaaUsageGrant": rep.grant,
        }
        if obj.name == "aaaUsageRecord":
            return (obj.syntax, record(*(_text(cols[c]) for c in RECORD_COLUMNS)))
        return (obj.syntax, cols[obj.name])

    # -- GETNEXT -----------------------------------------------------------------------------
    def next(self, oid: Oid) -> tuple[Oid, Value] | None:
        """The first walkable instance after ``oid``, or None past the end."""
        self._build()
        i = bisect.bisect_right(self._oids, oid)
        if i == len(self._oids):
            return None
        found = self._oids[i]
        return found, self._values[found]

    def _build(self) -> None:
        if self._built == self.service.generation:
            return
        values: dict[Oid, Value] = {}
        for entry, rows in self._rows().items():
            kinds = self._index_kinds(entry)
            for index, cols in rows:
                suffix = mib.encode_index(kinds, index)
                for name, value in cols.items():
                    obj = self.m[name]
                    values[obj.oid + suffix] = (obj.syntax, value)
        c = self.service.counters
        for name, value in (
            ("aaaGrantsIssued", c.issued),
            ("aaaGrantsRefused", c.refused),
            ("aaaGrantsRevoked", c.revoked),
            ("aaaInformsSent", c.informs_sent),
            ("aaaInformsAcknowledged", c.informs_acked),
        ):
            values[(*self.m[name].oid, 0)] = ("Counter64", value)
        self._values, self._oids = values, sorted(values)
        self._built = self.service.generation

    def _rows(self) -> dict[str, list[tuple[list[int | bytes], dict[str, int | bytes]]]]:
        s = self.service.snap
        return {
            "aaaUserEntry": [
                (
                    [u.id.encode()],
                    {
                        "aaaUserCustomer": u.customer.encode(),
                        "aaaUserBilling": u.billing.encode(),
                        "aaaUserSuspended": TRUTH[u.suspended],
                    },
                )
                for u in s.users.values()
            ],
            "aaaSaeEntry": [
                (
                    [x.id.encode()],
                    {
                        "aaaSaeUser": x.user.encode(),
                        "aaaSaeUkms": x.ukms,
                        "aaaSaeFingerprint": x.fingerprint.encode(),
                        "aaaSaeSuspended": TRUTH[x.suspended],
                    },
                )
                for x in s.saes.values()
            ],
            "aaaUkmsEntry": [([u], {"aaaUkmsAkms": a}) for u, a in s.ukms.items()],
            "aaaContractEntry": [
                ([c.id.encode()], contract_columns(c)) for c in s.contracts.values()
            ],
            "aaaPairEntry": [
                ([m.encode(), sl.encode()], {"aaaPairContract": cid.encode()})
                for (m, sl), cid in s.pairs.items()
            ],
            "aaaGrantEntry": [
                ([g.ukms, g.id], self._grant_columns(g)) for g in self.service.ledger.open_grants()
            ],
            "aaaAcctEntry": [
                (
                    [r.contract.encode(), r.master.encode(), r.slave.encode()],
                    {
                        "aaaAcctAllowed": r.allowed,
                        "aaaAcctRefusedLimits": r.refused_limits,
                        "aaaAcctRefusedUnauthorised": r.refused_unauthorised,
                        "aaaAcctRefusedQuota": r.refused_quota,
                        "aaaAcctKeys": r.keys,
                        "aaaAcctBits": r.bits,
                        "aaaAcctFailed": r.failed,
                    },
                )
                for r in self.service.totals()
                if r.contract
            ],
        }

    def _grant_columns(self, g: Grant) -> dict[str, int | bytes]:
        held = self.service.ledger.grants[g.id]
        return {
            "aaaGrantContract": g.contract.encode(),
            "aaaGrantKeys": g.keys,
            "aaaGrantBits": _sat(g.bits),
            "aaaGrantUsedKeys": _sat(held.used_keys),
            "aaaGrantUsedBits": _sat(held.used_bits),
            "aaaGrantState": 2 if held.revoked else 1,
        }

    # -- SET ---------------------------------------------------------------------------------
    def set(self, binds: list[tuple[Oid, int | bytes]], akms: int | None) -> list[Grant]:
        """Apply a SET PDU (all or nothing per row); the grants it revoked."""
        rows: dict[tuple[str, Oid], dict[str, tuple[int, int | bytes]]] = {}
        for i, (oid, value) in enumerate(binds):
            found = self.locate(oid)
            if found is None:
                raise SetFailure("noCreation", i)
            obj, suffix = found
            if obj.access != "read-write":
                raise SetFailure("notWritable", i)
            if not _fits(obj, value):
                raise SetFailure("wrongValue", i)
            rows.setdefault((self._entry_of(obj), suffix), {})[obj.name] = (i, value)
        plans = [self._plan(entry, suffix, cols, akms) for (entry, suffix), cols in rows.items()]
        revoked: list[Grant] = []
        with self.service.accounting.batch():  # a SET's reports: one commit
            for plan in plans:
                revoked += plan()
        return revoked

    def _plan(
        self, entry: str, suffix: Oid, cols: dict[str, tuple[int, int | bytes]], akms: int | None
    ) -> Callable[[], list[Grant]]:
        """Check one row's SET completely; return what applies it."""
        first = min(i for i, _ in cols.values())
        index = mib.decode_index(self._index_kinds(entry), suffix)
        if index is None:
            raise SetFailure("noCreation", first)
        vals = {k: v for k, (_, v) in cols.items()}
        if entry == "aaaUsageEntry":
            return self._plan_usage(index, vals, first)
        if entry == "aaaGrantEntry":
            return self._plan_close(index, vals, first)
        return self._plan_registry(entry, _text(index[0]), vals, first)

    def _plan_usage(
        self, index: list[int | bytes], vals: dict[str, int | bytes], at: int
    ) -> Callable[[], list[Grant]]:
        record = vals.get("aaaUsageRecord")
        if record is not None:
            if len(vals) > 1:
                raise SetFailure("inconsistentValue", at, "aaaUsageRecord is set alone")
            vals = self._record_columns(record, at)
        if not {"aaaUsageMaster", "aaaUsageSlave", "aaaUsageOutcome"} <= vals.keys():
            raise SetFailure("inconsistentValue", at, "a report needs master, slave, outcome")
        outcome = {v: k for k, v in self.m["aaaUsageOutcome"].enums.items()}
        fields = dict(
            master=_text(vals["aaaUsageMaster"]),
            slave=_text(vals["aaaUsageSlave"]),
            outcome=outcome[int(vals["aaaUsageOutcome"])],
            reason=Reason(int(vals.get("aaaUsageReason", 0))),
            keys=int(vals.get("aaaUsageKeys", 0)),
            bits=int(vals.get("aaaUsageBits", 0)),
            grant=int(vals.get("aaaUsageGrant", 0)),
        )
        ukms, request = int(index[0]), _text(index[1])

        def apply() -> list[Grant]:
            try:
                self.service.report(ukms, request, fields)
            except AaaError as exc:
                raise SetFailure("inconsistentValue", at, exc.message) from exc
            return []

        return apply

    def _record_columns(self, record: int | bytes, at: int) -> dict[str, int | bytes]:
        """aaaUsageRecord's fields as the columns they stand for, each checked as a SET of
        that column would be (wrongValue otherwise)."""
        fields = record.split(b" ") if isinstance(record, bytes) else []
        if len(fields) != len(RECORD_COLUMNS):
            raise SetFailure("wrongValue", at, "aaaUsageRecord has seven fields")
        vals: dict[str, int | bytes] = {}
        for name, field in zip(RECORD_COLUMNS, fields, strict=True):
            obj = self.m[name]
            value: int | bytes = field
            if obj.syntax != "OCTET STRING":
                if not (field.isdigit() and len(field) <= 10):
                    raise SetFailure("wrongValue", at, f"{name}: not a decimal number")
                value = int(field)
            if not _fits(obj, value):
                raise SetFailure("wrongValue", at, f"{name}: out of range")
            vals[name] = value
        return vals

    def _plan_close(
        self, index: list[int | bytes], vals: dict[str, int | bytes], at: int
    ) -> Callable[[], list[Grant]]:
        if vals.get("aaaGrantState") != 3:
            raise SetFailure("wrongValue", at, "only closed(3) may be set")
        ukms, gid = int(index[0]), int(index[1])
        held = self.service.ledger.grants.get(gid)
        if held is None or held.grant.ukms != ukms:
            raise SetFailure("noCreation", at)
        keys, bits = int(vals.get("aaaGrantUsedKeys", 0)), int(vals.get("aaaGrantUsedBits", 0))

        def apply() -> list[Grant]:
            self.service.close(ukms, gid, keys, bits)
            return []

        return apply

    def _plan_registry(
        self, entry: str, name: str, vals: dict[str, int | bytes], at: int
    ) -> Callable[[], list[Grant]]:
        kind = {"aaaUserEntry": "user", "aaaSaeEntry": "sae", "aaaContractEntry": "contract"}
        snap = self.service.snap
        tables: dict[str, dict[str, Any]] = {
            "user": snap.users,
            "sae": snap.saes,
            "contract": snap.contracts,
        }
        table = tables[kind[entry]]
        if name not in table:
            raise SetFailure("noCreation", at)
        changes: dict[str, Any] = {}
        for col, value in vals.items():
            field = WRITABLE[col]
            if field == "suspended":
                changes[field] = value == 1
            elif field == "relay_mode":
                changes[field] = "gcm" if value == 1 else "otp"
            elif field == "route_policy":
                changes[field] = {n: p for p, n in POLICY_NUMBERS.items()}.get(int(value), "")
            else:
                changes[field] = int(value)
        if entry == "aaaContractEntry":
            try:
                check_contract(dataclasses.replace(table[name], **changes))
            except AaaError as exc:
                raise SetFailure("inconsistentValue", at, exc.message) from exc
        return lambda: self.service.change(kind[entry], name, **changes)


WRITABLE = {
    "aaaUserSuspended": "suspended",
    "aaaSaeSuspended": "suspended",
    "aaaContractSuspended": "suspended",
    "aaaContractMaxKeySize": "max_key_size",
    "aaaContractKeysPerRequest": "keys_per_request",
    "aaaContractKeysPerDay": "keys_per_day",
    "aaaContractBitsPerDay": "bits_per_day",
    "aaaContractKeysPerMonth": "keys_per_month",
    "aaaContractBitsPerMonth": "bits_per_month",
    "aaaContractMaxRate": "max_rate",
    "aaaContractRelayMode": "relay_mode",
    "aaaContractPriority": "priority",
    "aaaContractRoutePolicy": "route_policy",
}
"""The operator's writable registry columns and the field each sets."""


def contract_columns(c: Any) -> dict[str, int | bytes]:
    return {
        "aaaContractUser": c.user.encode(),
        "aaaContractMaxKeySize": c.max_key_size,
        "aaaContractKeysPerRequest": c.keys_per_request,
        "aaaContractKeysPerDay": _sat(c.keys_per_day),
        "aaaContractBitsPerDay": _sat(c.bits_per_day),
        "aaaContractKeysPerMonth": _sat(c.keys_per_month),
        "aaaContractBitsPerMonth": _sat(c.bits_per_month),
        "aaaContractMaxRate": c.max_rate,
        "aaaContractValidFrom": c.valid_from.isoformat().encode() if c.valid_from else b"",
        "aaaContractValidUntil": c.valid_until.isoformat().encode() if c.valid_until else b"",
        "aaaContractRelayMode": MODES[c.relay_mode],
        "aaaContractPriority": c.priority,
        "aaaContractSuspended": TRUTH[c.suspended],
        "aaaContractRoutePolicy": POLICY_NUMBERS[c.route_policy],
    }


def quota_columns(answer: Grant | Refusal, now: float) -> dict[str, int | bytes]:
    """An answer as the aaaQuotaTable columns carry it (aaaQuotaAnswer: all in one; the
    routing policy class follows the contract, so that an older reader still parses it)."""
    cols = _quota_columns(answer, now)
    numbers = [str(cols[c]).encode() for c in QUOTA_COLUMNS if c != "aaaQuotaContract"]
    contract = cols["aaaQuotaContract"]
    assert isinstance(contract, bytes)
    if isinstance(answer, Refusal):
        cols["aaaQuotaAnswer"] = b" ".join([*numbers, contract]).rstrip()
    else:
        policy = str(cols["aaaQuotaRoutePolicy"]).encode()
        cols["aaaQuotaAnswer"] = b" ".join([*numbers, contract, policy])
    return cols


def _quota_columns(answer: Grant | Refusal, now: float) -> dict[str, int | bytes]:
    if isinstance(answer, Refusal):
        g: dict[str, int | bytes] = dict.fromkeys(QUOTA_COLUMNS, 0)
        g["aaaQuotaReason"] = int(answer.reason)
        g["aaaQuotaContract"] = b""
        g["aaaQuotaRoutePolicy"] = 0
        return g
    return {
        "aaaQuotaReason": 0,
        "aaaQuotaGrant": answer.id,
        "aaaQuotaGrantKeys": answer.keys,
        "aaaQuotaGrantBits": _sat(answer.bits),
        "aaaQuotaLifetime": max(0, int((answer.expires - now) * 1000)),
        "aaaQuotaUkmsB": answer.ukms_b,
        "aaaQuotaAkmsB": answer.akms_b,
        "aaaQuotaRelayMode": MODES[answer.mode],
        "aaaQuotaMaxKeySize": answer.max_key_size,
        "aaaQuotaKeysPerRequest": answer.keys_per_request,
        "aaaQuotaMaxRate": answer.max_rate,
        "aaaQuotaKeysPerPeriod": _sat(answer.keys_per_period),
        "aaaQuotaContract": answer.contract.encode(),
        "aaaQuotaRoutePolicy": POLICY_NUMBERS[answer.route_policy],
    }


QUOTA_COLUMNS = (
    "aaaQuotaReason",
    "aaaQuotaGrant",
    "aaaQuotaGrantKeys",
    "aaaQuotaGrantBits",
    "aaaQuotaLifetime",
    "aaaQuotaUkmsB",
    "aaaQuotaAkmsB",
    "aaaQuotaRelayMode",
    "aaaQuotaMaxKeySize",
    "aaaQuotaKeysPerRequest",
    "aaaQuotaMaxRate",
    "aaaQuotaKeysPerPeriod",
    "aaaQuotaContract",
)
"""The answer's columns, in the order a client asks for them."""


def _fits(obj: mib.MibObject, value: int | bytes) -> bool:
    """A value within its object's syntax, size or range, and enumeration."""
    if isinstance(value, bytes):
        return obj.syntax == "OCTET STRING" and obj.lo <= len(value) <= obj.hi
    ok = obj.syntax != "OCTET STRING" and obj.lo <= value <= obj.hi
    return ok and (not obj.enums or value in obj.enums.values())


def record(*fields: str | int) -> bytes:
    """An aaaUsageRecord value: master, slave, outcome, reason, keys, bits, grant."""
    return " ".join(str(f) for f in fields).encode("ascii")


def _text(value: int | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
