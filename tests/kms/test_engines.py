"""The KMS role engines one by one, without a network: scripted events in, typed actions out.

Each test drives the engines of a five-node network on :class:`engine_bench.Bench` (link
keys from simulated QKD module pairs, a model key store, the real seams and codec) and
steps in where a flow must take a given turn: an answer held back so the CN key comes
first, a refusal in a peer's stead, a node restarted, a link down, time moved on. Tests
assert on the actions the engines return, on key material being erased where the engines
say they erase it, and (for every bench, when the test ends) that no key bits appear in
a message between nodes, a notice, an alarm or an error text.

Every transition the state tables list is taken through the engines by some test here:
each test declares the transitions it must take (:func:`takes`), the trace of the tables
proves it took them, and :func:`test_every_listed_transition_is_taken_by_a_test` holds
the declarations to the tables (apart from :data:`NOT_TAKEN`, transitions no engine takes,
a defect of their own).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest

from appliance.aaa.accounting import Accounting
from appliance.aaa.client import AaaValidator, parse_answer
from appliance.aaa.ledger import Ask
from appliance.aaa.registry import Registry
from appliance.aaa.seed import seed
from appliance.aaa.service import AaaService
from appliance.aaa.view import quota_columns
from appliance.kms import channel, ksa
from appliance.kms import messages as m
from appliance.kms.engines import AkmsEngine
from appliance.kms.engines import states as st
from appliance.kms.engines import ukms as ukms_engine
from appliance.kms.engines.base import RETRY_MAX
from appliance.kms.engines.ckms import Arrivals
from appliance.kms.engines.config import Policy
from appliance.kms.engines.states import TABLES, I, S
from appliance.kms.engines.ukms import LEASE, LEASE_FIRST, REFILL_PAUSE
from appliance.kms.errors import (
    KeyUnavailable,
    KmsError,
    ProtocolError,
    ReplayDetected,
    StaleGrant,
    StaleKey,
    StoreFull,
    UnknownChannel,
)
from appliance.kms.events import (
    Alarm,
    Answered,
    CallFailed,
    DerivePsk,
    FindPath,
    LinkKeysRead,
    LinkWanted,
    Notice,
    PathFound,
    PskDerived,
    ReadLinkKeys,
    Received,
    Refuse,
    Reply,
    SaeAnswerWritten,
    SaeKeys,
    SaeRefused,
    StoreDone,
    StoreOp,
    TimerFired,
    Validate,
)
from appliance.kms.fsm import Table
from appliance.kms.linkend import GRANT_TTL, WANTED_GRANT
from appliance.kms.relay import Mode, decode
from appliance.kms.routing import NoRoute
from appliance.kms.seams import Denial, Denied
from appliance.kms.storeops import STOCK, Release, Restore, StoredKey, TakeOldest
from tests.kms.engine_bench import Bench, Delivery, mini_topology

Transition = tuple[str, S, I]

# -- which transitions each test takes ----------------------------------------------------
TABLE = {t.name: t for t in TABLES}
DECLARED: dict[str, set[Transition]] = {}
TAKEN: list[Transition] = []
UNEXPECTED: list[Transition] = []


def transition(text: str) -> Transition:
    """``"relay SENT STALE"``: a transition the table lists (a typo fails at import)."""
    name, state, event = text.split()
    assert TABLE[name].transitions[S[state]][I[event]] is not None
    return name, S[state], I[event]


def takes(*texts: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The test must take these transitions through the engines (checked when it ends)."""
    wanted = {transition(t) for t in texts}

    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        DECLARED[test.__name__] = wanted

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            test(*args, **kwargs)
            missing = wanted - set(TAKEN)
            assert not missing, f"transitions not taken: {sorted(missing, key=str)}"

        return run

    return wrap


@pytest.fixture(autouse=True)
def trace(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Transition]]:
    """Every transition the engines make, as Table.advance sees it."""
    TAKEN.clear()
    UNEXPECTED.clear()
    advance = Table.advance

    def traced(self: Table[S, I], request: Any, event: I) -> S:
        before = request.state
        listed = self.transitions.get(before, {}).get(event) is not None
        (TAKEN if listed else UNEXPECTED).append((self.name, before, event))
        return advance(self, request, event)

    monkeypatch.setattr(Table, "advance", traced)
    yield TAKEN
    assert UNEXPECTED == [], "an engine fed its table an input it does not list"


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory):
    return mini_topology(tmp_path_factory.mktemp("mini"))


@pytest.fixture
def bench(topology) -> Iterator[Callable[..., Bench]]:
    """Benches for the test; each is checked for key bits out of place when it ends."""
    made: list[Bench] = []

    def make(**options: Any) -> Bench:
        made.append(Bench(topology, **options))
        return made[-1]

    yield make
    for b in made:
        b.check_no_key_leaks()


GCM_PAIR, OTP_PAIR = ("sae-a", "sae-b"), ("sae-c", "sae-d")
UKMS_A, AKMS_A, CKMS_MID, AKMS_B, UKMS_B = 1, 2, 3, 4, 5


def zero(buf: bytes | bytearray) -> bool:
    return not any(buf)


def fetch(b: Bench, master: str, slave: str, req: int) -> list[tuple[str, bytes]]:
    """The keys the master got, fetched by the slave (same IDs, same bits)."""
    keys = b.keys(master, req)
    got = b.keys(slave, b.dec(slave, master, [k for k, _ in keys]))
    assert got == keys
    return keys


def opened(b: Bench) -> None:
    """Open the channel AKMS A -> AKMS B with a first request (and fetch its keys)."""
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))


def asked(b: Bench) -> list[m.CnRequest]:
    """The CnRequests AKMS A sent, in order."""
    return [m.decode(t.body, m.CnRequest) for t in b.sent(m.Tagged, AKMS_A)]


def rekey_answer(b: Bench) -> Callable[[Delivery], bool]:
    """AKMS B's answer to a CnRequest of AKMS A for a channel key (a re-key)."""

    def pred(d: Delivery) -> bool:
        if not b.answer_to(AKMS_A, "akms", m.Tagged)(d):
            return False
        assert isinstance(d.event, Answered | CallFailed)
        call = b.calls[(d.node, d.service, d.event.call)]
        assert isinstance(call, m.Tagged)
        return m.decode(call.body, m.CnRequest).purpose == "channel"

    return pred


def rekey_cn_key(b: Bench) -> Callable[[Delivery], bool]:
    """The CN key of a re-key, handed over to AKMS A by its CKMS."""

    def pred(d: Delivery) -> bool:
        if not b.request_to(AKMS_A, "akms", m.CnLocal)(d):
            return False
        assert isinstance(d.event, Received) and isinstance(d.event.message, m.CnLocal)
        ids = {r.request_id for r in asked(b) if r.purpose == "channel"}
        return d.event.message.request_id in ids

    return pred


# -- the key flow, end to end -------------------------------------------------------------
@takes(
    "ukms-enc ASKING ANSWER",
    "ukms-enc OPENING OPENED",
    "akms-a VALIDATING VALID",
    "akms-a CHANNEL CHANNEL_READY",
    "akms-a SEALING SEALED",
    "channel ASKING ANSWER",
    "channel DERIVING DERIVED",
    "channel REKEYING REKEYED",
    "channel-open DERIVING DERIVED",
    "rekey OPENING OPENED",
    "akms-b PATHING PATH",
    "akms-b RELAYING DELIVERED",
    "akms-b WAIT_RELAY RELAYED",
    "relay SEALING SEALED",
    "relay SENT ACCEPTED",
    "relay OPENING OPENED",
    "relay OPENING OPENED_LAST",
    "relay HANDING ACCEPTED",
    "delivery OPENING OPENED",
    "delivery STORING STORED",
    "ukms-dec TAKING TAKEN",
    "ukms-dec ANSWERED WRITTEN",
)
def test_enc_keys_cross_the_network_and_dec_keys_releases_them(bench):
    b = bench()
    req = b.enc("sae-a", "sae-b", number=2)
    keys = b.keys("sae-a", req)
    assert [len(bits) for _, bits in keys] == [32, 32]
    assert all(any(bits in draw for draw in b.draws) for _, bits in keys)  # PTG.3 output

    # what each engine asked for, typed
    (ksa_request,) = b.sent(m.KsaRequest, UKMS_A, "ukms")
    assert (ksa_request.master, ksa_request.slave, ksa_request.number) == ("sae-a", "sae-b", 2)
    assert ksa_request.fresh and ksa_request.size == 256
    (validate,) = b.actions(Validate, AKMS_A, "akms")
    assert (validate.query.master, validate.query.ukms) == ("sae-a", UKMS_A)
    paths = b.actions(FindPath, AKMS_B, "akms")
    assert {(p.src, p.dst) for p in paths} == {(AKMS_B, AKMS_A)}  # the re-key's and ours
    (deliver,) = b.sent(m.Deliver, AKMS_B, "akms")
    assert (deliver.master, deliver.slave) == ("sae-a", "sae-b")
    items = b.sent(m.RelayItem)
    assert {tuple(i.path) for i in items} == {(AKMS_B, CKMS_MID, AKMS_A)}
    assert all(decode(i.message)[0].mode is Mode.GCM for i in items)

    # the channel: opened from the PSK at both ends (one context, one pair of nonces); the
    # request that waited for it goes under the PSK-derived key, side by side with the
    # channel's first re-key (a key relayed like any other, delivered to no UKMS)
    derived = [(n, a) for n, _, a in b.log if isinstance(a, DerivePsk)]
    assert [(n, a.peer) for n, a in derived] == [(AKMS_B, "akms-a"), (AKMS_A, "akms-b")]
    assert derived[0][1].context == derived[1][1].context
    assert derived[0][1].nonces == derived[1][1].nonces
    tagged = b.sent(m.Tagged, AKMS_A)
    assert [m.decode(t.body, m.CnRequest).purpose for t in tagged] == ["ksa", "channel"]
    assert [t.epoch for t in tagged] == [0, 0]
    assert b.engine(AKMS_A, "akms")._out[AKMS_B].chan.epoch == 1  # re-keyed for the next

    # the CN keys handed over inside the access nodes are erased once used
    relayed = b.received(AKMS_B, "ckms", m.RelayLocal)
    handed = b.received(AKMS_A, "akms", m.CnLocal)
    assert len(relayed) == len(handed) == 2  # ours and the channel's first re-key
    assert all(zero(x.cn_key) for x in relayed + handed)

    # the slave fetches them once: taken pending, released once the answer is written
    got = b.dec("sae-b", "sae-a", [k for k, _ in keys])
    assert b.keys("sae-b", got) == keys
    (release,) = [op.op for op in b.actions(StoreOp, UKMS_B) if isinstance(op.op, Release)]
    assert release == Release(session="014:sae-a:sae-b", key_ids=[k for k, _ in keys])
    again = b.outcome("sae-b", b.dec("sae-b", "sae-a", [k for k, _ in keys]))
    assert isinstance(again, SaeRefused) and isinstance(again.error, KeyUnavailable)
    assert b.waiting() == {}


def classes_asked(b: Any) -> list[tuple[str, str]]:
    """A request for the GCM pair, then one for the OTP pair: (purpose, route_policy) of
    each CnRequest AKMS A sent."""
    b.enc(*GCM_PAIR)
    fetch(b, *OTP_PAIR, b.enc(*OTP_PAIR))
    return [(r.purpose, r.route_policy) for r in asked(b)]


@takes("ukms-enc ASKING ANSWER", "ukms-enc OPENING OPENED", "delivery STORING STORED")
def test_the_contracts_route_policy_class_reaches_the_path_request_and_nothing_else(bench):
    """contract-otp asks for most-key paths, contract-gcm names no class (balanced): AKMS
    A's verdict puts the class in its CnRequest, AKMS B asks its path provider under it."""
    b = bench()
    assert classes_asked(b) == [("ksa", "balanced"), ("channel", "balanced"), ("ksa", "most-key")]
    classes = [p.route_policy for p in b.actions(FindPath, AKMS_B, "akms")]
    assert classes == ["balanced", "balanced", "most-key"]


def test_under_aaa_the_contracts_class_reaches_the_path_request(bench, tmp_path):
    """The same trip through AAA: the registry seeded from the topology, the ledger's
    grant, aaaQuotaAnswer as the agent codes it and the AKMS decodes it, the wallet, the
    AaaValidator's verdict: AKMS A's CnRequest for contract-otp's pair asks for most-key."""
    reg = Registry(tmp_path / "registry.db")
    seed(reg, bench().topology)
    assert reg.contract("contract-otp").route_policy == "most-key"
    service = AaaService(reg, Accounting(tmp_path / "accounting.db"), clock=lambda: 1.0e9)
    validator = AaaValidator(None, clock=lambda: 0.0)  # type: ignore[arg-type]
    for pair in (GCM_PAIR, OTP_PAIR):
        ask = Ask(akms=AKMS_A, ukms=UKMS_A, request_id=len(pair[0]) + ord(pair[0][-1]),
                  master=pair[0], slave=pair[1], keys=1000, bits=256_000)  # fmt: skip
        answer = quota_columns(service.ask(ask), 1.0e9)["aaaQuotaAnswer"]
        assert isinstance(answer, bytes)
        validator.wallet.add(pair, parse_answer(UKMS_A, answer), 0.0)
    b = bench()
    b.validator = validator  # type: ignore[assignment]
    assert classes_asked(b) == [("ksa", "balanced"), ("channel", "balanced"), ("ksa", "most-key")]
    service.accounting.close()
    reg.close()


def test_enc_keys_in_otp_mode_spend_a_pad_as_long_as_the_keys(bench):
    b = bench()
    b.enc(*GCM_PAIR)  # the channel first (its re-key crosses in the network's mode)
    keys = fetch(b, *OTP_PAIR, b.enc(*OTP_PAIR, number=3))
    assert len(keys) == 3
    ours = [i for i in b.sent(m.RelayItem) if decode(i.message)[0].mode is Mode.OTP]
    assert len(ours) == 2  # two hops: 4 -> 3 -> 2
    (cn_key,) = [x for x in b.received(AKMS_B, "ckms", m.RelayLocal) if x.mode == "OTP"]
    assert len(cn_key.cn_key) == ksa.cn_key_bytes(Mode.OTP, 3, 32) == 3 * 32 + 32
    spent: dict[str, int] = {}
    for item in ours:
        hop, _, _ = decode(item.message)
        assert sum(s.length for s in hop.segments) == len(cn_key.cn_key) + 32  # and a MAC key
        for seg in hop.segments:
            spent[seg.key_id] = spent.get(seg.key_id, 0) + seg.length
    assert zero(cn_key.cn_key)
    # link keys whose every byte a pad used are erased at both ends (sender and receiver)
    used_up = {key_id for key_id, n in spent.items() if n == 32}
    copies = [bits for r in b.reads for key_id, bits in r.keys if key_id in used_up]
    assert len(copies) == 2 * len(used_up) >= 2 * 4
    assert all(zero(bits) for bits in copies)


@takes(
    "akms-a SEALING SEALED",
    "relay OPENING OPENED_LAST",
    "delivery OPENING OPENED",
    "delivery STORING STORED",
)
def test_keys_flow_the_other_way_with_grants_from_the_user_node(bench):
    """sae-b asks: AKMS 4 is now the requester, AKMS 2 delivers to UKMS 1, which is the
    master end of their link and grants it the keys to send with."""
    b = bench()
    req = b.enc("sae-b", "sae-a")
    fetch(b, "sae-b", "sae-a", req)
    grants = b.received(UKMS_A, "ukms", m.GrantRequest)
    assert [g.link for g in grants] == ["link-1-2"]
    (grant,) = [r.message for r in b.actions(Reply, UKMS_A) if isinstance(r.message, m.Grant)]
    assert len(grant.key_ids) == grants[0].n
    assert {tuple(i.path) for i in b.sent(m.RelayItem)} == {(AKMS_A, CKMS_MID, AKMS_B)}


# -- the order in which things arrive -----------------------------------------------------
@takes(
    "akms-a ASKING CN_KEY",
    "akms-a HAVE_KEY ANSWER",
    "rekey ASKING CN_KEY",
    "rekey HAVE_KEY ANSWER",
)
def test_the_cn_key_may_come_before_the_answer(bench):
    b = bench()
    for _ in range(2):  # the user request's answer and the channel's first re-key's
        b.hold(b.answer_to(AKMS_A, "akms", m.Tagged))
    req = b.enc(*GCM_PAIR)
    assert len(b.held) == 2 and all(isinstance(h.event, Answered) for h in b.held)
    assert len(b.received(AKMS_A, "akms", m.CnLocal)) == 2  # both CN keys are in
    first, second = sorted(b.held, key=lambda h: not rekey_answer(b)(h))
    assert rekey_answer(b)(first) and not rekey_answer(b)(second)
    b.release(first)  # the re-key's: the channel moves on, the request still waits
    assert b.engine(AKMS_A, "akms")._out[AKMS_B].chan.epoch == 1
    assert b.outcome("sae-a", req) is None
    b.release(second)
    fetch(b, *GCM_PAIR, req)


@takes(
    "akms-a ASKING ANSWER",
    "akms-a HAVE_ANSWER CN_KEY",
    "rekey ASKING ANSWER",
    "rekey HAVE_ANSWER CN_KEY",
)
def test_the_cn_key_may_come_after_the_answer(bench):
    b = bench()
    for _ in range(2):  # the user request's CN key and the channel's first re-key's
        b.hold(b.request_to(AKMS_A, "akms", m.CnLocal))
    req = b.enc(*GCM_PAIR)
    answers = [r for r in b.actions(Reply, AKMS_B, "akms") if isinstance(r.message, m.Tagged)]
    assert len(answers) == len(b.held) == 2  # AKMS B has answered both
    first, second = sorted(b.held, key=lambda h: not rekey_cn_key(b)(h))
    assert rekey_cn_key(b)(first) and not rekey_cn_key(b)(second)
    b.release(first)
    assert b.outcome("sae-a", req) is None
    b.release(second)
    fetch(b, *GCM_PAIR, req)
    assert all(zero(x.cn_key) for x in b.received(AKMS_A, "akms", m.CnLocal))


@takes(
    "akms-b RELAYING RELAYED",
    "akms-b WAIT_DELIVERY DELIVERED",
    "akms-b RELAYING DELIVERED",
    "akms-b WAIT_RELAY RELAYED",
)
def test_akms_b_answers_once_relayed_and_delivered_in_either_order(bench):
    b = bench()
    opened(b)
    b.hold(b.answer_to(AKMS_B, "akms", m.Deliver))  # the relay is done first
    req = b.enc(*GCM_PAIR)
    (delivered,) = b.held
    assert b.outcome("sae-a", req) is None
    b.release(delivered)
    fetch(b, *GCM_PAIR, req)
    b.hold(b.answer_to(AKMS_B, "akms", m.RelayLocal))  # the delivery is done first
    req = b.enc(*GCM_PAIR)
    (relayed,) = b.held
    assert b.outcome("sae-a", req) is None
    b.release(relayed)
    fetch(b, *GCM_PAIR, req)


# -- UKMS: the stock -----------------------------------------------------------------------
STOCKED = Policy(patience=1.0, stock=4, stock_batch=4)
SESSION_AB = "014:sae-a:sae-b"


def stock_ids(b: Bench, node: int, session: str) -> set[str]:
    return {k for p in b.puts if p.kind == STOCK and p.session == session for k, _ in p.keys}


@takes(
    "refill ASKING ANSWER",
    "refill OPENING OPENED",
    "refill STORING STORED",
    "ukms-enc LEASING LEASED",
    "ukms-enc LEASING SHORT",
    "ukms-enc ASKING ANSWER",
    "ukms-enc OPENING OPENED",
)
def test_enc_keys_from_the_stock_and_through_the_network_when_it_is_short(bench):
    b = bench(policy=STOCKED)
    ukms = b.engine(UKMS_A, "ukms")
    assert ukms.stored("sae-a", "sae-b") == 4  # filled at start, by the network
    assert all(zero(bits) for p in b.puts for _, bits in p.keys)  # erased once stored
    stocked = stock_ids(b, UKMS_A, SESSION_AB)
    asked = len(b.sent(m.KsaRequest, UKMS_A))

    req = b.enc(*GCM_PAIR)  # from the stock: a lease of what is there
    (key,) = fetch(b, *GCM_PAIR, req)
    assert key[0] in stocked
    leases = [op.op for op in b.actions(StoreOp, UKMS_A) if isinstance(op.op, TakeOldest)]
    assert leases == [TakeOldest(session=SESSION_AB, kind=STOCK, n=1 + LEASE_FIRST)]
    # one key missing, less than half a batch (2): not short yet, no relay for it
    assert b.sent(m.KsaRequest, UKMS_A)[asked:] == []
    assert ukms.stored("sae-a", "sae-b") == 3
    (key,) = fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))
    assert key[0] in stocked
    refills = b.sent(m.KsaRequest, UKMS_A)[asked:]
    # half a batch missing: topped up by a whole batch (half a batch beyond the stock)
    assert [(r.number, r.fresh) for r in refills] == [(4, False)]
    assert ukms.stored("sae-a", "sae-b") == 2 + 4

    req = b.enc(*GCM_PAIR, number=8)  # more than the stock holds: through the network
    assert len(fetch(b, *GCM_PAIR, req)) == 8
    assert b.sent(m.KsaRequest, UKMS_A)[-1].number == 8
    assert ukms.stored("sae-a", "sae-b") == 6
    assert len(b.sent(m.KsaRequest, UKMS_A)) == asked + 2  # and no refill: the stock is full

    served = [k for (node, _), got in b.sae_bits.items() if node == UKMS_A for k, _ in got]
    assert len(served) == len(set(served)) == 10  # no key handed to the master twice


def test_the_keys_of_one_batch_share_the_front_of_their_ids_another_batch_not(bench):
    """So that a batch's keys sit side by side in the stores (keyids.batch_raw)."""
    b = bench(policy=STOCKED)
    stocked = sorted(stock_ids(b, UKMS_A, SESSION_AB))
    assert len(stocked) == 4 and len({k[:13] for k in stocked}) == 1  # one refill's batch
    first = [k for k, _ in fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR, number=8))]
    second = [k for k, _ in fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR, number=8))]
    assert len({k[:13] for k in first}) == 1 and len({k[:13] for k in second}) == 1
    assert len({first[0][:13], second[0][:13], stocked[0][:13]}) == 3


def test_a_stocked_enc_keys_is_served_at_once_from_the_lease_or_not_at_all(bench):
    """The adapter's direct path: keys already leased are handed over in one step (the
    slave finds them as usual); anything else takes nothing and is left to the full path."""
    b = bench(policy=STOCKED)
    ukms = b.engine(UKMS_A, "ukms")
    assert ukms.from_lease_now("sae-a", "sae-b", 1, 256, 0.0) is None  # nothing leased yet
    first = fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))  # the full path leases the stock
    assert ukms._leased_count(SESSION_AB) == 3
    not_now = [
        ("sae-a", "sae-b", 4, 256),  # more than the lease holds
        ("sae-a", "sae-b", 2, 128),  # not the usual size
        ("sae-b", "sae-a", 1, 256),  # not the master of a pair here
        ("sae-c", "sae-d", 1, 256),  # a pair with nothing leased
    ]
    for request in not_now:
        assert ukms.from_lease_now(*request, 0.0) is None
    assert ukms._leased_count(SESSION_AB) == 3  # nothing was taken
    got = ukms.from_lease_now("sae-a", "sae-b", 2, 256, 0.0)
    assert got is not None
    keys, actions = got
    assert ukms._leased_count(SESSION_AB) == 1
    assert {k.key_id for k in keys} <= stock_ids(b, UKMS_A, SESSION_AB) - {first[0][0]}
    bits = [(k.key_id, bytes(k.material)) for k in keys]
    assert b.keys("sae-b", b.dec("sae-b", "sae-a", [k for k, _ in bits])) == bits
    b.perform(UKMS_A, "ukms", actions)
    b.run()
    for k in keys:
        k.material[:] = bytes(len(k.material))  # the adapter erases what it handed on
    aaa = bench(policy=STOCKED_AT_AKMS)
    fetch(aaa, *GCM_PAIR, aaa.enc(*GCM_PAIR))
    assert aaa.engine(UKMS_A, "ukms").from_lease_now("sae-a", "sae-b", 1, 256, 0.0) is None


@takes("ukms-enc LEASING SHORT", "ukms-enc ASKING ANSWER")
def test_a_lease_that_comes_back_short_falls_back_to_the_network(bench):
    b = bench(policy=STOCKED)
    store = b.stores[UKMS_A]
    gone = store.apply(TakeOldest(session=SESSION_AB, kind=STOCK, n=100))  # "expired"
    assert len(gone) == 4 and b.engine(UKMS_A, "ukms").stored("sae-a", "sae-b") == 4
    req = b.enc(*GCM_PAIR, number=2)
    assert len(fetch(b, *GCM_PAIR, req)) == 2
    assert [r.number for r in b.sent(m.KsaRequest, UKMS_A)[-2:]] == [2, 4]  # and a refill


def test_a_stock_found_short_by_a_lease_is_refilled(bench):
    b = bench(policy=STOCKED)
    b.stores[UKMS_A].apply(TakeOldest(session=SESSION_AB, kind=STOCK, n=100))  # "expired"
    asked = len(b.sent(m.KsaRequest, UKMS_A))
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR, number=2))
    refills = b.sent(m.KsaRequest, UKMS_A)[asked + 1 :]
    assert [r.number for r in refills] == [4]
    assert b.engine(UKMS_A, "ukms").stored("sae-a", "sae-b") == 4


def test_a_stopping_ukms_gives_its_leased_keys_back_to_the_stock(bench):
    b = bench(policy=STOCKED)
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR, number=2))  # half a batch drawn: a refill
    ukms = b.engine(UKMS_A, "ukms")
    leased = list(ukms._stocks[SESSION_AB].leased)
    assert len(leased) == 2
    b.perform(UKMS_A, "ukms", ukms.stop())
    b.run()
    back = b.puts[-1]
    assert (back.session, back.kind, [k for k, _ in back.keys]) == (
        SESSION_AB,
        STOCK,
        [k.key_id for k in leased],
    )
    assert all(zero(k.material) for k in leased)  # the store has them; memory does not
    # the two given back and the whole batch (4) that had topped the stock up
    assert len(b.stores[UKMS_A].apply(TakeOldest(session=SESSION_AB, kind=STOCK, n=100))) == 6


def lease_sizes(b: Bench, session: str) -> list[int]:
    """The keys each lease of the pair asked its stock for, in turn."""
    ops = [op.op for op in b.actions(StoreOp, UKMS_A) if isinstance(op.op, TakeOldest)]
    return [op.n for op in ops if op.session == session]


def test_a_pairs_leases_grow_while_it_draws_up_to_lease(bench):
    """A lease by demand: the first takes the request and a few ahead, each next one twice
    as many ahead, up to LEASE; never a key handed out twice."""
    b = bench(policy=replace(STOCKED, stock=32, stock_batch=32))
    served: list[str] = []
    for _ in range(300):  # bounded: six leases take at most 5 + 9 + 17 + 33 + 65 + 1 draws
        if len(lease_sizes(b, SESSION_AB)) == 6:
            break
        served += [k for k, _ in fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))]
    aheads = [LEASE_FIRST << i for i in range(5)]
    assert aheads[-1] == LEASE
    assert lease_sizes(b, SESSION_AB) == [1 + n for n in aheads] + [1 + LEASE]
    assert len(served) == len(set(served))


def test_a_lease_given_back_leaves_its_pair_small_again(bench, monkeypatch):
    """A pair drawn once gives back only what its lease took ahead; the next lease of a
    pair whose lease went back starts at LEASE_FIRST again."""
    monkeypatch.setattr(ukms_engine, "MAX_LEASED", 1)
    b = bench(policy=replace(STOCKED, stock=32, stock_batch=32))
    session_cd = "014:sae-c:sae-d"
    for _ in range(1 + LEASE_FIRST + 1):  # two leases: the second grown
        fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))
    assert lease_sizes(b, SESSION_AB) == [1 + LEASE_FIRST, 1 + 2 * LEASE_FIRST]
    puts = len(b.puts)
    fetch(b, *OTP_PAIR, b.enc(*OTP_PAIR))  # a lease of another pair: ours goes back
    assert lease_sizes(b, session_cd) == [1 + LEASE_FIRST]
    back = [p for p in b.puts[puts:] if p.session == SESSION_AB and p.kind == STOCK]
    assert [len(p.keys) for p in back][:1] == [2 * LEASE_FIRST]
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))
    assert lease_sizes(b, SESSION_AB)[-1] == 1 + LEASE_FIRST


# -- UKMS: the stock when the contracts live at the AKMS (AAA) -------------------------------
STOCKED_AT_AKMS = replace(STOCKED, terms_from_akms=True, max_key_per_request=2, stock_batch=2)


@takes(
    "ukms-enc LEASING TAKEN",
    "ukms-enc VALIDATING VALID",
    "akms-stocked VALIDATING VALID",
)
def test_a_stocked_request_is_allowed_by_the_akms_before_its_keys_leave(bench):
    b = bench(policy=STOCKED_AT_AKMS)
    refills = b.sent(m.KsaRequest, UKMS_A)
    assert refills and all(r.refill for r in refills)  # stock refills: looked up, not billed
    refill_queries = [v.query for v in b.actions(Validate, AKMS_A)]
    assert refill_queries and all(q.refill for q in refill_queries)
    stocked = stock_ids(b, UKMS_A, SESSION_AB)
    b.hold(b.request_to(AKMS_A, "akms", m.KsaStocked))
    req = b.enc(*GCM_PAIR, number=2)
    assert b.outcome("sae-a", req) is None  # the keys wait for the AKMS's word
    (asked,) = b.sent(m.KsaStocked, UKMS_A)
    assert (asked.master, asked.slave, asked.number, asked.size) == ("sae-a", "sae-b", 2, 256)
    (held,) = b.held
    b.release(held)
    (query,) = [v.query for v in b.actions(Validate, AKMS_A) if not v.query.refill]
    assert (query.number, query.size, query.ukms, query.refill) == (2, 256, UKMS_A, False)
    keys = fetch(b, *GCM_PAIR, req)
    assert {k for k, _ in keys} <= stocked
    assert b.sent(m.KsaRequest, UKMS_A)[-1].refill  # nothing crossed for the request itself


@takes(
    "ukms-enc LEASING TAKEN",
    "ukms-enc VALIDATING REFUSED",
    "akms-stocked VALIDATING REFUSED",
)
def test_a_stocked_request_the_akms_refuses_gets_the_denial_and_its_keys_stay(bench):
    b = bench(policy=STOCKED_AT_AKMS)
    stocked = stock_ids(b, UKMS_A, SESSION_AB)
    refused = b.outcome("sae-a", b.enc(*GCM_PAIR, number=3))  # above the contract's 2
    assert isinstance(refused, SaeRefused)
    assert isinstance(refused.error, Denied) and refused.error.why is Denial.LIMITS
    (denial,) = b.actions(Refuse, AKMS_A, "akms")
    assert isinstance(denial.error, Denied)
    # the keys went back to the front of the lease, seen by nobody: the next request
    # gets the first of them (the stock was topped up meanwhile: it holds more now)
    ukms = b.engine(UKMS_A, "ukms")
    front = [k.key_id for k in list(ukms._stocks[SESSION_AB].leased)[:3]]
    assert set(front) <= stocked and ukms.stored("sae-a", "sae-b") >= 4
    got = fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR, number=2))
    assert [k for k, _ in got] == front[:2]
    b.refuse(b.request_to(AKMS_A, "akms", m.KsaStocked), KeyUnavailable("AKMS unreachable"))
    lost = b.outcome("sae-a", b.enc(*GCM_PAIR, number=1))
    assert isinstance(lost, SaeRefused) and isinstance(lost.error, KeyUnavailable)
    served = [k for (node, _), got in b.sae_bits.items() if node == UKMS_A for k, _ in got]
    assert len(served) == len(set(served)) == 2


def tampered(message: m.KsaAnswer) -> m.KsaAnswer:
    sealed = bytearray(message.sealed)
    sealed[-1] ^= 1
    return m.KsaAnswer(sealed=bytes(sealed), epoch=message.epoch)


@takes(
    "refill ASKING REFUSED",
    "refill OPENING REFUSED",
    "refill STORING REFUSED",
    "refill STORING STORED",
)
def test_a_failed_refill_backs_off_and_tries_again(bench):
    b = bench(policy=STOCKED)
    ukms = b.engine(UKMS_A, "ukms")
    b.refuse(b.request_to(AKMS_A, "akms", m.KsaRequest), KeyUnavailable("busy"))
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR, number=2))  # the stock is short: a refill
    assert REFILL_PAUSE in {t[2] for t in b.timers}  # the engine's one back-off timer

    def tamper(d: Delivery) -> Delivery:
        assert isinstance(d.event, Answered) and isinstance(d.event.message, m.KsaAnswer)
        return replace(d, event=Answered(call=d.event.call, message=tampered(d.event.message)))

    b.rewrite(b.answer_to(UKMS_A, "ukms", m.KsaRequest), tamper)
    b.advance(0.1)  # the back-off: 0.1 s, then 0.2 s, then 0.4 s
    assert [a.code for a in b.actions(Alarm, UKMS_A)] == ["KMS-INTEGRITY"]

    def full(d: Delivery) -> Delivery:
        assert isinstance(d.event, StoreDone)
        return replace(d, event=StoreDone(ticket=d.event.ticket, result=StoreFull("full")))

    b.rewrite(b.input_to(UKMS_A, "ukms", StoreDone), full)
    b.advance(0.2)
    put = b.puts[-1]
    assert put.kind == STOCK and all(zero(bits) for _, bits in put.keys)
    assert ukms.stored("sae-a", "sae-b") == 2
    b.advance(0.4)
    assert ukms.stored("sae-a", "sae-b") == 2 + 4  # topped up by a whole batch
    assert b.waiting() == {}


# -- UKMS: dec_keys and deliveries ---------------------------------------------------------
@takes("ukms-dec TAKING TAKEN", "ukms-dec ANSWERED REFUSED", "ukms-dec ANSWERED WRITTEN")
def test_dec_keys_whose_answer_never_left_are_restored_for_the_slave(bench):
    b = bench()
    keys = b.keys("sae-a", b.enc(*GCM_PAIR, number=2))
    ids = [k for k, _ in keys]
    lost = b.dec("sae-b", "sae-a", ids, written=False)  # the connection was gone
    assert b.keys("sae-b", lost) == keys
    (restore,) = [op.op for op in b.actions(StoreOp, UKMS_B) if isinstance(op.op, Restore)]
    assert restore == Restore(session="014:sae-a:sae-b", key_ids=ids)
    got = b.dec("sae-b", "sae-a", ids)  # asked again: the same keys, then released
    assert b.keys("sae-b", got) == keys
    assert not any(b.stores[UKMS_B].holds(k, "ksa") for k in ids)
    b.feed(UKMS_B, "ukms", SaeAnswerWritten(req=got))  # written twice: nothing more
    assert len([o for o in b.actions(StoreOp, UKMS_B) if isinstance(o.op, Release)]) == 1


@takes("ukms-dec TAKING REFUSED")
def test_dec_keys_for_keys_not_there_or_another_sae_is_refused(bench):
    b = bench()
    keys = b.keys("sae-a", b.enc(*GCM_PAIR, number=2))
    ids = [k for k, _ in keys]
    unknown = "00000000-0000-4000-8000-000000000000"
    refused = b.outcome("sae-b", b.dec("sae-b", "sae-a", [ids[0], unknown]))
    assert isinstance(refused, SaeRefused) and isinstance(refused.error, KeyUnavailable)
    assert refused.error.missing == [unknown]
    refused = b.outcome("sae-d", b.dec("sae-d", "sae-a", ids))  # another user's SAE there
    assert isinstance(refused, SaeRefused) and refused.error.code == "KMS-NO-KEY"
    refused = b.outcome("sae-a", b.dec("sae-a", "sae-b", ids))  # the master itself
    assert isinstance(refused, SaeRefused)
    assert b.keys("sae-b", b.dec("sae-b", "sae-a", ids)) == keys  # all still there, once


def test_enc_keys_for_a_pair_not_served_here_is_refused_at_once(bench):
    b = bench()
    for master, slave in (("sae-a", "sae-d"), ("sae-b", "sae-a"), ("sae-a", "sae-a")):
        node = b.node_of(master)
        before = len(b.log)
        refused = b.outcome(master, b.enc(master, slave))
        if node == UKMS_B:  # sae-b's pair with sae-a is served at UKMS B: not refused
            assert isinstance(refused, SaeKeys)
            continue
        assert isinstance(refused, SaeRefused) and refused.error.code == "KMS-NO-KEY"
        assert [type(a) for _, _, a in b.log[before:]] == [SaeRefused]  # nothing asked


@takes("delivery STORING REFUSED", "akms-b RELAYING REFUSED", "akms-a HAVE_KEY REFUSED")
def test_a_delivery_the_store_refuses_fails_the_request_at_both_ends(bench):
    b = bench()
    opened(b)

    def full(d: Delivery) -> Delivery:
        assert isinstance(d.event, StoreDone)
        return replace(d, event=StoreDone(ticket=d.event.ticket, result=StoreFull("full")))

    b.rewrite(b.input_to(UKMS_B, "ukms", StoreDone), full)
    b.hold(b.answer_to(AKMS_B, "akms", m.RelayLocal))  # the delivery fails first
    req = b.enc(*GCM_PAIR)
    (refused,) = [a for a in b.actions(Refuse, UKMS_B, "ukms")]
    assert refused.error.code == "KMS-STORE-FULL"
    assert all(zero(bits) for _, bits in b.puts[-1].keys)  # the copies never stored: erased
    got = b.outcome("sae-a", req)
    assert isinstance(got, SaeRefused)
    b.release(b.held[0])  # the relay's answer comes late to a request that failed
    assert b.waiting() == {}


@takes("akms-b WAIT_DELIVERY REFUSED", "akms-a HAVE_KEY REFUSED")
def test_a_delivery_that_fails_after_the_relay_fails_the_request(bench):
    b = bench()
    opened(b)
    b.hold(b.request_to(UKMS_B, "ukms", m.Deliver))
    req = b.enc(*GCM_PAIR)
    (deliver,) = b.held
    assert len(b.received(AKMS_A, "akms", m.CnLocal)) == 3  # our CN key is at AKMS A
    b.rewrite(
        b.input_to(UKMS_B, "ukms", StoreDone),
        lambda d: replace(d, event=StoreDone(ticket=d.event.ticket, result=StoreFull("full"))),
    )
    b.release(deliver)
    assert isinstance(b.outcome("sae-a", req), SaeRefused)
    assert zero(b.received(AKMS_A, "akms", m.CnLocal)[-1].cn_key)  # erased on failure


@takes("delivery OPENING REFUSED", "delivery OPENING OPENED", "delivery STORING STORED")
def test_a_delivery_to_a_restarted_ukms_is_sealed_once_more_with_fresh_link_keys(bench):
    """UKMS B restarts: its module handed out the link key AKMS B still sends with, so the
    new run cannot read it (stale key); AKMS B drops its link keys and seals once more."""
    b = bench()
    opened(b)
    b.restart(UKMS_B, "ukms")
    req = b.enc(*GCM_PAIR)
    fetch(b, *GCM_PAIR, req)
    stale = [a for a in b.actions(Refuse, UKMS_B, "ukms") if isinstance(a.error, StaleKey)]
    assert len(stale) == 1
    first, second = b.sent(m.Deliver, AKMS_B)[-2:]
    used = [decode(x.sealed)[0].segments[0].key_id for x in (first, second)]
    assert used[0] != used[1]


# -- AKMS A: validation, the channel, timeouts ---------------------------------------------
@takes("akms-a VALIDATING REFUSED")
def test_a_request_the_validator_denies_goes_no_further(bench):
    b = bench(policy=Policy(patience=1.0, max_key_per_request=4))
    refused = b.outcome("sae-a", b.enc(*GCM_PAIR, number=5))
    assert isinstance(refused, SaeRefused)
    (denial,) = b.actions(Refuse, AKMS_A, "akms")
    assert isinstance(denial.error, Denied) and denial.error.why is Denial.LIMITS
    assert b.sent(m.ChannelOpen) == [] and b.sent(m.Tagged) == []  # nothing asked of B
    # a user pair the contracts do not join, and a request from a node with no users
    foreign = m.KsaRequest(master="sae-c", slave="sae-b", number=1, size=256, epoch=None)
    b.feed(AKMS_A, "akms", Received(req=999, caller=UKMS_A, message=foreign))
    assert b.actions(Refuse, AKMS_A)[-1].error.why is Denial.UNAUTHORISED
    b.feed(AKMS_A, "akms", Received(req=998, caller=CKMS_MID, message=foreign))
    assert isinstance(b.actions(Refuse, AKMS_A)[-1].error, ProtocolError)
    assert len(b.actions(Validate, AKMS_A)) == 2  # refused before the validator is asked


def ksa_request_to_b(b: Bench) -> Callable[[Delivery], bool]:
    """A user's CnRequest arriving at AKMS B (not a channel re-key)."""
    on_channel = b.request_to(AKMS_B, "akms", m.Tagged)

    def pred(d: Delivery) -> bool:
        if not on_channel(d):
            return False
        assert isinstance(d.event, Received) and isinstance(d.event.message, m.Tagged)
        return m.decode(d.event.message.body, m.CnRequest).purpose == "ksa"

    return pred


@takes("akms-a ASKING REOPEN", "channel OPEN CLOSED", "akms-a CHANNEL CHANNEL_READY")
def test_an_unknown_channel_is_opened_again_once(bench):
    b = bench()
    opened(b)
    b.restart(AKMS_B, "akms")  # it forgot the channel
    req = b.enc(*GCM_PAIR)
    fetch(b, *GCM_PAIR, req)
    unknown = [a for a in b.actions(Refuse, AKMS_B) if isinstance(a.error, UnknownChannel)]
    assert len(unknown) == 1
    assert len(b.sent(m.ChannelOpen, AKMS_A)) == 2


@takes("akms-a ASKING REOPEN", "akms-a ASKING REFUSED")
def test_an_unknown_channel_the_second_time_fails_the_request(bench):
    b = bench()
    opened(b)
    b.refuse(ksa_request_to_b(b), UnknownChannel("no such channel"), once=False)
    refused = b.outcome("sae-a", b.enc(*GCM_PAIR))
    assert isinstance(refused, SaeRefused) and isinstance(refused.error, UnknownChannel)
    assert len(b.sent(m.ChannelOpen, AKMS_A)) == 2  # opened again once, not twice
    assert b.waiting() == {}


@takes(
    "akms-a HAVE_ANSWER REFUSED",
    "relay HANDING REFUSED",
    "relay SENT REFUSED",
    "ukms-enc ASKING REFUSED",
)
def test_a_cn_key_that_comes_too_late_is_refused_erased_and_aborted_back(bench):
    b = bench()
    opened(b)
    b.hold(b.request_to(AKMS_A, "akms", m.CnLocal))
    req = b.enc(*GCM_PAIR)
    (late,) = b.held
    assert b.outcome("sae-a", req) is None
    b.advance(b.policy.cn_timeout)
    refused = b.outcome("sae-a", req)
    assert isinstance(refused, SaeRefused) and refused.error.code == "KMS-NO-KEY"
    assert not [k for _, _, k in b.timers if isinstance(k, tuple) and k[0] == "cn"]
    b.release(late)
    assert isinstance(late.event, Received) and isinstance(late.event.message, m.CnLocal)
    assert zero(late.event.message.cn_key)  # refused, and erased by AKMS A
    (notice,) = [n for n in b.actions(Notice, CKMS_MID) if n.warning]
    assert notice.fields == {"request": late.event.message.request_id.hex(), "error": "KMS-NO-KEY"}
    (abort,) = b.sent(m.RelayAbort, CKMS_MID)
    assert (abort.path, abort.index) == ([AKMS_B, CKMS_MID, AKMS_A], 0)
    (cn_abort,) = b.sent(m.CnAbort, AKMS_B, "ckms")
    assert cn_abort.request_id == late.event.message.request_id
    assert b.waiting() == {}


def test_the_path_end_logs_once_when_a_pairs_cn_keys_first_come_over_a_new_path(bench):
    b = bench()
    opened(b)  # the pair's keys have come over AKMS B -> CKMS -> AKMS A
    arrived = "relays arrive over a new path"
    assert not [n for n in b.actions(Notice, AKMS_A, "ckms") if n.event == arrived]
    ckms_a = b.engine(AKMS_A, "ckms")
    ckms_a.arrivals.changed((AKMS_B, 9, AKMS_A))  # as if the last had come another way
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))
    (notice,) = [n for n in b.actions(Notice, AKMS_A, "ckms") if n.event == arrived]
    assert notice.fields == {"src": AKMS_B, "dst": AKMS_A, "path": "4-3-2"}
    assert not notice.warning


def test_arrivals_tell_a_pairs_path_change_once_and_stay_bounded():
    arrivals = Arrivals()
    assert not arrivals.changed((5, 3, 1))  # a pair's first key: no change
    assert not arrivals.changed((5, 3, 1))
    assert arrivals.changed((5, 4, 1))
    assert not arrivals.changed((5, 4, 1))
    assert not arrivals.changed((6, 3, 1))  # another pair
    assert arrivals.changed((5, 3, 1))
    for src in range(100, 100 + Arrivals.MAX_PAIRS):
        arrivals.changed((src, 1))
    assert len(arrivals) == Arrivals.MAX_PAIRS
    assert not arrivals.changed((5, 4, 1))  # forgotten, the oldest: a first key again


@takes("rekey HAVE_ANSWER REFUSED", "channel REKEYING REFUSED")
def test_a_first_re_key_whose_cn_key_never_comes_closes_the_channel(bench):
    b = bench()
    b.hold(rekey_cn_key(b))
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))  # done under the PSK-derived key meanwhile
    assert b.engine(AKMS_A, "akms")._out[AKMS_B].state is S.REKEYING
    b.advance(b.policy.cn_timeout)
    assert b.engine(AKMS_A, "akms")._out == {}  # no channel: the next request opens one
    (late,) = b.held
    b.release(late)  # refused and erased: no request waits for it
    assert all(zero(x.cn_key) for x in b.received(AKMS_A, "akms", m.CnLocal))
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))
    assert len(b.sent(m.ChannelOpen, AKMS_A)) == 2


@takes("rekey HAVE_KEY REFUSED")
def test_a_first_re_key_whose_answer_never_comes_fails_and_erases_its_cn_key(bench):
    b = bench()
    b.hold(rekey_answer(b))
    fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))
    b.advance(b.policy.cn_timeout)
    assert all(zero(x.cn_key) for x in b.received(AKMS_A, "akms", m.CnLocal))
    assert b.engine(AKMS_A, "akms")._out == {}
    (late,) = b.held
    b.release(late)  # the answer, late: nothing more happens
    assert b.waiting() == {}


@takes(
    "channel DERIVING REFUSED",
    "channel-open DERIVING DERIVED",
    "akms-a CHANNEL REFUSED",
)
def test_a_peer_that_does_not_hold_our_psk_gets_no_channel(bench):
    b = bench(psk={AKMS_B: bytes(32)})
    refused = b.outcome("sae-a", b.enc(*GCM_PAIR))
    assert isinstance(refused, SaeRefused)
    alarm = b.actions(Alarm, AKMS_A)[0]
    assert alarm.code == "KMS-INTEGRITY" and "akms-b" in alarm.reason
    ((_, ours),) = [(n, k) for n, k in b.derived if n == AKMS_A]
    assert zero(ours)  # AKMS A's PSK-derived key, erased when the confirmation failed
    assert b.sent(m.Tagged) == []


def test_a_failed_channel_confirmation_is_one_alarm(bench):
    b = bench(psk={AKMS_B: bytes(32)})
    b.enc(*GCM_PAIR)
    assert len(b.actions(Alarm, AKMS_A)) == 1


@takes("rekey OPENING REFUSED", "channel REKEYING REFUSED")
def test_a_re_key_whose_batch_does_not_open_fails_the_channel_with_an_alarm(bench):
    b = bench()

    def flipped(d: Delivery) -> Delivery:
        assert isinstance(d.event, Received) and isinstance(d.event.message, m.CnLocal)
        d.event.message.cn_key[0] ^= 1  # the CN key is not the one the batch is sealed under
        return d

    b.rewrite(rekey_cn_key(b), flipped)
    ours = b.request_to(AKMS_A, "akms", m.CnLocal)
    b.hold(lambda d: ours(d) and not rekey_cn_key(b)(d))  # the request is still in flight
    req = b.enc(*GCM_PAIR)
    refused = b.outcome("sae-a", req)  # it went under the PSK-derived key: it fails too
    assert isinstance(refused, SaeRefused)
    assert [a.code for a in b.actions(Alarm, AKMS_A)][:1] == ["KMS-INTEGRITY"]
    assert b.engine(AKMS_A, "akms")._out == {}
    (late,) = b.held
    b.release(late)
    handed = b.received(AKMS_A, "akms", m.CnLocal)
    assert len(handed) == 2 and all(zero(x.cn_key) for x in handed)
    assert b.outcome("sae-a", req) is refused and b.waiting() == {}


@takes("channel-open DERIVING REFUSED", "channel ASKING REFUSED")
def test_a_peer_without_a_psk_source_refuses_the_channel(bench):
    b = bench(no_psk=frozenset({AKMS_B}))
    refused = b.outcome("sae-a", b.enc(*GCM_PAIR))
    assert isinstance(refused, SaeRefused)
    (refusal,) = b.actions(Refuse, AKMS_B, "akms")
    assert isinstance(refusal.error, KeyUnavailable)
    assert b.waiting() == {}


@takes("channel OPEN REKEYED", "rekey OPENING OPENED")
def test_the_channel_is_re_keyed_again_after_its_requests(bench, monkeypatch):
    monkeypatch.setattr(channel, "REKEY_AFTER", 2)
    b = bench()
    opened(b)  # epoch 1 after the first re-key (its request went under epoch 0)
    akms = b.engine(AKMS_A, "akms")
    chan = akms._out[AKMS_B].chan
    assert chan.epoch == 1
    for _ in range(4):
        fetch(b, *GCM_PAIR, b.enc(*GCM_PAIR))
    assert chan.epoch == 2  # re-keyed in the background once two requests were made
    epochs = [t.epoch for t in b.sent(m.Tagged, AKMS_A)]
    assert epochs == sorted(epochs) and epochs[-1] == 2
    purposes = [m.decode(t.body, m.CnRequest).purpose for t in b.sent(m.Tagged, AKMS_A)]
    assert purposes.count("channel") == 2


def test_a_closing_akms_erases_its_channel_keys(bench):
    b = bench()
    opened(b)
    ((_, callee_key),) = [(n, k) for n, k in b.derived if n == AKMS_B]  # its epoch-0 key
    akms_a, akms_b = b.engine(AKMS_A, "akms"), b.engine(AKMS_B, "akms")
    assert isinstance(akms_a, AkmsEngine)
    held = list(akms_a._out[AKMS_B].chan._keys.values())
    assert held and not any(zero(k) for k in [*held, callee_key])
    akms_a.close()
    akms_b.close()
    assert all(zero(k) for k in held) and zero(callee_key)


# -- links without key -------------------------------------------------------------------
@takes(
    "relay SEALING REFUSED",
    "akms-b WAIT_RELAY REFUSED",
    "rekey ASKING REFUSED",
    "channel REKEYING REFUSED",
    "ukms-enc ASKING REFUSED",
)
def test_a_hop_whose_link_has_no_key_fails_the_relay_once_its_patience_is_out(bench):
    b = bench(down=("link-3-4",))
    req = b.enc(*GCM_PAIR)  # its relay and the channel's re-key's, 4 -> 3 -> 2: stuck at 4
    assert b.outcome("sae-a", req) is None
    grants = [a for a in b.actions(Refuse, CKMS_MID, "ckms") if isinstance(a.error, KeyUnavailable)]
    assert grants  # the master end had nothing to grant
    b.advance(b.policy.patience + RETRY_MAX)  # its last try comes after the deadline
    assert b.now < b.policy.cn_timeout  # not a timeout at AKMS A: a refusal from the relay
    refused = b.outcome("sae-a", req)
    assert isinstance(refused, SaeRefused)
    b.advance(b.policy.patience + RETRY_MAX)  # a retry's relay, if one went: failed as well
    handed = b.received(AKMS_B, "ckms", m.RelayLocal)
    assert handed and all(zero(x.cn_key) for x in handed)  # CN keys that could not go on
    failed = b.actions(Refuse, AKMS_B, "ckms")
    assert len(failed) == len(handed)
    assert all(isinstance(f.error, KeyUnavailable) for f in failed)
    assert all("link-3-4" in f.error.message for f in failed)
    assert b.waiting() == {}


@takes("akms-a SEALING REFUSED", "ukms-enc ASKING REFUSED")
def test_keys_akms_a_cannot_seal_for_its_user_node_in_time_fail_the_request(bench):
    b = bench(down=("link-1-2",))
    req = b.enc(*GCM_PAIR)
    assert b.outcome("sae-a", req) is None
    assert b.received(UKMS_A, "ukms", m.GrantRequest)  # asked its master end for keys
    b.advance(b.policy.patience + RETRY_MAX)
    refused = b.outcome("sae-a", req)
    assert isinstance(refused, SaeRefused) and "link-1-2" in refused.error.message
    # the slave's copies were delivered beside: stored, never handed out without their IDs
    assert len(b.puts) == 1 and b.puts[0].session == "014:sae-a:sae-b"
    assert b.waiting() == {}


# -- links readied before the first relay (a route installed: LinkWanted) ----------------
def sending_reads(b: Bench, node: int) -> list[ReadLinkKeys]:
    return b.actions(ReadLinkKeys, node, "ckms")


def test_a_wanted_link_is_granted_and_read_before_the_first_relay_needs_it(bench):
    """CKMS 4 is the slave end of link-3-4: a route installed through it towards 3 makes
    it ask its master for a grant and read the granted key then, so that the first relay
    over the link (the CN keys go 4 -> 3 -> 2) waits for neither."""
    b = bench()
    b.feed(AKMS_B, "ckms", LinkWanted(peer=CKMS_MID))
    (grant,) = b.received(CKMS_MID, "ckms", m.GrantRequest)
    assert grant.link == "link-3-4"
    assert grant.n == WANTED_GRANT  # readying in GCM: a small first grant
    (read,) = sending_reads(b, AKMS_B)
    assert read.link == "link-3-4" and read.count == 0 and len(read.ids) == 1  # a granted one
    assert b.waiting() == {}
    b.feed(AKMS_B, "ckms", LinkWanted(peer=CKMS_MID))  # ready: nothing more to do
    b.feed(AKMS_B, "ckms", LinkWanted(peer=UKMS_B))  # not a link of this CKMS: ignored
    assert len(sending_reads(b, AKMS_B)) == 1
    opened(b)  # the channel's re-key and the user's CN key, both relayed 4 -> 3 -> 2
    assert len(b.received(CKMS_MID, "ckms", m.GrantRequest)) == 1
    assert len(sending_reads(b, AKMS_B)) == 1  # both sealed under the key read beforehand


def test_a_wanted_link_at_its_master_end_reads_its_next_key(bench):
    b = bench()
    b.feed(AKMS_A, "ckms", LinkWanted(peer=CKMS_MID))  # CKMS 2 is the master of link-2-3
    (read,) = sending_reads(b, AKMS_A)
    assert (read.link, read.count, read.ids) == ("link-2-3", 1, ())
    assert b.received(CKMS_MID, "ckms", m.GrantRequest) == []


def test_a_wanted_link_without_key_is_tried_once_and_left_to_the_first_relay(bench):
    b = bench(down=("link-3-4",))
    b.feed(AKMS_B, "ckms", LinkWanted(peer=CKMS_MID))
    assert len(b.received(CKMS_MID, "ckms", m.GrantRequest)) == 1  # refused: nothing yet
    assert b.waiting() == {}
    assert [t for t in b.timers if t[:2] == (AKMS_B, "ckms") and t[2] != "housekeeping"] == []
    b.advance(4 * RETRY_MAX)
    assert len(b.received(CKMS_MID, "ckms", m.GrantRequest)) == 1


def test_a_link_with_light_traffic_keeps_working_past_the_grant_lifetime(bench):
    b = bench()
    failed = []
    for _ in range(int(2 * GRANT_TTL / 600)):  # one request every ten minutes, two hours
        got = b.outcome("sae-a", b.enc(*GCM_PAIR))
        if not isinstance(got, SaeKeys):
            failed.append((b.now, got))
        b.advance(600)
    assert failed == []
    assert b.actions(Alarm) == []


# -- AKMS B ------------------------------------------------------------------------------
def test_a_replayed_cn_request_is_refused_and_draws_nothing(bench):
    b = bench()
    opened(b)
    (request,) = [
        r for r in b.received(AKMS_B, "akms", m.Tagged)
        if m.decode(r.body, m.CnRequest).purpose == "ksa"
    ]  # fmt: skip
    draws, paths = len(b.draws), len(b.actions(FindPath))
    b.inbox.clear()
    b.feed(AKMS_B, "akms", Received(req=777, caller=AKMS_A, message=request))
    alarm, refusal = b.log[-2][2], b.log[-1][2]
    assert isinstance(refusal, Refuse) and refusal.req == 777
    assert isinstance(refusal.error, ReplayDetected) and refusal.error.code == "KMS-REPLAY"
    assert isinstance(alarm, Alarm) and alarm.code == "KMS-REPLAY"
    assert (len(b.draws), len(b.actions(FindPath))) == (draws, paths)


def test_akms_b_refuses_a_cn_request_it_cannot_answer(bench):
    b = bench()
    opened(b)
    chan = b.engine(AKMS_A, "akms")._out[AKMS_B].chan
    bad = {
        "deliver_to": dict(deliver_to=CKMS_MID),
        "ukms_b": dict(ukms_b=UKMS_A),
        "size": dict(purpose="channel", master=None, slave=None, ukms_b=None, size=512),
    }
    base = m.CnRequest(
        request_id=bytes(16), purpose="ksa", mode="GCM", master="sae-a", slave="sae-b",
        number=1, size=256, ukms_b=UKMS_B, deliver_to=AKMS_A,
    )  # fmt: skip
    for n, (what, change) in enumerate(bad.items()):
        body = m.encode(m.CnRequest(**{**{f: getattr(base, f) for f in base.__struct_fields__},
                                       **change, "request_id": bytes([n + 1]) * 16}))  # fmt: skip
        header = chan.tag_request("/v1/cn", body)
        channel_id, epoch, tag = header.split(";")
        tagged = m.Tagged(channel_id=channel_id, epoch=int(epoch), tag=tag, body=body)
        b.feed(AKMS_B, "akms", Received(req=900 + n, caller=AKMS_A, message=tagged))
        refusal = b.log[-1][2]
        assert isinstance(refusal, Refuse) and isinstance(refusal.error, ProtocolError), what
    forged = replace_tag(tagged)
    b.feed(AKMS_B, "akms", Received(req=990, caller=AKMS_A, message=forged))
    assert [type(a) for _, _, a in b.log[-2:]] == [Alarm, Refuse]
    assert b.log[-1][2].error.code == "KMS-INTEGRITY"
    stranger = m.Tagged(channel_id="0" * 16, epoch=0, tag="0" * 64, body=body)
    b.feed(AKMS_B, "akms", Received(req=991, caller=AKMS_A, message=stranger))
    assert isinstance(b.log[-1][2].error, UnknownChannel)


def replace_tag(tagged: m.Tagged) -> m.Tagged:
    flipped = ("1" if tagged.tag[0] == "0" else "0") + tagged.tag[1:]
    return m.Tagged(channel_id=tagged.channel_id, epoch=tagged.epoch, tag=flipped, body=tagged.body)


@takes("akms-b PATHING REFUSED", "akms-a ASKING RETRY", "akms-a ASKING REFUSED")
def test_akms_b_without_a_path_refuses_and_erases_what_it_drew(bench):
    b = bench()
    opened(b)
    b.rewrite(
        b.input_to(AKMS_B, "akms", PathFound),
        lambda d: replace(d, event=PathFound(ticket=d.event.ticket, error=NoRoute("no path"))),
        once=False,
    )
    refused = b.outcome("sae-a", b.enc(*GCM_PAIR))
    assert isinstance(refused, SaeRefused)
    refusals = b.actions(Refuse, AKMS_B, "akms")
    assert len(refusals) == 2  # asked once more (a new path may be there), then given up
    assert all(isinstance(r.error, NoRoute) for r in refusals)
    assert len(b.received(AKMS_B, "ckms", m.RelayLocal)) == 2  # nothing new handed over
    assert len(b.sent(m.Deliver)) == 1  # nor delivered
    assert b.waiting() == {}


@takes("akms-a HAVE_ANSWER RETRY")
def test_a_relay_lost_on_its_way_is_asked_again_with_fresh_keys_and_a_fresh_cn_key(bench):
    """A hop cannot forward the first attempt's CN key (aborted back); AKMS A asks again
    under a new request ID: AKMS B draws anew and relays a new CN key; the master gets
    the second attempt's keys, the slave the same; the first attempt's are never used."""
    b = bench()
    opened(b)
    b.refuse(b.request_to(AKMS_A, "ckms", m.RelayItem), KeyUnavailable("no link key"))
    draws = len(b.draws)
    req = b.enc(*GCM_PAIR)
    keys = fetch(b, *GCM_PAIR, req)
    asked = [m.decode(t.body, m.CnRequest) for t in b.sent(m.Tagged, AKMS_A)][-2:]
    assert [a.purpose for a in asked] == ["ksa", "ksa"]
    first, second = (a.request_id for a in asked)
    assert first != second
    (cn_abort,) = b.sent(m.CnAbort)
    assert cn_abort.request_id == first
    assert len(b.draws) == draws + 2  # fresh keys and a fresh CN key for the retry
    assert not any(bits in b.draws[draws] for _, bits in keys)  # none of the first draw's
    delivered = b.sent(m.Deliver, AKMS_B, "akms")[-2:]
    assert len(delivered) == 2  # the slave's copies of both; it is asked for the second's
    notices = [a for a in b.actions(Notice, AKMS_A, "akms") if "asking again" in a.event]
    assert len(notices) == 1 and notices[0].fields["attempt"] == 2
    # a late hand-over of the first attempt's CN key is refused and erased
    key = bytearray(b"\x5a" * 32)
    late = m.CnLocal(request_id=first, cn_key=key)
    b.feed(AKMS_A, "akms", Received(req=800, caller=AKMS_A, message=late))
    assert isinstance(b.log[-1][2], Refuse) and zero(key)
    assert b.waiting() == {}


def test_a_request_on_a_channel_evicted_meanwhile_is_refused(bench):
    b = bench()
    opened(b)
    b.hold(b.answer_to(AKMS_B, "akms", m.RelayLocal))
    req = b.enc(*GCM_PAIR)
    for n in range(4):  # AKMS A, restarted four times, opens four channels
        b.feed(AKMS_B, "akms", Received(req=800 + n, caller=AKMS_A, message=m.ChannelOpen(
            nonce=bytes([n]) * 16)))  # fmt: skip
    b.release(b.held[0])
    assert isinstance(b.outcome("sae-a", req), SaeRefused)


# -- CKMS ----------------------------------------------------------------------------------
@takes("relay OPENING REFUSED", "relay SENT STALE", "relay SEALING SEALED", "relay SENT ACCEPTED")
def test_a_restarted_hop_refuses_stale_grants_and_the_sender_seals_once_more(bench):
    """CKMS 2 (the master end of link 2-3) restarts: the grants CKMS 3 sends with are of
    its earlier run. It refuses them unread; CKMS 3 asks for new ones and seals again."""
    b = bench()
    opened(b)
    b.restart(AKMS_A, "ckms")
    req = b.enc(*GCM_PAIR)
    fetch(b, *GCM_PAIR, req)
    (stale,) = [a for a in b.actions(Refuse, AKMS_A, "ckms")]
    assert isinstance(stale.error, StaleGrant)
    to_2 = [i for i in b.sent(m.RelayItem, CKMS_MID) if i.path[i.index] == AKMS_A]
    first, second = to_2[-2:]
    assert first.epoch != second.epoch  # sealed under grants of the new run
    grants = [g.link for g in b.received(AKMS_A, "ckms", m.GrantRequest)]
    assert grants == ["link-2-3", "link-2-3"]  # one from each run of CKMS 2


@takes("relay SENT STALE", "relay SENT REFUSED", "akms-a HAVE_ANSWER REFUSED")
def test_a_second_stale_key_refusal_fails_the_relay_and_aborts_it_back(bench):
    b = bench()
    opened(b)
    b.refuse(b.request_to(AKMS_A, "ckms", m.RelayItem), StaleKey("gone"), once=False)
    refused = b.outcome("sae-a", b.enc(*GCM_PAIR))
    assert isinstance(refused, SaeRefused) and "lost on its way" in refused.error.message
    sent = [i for i in b.sent(m.RelayItem, CKMS_MID) if i.path[i.index] == AKMS_A]
    # the re-key's and the first request's; ours twice per attempt (not thrice), and the
    # request is tried twice (fresh keys the second time), then given up
    assert len(sent) == 2 + 2 * 2
    assert decode(sent[-1].message)[0].segments != decode(sent[-2].message)[0].segments
    aborts = b.sent(m.RelayAbort, CKMS_MID)
    assert [a.index for a in aborts] == [0, 0]
    cn_aborts = b.sent(m.CnAbort)
    assert [r.message for r in b.actions(Reply, AKMS_A, "akms")][-1] == m.Ok()
    assert b.waiting() == {}
    assert [c.request_id for c in cn_aborts] == [a.request_id for a in aborts]
    assert cn_aborts[0].request_id != cn_aborts[1].request_id


def relay_item(path: list[int], index: int, message: bytes = b"x" * 64) -> m.RelayItem:
    return m.RelayItem(path=path, index=index, message=message, epoch=None)


def test_a_relay_message_off_its_path_is_refused(bench):
    b = bench()
    cases = [
        (AKMS_B, relay_item([AKMS_B, CKMS_MID, AKMS_A], 2)),  # not us at that index
        (AKMS_A, relay_item([AKMS_B, CKMS_MID, AKMS_A], 1)),  # caller not the previous hop
        (AKMS_B, relay_item([AKMS_B, CKMS_MID, AKMS_A], 0)),  # no previous hop at all
        (AKMS_A, relay_item([AKMS_A, CKMS_MID, AKMS_B], 1)),  # a path the other way round
        (AKMS_B, m.RelayAbort(request_id=bytes(16), path=[AKMS_B, CKMS_MID, AKMS_A], index=1)),
        (AKMS_A, m.RelayAbort(request_id=bytes(16), path=[AKMS_B, CKMS_MID, AKMS_A], index=0)),
    ]
    for n, (caller, message) in enumerate(cases):
        b.feed(CKMS_MID, "ckms", Received(req=500 + n, caller=caller, message=message))
        refusal = b.log[-1][2]
        assert isinstance(refusal, Refuse) and refusal.req == 500 + n, message
        assert isinstance(refusal.error, ProtocolError), message
    assert not b.actions(ReadLinkKeys, CKMS_MID)  # nothing was read to open them
    # a CN key handed over by another node, or at the end of its path: refused, erased
    for n, (caller, index) in enumerate(((CKMS_MID, 0), (AKMS_B, 2))):
        local = m.RelayLocal(
            request_id=bytes(16), path=[AKMS_B, CKMS_MID, AKMS_A], index=index,
            cn_key=bytearray(b"\x5a" * 32), mode="GCM",
        )  # fmt: skip
        b.feed(AKMS_B, "ckms", Received(req=600 + n, caller=caller, message=local))
        assert isinstance(b.log[-1][2], Refuse) and zero(local.cn_key)
    # and a CN key for a request AKMS A is not waiting for
    key = bytearray(b"\xa5" * 32)
    b.feed(AKMS_A, "akms", Received(req=700, caller=AKMS_A, message=m.CnLocal(
        request_id=bytes(16), cn_key=key)))  # fmt: skip
    assert isinstance(b.log[-1][2], Refuse) and zero(key)
    b.feed(AKMS_A, "akms", Received(req=701, caller=CKMS_MID, message=m.CnAbort(
        request_id=bytes(16))))  # fmt: skip
    assert isinstance(b.log[-1][2].error, ProtocolError)  # only an access node aborts


# -- grants at the ends of a link ------------------------------------------------------------
@takes("grant READING READ", "grant READING REFUSED")
def test_grants_at_a_master_end_and_refused_at_a_slave_end(bench):
    b = bench()
    ckms = b.engine(CKMS_MID, "ckms")
    b.feed(CKMS_MID, "ckms", Received(req=1, caller=AKMS_B, message=m.GrantRequest(
        link="link-3-4", n=3)))  # fmt: skip
    (read,) = b.actions(ReadLinkKeys, CKMS_MID)
    assert (read.link, read.count, read.ids) == ("link-3-4", 3, ())
    reply = b.log[-1][2]
    assert isinstance(reply, Reply) and isinstance(reply.message, m.Grant)
    assert reply.message.key_ids == [k for k, _ in b.reads[-1].keys]
    assert reply.message.epoch == ckms.links[AKMS_B].epoch
    refusals = [
        (AKMS_A, "link-2-3"),  # CKMS 3 is the slave end of link 2-3
        (UKMS_B, "link-4-5"),  # not a neighbour
        (AKMS_B, "link-2-3"),  # a neighbour naming another link
    ]
    for n, (caller, link) in enumerate(refusals):
        b.feed(CKMS_MID, "ckms", Received(req=10 + n, caller=caller, message=m.GrantRequest(
            link=link, n=3)))  # fmt: skip
        refusal = b.log[-1][2]
        assert isinstance(refusal, Refuse) and isinstance(refusal.error, ProtocolError), link
    assert len(b.actions(ReadLinkKeys, CKMS_MID)) == 1
    b.links["link-3-4"].down = True  # a master with nothing to grant says so
    b.feed(CKMS_MID, "ckms", Received(req=20, caller=AKMS_B, message=m.GrantRequest(
        link="link-3-4", n=3)))  # fmt: skip
    assert isinstance(b.log[-1][2].error, KeyUnavailable)


# -- UKMS: a restart ------------------------------------------------------------------------
@takes("ukms-enc OPENING REFUSED", "ukms-enc OPENING OPENED")
def test_a_restarted_ukms_asks_fresh_so_its_akms_drops_the_keys_it_sent_with(bench):
    """sae-b asks at UKMS 5, the slave end of link 4-5: AKMS 4 seals answers with keys it
    reads in order. After a restart UKMS 5's module no longer has the key AKMS 4 sent
    with; its first request says so (``fresh``) and AKMS 4 reads new ones."""
    b = bench()
    for _ in range(2):
        fetch(b, "sae-b", "sae-a", b.enc("sae-b", "sae-a"))
    b.restart(UKMS_B, "ukms")

    def stale(d: Delivery) -> Delivery:  # the control: as if fresh were not said
        assert isinstance(d.event, Received) and isinstance(d.event.message, m.KsaRequest)
        message = m.KsaRequest(**{**m_fields(d.event.message), "fresh": False})
        return replace(d, event=msgspec.structs.replace(d.event, message=message))

    b.rewrite(b.request_to(AKMS_B, "akms", m.KsaRequest), stale)
    refused = b.outcome("sae-b", b.enc("sae-b", "sae-a"))
    assert isinstance(refused, SaeRefused) and isinstance(refused.error, StaleKey)
    req = b.enc("sae-b", "sae-a")  # still fresh: no answer was opened in this run
    fetch(b, "sae-b", "sae-a", req)
    requests = b.sent(m.KsaRequest, UKMS_B)
    assert [r.fresh for r in requests] == [True, False, True, True]
    answers = [r.message for r in b.actions(Reply, AKMS_B, "akms")]
    used = [decode(a.sealed)[0].segments[0].key_id for a in answers if isinstance(a, m.KsaAnswer)]
    assert used[0] == used[1] == used[2] != used[3]


def m_fields(message: m.Message) -> dict[str, Any]:
    return {f: getattr(message, f) for f in message.__struct_fields__}


# -- inputs nobody waits for ---------------------------------------------------------------
def test_late_inputs_are_erased_and_change_nothing(bench):
    b = bench()
    for service, node in (("ckms", CKMS_MID), ("akms", AKMS_A), ("ukms", UKMS_A)):
        engine = b.engine(node, service)
        link_key, psk_key, stored = bytearray(b"\x11" * 32), bytearray(b"\x22" * 32), b"\x33" * 32
        taken = StoredKey("00000000-0000-4000-8000-000000000001", bytearray(stored))
        late = [
            LinkKeysRead(ticket=10_001, keys=[("00000000-0000-4000-8000-000000000002", link_key)]),
            PskDerived(ticket=10_002, key=psk_key),
            StoreDone(ticket=10_003, result=[taken]),
            Answered(call=10_004, message=m.Ok()),
            CallFailed(call=10_005, error=KeyUnavailable("late")),
            TimerFired(key=("nobody", 1)),
        ]
        for event in late:
            assert engine.handle(event, b.now) == []
        assert zero(link_key) and zero(psk_key) and zero(taken.material), service
    assert b.engine(UKMS_A, "ukms").handle(SaeAnswerWritten(req=12_345), b.now) == []
    with pytest.raises(ProtocolError):  # an SAE call at a node that serves none
        b.engine(CKMS_MID, "ckms").handle(SaeAnswerWritten(req=1), b.now)
    refusal = b.engine(UKMS_A, "ukms").handle(
        Received(req=1, caller=AKMS_A, message=m.StatusRequest()), b.now
    )
    assert isinstance(refusal[0], Refuse) and isinstance(refusal[0].error, ProtocolError)


# -- the checks themselves -----------------------------------------------------------------
def test_the_leak_check_finds_key_bits_where_they_must_not_be(bench):
    b = bench()
    keys = b.keys("sae-a", b.enc(*GCM_PAIR))
    b.check_no_key_leaks()
    bits = keys[0][1]
    for planted in (
        Notice(event="x", fields={"key": bits.hex()}),
        Notice(event="x", fields={"key": bits}),  # type: ignore[dict-item]
        Alarm(code="KMS-X", reason=f"bad key {bits[:20].hex()}"),
        Refuse(req=1, error=KmsError(f"key {bits.hex().upper()}")),
    ):
        b.log.append((UKMS_A, "ukms", planted))
        with pytest.raises(AssertionError):
            b.check_no_key_leaks()
        b.log.pop()
    b.wire.append(("planted", b"head" + bits[3:22] + b"tail"))
    with pytest.raises(AssertionError, match="planted"):
        b.check_no_key_leaks()
    b.wire.pop()


NOT_TAKEN: set[Transition] = set()
"""Transitions no engine takes (none: see test_every_listed_transition_is_taken_by_an_engine)."""


def listed() -> set[Transition]:
    return {
        (t.name, state, event)
        for t in TABLES
        for state, row in t.transitions.items()
        for event in row
    }


def test_every_listed_transition_is_taken_by_a_test():
    declared = set().union(*DECLARED.values())
    assert listed() - declared <= NOT_TAKEN, sorted(listed() - declared - NOT_TAKEN, key=str)
    assert not declared & NOT_TAKEN


def test_every_listed_transition_is_taken_by_an_engine():
    engines = Path(st.__file__).parent
    used = "".join(p.read_text() for p in engines.glob("*.py") if p.name != "states.py")
    assert "GRANT." in used or "GRANT," in used
    assert set() == NOT_TAKEN


def test_keys_taken_just_before_a_crash_are_fetched_again_after_the_restart(bench):
    """The answer to a dec_keys never left (UKMS B died first): the keys stay pending in
    its store, and the same slave takes them again from the next run."""
    b = bench()
    keys = b.keys("sae-a", b.enc(*GCM_PAIR, number=2))
    ids = [k for k, _ in keys]
    assert b.keys("sae-b", b.dec("sae-b", "sae-a", ids, written=None)) == keys
    b.restart(UKMS_B, "ukms")
    refused = b.outcome("sae-d", b.dec("sae-d", "sae-a", ids))  # nobody else, even now
    assert isinstance(refused, SaeRefused)
    assert b.keys("sae-b", b.dec("sae-b", "sae-a", ids)) == keys
    again = b.outcome("sae-b", b.dec("sae-b", "sae-a", ids))
    assert isinstance(again, SaeRefused)  # released this time
