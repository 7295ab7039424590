"""What ``qkdn demo`` shows of the AAA device: accounting against what the SAEs received,
and (``--contracts``) two users meeting their contracts' rules mid-run.

* :func:`billed` reads AAA's accounting per contract, once every access node's outbox has
  been acknowledged (every report is in).
* :func:`contracts_scenario` runs rounds of one request per user: ``example-bank``'s daily
  quota is set to what it has used plus ``quota`` keys, so it runs out; ``demo-encryptors``
  is suspended half way (a registry change, as ``qkdn aaa user suspend`` makes). Every
  answer an SAE gets is kept: keys received, and each refusal with its status and reason.
  Both changes are undone at the end.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from appliance.aaa.accounting import Accounting
from appliance.aaa.registry import Registry
from appliance.tkey import call, endpoints

PAIRS = {"demo-2026": ("sae-berlin-1", "sae-bonn-1"), "bank-2026": ("sae-berlin-2", "sae-bonn-2")}
SUSPENDED_USER, QUOTA_CONTRACT = "demo-encryptors", "bank-2026"
FLUSH_S = 60.0
KEY_BITS = 256


@dataclass
class Received:
    """What the SAEs of one contract got: keys, bits, refusals by (status, reason)."""

    keys: int = 0
    bits: int = 0
    refusals: dict[tuple[int, str], int] = field(default_factory=dict)


def reports_in(net_dir: Path, timeout: float = FLUSH_S) -> bool:
    """Until every access node's accounting outbox is empty (AAA has every report)."""
    deadline = time.monotonic() + timeout
    outboxes = list((net_dir / "data").glob("*/aaa-outbox.db"))
    while True:
        left = 0
        for path in outboxes:
            db = sqlite3.connect(path)
            try:
                left += db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            finally:
                db.close()
        if not left:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def billed(net_dir: Path) -> dict[str, dict[str, int]]:
    """AAA's accounting per contract: keys, bits, allowed, refused by kind, failed."""
    acct = Accounting(net_dir / "aaa" / "accounting.db")
    try:
        out: dict[str, dict[str, int]] = {}
        for row in acct.totals():
            c = out.setdefault(row.contract or "(none)", dict.fromkeys(COUNTERS, 0))
            for name in COUNTERS:
                c[name] += getattr(row, name)
        return out
    finally:
        acct.close()


COUNTERS = (
    "keys",
    "bits",
    "allowed",
    "refused_limits",
    "refused_unauthorised",
    "refused_quota",
    "failed",
)


def contracts_scenario(
    status: dict[str, Any], net_dir: Path, rounds: int = 40, quota: int = 15
) -> dict[str, Received]:
    """Rounds of one 1-key request per contract; the quota runs out, the user is
    suspended half way through. Returns what each contract's master SAE received."""
    got = {c: Received() for c in PAIRS}
    ends = {c: endpoints(status, *pair) for c, pair in PAIRS.items()}
    conns = {c: ends[c][0].connect() for c in PAIRS}
    reports_in(net_dir)
    used = billed(net_dir).get(QUOTA_CONTRACT, {}).get("keys", 0)
    reg = Registry(net_dir / "aaa" / "registry.db")
    before = reg.contract(QUOTA_CONTRACT).keys_per_day
    reg.set_contract(QUOTA_CONTRACT, keys_per_day=used + quota)
    try:
        for i in range(rounds):
            if i == rounds // 2:
                reg.set_user(SUSPENDED_USER, suspended=True)
                time.sleep(0.3)  # the agent takes the change in (0.1 s) and revokes
            for contract, (_, slave) in ends.items():
                _one(conns[contract], slave.sae, got[contract])
    finally:
        reg.set_user(SUSPENDED_USER, suspended=False)
        reg.set_contract(QUOTA_CONTRACT, keys_per_day=before)
        reg.close()
        for conn in conns.values():
            conn.close()
    return got


def _one(conn: Any, slave: str, into: Received) -> None:
    try:
        code, doc = call(conn, f"/api/v1/keys/{slave}/enc_keys?number=1")
    except (OSError, ValueError):
        conn.close()
        into.refusals[(0, "no answer")] = into.refusals.get((0, "no answer"), 0) + 1
        return
    if code == 200:
        into.keys += len(doc["keys"])
        into.bits += KEY_BITS * len(doc["keys"])
        return
    details = doc.get("details") or [{}]
    reason = str(details[0].get("reason", doc.get("message", "")))[:80]
    into.refusals[(code, reason)] = into.refusals.get((code, reason), 0) + 1


def accounting_table(received: dict[str, Received], net_dir: Path) -> tuple[Table, bool]:
    """Per contract: what the SAEs received beside what AAA billed; equal or not."""
    complete = reports_in(net_dir)
    bills = billed(net_dir)
    table = Table(title="Accounting per contract (AAA) against what the SAEs received")
    for col in ("contract", "SAEs: keys", "bits", "AAA: keys", "bits", "refused", "failed", ""):
        table.add_column(col, justify="left" if col in ("contract", "") else "right")
    ok = complete
    for contract in sorted(set(received) | set(bills)):
        r = received.get(contract, Received())
        b = bills.get(contract, dict.fromkeys(COUNTERS, 0))
        same = (r.keys, r.bits) == (b["keys"], b["bits"])
        ok = ok and same
        refused = b["refused_limits"] + b["refused_unauthorised"] + b["refused_quota"]
        table.add_row(
            contract,
            str(r.keys),
            str(r.bits),
            str(b["keys"]),
            str(b["bits"]),
            str(refused),
            str(b["failed"]),
            "[green]equal[/]" if same else "[red]DIFFERENT[/]",
        )
    if not complete:
        table.caption = "[red]some accounting reports were not acknowledged in time[/]"
    return table, ok


def refusals_table(received: dict[str, Received]) -> Table:
    table = Table(title="Refusals the SAEs received (ETSI 014 status and reason)")
    for col in ("contract", "status", "reason", "requests"):
        table.add_column(col, justify="right" if col == "requests" else "left")
    for contract, r in received.items():
        for (code, reason), n in sorted(r.refusals.items()):
            table.add_row(contract, str(code), reason, str(n))
    return table
