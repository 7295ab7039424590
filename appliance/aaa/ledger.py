"""Credit control for the AKMSs, in the manner of Diameter (RFC 4006): sans-IO.

Rules of this file:

* An AKMS *asks* for quota on behalf of one SAE pair (keys and bits it expects to need);
  the ledger answers with a :class:`Grant` (an amount, the contract's terms and the
  directory's answer: where the slave SAE is) or a :class:`Refusal` with a reason.
* A grant is charged in full against its contract's day and month, from the moment it is
  issued, until the AKMS *closes* it with what it really used; then the charge becomes
  the use. So at every instant, for every contract and period, the sum of the charges
  never exceeds the contract's limit: nothing is granted beyond the contract, whatever
  the interleaving of asks, closes and revocations (tests/aaa/test_ledger.py
  property-tests this).
* A grant is valid for at most :data:`VALIDITY_S` seconds and never past the end of the
  UTC day it was issued on (nor past the contract's last day): it cannot spill into a
  period it was not charged to. It also holds at most ``max_rate x validity`` keys.
* A suspension or a contract change *revokes* the open grants of a contract; the caller
  tells their AKMSs (an SNMPv3 INFORM). A revoked grant stays charged until closed.
* An open grant never closed (its AKMS died) is settled at its reported use once
  :data:`GRACE_S` seconds have passed since it expired.
* An ask repeated with the same request ID gets the same answer (idempotent: an SNMP GET
  may be retried).

Time is an argument (``now``, Unix seconds, UTC): the ledger never reads a clock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from enum import IntEnum

from appliance.aaa.registry import Contract, Snapshot

VALIDITY_S = 10.0
"""How long a grant may be spent at most."""
GRACE_S = 30.0
"""After expiry, how long an unclosed grant stays charged in full before it is settled."""
ANSWER_CACHE_S = 60.0
"""How long an answer is kept for a repeated ask (same UKMS and request ID)."""


class Reason(IntEnum):
    """Why an ask or a request is refused (``AaaReason`` in QKDN-AAA-MIB)."""

    NONE = 0
    UNKNOWN_PAIR = 1
    WRONG_NODE = 2
    SUSPENDED = 3
    OUTSIDE_WINDOW = 4
    QUOTA = 5
    LIMITS = 6
    RATE = 7
    UNREACHABLE = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Ask:
    """An AKMS asks for quota for one SAE pair."""

    akms: int
    """The asking AKMS (from its SNMP user, not from the request)."""
    ukms: int
    """The UKMS that serves the master SAE."""
    request_id: int
    master: str
    slave: str
    keys: int
    bits: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """Quota an AKMS may spend locally until ``expires`` (or until revoked)."""

    id: int
    contract: str
    akms: int
    ukms: int
    """The UKMS it was asked for (the grant table's index)."""
    keys: int
    bits: int
    issued: float
    expires: float
    """Unix seconds."""
    day: str
    """The UTC day charged (ISO date); the month is its first 7 characters."""
    mode: str
    ukms_b: int
    """The directory's answer: the slave SAE's UKMS ..."""
    akms_b: int
    """... and the AKMS that UKMS hangs off."""
    max_key_size: int
    keys_per_request: int
    max_rate: int
    keys_per_period: int = 0
    """The contract's most keys per day or per month, whichever is smaller (ETSI 014
    Status's ``max_key_count``; 0 in a grant stored before this field existed: unknown)."""
    route_policy: str = "balanced"
    """The contract's routing policy class (``balanced`` in a grant stored before it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    reason: Reason
    message: str


Answer = Grant | Refusal


@dataclass(slots=True)
class _Open:
    grant: Grant
    used_keys: int = 0
    used_bits: int = 0
    reported_keys: int = 0
    """Keys of the accounting reports under this grant (a subset of what its AKMS states
    at the close: a report may arrive before or after the close)."""
    reported_bits: int = 0
    revoked: bool = False
    closed: bool = False


@dataclass(slots=True)
class _Charge:
    keys: int = 0
    bits: int = 0


@dataclass(slots=True)
class Ledger:
    """Charges per contract and period, and the grants behind them."""

    next_id: int = 1
    grants: dict[int, _Open] = field(default_factory=dict)
    charges: dict[tuple[str, str], _Charge] = field(default_factory=dict)
    """(contract, period) -> charged; a period is 'YYYY-MM-DD' or 'YYYY-MM'."""
    answers: dict[tuple[int, int], tuple[float, Answer]] = field(default_factory=dict)

    # -- asks -------------------------------------------------------------------------------
    def ask(self, reg: Snapshot, ask: Ask, now: float) -> Answer:
        """Grant quota for ``ask`` or refuse it, charging the contract at once."""
        cached = self.answers.get((ask.ukms, ask.request_id))
        if cached is not None and now - cached[0] <= ANSWER_CACHE_S:
            return cached[1]
        answer = self._decide(reg, ask, now)
        self.answers[(ask.ukms, ask.request_id)] = (now, answer)
        return answer

    def _decide(self, reg: Snapshot, ask: Ask, now: float) -> Answer:
        found = check_pair(reg, ask.master, ask.slave, ask.ukms, ask.akms, _day(now))
        if isinstance(found, Refusal):
            return found
        contract = found
        expires = min(now + VALIDITY_S, _end_of_day(now))
        if contract.valid_until is not None:
            expires = min(expires, _end_of(contract.valid_until))
        keys, bits = self._room(contract, _day(now))
        keys = min(ask.keys, keys, int(contract.max_rate * (expires - now)) + 1)
        bits = min(ask.bits, bits)
        if keys <= 0 or bits < 8:
            return Refusal(reason=Reason.QUOTA, message="the contract's quota is used up")
        slave = reg.saes[ask.slave]
        grant = Grant(
            id=self.next_id,
            contract=contract.id,
            akms=ask.akms,
            ukms=ask.ukms,
            keys=keys,
            bits=bits,
            issued=now,
            expires=expires,
            day=_day(now).isoformat(),
            mode=contract.relay_mode,
            route_policy=contract.route_policy,
            ukms_b=slave.ukms,
            akms_b=reg.ukms[slave.ukms],
            max_key_size=contract.max_key_size,
            keys_per_request=contract.keys_per_request,
            max_rate=contract.max_rate,
            keys_per_period=min(contract.keys_per_day, contract.keys_per_month),
        )
        self.next_id += 1
        self.admit(grant)
        return grant

    def _room(self, c: Contract, day: dt.date) -> tuple[int, int]:
        d = self.charges.get((c.id, day.isoformat()), _Charge())
        m = self.charges.get((c.id, day.isoformat()[:7]), _Charge())
        keys = min(c.keys_per_day - d.keys, c.keys_per_month - m.keys)
        bits = min(c.bits_per_day - d.bits, c.bits_per_month - m.bits)
        return keys, bits

    def admit(self, grant: Grant, *, used: tuple[int, int] | None = None) -> None:
        """Charge a grant (new, or reloaded after a restart with its use if settled)."""
        self.grants[grant.id] = _Open(grant=grant)
        self.next_id = max(self.next_id, grant.id + 1)
        self._charge(grant, grant.keys, grant.bits)
        if used is not None:
            self.close(grant.id, *used)

    def _charge(self, grant: Grant, keys: int, bits: int) -> None:
        for period in (grant.day, grant.day[:7]):
            charge = self.charges.setdefault((grant.contract, period), _Charge())
            charge.keys += keys
            charge.bits += bits

    # -- use, close, revoke, expire ----------------------------------------------------------
    def use(self, grant_id: int, keys: int, bits: int) -> None:
        """Record delivered keys under a grant (from an accounting report)."""
        held = self.grants.get(grant_id)
        if held is None:
            return
        held.reported_keys += keys
        held.reported_bits += bits
        extra_keys = max(0, held.reported_keys - held.used_keys)
        extra_bits = max(0, held.reported_bits - held.used_bits)
        held.used_keys += extra_keys
        held.used_bits += extra_bits
        if held.closed:  # reports beyond what the close stated: delivered, so charged
            self._charge(held.grant, extra_keys, extra_bits)

    def close(self, grant_id: int, used_keys: int = 0, used_bits: int = 0) -> bool:
        """Settle a grant at its use (the larger of reported and stated); False if unknown
        or already closed."""
        held = self.grants.get(grant_id)
        if held is None or held.closed:
            return False
        held.used_keys = max(held.used_keys, used_keys)
        held.used_bits = max(held.used_bits, used_bits)
        held.closed = True
        g = held.grant
        self._charge(g, held.used_keys - g.keys, held.used_bits - g.bits)
        return True

    def revoke(self, contracts: set[str]) -> list[Grant]:
        """Revoke the open grants of ``contracts``; the grants their AKMSs must drop."""
        out = []
        for held in self.grants.values():
            if held.grant.contract in contracts and not held.closed and not held.revoked:
                held.revoked = True
                out.append(held.grant)
        return out

    def expire(self, now: float) -> list[int]:
        """Settle grants expired more than GRACE_S ago; forget old answers and settled
        grants of past days. Returns the settled grant IDs."""
        settled = [
            gid
            for gid, held in self.grants.items()
            if not held.closed and held.grant.expires + GRACE_S <= now
        ]
        for gid in settled:
            self.close(gid)
        self.answers = {k: v for k, v in self.answers.items() if now - v[0] <= ANSWER_CACHE_S}
        today = _day(now).isoformat()
        self.grants = {
            gid: held
            for gid, held in self.grants.items()
            if not held.closed or held.grant.day >= today
        }
        return settled

    def is_revoked(self, grant_id: int) -> bool:
        held = self.grants.get(grant_id)
        return held is not None and held.revoked

    def charged(self, contract: str, period: str) -> tuple[int, int]:
        c = self.charges.get((contract, period), _Charge())
        return c.keys, c.bits

    def open_grants(self) -> list[Grant]:
        return [h.grant for h in self.grants.values() if not h.closed]


def check_pair(
    reg: Snapshot, master: str, slave: str, ukms: int, akms: int, day: dt.date
) -> Contract | Refusal:
    """The contract under which ``master`` at ``ukms`` behind ``akms`` may get keys
    shared with ``slave`` on ``day``, or why not."""
    cid = reg.pairs.get((master, slave))
    m, s = reg.saes.get(master), reg.saes.get(slave)
    if cid is None or m is None or s is None or s.ukms not in reg.ukms:
        return Refusal(reason=Reason.UNKNOWN_PAIR, message="no contract covers this SAE pair")
    if m.ukms != ukms or reg.ukms.get(ukms) != akms:
        return Refusal(reason=Reason.WRONG_NODE, message="the master SAE is not served here")
    contract, user = reg.contracts[cid], reg.users[m.user]
    if user.suspended or contract.suspended or m.suspended or s.suspended:
        return Refusal(reason=Reason.SUSPENDED, message="the user's service is suspended")
    if not contract.valid_on(day):
        return Refusal(reason=Reason.OUTSIDE_WINDOW, message="outside the contract's validity")
    return contract


def terms_changed(old: Snapshot, new: Snapshot) -> set[str]:
    """Contracts whose open grants must be revoked after a registry change."""
    out = set()
    for cid, c in old.contracts.items():
        n = new.contracts.get(cid)
        if n is None or replace(n, pairs=()) != replace(c, pairs=()) or n.pairs != c.pairs:
            out.add(cid)
            continue
        saes = {sae for pair in c.pairs for sae in pair}
        if old.users.get(c.user) != new.users.get(c.user) or any(
            old.saes.get(x) != new.saes.get(x) for x in saes
        ):
            out.add(cid)
    return out


def _day(now: float) -> dt.date:
    return dt.datetime.fromtimestamp(now, dt.UTC).date()


def _end_of(day: dt.date) -> float:
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp()


def _end_of_day(now: float) -> float:
    return _end_of(_day(now))
