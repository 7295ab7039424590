"""The AAA device's decisions behind typed calls: registry, ledger, accounting, grants.

No SNMP here (that is :mod:`appliance.aaa.agent`): the service answers asks, settles
grants, records reports and applies the operator's changes, and tells its caller which
grants a change revoked so that their AKMSs can be told. Time comes from ``clock``.

Rules: a grant is committed to the grant store before it is answered (a restarted AAA
never grants twice); a registry change made by any process (the ``qkdn aaa`` command
writes the same database) is noticed by :meth:`AaaService.refresh`, which the agent calls
every :data:`POLL_S` seconds, so a suspension revokes quota within that time plus one
INFORM round trip.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.aaa.accounting import Accounting, GrantStore, Report, Row
from appliance.aaa.errors import AccountingError, RegistryError
from appliance.aaa.ledger import Answer, Ask, Grant, Ledger, Reason, terms_changed
from appliance.aaa.registry import Registry, Snapshot

POLL_S = 0.1
"""How often the agent looks for registry changes made by another process."""


@dataclass(slots=True)
class Counters:
    issued: int = 0
    refused: int = 0
    revoked: int = 0
    informs_sent: int = 0
    informs_acked: int = 0


@dataclass(slots=True)
class AaaService:
    registry: Registry
    accounting: Accounting
    clock: Callable[[], float] = time.time
    signing_key: Ed25519PrivateKey | None = None
    ledger: Ledger = field(default_factory=Ledger)
    counters: Counters = field(default_factory=Counters)
    generation: int = 0
    """Bumped on every change a reader of the MIB could see."""
    snap: Snapshot = field(init=False)
    grants: GrantStore = field(init=False)

    def __post_init__(self) -> None:
        self.snap = self.registry.snapshot()
        self.grants = GrantStore(self.accounting.path.with_name("grants.db"))
        month = dt.datetime.fromtimestamp(self.clock(), dt.UTC).date().isoformat()[:7]
        for body, used in self.grants.load(month):
            self.ledger.admit(Grant(**body), used=used)  # type: ignore[arg-type]
        self.ledger.next_id = max(self.ledger.next_id, self.grants.next_id())

    # -- asks and grants ---------------------------------------------------------------
    def ask(self, ask: Ask) -> Answer:
        before = self.ledger.next_id
        answer = self.ledger.ask(self.snap, ask, self.clock())
        if isinstance(answer, Grant) and answer.id >= before:
            self.grants.save(dataclasses.asdict(answer))
            self.counters.issued += 1
            self.generation += 1
        elif not isinstance(answer, Grant):
            self.counters.refused += 1
        return answer

    def close(self, ukms: int, grant_id: int, used_keys: int, used_bits: int) -> bool:
        held = self.ledger.grants.get(grant_id)
        if held is None or held.grant.ukms != ukms:
            return False
        if self.ledger.close(grant_id, used_keys, used_bits):
            self.grants.settle(grant_id, held.used_keys, held.used_bits)
            self.generation += 1
        return True

    def report(self, ukms: int, request: str, fields: dict[str, Any]) -> bool:
        """Record one request's outcome; False if it was recorded before."""
        master, slave = fields["master"], fields["slave"]
        home = self.snap.saes.get(master)
        if home is not None and home.ukms != ukms:
            raise AccountingError(
                f"SAE {master} is not served by UKMS {ukms}: not its AKMS's to report",
                code="AAA-VALUE",
            )
        held = self.ledger.grants.get(int(fields.get("grant", 0) or 0))
        if held is not None and held.grant.ukms == ukms:  # billed under the grant's contract,
            contract = held.grant.contract  # even if the pair has left it since
        else:
            contract = self.snap.pairs.get((master, slave), "")
        user = self.snap.saes[master].user if master in self.snap.saes else ""
        rep = Report(request=f"{ukms}:{request}", contract=contract, user=user, **fields)
        if not self.accounting.record(rep, self.clock()):
            return False
        if rep.outcome == "delivered" and rep.grant:
            self.ledger.use(rep.grant, rep.keys, rep.bits)
        self.generation += 1
        return True

    # -- changes -------------------------------------------------------------------------
    def refresh(self, *, force: bool = False) -> list[Grant]:
        """Take a changed registry in; the grants this revokes (for their AKMSs)."""
        if not (self.registry.changed() or force):
            return []
        old, self.snap = self.snap, self.registry.snapshot()
        revoked = self.ledger.revoke(terms_changed(old, self.snap))
        self.counters.revoked += len(revoked)
        self.generation += 1
        return revoked

    def change(self, kind: str, name: str, **changes: Any) -> list[Grant]:
        """An operator's change (from SNMP): applied to the registry, then taken in."""
        setters: dict[str, Callable[..., object]] = {
            "user": self.registry.set_user,
            "sae": self.registry.set_sae,
            "contract": self.registry.set_contract,
        }
        setter = setters[kind]
        setter(name, **changes)
        return self.refresh(force=True)

    def tick(self) -> None:
        """Settle abandoned grants; sign the heads of past days."""
        now = self.clock()
        for gid in self.ledger.expire(now):
            held = self.ledger.grants.get(gid)
            if held is not None:
                self.grants.settle(gid, held.used_keys, held.used_bits)
        if self.signing_key is not None:
            today = dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat()
            self.accounting.seal(self.signing_key, before=today)

    def totals(self) -> list[Row]:
        return self.accounting.totals()

    def recorded(self, ukms: int, request: str) -> Report | None:
        return self.accounting.recorded(f"{ukms}:{request}")


__all__ = ["AaaService", "AccountingError", "Reason", "RegistryError"]
