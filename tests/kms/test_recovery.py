"""What a running network does when its parts fail, as an operator sees it (issue 13, items
6-9 and 13): clean refusals while a peer is away, no false alarm after an ordinary crash,
an alarm with a code for tampering and for a store that cannot be trusted, a node that
refuses to start without its key, and private files.

One network for the module; each test leaves it serving. While a test changes a node's
files, the supervisor is held (SIGSTOP) so that it cannot restart the node half-way.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.kms.shards import shard_index
from tests.kms.conftest import Net, poll, running_net

BERLIN, BONN = "sae-berlin-1", "sae-bonn-1"
BANK_BERLIN, BANK_BONN = "sae-berlin-2", "sae-bonn-2"
SLAVE_UKMS = "ukms-bonn"
CROSSING = 128
"""A key size the stocks do not hold (they hold 256-bit keys), so the request crosses the
network; within DemoQuanDT's contracts (256 bits at most), which AAA enforces."""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    with running_net(tmp_path_factory) as network:
        network.wait_for_relays(BERLIN, BONN)
        yield network


def data_dir(net: Net, node: str) -> Path:
    return Path(net.config(node)["paths"]["data_dir"])


@contextmanager
def supervisor_held(net: Net) -> Iterator[None]:
    """The supervisor stopped (it restarts nothing) for the duration."""
    pid = int(json.loads((net.dir / "run" / "state.json").read_text())["supervisor_pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def logged(net: Net, node: str, mark: int, needle: str) -> list[str]:
    return [line for line in net.log_since(node, mark) if needle in line]


def test_a_peer_that_is_down_is_a_clean_503_not_an_internal_error(net):
    """Item 13: with the access node down, enc_keys answers a JSON 503 that says the
    service is unavailable; the UKMS logs no traceback and no internal error."""
    mark = net.log_mark("ukms-berlin")
    with supervisor_held(net):
        pid = net.kill("akms-berlin")
        got = net.enc_keys(BERLIN, BONN, size=CROSSING)
    assert got.status == 503, got.body
    doc = got.json()
    assert "message" in doc and "internal" not in doc["message"].lower(), doc
    net.assert_reveals_no_carrier(got.body.decode())
    net.wait_restarted("akms-berlin", pid)
    lines = net.log_since("ukms-berlin", mark)
    assert not [x for x in lines if "Traceback" in x or "internal error" in x], lines
    net.wait_for_relays(BERLIN, BONN)


def test_an_ordinary_crash_is_recovered_without_an_integrity_alarm(net):
    """Item 8: after kill -9 of a carrier node its neighbours resynchronise their link
    keys (stale grants and keys) quietly: no alarm, no error line anywhere."""
    nodes = [n["name"] for n in net.status()["nodes"]]
    marks = {n: net.log_mark(n) for n in nodes}
    pid = net.kill("ckms-hannover")
    net.wait_restarted("ckms-hannover", pid)
    net.wait_for_relays(BERLIN, BONN)
    net.wait_for_relays(BONN, BERLIN)
    for node in nodes:
        alarms = logged(net, node, marks[node], "alarm")
        errors = [x for x in net.log_since(node, marks[node]) if '"level": "error"' in x]
        assert not alarms and not errors, (node, alarms, errors)


def test_a_tampered_key_record_is_an_alarm_and_gives_no_key(net):
    """Item 8: one flipped byte in a sealed record: dec_keys gets no key, and the UKMS
    raises an integrity alarm with its code (not a silent 503)."""
    got = net.enc_keys(BERLIN, BONN, size=CROSSING)
    assert got.status == 200, got.body
    ids = [k["key_ID"] for k in got.json()["keys"]]
    shard = data_dir(net, SLAVE_UKMS) / f"keys-{shard_index(f'014:{BERLIN}:{BONN}', 8)}.db"
    with supervisor_held(net):
        pid = net.kill(SLAVE_UKMS)
        with sqlite3.connect(shard) as db:
            seq, record = db.execute(
                "SELECT b.seq, b.record FROM batches b JOIN keys k ON k.batch = b.seq "
                "WHERE k.id = ?",
                (ids[0],),
            ).fetchone()
            flipped = bytearray(record)
            flipped[len(flipped) // 2] ^= 0x01
            db.execute("UPDATE batches SET record = ? WHERE seq = ?", (bytes(flipped), seq))
    net.wait_restarted(SLAVE_UKMS, pid)
    mark = net.log_mark(SLAVE_UKMS)
    got = net.dec_keys(BONN, BERLIN, ids)
    assert got.status != 200 and "keys" not in got.json(), got.body
    alarm = poll(lambda: logged(net, SLAVE_UKMS, mark, "KMS-INTEGRITY"), "integrity alarm")
    assert len(alarm) == 1 and "integrity alarm" in alarm[0], alarm
    net.wait_for_relays(BERLIN, BONN, size=CROSSING)


def test_a_corrupt_store_is_quarantined_and_the_other_pairs_go_on(net):
    """Item 7: a shard whose SQLite header is overwritten is set aside with an alarm;
    pairs kept in other shards still get their keys, and new keys flow for all pairs."""
    got = net.enc_keys(BANK_BERLIN, BANK_BONN, size=CROSSING)
    assert got.status == 200, got.body
    bank_ids = [k["key_ID"] for k in got.json()["keys"]]
    demo = shard_index(f"014:{BERLIN}:{BONN}", 8)
    assert shard_index(f"014:{BANK_BERLIN}:{BANK_BONN}", 8) != demo  # the test's premise
    shard = data_dir(net, SLAVE_UKMS) / f"keys-{demo}.db"
    mark = net.log_mark(SLAVE_UKMS)
    with supervisor_held(net):
        pid = net.kill(SLAVE_UKMS)
        with sqlite3.connect(shard) as db:  # the log folded in: the header is read again
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(shard, "r+b") as fh:
            fh.write(b"\xff" * 100)
    net.wait_restarted(SLAVE_UKMS, pid)
    poll(lambda: logged(net, SLAVE_UKMS, mark, "KMS-STORE-CORRUPT"), "corrupt-store alarm")
    assert list(shard.parent.glob(f"{shard.name}.quarantined-*")), "nothing set aside"
    got = net.dec_keys(BANK_BONN, BANK_BERLIN, bank_ids)
    assert got.status == 200, got.body  # another shard: untouched
    net.wait_for_relays(BERLIN, BONN, size=CROSSING)  # the fresh shard takes the pair's new keys
    net.wait_for_relays(BANK_BERLIN, BANK_BONN, size=CROSSING)


def test_a_node_without_its_key_refuses_to_start_and_another_key_is_an_alarm(net):
    """Item 6: node.key deleted while sealed stores exist: the node refuses to start with
    a coded error naming the file (it is never silently replaced); with the key back it
    starts. A key that is not the one the stores were sealed under: an alarm, the stores
    are set aside, and the node serves again with fresh ones."""
    key = data_dir(net, SLAVE_UKMS) / "node.key"
    original = key.read_bytes()
    mark = net.log_mark(SLAVE_UKMS)
    with supervisor_held(net):
        pid = net.kill(SLAVE_UKMS)
        key.unlink()
    refusal = poll(lambda: logged(net, SLAVE_UKMS, mark, "KMS-NODE-KEY-MISSING"), "refusal")
    assert str(key) in refusal[0]
    assert not key.exists(), "the node made itself a new key"
    with supervisor_held(net):
        key.write_bytes(original)
        os.chmod(key, 0o600)
    net.wait_restarted(SLAVE_UKMS, pid)
    net.wait_for_relays(BERLIN, BONN, size=CROSSING)

    mark = net.log_mark(SLAVE_UKMS)
    with supervisor_held(net):
        pid = net.kill(SLAVE_UKMS)
        key.write_text(os.urandom(32).hex() + "\n")
    net.wait_restarted(SLAVE_UKMS, pid)
    poll(lambda: logged(net, SLAVE_UKMS, mark, "KMS-STORE-KEY"), "store-key alarm")
    net.wait_for_relays(BERLIN, BONN, size=CROSSING)


def test_store_files_are_private(net):
    """Item 9: key IDs are in clear in the stores: files 0600, directories 0700."""
    directory = data_dir(net, SLAVE_UKMS)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.glob("keys-*.db*"))
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
