"""Crash consistency of the accounting: 2,000 key requests while AAA and both access nodes
are killed with ``-9`` at random moments; afterwards AAA's accounting equals, per contract,
exactly the keys and bits the SAEs received (a failed request is not billed, a replayed
report counts once, nothing is lost). Bounded: 2,000 requests, 6 kills."""

from __future__ import annotations

import base64
import os
import random
import signal
import sqlite3
import threading
from collections.abc import Iterator
from http.client import HTTPException

import pytest

from appliance.aaa.accounting import Accounting
from appliance.kms import netproc
from tests.kms.conftest import Net, exchange, poll, running_net

REQUESTS = 2000
WORKERS = 4
PAIRS = {"demo-2026": ("sae-berlin-1", "sae-bonn-1"), "bank-2026": ("sae-berlin-2", "sae-bonn-2")}
VICTIMS = ("aaa", "akms-berlin", "akms-bonn")
KILLS = 6


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    # patience 2 s: a request whose CN key died with a node fails after 4 s, not 20
    options = ("--aaa", "--timeout", "240", "--patience", "2")
    with running_net(tmp_path_factory, *options) as running:
        yield running


def pid_of(net: Net, name: str) -> int:
    live = netproc.ask_supervisor(net.dir) or {}
    return int(live.get("nodes", {}).get(name, {}).get("pid", 0) or 0)


def outboxes_empty(net: Net) -> bool:
    for node in ("akms-berlin", "akms-bonn"):
        db = sqlite3.connect(net.dir / "data" / node / "aaa-outbox.db")
        try:
            if db.execute("SELECT count(*) FROM outbox").fetchone()[0]:
                return False
        finally:
            db.close()
    return True


class Load:
    """Workers sending enc_keys requests, counting what the SAEs received per contract."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.lock = threading.Lock()
        self.sent = 0
        self.ok = 0
        self.received = {c: [0, 0] for c in PAIRS}

    def take(self) -> int | None:
        with self.lock:
            if self.sent >= REQUESTS:
                return None
            self.sent += 1
            return self.sent

    def work(self, seed: int) -> None:
        rng = random.Random(seed)
        conns: dict[str, object] = {}
        while (n := self.take()) is not None:
            contract = "demo-2026" if n % 3 else "bank-2026"
            master, slave = PAIRS[contract]
            number, size = rng.choice((1, 2, 4)), rng.choice((128, 256))
            conn = conns.get(master) or self.net.connect(master)
            conns[master] = conn
            try:
                got = exchange(
                    conn, "GET", f"/api/v1/keys/{slave}/enc_keys?number={number}&size={size}"
                )  # type: ignore[arg-type]
            except (OSError, HTTPException):
                conns.pop(master, None)
                continue
            if got.status != 200:
                assert got.status == 503, got.body
                continue
            keys = got.json()["keys"]
            assert len(keys) == number
            with self.lock:
                self.ok += 1
                self.received[contract][0] += number
                self.received[contract][1] += sum(len(base64.b64decode(k["key"])) * 8 for k in keys)


def test_accounting_equals_what_the_saes_received_through_kills(net: Net) -> None:
    load = Load(net)
    workers = [threading.Thread(target=load.work, args=(i,)) for i in range(WORKERS)]
    for w in workers:
        w.start()
    rng = random.Random(14)
    try:
        for i in range(KILLS):
            at = (i + 1) * REQUESTS // (KILLS + 1) + rng.randrange(-50, 50)
            poll(lambda at=at: load.sent >= at, f"{at} requests sent", 120)
            victim = VICTIMS[i % len(VICTIMS)]
            pid = poll(lambda v=victim: pid_of(net, v), f"{victim} running", 60)
            os.kill(pid, signal.SIGKILL)
            poll(lambda v=victim, p=pid: pid_of(net, v) not in (0, p), f"{victim} back", 60)
    finally:
        for w in workers:
            w.join(300)
    assert load.sent == REQUESTS and load.ok > REQUESTS // 4, (load.sent, load.ok)
    poll(lambda: outboxes_empty(net), "every AKMS's reports acknowledged by AAA", 120)
    acct = Accounting(net.dir / "aaa" / "accounting.db")
    try:
        billed = {c: [0, 0] for c in PAIRS}
        for row in acct.totals():
            billed[row.contract][0] += row.keys
            billed[row.contract][1] += row.bits
    finally:
        acct.close()
    assert billed == load.received
