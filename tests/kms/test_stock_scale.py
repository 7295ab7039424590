"""A UKMS serving many SAE pairs: what an idle pair costs, whose turn a refill is, and how
failed refills back off (issue 12, "scale with users").

The engines run on :class:`engine_bench.Bench` (no network, no clock: time moves when a
test says so) over the five-node network of :data:`engine_bench.MINI` with
:data:`PAIRS` more users, each with one SAE at each user node.
"""

from __future__ import annotations

import pytest

from appliance.kms import messages as m
from appliance.kms.engines.config import Policy
from appliance.kms.engines.ukms import REFILL_PAUSE
from appliance.kms.errors import KeyUnavailable
from appliance.kms.storeops import STOCK, TakeOldest
from tests.kms.engine_bench import MINI, Bench

UKMS_A, AKMS_A = 1, 2
PAIRS = 40


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory):
    from appliance.config.topology import load_topology

    extra = []
    for i in range(PAIRS):
        extra.append(f'[[users]]\nid = "user-{i}"\nname = "User {i}"\n')
        extra.append(f'[[contracts]]\nid = "c-{i}"\nuser = "user-{i}"\n')
        for node, side in ((1, "m"), (5, "s")):
            extra.append(
                f'[[saes]]\nid = "sae-{side}-{i}"\nnode = {node}\n'
                f'user = "user-{i}"\ncontract = "c-{i}"\n'
            )
    path = tmp_path_factory.mktemp("many") / "many.toml"
    path.write_text(MINI + "\n" + "\n".join(extra))
    return load_topology(str(path))


def ukms_timers(b: Bench) -> set[object]:
    return {name for node, service, name in b.timers if (node, service) == (UKMS_A, "ukms")}


def masters(b: Bench) -> list[tuple[str, str]]:
    return b.engine(UKMS_A, "ukms").sessions.master_pairs()


def test_idle_pairs_with_full_stocks_hold_no_object_no_timer_and_ask_nothing(topology):
    b = Bench(topology, Policy(patience=1.0, stock=4, stock_batch=4))
    ukms = b.engine(UKMS_A, "ukms")
    pairs = masters(b)
    assert len(pairs) == PAIRS + 2
    assert all(ukms.stored(master, slave) == 4 for master, slave in pairs)
    assert ukms._stocks == {}  # no per-pair object once every pair is idle
    assert ukms_timers(b) == {"housekeeping"}  # one engine timer, whatever the pairs
    before = len(b.log)
    b.advance(30.0)  # time passes, nobody asks for keys
    assert [a for node, service, a in b.log[before:] if (node, service) == (UKMS_A, "ukms")] == []

    master, slave = pairs[-1]
    req = b.enc(master, slave)  # one pair serves a request: it alone becomes active
    assert len(b.keys(master, req)) == 1
    assert set(ukms._stocks) == {ukms.sessions.session_014(master, slave)}


def test_short_pairs_take_turns_every_pair_once_before_any_twice(topology):
    b = Bench(topology, Policy(patience=1.0, stock=8, stock_batch=4, stock_parallel=2))
    pairs = masters(b)
    asked = [(r.master, r.slave) for r in b.sent(m.KsaRequest, UKMS_A, "ukms")]
    assert len(asked) == 2 * len(pairs)  # two batches of 4 fill a stock of 8
    assert sorted(asked[: len(pairs)]) == sorted(pairs)  # every pair's first batch first
    assert sorted(asked[len(pairs) :]) == sorted(pairs)
    ukms = b.engine(UKMS_A, "ukms")
    assert all(ukms.stored(master, slave) == 8 for master, slave in pairs)


def test_a_pair_is_refilled_once_half_a_batch_is_missing_not_per_key_drawn(topology):
    b = Bench(topology, Policy(patience=1.0, stock=8, stock_batch=4, stock_parallel=2))
    ukms = b.engine(UKMS_A, "ukms")
    pairs = masters(b)
    asked = len(b.sent(m.KsaRequest, UKMS_A, "ukms"))
    for master, slave in pairs:  # one key drawn from every pair: none is short yet
        assert len(b.keys(master, b.enc(master, slave))) == 1
    assert len(b.sent(m.KsaRequest, UKMS_A, "ukms")) == asked
    assert all(ukms.stored(master, slave) == 7 for master, slave in pairs)

    master, slave = pairs[0]  # a second key: half a batch (2) missing, a whole batch asked
    assert len(b.keys(master, b.enc(master, slave))) == 1
    (refill,) = b.sent(m.KsaRequest, UKMS_A, "ukms")[asked:]
    assert (refill.master, refill.slave, refill.number, refill.refill) == (master, slave, 4, True)
    assert ukms.stored(master, slave) == 6 + 4  # at most half a batch beyond the stock
    assert all(ukms.stored(*pair) == 7 for pair in pairs[1:])


def test_a_short_pair_is_refilled_by_whole_batches_until_it_holds_its_stock(topology):
    b = Bench(topology, Policy(patience=1.0, stock=6, stock_batch=4, stock_parallel=2))
    ukms = b.engine(UKMS_A, "ukms")
    pairs = masters(b)
    # filled by whole batches until full: 4 then 8 (a batch less one beyond 6 at most)
    assert all(ukms.stored(master, slave) == 8 for master, slave in pairs)
    master, slave = pairs[0]
    asked = len(b.sent(m.KsaRequest, UKMS_A, "ukms"))
    assert len(b.keys(master, b.enc(master, slave, number=7))) == 7
    refills = b.sent(m.KsaRequest, UKMS_A, "ukms")[asked:]
    # 1 left, 5 missing: a batch (5 held, still short of 6), then another (9)
    assert [(r.master, r.number, r.refill) for r in refills] == [(master, 4, True)] * 2
    assert ukms.stored(master, slave) == 1 + 4 + 4


def test_failed_refills_pause_every_pair_on_one_timer_and_rotate_the_pairs(topology):
    policy = Policy(patience=1.0, stock=4, stock_batch=4, stock_parallel=2)
    b = Bench(topology, policy)
    pairs = masters(b)
    ukms = b.engine(UKMS_A, "ukms")
    for master, slave in pairs:  # every stock gone (expired, say)
        session = ukms.sessions.session_014(master, slave)
        b.stores[UKMS_A].apply(TakeOldest(session=session, kind=STOCK, n=100))
    b.refuse(b.request_to(AKMS_A, "akms", m.KsaRequest), KeyUnavailable("busy"), once=False)
    sent = len(b.sent(m.KsaRequest, UKMS_A, "ukms"))
    b.restart(UKMS_A, "ukms")  # starts short everywhere; every refill fails

    def tried() -> list[tuple[str, str]]:
        return [(r.master, r.slave) for r in b.sent(m.KsaRequest, UKMS_A, "ukms")[sent:]]

    assert len(tried()) == policy.stock_parallel  # then the refills pause
    assert ukms_timers(b) == {"housekeeping", REFILL_PAUSE}  # not one timer per pair
    pause = 0.1
    for _ in range(4):  # each pause over, the next pairs in turn are tried (and fail)
        count = len(tried())
        b.advance(pause)
        assert len(tried()) == count + policy.stock_parallel
        assert ukms_timers(b) == {"housekeeping", REFILL_PAUSE}
        pause *= 2
    assert len(set(tried())) == len(tried())  # a failed pair waits behind the others

    b.rules.clear()  # the AKMS serves again: after the pause, every stock fills
    b.advance(5.0 * len(pairs))
    ukms = b.engine(UKMS_A, "ukms")
    assert all(ukms.stored(master, slave) == 4 for master, slave in pairs)
    assert ukms._stocks == {} and ukms_timers(b) == {"housekeeping"}
