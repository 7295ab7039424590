"""The AAA device on the key path of a running network (``qkdn net up``, AAA and the UKMS
stocks on by default; one network for the module): every contract rule both ways as an
SAE sees it (ETSI 014 status and message), for a request served from the pair's stock
(256-bit keys, with the stock holding enough: allowed and accounted by the AKMS before the
keys leave) and for one that crosses the network (128-bit keys, never stocked); Status
following the contract, the suspension race, accounting equal to what the SAEs received
with the stock on, no key material in AAA, and no carrier detail either.

Contract changes are made on the registry the agent serves (as ``qkdn aaa`` does); the
agent takes them in within 0.1 s and revokes the quota granted under them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.aaa.accounting import Accounting
from appliance.aaa.registry import Registry
from appliance.kms import netproc
from tests.kms.conftest import Net, exchange, poll, qkdn, running_net

DEMO = ("sae-berlin-1", "sae-bonn-1")
BANK = ("sae-berlin-2", "sae-bonn-2")
AKMS_NODES = ("akms-berlin", "akms-bonn")


PATHS = {"stocked": 256, "relayed": 128}
"""Key size per path: the stock holds keys of the network's size (256 bits) only."""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    with running_net(tmp_path_factory, "--timeout", "240") as running:  # AAA by default
        yield running


@pytest.fixture(params=list(PATHS))
def size(request: pytest.FixtureRequest) -> int:
    """The key size that takes the path under test."""
    return PATHS[request.param]


def status(net: Net, pair: tuple[str, str]) -> dict[str, Any]:
    conn = net.connect(pair[0])
    try:
        return exchange(conn, "GET", f"/api/v1/keys/{pair[1]}/status").json()
    finally:
        conn.close()


def stocked(net: Net, pair: tuple[str, str], size: int, number: int = 1) -> None:
    """For 256-bit keys: wait until the pair's stock holds ``number`` keys, so that the next
    request is served from it (a UKMS serves a request of the stock's size from the stock
    whenever it holds enough)."""
    if size == PATHS["stocked"]:
        poll(lambda: status(net, pair)["stored_key_count"] >= number, f"{pair}'s stock", 30)


def registry(net: Net) -> Registry:
    return Registry(net.dir / "aaa" / "registry.db")


def change(net: Net, kind: str, name: str, **changes: Any) -> None:
    reg = registry(net)
    try:
        {"user": reg.set_user, "contract": reg.set_contract}[kind](name, **changes)
    finally:
        reg.close()


def registry_contract(net: Net, name: str) -> Any:
    reg = registry(net)
    try:
        return reg.contract(name)
    finally:
        reg.close()


def keys(net: Net, pair: tuple[str, str], number: int = 1, size: int = 256) -> Any:
    return net.enc_keys(*pair, number=number, size=size)


def ok(net: Net, pair: tuple[str, str], number: int = 1, size: int = 256) -> list[Any]:
    """Keys that must come (a grant may be on its way after a change: bounded poll)."""

    def once() -> list[Any] | None:
        got = keys(net, pair, number, size)
        return got.json()["keys"] if got.status == 200 else None

    return poll(once, f"{number} keys of {size} bits for {pair}", 30)


def refused(net: Net, pair: tuple[str, str], status: int, number: int = 1, size: int = 256) -> Any:
    """The refusal that must come (bounded poll: a change reaches the AKMS within ~0.1 s)."""

    def once() -> Any:
        got = keys(net, pair, number, size)
        return got if got.status == status else None

    got = poll(once, f"status {status} for {pair}", 30)
    net.assert_reveals_no_carrier(got.body.decode())
    return got.json()


def outboxes_empty(net: Net) -> bool:
    for node in AKMS_NODES:
        db = sqlite3.connect(net.dir / "data" / node / "aaa-outbox.db")
        try:
            if db.execute("SELECT count(*) FROM outbox").fetchone()[0]:
                return False
        finally:
            db.close()
    return True


def delivered(net: Net) -> dict[str, tuple[int, int]]:
    """Keys and bits AAA accounted per contract (every report sent first)."""
    poll(lambda: outboxes_empty(net), "every AKMS's accounting reports acknowledged", 30)
    acct = Accounting(net.dir / "aaa" / "accounting.db")
    try:
        out: dict[str, tuple[int, int]] = {}
        for row in acct.totals():
            k, b = out.get(row.contract, (0, 0))
            out[row.contract] = (k + row.keys, b + row.bits)
        return out
    finally:
        acct.close()


# -- every rule, both ways ------------------------------------------------------------------
def test_size_and_number_within_the_contract_pass_above_it_400(net: Net) -> None:
    assert len(ok(net, DEMO, number=128, size=256)) == 128
    body = refused(net, DEMO, 400, size=264)
    assert "size" in body["message"]
    body = refused(net, DEMO, 400, number=129)
    assert "max_key_per_request" in body["message"]


def test_status_reflects_the_contract_and_follows_a_change(net: Net) -> None:
    def status_demo() -> dict[str, Any]:
        return status(net, DEMO)

    first = status_demo()
    assert (first["max_key_size"], first["max_key_per_request"]) == (256, 128)
    # the contract allows 10 million keys a day: the KME's own bound is the smaller
    store_bound = first["max_key_count"]
    assert 0 < store_bound < 10_000_000
    was = registry_contract(net, "demo-2026")
    change(net, "contract", "demo-2026", max_key_size=128, keys_per_request=4, keys_per_day=5000)
    try:
        poll(lambda: status_demo()["max_key_size"] == 128, "Status showing the new size", 30)
        now = status_demo()
        assert now["max_key_per_request"] == 4 and now["key_size"] == 128
        assert now["max_key_count"] == 5000 and now["stored_key_count"] <= 5000
        # the AKMS enforces it at once, whatever the UKMS still shows
        refused(net, DEMO, 400, size=256)
        assert len(ok(net, DEMO, number=4, size=128)) == 4
    finally:
        change(
            net,
            "contract",
            "demo-2026",
            max_key_size=256,
            keys_per_request=128,
            keys_per_day=was.keys_per_day,
        )
    poll(lambda: status_demo()["max_key_size"] == 256, "Status back to the contract", 30)
    assert status_demo()["max_key_count"] == store_bound


def test_a_suspended_user_gets_401_and_keys_again_when_resumed(net: Net, size: int) -> None:
    ok(net, BANK, size=size)
    stocked(net, BANK, size)
    change(net, "user", "example-bank", suspended=True)
    try:
        body = refused(net, BANK, 401, size=size)
        assert "suspended" in body["details"][0]["reason"]
        ok(net, DEMO, size=size)  # another user is not concerned
    finally:
        change(net, "user", "example-bank", suspended=False)
    stocked(net, BANK, size)
    ok(net, BANK, size=size)


def test_a_pair_the_contract_does_not_name_gets_401(net: Net, size: int) -> None:
    stocked(net, BANK, size)
    change(net, "contract", "bank-2026", pairs=((BANK[1], BANK[0]),))
    try:
        body = refused(net, BANK, 401, size=size)
        assert "no contract" in body["details"][0]["reason"]
    finally:
        change(net, "contract", "bank-2026", pairs=(BANK, (BANK[1], BANK[0])))
    stocked(net, BANK, size)
    ok(net, BANK, size=size)


def test_a_day_outside_the_validity_window_gets_401(net: Net, size: int) -> None:
    stocked(net, DEMO, size)
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    change(net, "contract", "demo-2026", valid_from=tomorrow)
    try:
        body = refused(net, DEMO, 401, size=size)
        assert "validity" in body["details"][0]["reason"]
    finally:
        change(net, "contract", "demo-2026", valid_from=None)
    stocked(net, DEMO, size)
    ok(net, DEMO, size=size)


def test_the_daily_quota_gives_exactly_what_is_left_then_503(net: Net, size: int) -> None:
    ok(net, BANK, size=size)
    stocked(net, BANK, size, number=5)
    used = delivered(net).get("bank-2026", (0, 0))[0]
    change(net, "contract", "bank-2026", keys_per_day=used + 5)
    got = 0
    try:
        for _ in range(200):  # bounded: 5 keys, then refusals
            answer = keys(net, BANK, number=1, size=size)
            if answer.status == 200:
                got += 1
            elif got == 5:
                assert answer.status == 503
                assert "quota" in answer.json()["details"][0]["reason"]
                net.assert_reveals_no_carrier(answer.body.decode())
                break
        assert got == 5
        assert all(keys(net, BANK, size=size).status == 503 for _ in range(3))
        assert delivered(net)["bank-2026"][0] == used + 5
    finally:
        change(net, "contract", "bank-2026", keys_per_day=1_000_000)
    ok(net, BANK, size=size)


def test_the_contract_rate_is_enforced_with_503(net: Net, size: int) -> None:
    stocked(net, DEMO, size, number=4)
    change(net, "contract", "demo-2026", max_rate=1)
    try:
        body = refused(net, DEMO, 503, size=size)
        assert "rate" in body["details"][0]["reason"]
    finally:
        change(net, "contract", "demo-2026", max_rate=10_000)
    ok(net, DEMO, size=size)


# -- the suspension race --------------------------------------------------------------------
def test_after_a_suspension_takes_effect_no_request_passes(net: Net, size: int) -> None:
    ok(net, BANK, size=size)
    stocked(net, BANK, size, number=20)
    change(net, "user", "example-bank", suspended=True)
    try:
        statuses = []
        for _ in range(300):  # bounded: until refused, then 20 more
            statuses.append(keys(net, BANK, size=size).status)
            if statuses.count(401) >= 20:
                break
        first = statuses.index(401)
        assert set(statuses[first:]) == {401}, statuses
    finally:
        change(net, "user", "example-bank", suspended=False)
    ok(net, BANK, size=size)


# -- accounting -----------------------------------------------------------------------------
def test_accounting_equals_what_the_saes_received(net: Net) -> None:
    """With the stock on: 256-bit requests come from the stock, 128-bit ones cross."""
    stocked(net, DEMO, 256, number=40)
    stocked(net, BANK, 256, number=20)
    before = delivered(net)
    received: dict[str, list[int]] = {"demo-2026": [0, 0], "bank-2026": [0, 0]}
    for i in range(30):
        pair, contract = (DEMO, "demo-2026") if i % 3 else (BANK, "bank-2026")
        number, size = 1 + i % 4, 128 if i % 2 else 256
        got = keys(net, pair, number, size)
        assert got.status == 200, got.body
        for key in got.json()["keys"]:
            received[contract][0] += 1
            received[contract][1] += len(base64.b64decode(key["key"])) * 8
    keys(net, DEMO, size=512)  # refused: billed nothing
    after = delivered(net)
    for contract, (k, b) in received.items():
        old = before.get(contract, (0, 0))
        assert (after[contract][0] - old[0], after[contract][1] - old[1]) == (k, b)


# -- what AAA must never see ----------------------------------------------------------------
def aaa_texts(net: Net) -> dict[str, bytes]:
    """Everything AAA stores or logs, and what the AKMSs queue for it."""
    files = [p for p in (net.dir / "aaa").iterdir() if p.is_file()]
    files += [net.dir / "logs" / "aaa.log"]
    files += [net.dir / "data" / n / f"aaa-outbox.db{x}" for n in AKMS_NODES for x in ("", "-wal")]
    out = {}
    for path in files:
        if path.exists():
            out[str(path)] = path.read_bytes()
    for db in (net.dir / "aaa").glob("*.db"):
        conn = sqlite3.connect(db)
        try:
            out[f"{db} (dump)"] = "\n".join(conn.iterdump()).encode()
        finally:
            conn.close()
    return out


def test_no_key_material_or_key_id_reaches_aaa(net: Net) -> None:
    got = ok(net, DEMO, number=8) + ok(net, BANK, number=8, size=128)
    delivered(net)  # every report is in
    secrets: list[bytes] = []
    for key in got:
        raw = base64.b64decode(key["key"])
        secrets += [raw, key["key"].encode(), raw.hex().encode(), key["key_ID"].encode()]
    for name, data in aaa_texts(net).items():
        for secret in secrets:
            assert secret not in data, f"key material or a key ID in {name}"


def test_aaa_knows_users_and_access_nodes_never_the_carrier(net: Net) -> None:
    topo = tomllib.loads((net.dir / "topology.toml").read_text())
    carrier = [n for n in topo["nodes"] if n["role"] == "ckms"]
    words = [n["name"] for n in carrier] + [n["site"] for n in carrier]
    words += [f"link-{x['a']}-{x['b']}" for x in topo["links"]]
    for name, data in aaa_texts(net).items():
        if "outbox" in name:
            continue
        text = data.decode("utf-8", "replace")
        for word in words:
            assert word not in text, f"{word} in {name}"
    snap = registry(net).snapshot()
    carrier_ids = {n["id"] for n in carrier}
    assert not (set(snap.ukms) | set(snap.ukms.values())) & carrier_ids
    assert set(snap.ukms.values()) == {2, 14}


def test_aaa_runs_as_a_supervised_process_with_private_credentials(net: Net) -> None:
    live = netproc.ask_supervisor(net.dir)
    assert live is not None and live["nodes"]["aaa"]["pid"] > 0
    assert netproc.find_processes(net.dir).get(live["nodes"]["aaa"]["pid"]) == "aaa"
    shown = qkdn("net", "status", "--dir", str(net.dir), "--json")
    assert shown.returncode == 0, shown.stderr
    aaa = json.loads(shown.stdout)["aaa"]
    assert aaa["alive"] and aaa["pid"] == live["nodes"]["aaa"]["pid"]
    assert aaa["snmp"] == tomllib.loads((net.dir / "aaa" / "aaa.toml").read_text())["listen"]
    files = [net.dir / "aaa" / "aaa.toml", net.dir / "aaa" / "dc.pem"]
    files += [net.dir / "aaa" / f"akms-{n}.toml" for n in (2, 14)]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
