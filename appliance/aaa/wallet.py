"""The AKMS side of credit control: a wallet that spends granted quota locally. Sans-IO.

Rules of this file:

* A request is allowed only from a grant the wallet holds for its SAE pair, before the
  grant's local expiry (measured from when the ask was *sent*, so never later than AAA's
  own expiry), not revoked, with enough keys and bits left, within the contract's size,
  count and rate limits. Otherwise :meth:`Wallet.spend` refuses, or returns None: "no
  usable grant: ask AAA".
* :meth:`Wallet.wants` says when to ask ahead of need (less than :data:`LOW_WATER` of a
  grant left, or less than that share of its lifetime), so the key path rarely waits.
* A refusal from AAA is remembered for :data:`REFUSAL_TTL_S` (a suspended user does not
  cost one SNMP round trip per request).
* A grant that is spent out, expired or revoked is handed back once by
  :meth:`Wallet.to_close` with its use, for the client to settle it at AAA.

If AAA cannot be reached, grants already held may still be spent until they expire; then
requests are refused (fail closed: :class:`Reason.UNREACHABLE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.aaa.ledger import Reason, Refusal
from appliance.config.topology import RoutePolicy

LOW_WATER = 0.3
REFUSAL_TTL_S = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class Terms:
    """A grant as the AAA answered it (aaaQuotaTable's columns)."""

    ukms: int
    """The UKMS the grant was asked for."""
    grant: int
    contract: str
    keys: int
    bits: int
    lifetime_s: float
    ukms_b: int
    akms_b: int
    mode: str
    max_key_size: int
    keys_per_request: int
    max_rate: int
    keys_per_period: int
    """The contract's most keys per day or month (0: not known)."""
    route_policy: RoutePolicy = "balanced"
    """The contract's routing policy class (what the controller weighs links by)."""


@dataclass(slots=True)
class Held:
    terms: Terms
    expires: float
    keys_left: int
    bits_left: int
    used_keys: int = 0
    used_bits: int = 0
    revoked: bool = False
    closed: bool = False

    def usable(self, now: float) -> bool:
        return not self.revoked and now < self.expires and self.keys_left > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Spent:
    """A request allowed from a grant: where the slave is and how keys cross."""

    grant: int
    contract: str
    mode: str
    ukms_b: int
    akms_b: int
    route_policy: RoutePolicy = "balanced"


@dataclass(slots=True)
class _Bucket:
    rate: float
    tokens: float
    at: float

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


@dataclass(slots=True)
class Wallet:
    grants: dict[tuple[str, str], list[Held]] = field(default_factory=dict)
    refusals: dict[tuple[str, str], tuple[float, Refusal]] = field(default_factory=dict)
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def add(self, pair: tuple[str, str], answer: Terms | Refusal, sent: float) -> None:
        """Take AAA's answer to an ask sent at ``sent`` (local monotonic seconds)."""
        if isinstance(answer, Refusal):
            self.refusals[pair] = (sent, answer)
            return
        self.refusals.pop(pair, None)
        held = Held(
            terms=answer,
            expires=sent + answer.lifetime_s,
            keys_left=answer.keys,
            bits_left=answer.bits,
        )
        self.grants.setdefault(pair, []).append(held)

    def spend(
        self, master: str, slave: str, number: int, size: int, now: float
    ) -> Spent | Refusal | None:
        """Allow ``number`` keys of ``size`` bits from a held grant; None: ask AAA first."""
        pair = (master, slave)
        held = [h for h in self.grants.get(pair, ()) if h.usable(now)]
        if not held:
            refused = self.refusals.get(pair)
            if refused is not None and now - refused[0] < REFUSAL_TTL_S:
                return refused[1]
            return None
        t = held[0].terms
        if not (0 < number <= t.keys_per_request and 0 < size <= t.max_key_size and size % 8 == 0):
            return Refusal(
                reason=Reason.LIMITS, message="outside the contract's size or count limits"
            )
        bits = number * size
        for h in held:
            if h.keys_left >= number and h.bits_left >= bits:
                if not self._rate(t, number, now):
                    return Refusal(reason=Reason.RATE, message="the contract's rate is exceeded")
                h.keys_left -= number
                h.bits_left -= bits
                h.used_keys += number
                h.used_bits += bits
                return Spent(
                    grant=t.grant if h is held[0] else h.terms.grant,
                    contract=t.contract,
                    mode=h.terms.mode,
                    ukms_b=h.terms.ukms_b,
                    akms_b=h.terms.akms_b,
                    route_policy=h.terms.route_policy,
                )
        return None

    def _rate(self, t: Terms, number: int, now: float) -> bool:
        bucket = self.buckets.get(t.contract)
        if bucket is None or bucket.rate != t.max_rate:
            bucket = self.buckets[t.contract] = _Bucket(float(t.max_rate), float(t.max_rate), now)
        return bucket.take(number, now)

    def terms(self, master: str, slave: str, now: float) -> Terms | None:
        """The terms of a usable grant held for the pair (None: none held)."""
        held = [h for h in self.grants.get((master, slave), ()) if h.usable(now)]
        return held[-1].terms if held else None

    def unspend(self, master: str, slave: str, spent: Spent, number: int, size: int) -> None:
        """Give back what a request took when it failed before delivery (not billed)."""
        for h in self.grants.get((master, slave), ()):
            if h.terms.grant == spent.grant and not h.closed:
                h.used_keys -= number
                h.used_bits -= number * size
                h.keys_left += number
                h.bits_left += number * size
                return

    def wants(self, master: str, slave: str, now: float) -> bool:
        """True when the pair should ask AAA for more ahead of need."""
        pair = (master, slave)
        if pair in self.refusals and now - self.refusals[pair][0] < REFUSAL_TTL_S:
            return False
        held = [h for h in self.grants.get(pair, ()) if h.usable(now)]
        if not held:
            return True
        keys = sum(h.keys_left for h in held)
        h = held[-1]
        fresh = (h.expires - now) > LOW_WATER * h.terms.lifetime_s
        return keys < LOW_WATER * h.terms.keys or not fresh

    def revoke(self, *, grant: int | None = None, contract: str | None = None) -> int:
        """AAA revoked a grant (or every grant of a contract): stop spending it now."""
        n = 0
        for held in self.grants.values():
            for h in held:
                if not h.revoked and (h.terms.grant == grant or h.terms.contract == contract):
                    h.revoked = True
                    n += 1
        return n

    def to_close(self, now: float) -> list[tuple[str, str, Held]]:
        """Grants done with (spent out, expired or revoked), each handed out once."""
        out = []
        for pair, held in self.grants.items():
            for h in held:
                if not h.closed and not h.usable(now):
                    h.closed = True
                    out.append((*pair, h))
            self.grants[pair] = [h for h in held if not h.closed]
        return out

    def open(self) -> list[Held]:
        return [h for held in self.grants.values() for h in held if not h.closed]
