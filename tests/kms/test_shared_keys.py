"""Keys shared with several slave SAEs (ETSI GS QKD 014 Annex B, issue 16 A7), engine by
engine on :class:`engine_bench.Bench`: the mini network of the engine tests with a second
UKMS under access node B, so that the slaves of one request sit at different UKMSs.

Each slave is checked against the contract (one validation per slave at AKMS A), gets
its copies at its own UKMS and fetches the same bits once; nobody else does. Slaves that
cannot share one request (another user, another access node) get nothing, and nothing is
drawn for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config.topology import Topology, load_topology
from appliance.kms import messages as m
from appliance.kms.errors import KeyUnavailable, StoreFull
from appliance.kms.events import Refuse, SaeEncKeys, SaeKeys, SaeRefused, Validate
from appliance.kms.seams import Denial, Denied
from tests.kms.engine_bench import SHARED, Bench

UKMS_A, AKMS_A, AKMS_B, UKMS_B, UKMS_B2 = 1, 2, 4, 5, 6


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Topology:
    path: Path = tmp_path_factory.mktemp("shared") / "shared.toml"
    path.write_text(SHARED)
    return load_topology(str(path))


@pytest.fixture
def bench(topology: Topology) -> Iterator[Bench]:
    b = Bench(topology)
    yield b
    b.check_no_key_leaks()


def enc(b: Bench, slave: str, also: tuple[str, ...], number: int = 3) -> int:
    req = next(b.numbers)
    event = SaeEncKeys(req=req, master="sae-a", slave=slave, number=number, size=256, also=also)
    b.feed(UKMS_A, "ukms", event)
    return req


def test_every_slave_fetches_the_same_bits_once_at_its_own_ukms(bench):
    b = bench
    req = enc(b, "sae-b", ("sae-f",))
    keys = b.keys("sae-a", req)
    ids = [k for k, _ in keys]
    assert len(keys) == 3
    (ksa,) = b.sent(m.KsaRequest, UKMS_A, "ukms")
    assert ksa.also == ["sae-f"]
    checked = [a.query.slave for a in b.actions(Validate, AKMS_A, "akms")]
    assert sorted(checked) == ["sae-b", "sae-f"]  # each against the contract
    delivered = {(d.slave, d.master) for d in b.sent(m.Deliver, AKMS_B, "akms")}
    assert delivered == {("sae-b", "sae-a"), ("sae-f", "sae-a")}
    for slave in ("sae-b", "sae-f"):
        assert b.keys(slave, b.dec(slave, "sae-a", ids)) == keys
        again = b.outcome(slave, b.dec(slave, "sae-a", ids))  # once only
        assert isinstance(again, SaeRefused) and isinstance(again.error, KeyUnavailable)
    # another SAE of the user at a slave's UKMS, and the master itself, get nothing
    for caller, master in (("sae-e", "sae-a"), ("sae-d", "sae-a"), ("sae-g", "sae-a")):
        got = b.outcome(caller, b.dec(caller, master, ids))
        assert isinstance(got, SaeRefused), caller
    assert b.waiting() == {}


def test_a_plain_request_still_names_no_additional_slave(bench):
    b = bench
    req = b.enc("sae-a", "sae-f", number=1)
    assert isinstance(b.outcome("sae-a", req), SaeKeys)
    (ksa,) = b.sent(m.KsaRequest, UKMS_A, "ukms")
    assert ksa.also == []
    assert [len(m.decode(t.body, m.CnRequest).also) for t in b.sent(m.Tagged, AKMS_A)] == [0, 0]


@pytest.mark.parametrize("also", [("sae-e",), ("sae-f", "sae-e")])
def test_slaves_that_cannot_share_are_refused_before_anything_is_drawn(bench, also):
    """Two slaves at one UKMS (sae-b, sae-e: its store holds a key ID once) cannot share a
    request (400, the contract's limits)."""
    b = bench
    req = enc(b, "sae-b", also)
    assert isinstance(b.outcome("sae-a", req), SaeRefused)
    (denial,) = b.actions(Refuse, AKMS_A, "akms")
    assert isinstance(denial.error, Denied) and denial.error.why is Denial.LIMITS
    assert b.sent(m.Tagged, AKMS_A) == [] and b.draws == []
    assert b.waiting() == {}


def test_a_slave_of_another_user_is_refused_at_the_masters_ukms(bench):
    b = bench
    req = enc(b, "sae-b", ("sae-d",))
    got = b.outcome("sae-a", req)
    assert isinstance(got, SaeRefused) and isinstance(got.error, KeyUnavailable)
    assert b.sent(m.KsaRequest) == []


def test_one_slave_whose_copies_cannot_be_stored_fails_the_request(bench):
    """The master gets no key that one of its slaves could not fetch; the copies stored
    for the others are never issued (no master holds their IDs) and expire. (AKMS A asks
    once more, with fresh keys: that attempt's copies are refused too.)"""
    b = bench
    b.refuse(b.request_to(UKMS_B2, "ukms", m.Deliver), StoreFull("full"), once=False)
    req = enc(b, "sae-b", ("sae-f",))
    assert isinstance(b.outcome("sae-a", req), SaeRefused)
    assert b.waiting() == {}


def test_a_slave_behind_the_masters_access_node_gets_its_copies_from_there(bench):
    """sae-g sits at the master's own UKMS: AKMS A delivers its copies (the keys crossed
    the network once, to AKMS A) before it answers the master's UKMS."""
    b = bench
    req = enc(b, "sae-b", ("sae-f", "sae-g"))
    keys = b.keys("sae-a", req)
    ids = [k for k, _ in keys]
    (tagged,) = [t for t in b.sent(m.Tagged, AKMS_A) if m.decode(t.body, m.CnRequest).also]
    assert [x.slave for x in m.decode(tagged.body, m.CnRequest).also] == ["sae-f"]
    (here,) = b.sent(m.Deliver, AKMS_A, "akms")
    assert (here.master, here.slave) == ("sae-a", "sae-g")
    for slave in ("sae-b", "sae-f", "sae-g"):
        assert b.keys(slave, b.dec(slave, "sae-a", ids)) == keys
    assert b.waiting() == {}


def test_a_local_slave_whose_copies_cannot_be_stored_fails_the_request(bench):
    b = bench
    b.refuse(b.request_to(UKMS_A, "ukms", m.Deliver), StoreFull("full"))
    req = enc(b, "sae-b", ("sae-g",))
    assert isinstance(b.outcome("sae-a", req), SaeRefused)
    assert b.sent(m.KsaAnswer) == []  # the master's UKMS got nothing
    assert b.waiting() == {}


def test_a_first_slave_behind_the_masters_access_node_shares_with_no_one(bench):
    """Keys for sae-g (the master's UKMS) cross no network: no slave can share them."""
    b = bench
    req = enc(b, "sae-g", ("sae-b",))
    assert isinstance(b.outcome("sae-a", req), SaeRefused)
    (denial,) = b.actions(Refuse, AKMS_A, "akms")
    assert isinstance(denial.error, Denied) and denial.error.why is Denial.LIMITS
    assert b.draws == []
