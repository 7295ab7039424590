"""Reliability of the network of OS processes (issue 5, item 8): crashes and a busy store.

One DemoQuanDT network for the module, without a KSA stock, so that every ``enc_keys``
crosses the whole chain (a stock would hide a crashed carrier). What must hold:

* a carrier node killed with SIGKILL under concurrent requests: each request either
  completes, and the slave then gets the identical key exactly once, or fails with a clean
  ETSI 014 503 (a JSON ``{"message", "details"}`` error); no key is delivered twice or
  differently; the supervisor restarts the node and relays resume;
* the slave's UKMS killed with SIGKILL keeps the keys its SAE has not fetched yet, each
  still fetchable exactly once;
* a key store another process holds locked (a busy database) gives a clean 503 and loses
  nothing (a full disk and the other store errors are unit-tested in ``test_store.py``).
"""

from __future__ import annotations

import http.client
import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kms.conftest import Net, Reply, exchange, poll, running_net

MASTER, SLAVE = "sae-berlin-1", "sae-bonn-1"
ENC = f"/api/v1/keys/{SLAVE}/enc_keys"
DEC = f"/api/v1/keys/{MASTER}/dec_keys"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    # the key path (AAA included); the node agents and the manager are tests/mgmt's
    with running_net(tmp_path_factory, "--stock", "0", "--no-mgmt") as running:
        yield running


@dataclass
class Outcome:
    """One enc_keys request of a worker: when it ran (on the workers' logical clock) and
    what the master SAE got."""

    start: int
    end: int
    reply: Reply | None
    error: str = ""


def assert_clean_503(net: Net, reply: Reply) -> None:
    """An ETSI 014 error: 503, JSON ``{"message"[, "details"]}``, nothing about carriers."""
    assert reply.status == 503, (reply.status, reply.body)
    assert reply.headers.get("content-type", "").startswith("application/json")
    doc = reply.json()
    assert isinstance(doc, dict) and set(doc) <= {"message", "details"}, doc
    assert isinstance(doc["message"], str) and doc["message"], doc
    net.assert_reveals_no_carrier(reply.body.decode())


def take_each_once(net: Net, issued: dict[str, str], recheck: set[str] | None = None) -> None:
    """The slave gets every issued key, identical, and a second dec_keys fails: one key at
    a time for the keys in ``recheck`` (default: all), since a batch is all-or-none and a
    refused batch would not show that each of its keys is gone; by batches for the rest."""
    ids = list(issued)
    batches = [ids[i : i + 100] for i in range(0, len(ids), 100)]
    for batch in batches:
        got = net.dec_keys(SLAVE, MASTER, batch)
        assert got.status == 200, got.body
        assert {k["key_ID"]: k["key"] for k in got.json()["keys"]} == {k: issued[k] for k in batch}
    conn = net.connect(SLAVE)
    for key_id in set(ids) if recheck is None else recheck:
        again = exchange(conn, "GET", f"{DEC}?key_ID={key_id}")
        assert again.status == 401, f"key {key_id} was delivered twice"
    for batch in batches:
        again = exchange(conn, "POST", DEC, {"key_IDs": [{"key_ID": k} for k in batch]})
        assert again.status == 401, "a batch of keys was delivered twice"
    conn.close()


class Workers:
    """Threads that each send enc_keys requests back to back, as the master SAE."""

    def __init__(self, net: Net, count: int) -> None:
        self.net, self.outcomes, self.stop = net, list[Outcome](), threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(count)]
        self._clock = itertools.count()  # orders the workers' events and the test's

    def now(self) -> int:
        """A tick of the logical clock (after every tick taken before it, in any thread)."""
        return next(self._clock)

    def __enter__(self) -> Workers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self) -> None:
        conn = self.net.connect(MASTER)
        while not self.stop.is_set():
            start = self.now()
            try:
                reply: Reply | None = exchange(conn, "GET", f"{ENC}?number=2")
                error = ""
            except (OSError, http.client.HTTPException) as exc:  # not a clean 014 answer
                reply, error = None, repr(exc)
                conn.close()
                conn = self.net.connect(MASTER)
            self.outcomes.append(Outcome(start, self.now(), reply, error))
        conn.close()

    def successes_since(self, t: int) -> int:
        return sum(1 for o in self.outcomes if o.start >= t and o.reply and o.reply.status == 200)

    def wait(self, what: str, done: Callable[[], bool], timeout: float = 60) -> None:
        poll(done, what, timeout)


@pytest.mark.parametrize("victim", ["ckms-magdeburg", "akms-bonn"])
def test_a_node_killed_during_concurrent_requests(net, victim):
    """SIGKILL of a carrier (a CKMS, or the AKMS that answers the requests) while four SAE
    requests run back to back: no unclean failure, no key twice or mismatched, and the
    restarted node carries keys again."""
    with Workers(net, 4) as workers:
        workers.wait("no key request succeeded", lambda: workers.successes_since(0) >= 8)
        killed_at = workers.now()
        pid = net.kill(victim)
        net.wait_restarted(victim, pid)
        back_at = workers.now()
        workers.wait(
            "relays did not resume after the restart",
            lambda: workers.successes_since(back_at) >= 8,
        )
    unclean = [o.error for o in workers.outcomes if o.reply is None]
    assert not unclean, f"requests failed without an HTTP answer: {unclean[:3]}"
    failed = [o.reply for o in workers.outcomes if o.reply and o.reply.status != 200]
    assert failed, "no request failed while the node was down: the test did not bite"
    for reply in failed:
        assert_clean_503(net, reply)
    in_flight = [o for o in workers.outcomes if o.start < killed_at < o.end]
    assert in_flight, "no request was in flight at the kill"
    issued: dict[str, str] = {}
    around_the_crash: set[str] = set()  # keys of requests that overlapped the down time
    for o in workers.outcomes:
        if o.reply and o.reply.status == 200:
            for key in o.reply.json()["keys"]:
                assert key["key_ID"] not in issued, "one key ID was issued twice"
                issued[key["key_ID"]] = key["key"]
                if o.end > killed_at and o.start < back_at:
                    around_the_crash.add(key["key_ID"])
    assert len(set(issued.values())) == len(issued), "one key was issued under two IDs"
    take_each_once(net, issued, recheck=around_the_crash)


@contextmanager
def slave_stores_locked(net: Net) -> Iterator[None]:
    """Every SQLite store of the slave's UKMS held by another process's write transaction
    (what a stuck backup job or a second writer does to a database)."""
    data = Path(net.config(net.sae(SLAVE)["ukms"])["paths"]["data_dir"])
    stores = sorted(data.glob("*.db"))
    assert stores, f"no key store in {data}"
    holders = [sqlite3.connect(p, isolation_level=None) for p in stores]
    for db in holders:
        db.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        for db in holders:
            db.execute("ROLLBACK")
            db.close()


def test_a_busy_key_store_gives_a_clean_503_and_loses_no_key(net):
    got = net.enc_keys(MASTER, SLAVE, number=2)  # this also creates the slave's store
    assert got.status == 200, got.body
    issued = {k["key_ID"]: k["key"] for k in got.json()["keys"]}
    with slave_stores_locked(net):  # the UKMS gives up after its busy timeout
        assert_clean_503(net, net.dec_keys(SLAVE, MASTER, list(issued)))
    take_each_once(net, issued)


def wait_released(net: Net, key_id: str) -> None:
    """Until the slave's UKMS has committed the release of a key it answered (bounded).
    The release follows the written answer by a commit: a crash in between leaves the key
    pending, fetchable again by the same slave for the refetch window (store.py)."""
    data = Path(net.config(net.sae(SLAVE)["ukms"])["paths"]["data_dir"])

    def gone() -> bool:
        return all(stored(path, key_id) == 0 for path in sorted(data.glob("*.db")))

    poll(gone, f"the release of {key_id} committed", timeout=10)


def stored(path: Path, key_id: str) -> int:
    """Rows of ``key_id`` in one store file (read only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM keys WHERE id = ?", (key_id,)).fetchone()[0])
    finally:
        db.close()


@pytest.fixture(scope="module")
def slave_ukms_restarted(net: Net) -> tuple[dict[str, str], str]:
    """Keys issued to the master, then SIGKILL of the slave's UKMS and its restart.
    Returns the keys the slave had not fetched (ID -> key) and one it had."""
    issued: dict[str, str] = {}
    for _ in range(3):
        got = net.enc_keys(MASTER, SLAVE, number=2)
        assert got.status == 200, got.body
        issued |= {k["key_ID"]: k["key"] for k in got.json()["keys"]}
    fetched = next(iter(issued))
    assert net.dec_keys(SLAVE, MASTER, [fetched]).status == 200
    del issued[fetched]
    wait_released(net, fetched)
    ukms = net.sae(SLAVE)["ukms"]
    pid = net.kill(ukms)
    net.wait_restarted(ukms, pid)
    return issued, fetched


def test_a_ukms_restart_keeps_the_keys_its_slave_has_not_fetched(net, slave_ukms_restarted):
    unfetched, fetched = slave_ukms_restarted
    take_each_once(net, unfetched)
    assert net.dec_keys(SLAVE, MASTER, [fetched]).status == 401, "a taken key came back"


def test_keys_flow_again_after_a_ukms_restart(net, slave_ukms_restarted):
    net.wait_for_relays(MASTER, SLAVE)
