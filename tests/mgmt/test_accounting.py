"""The manager's accounting view: the AAA device's ``aaaAcctTable`` and contracts' users,
walked from a real AAA agent (SNMPv3 authPriv, its operator user) into the manager's
database, per user and per pair; and the parser against malformed indexes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pysnmp.proto import rfc1902

from appliance.aaa.accounting import Report
from appliance.aaa.ledger import Reason
from appliance.aaa.mib import oid
from appliance.mgmt.accounting import AcctRow, parse, per_user, strings
from appliance.mgmt.manager import AaaEntry, Manager, ManagerConfig
from appliance.mgmt.store import Store
from tests.aaa.agent_fixture import OPERATOR, start, stop


def _index(*parts: str) -> tuple[int, ...]:
    out: tuple[int, ...] = ()
    for p in parts:
        out += (len(p), *p.encode())
    return out


def test_index_strings_are_decoded_or_refused():
    assert strings("aaaAcctEntry", _index("alice-2026", "alice-a", "alice-b")) == [
        "alice-2026",
        "alice-a",
        "alice-b",
    ]
    assert strings("aaaContractEntry", (3, 97, 98)) is None  # shorter than it says
    assert strings("aaaContractEntry", (1, 97, 5)) is None  # trailing parts
    assert strings("aaaContractEntry", (1, 300)) is None  # not a byte
    assert strings("aaaAcctEntry", _index("alice-2026", "alice-a")) is None  # a part short


def test_parse_joins_each_contract_to_its_user_and_skips_what_it_cannot_read():
    entry, user = oid("aaaAcctEntry"), oid("aaaContractUser")
    idx = _index("alice-2026", "alice-a", "alice-b")
    binds = [
        ((*user, *_index("alice-2026")), rfc1902.OctetString(b"alice")),
        ((*entry, 4, *idx), rfc1902.Counter64(7)),
        ((*entry, 8, *idx), rfc1902.Counter64(12)),
        ((*entry, 9, *idx), rfc1902.Counter64(3072)),
        ((*entry, 4, *_index("ghost", "x", "y")), rfc1902.Counter64(1)),
        ((*entry, 4, 99), rfc1902.Counter64(1)),  # a broken index
        ((*entry, 2, *idx), rfc1902.OctetString(b"alice-a")),  # an index column
    ]
    rows = parse(binds)
    assert rows == [
        AcctRow(user="?", contract="ghost", master="x", slave="y", allowed=1),
        AcctRow(
            user="alice", contract="alice-2026", master="alice-a", slave="alice-b",
            allowed=7, keys=12, bits=3072,
        ),
    ]  # fmt: skip
    [ghost, alice] = per_user(rows)
    assert alice["contracts"] == ["alice-2026"] and alice["keys"] == 12 and ghost["user"] == "?"


def test_the_manager_walks_the_aaa_devices_accounting(tmp_path: Path):
    running = start(tmp_path / "aaa", receivers=False)
    try:
        reports = [
            Report(request="1:1", contract="alice-2026", user="alice", master="alice-a",
                   slave="alice-b", outcome="delivered", keys=4, bits=1024),
            Report(request="1:2", contract="alice-2026", user="alice", master="alice-a",
                   slave="alice-b", outcome="refused", reason=Reason.QUOTA),
            Report(request="15:1", contract="bob-2026", user="bob", master="bob-b",
                   slave="bob-a", outcome="delivered", keys=2, bits=512),
        ]  # fmt: skip

        async def record() -> None:
            for r in reports:
                running.agent.service.accounting.record(r, 1_796_000_000.0)

        running.call(record())
        store = Store(tmp_path / "manager.db")
        aaa = AaaEntry(address=f"127.0.0.1:{running.port}", **OPERATOR.model_dump())
        manager = Manager(ManagerConfig(aaa=aaa), store)
        heard: list[str] = []
        manager.changed.append(heard.append)
        wrong = aaa.model_copy(update={"priv": "not-the-priv-key"})

        async def polls() -> tuple[list[AcctRow], list[AcctRow]]:
            await manager.poll_accounting(aaa)
            first = store.accounting()
            await manager.poll_accounting(wrong)  # refused: the last view stays
            return first, store.accounting()

        try:
            rows, after = asyncio.run(polls())
        finally:
            store.close()
        assert heard == ["accounting"]
        assert [(r.user, r.contract, r.allowed, r.keys, r.bits, r.refused_quota) for r in rows] == [
            ("alice", "alice-2026", 1, 4, 1024, 1),
            ("bob", "bob-2026", 1, 2, 512, 0),
        ]
        assert after == rows
    finally:
        stop(running)
