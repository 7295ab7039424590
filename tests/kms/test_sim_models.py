"""The simulation's models hold to what they stand for.

:class:`~appliance.kms.sim.models.ModelStore` stands for a node's key stores
(:class:`~appliance.kms.shards.ShardedStore` over :class:`~appliance.kms.store.KeyStore`):
Hypothesis runs random operation sequences on both, side by side, on one injected clock
(puts, takes, takes again in the same run, restarts, takes again within and after the
refetch window, releases, restores, the stock's oldest-first takes, levels,
housekeeping), the way the UKMS engine uses them, and every outcome must match.
:class:`~appliance.kms.sim.qkdm.SimLink` stands for a QKD module pair: both its ends pass
:func:`hal.testing.check_qkdm` with each other as ``peer``, on an injected clock.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hal
from appliance.kms.errors import KeyUnavailable, KmsError, StoreError
from appliance.kms.events import Housekeep, Levels
from appliance.kms.shards import ShardedStore
from appliance.kms.sim.models import REFETCH_WINDOW, TTL, ModelStore
from appliance.kms.sim.qkdm import SimLink
from appliance.kms.store import NodeKey
from appliance.kms.storeops import KSA, STOCK, Put, Release, Restore, StoredKey, Take, TakeOldest
from hal.testing import check_qkdm

NODE_KEY = NodeKey(bytes(range(32)))
SESSIONS = ("014:sae-a:sae-b", "014:sae-c:sae-b", "014:sae-b:sae-a")
KINDS = (KSA, STOCK)
POOLS = {
    (session, kind): tuple(str(uuid.UUID(int=(s << 16) + (k << 8) + i)) for i in range(8))
    for s, session in enumerate(SESSIONS)
    for k, kind in enumerate(KINDS)
}
"""Key IDs for the tests of single cases, per session and kind: never shared by two
sessions or kinds, as QKD key IDs are random UUIDs (the real store checks that an ID is
unique per shard and kind only, the model per node)."""
STEPS = (7.0, 14.0, 147.0, REFETCH_WINDOW - 6, REFETCH_WINDOW + 1, TTL / 2)
"""Clock advances (seconds): within the refetch window, past it, towards the keys' expiry.
All multiples of 7 s, so no take comes exactly one window after another (300 s is not a
multiple of 7): the boundary itself is held by a test of its own below."""
FAST_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None
"""Where the stores go: memory where there is one (fsyncs would cost most of the time)."""


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bits(key_id: str, n: int) -> bytes:
    return hashlib.sha256(f"{key_id}/{n}".encode()).digest()


def held(run: Callable[[], Any]) -> list[str]:
    """The keys a refused take says are held for its session (it changes nothing)."""
    try:
        run()
    except KeyUnavailable as exc:
        return sorted(exc.held)
    raise AssertionError("the take was refused a moment ago")


def outcome(run: Callable[[], Any]) -> tuple[str, Any]:
    """An operation's outcome in comparable form: the value, or the error's kind."""
    try:
        result = run()
    except KeyUnavailable as exc:
        return "unavailable", sorted(exc.missing)
    except StoreError as exc:
        return "store-error", type(exc).__name__
    except KmsError as exc:  # anything else is a difference in itself
        return "error", f"{exc.code}: {exc.message}"
    if isinstance(result, list):
        assert all(isinstance(k, StoredKey) for k in result)
        return "keys", [(k.key_id, bytes(k.material)) for k in result]
    return "value", result


class Pair:
    """A real sharded store and the model, on one clock, restarted together."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qkdn-model-", dir=FAST_DIR))
        self.clock = Clock()
        self.runs = 0
        self.alarms: list[tuple[str, str]] = []
        self.real = self._open()
        self.model = ModelStore(self.clock)
        self.model.restart(self.real.run_id)

    def _open(self) -> ShardedStore:
        return ShardedStore(
            self.dir,
            NODE_KEY,
            alarm=lambda code, reason: self.alarms.append((code, reason)),
            shards=2,
            clock=self.clock,
            run_id=f"run-{self.runs}",
        )

    def both(self, op: Any) -> tuple[tuple[str, Any], tuple[str, Any]]:
        real = outcome(lambda: self.real.run(op))
        model = outcome(lambda: self.model.apply(op))
        if isinstance(op, Take) and real == model and real[0] == "unavailable":
            assert held(lambda: self.real.run(op)) == held(lambda: self.model.apply(op)), op
        if isinstance(op, Take) and len(set(op.key_ids)) < len(op.key_ids):
            real, model = (real[0], None), (model[0], None)  # refused; "missing" says why
        return real, model

    def same(self, op: Any) -> tuple[str, Any]:
        real, model = self.both(op)
        assert real == model, f"{op!r}: store {real}, model {model}"
        return real

    def purge(self) -> tuple[tuple[str, Any], tuple[str, Any]]:
        return outcome(self.real.purge_expired), outcome(lambda: self.model.apply(Housekeep()))

    def levels(self, kind: str) -> tuple[tuple[str, Any], tuple[str, Any]]:
        real = outcome(lambda: self.real.levels(kind))
        return real, outcome(lambda: self.model.apply(Levels(kind=kind)))

    def restart(self) -> None:
        """A crash and a restart: what was committed stays, the run is a new one."""
        self.real.close()
        self.runs += 1
        self.real = self._open()
        self.model.restart(self.real.run_id)

    def close(self) -> None:
        self.real.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pair():
    both = Pair()
    yield both
    both.close()


Copy = tuple[str, str]
"""A slave copy put in the store: (session, key ID)."""
Step = tuple[str, int, int]
"""One operation of a sequence: its name and two choices (which session, which keys, how
many, how long...), read modulo what there is to choose from."""
OPS = (
    ("deliver",) * 3
    + ("take",) * 4
    + ("settle",) * 2
    + ("wait",) * 3
    + ("restart",) * 2
    + ("refill", "lease", "again", "housekeep")
)
"""The operations, weighted by repetition (takes and their settling are the point)."""
steps = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 63), st.integers(0, 63)),
    min_size=20,
    max_size=60,
)


class Walk:
    """One sequence on a store and its model; every outcome compared as it goes."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.copies: list[Copy] = []
        self.made = 0

    def fresh(self, n: int) -> list[str]:
        """New key IDs (QKD key IDs are random UUIDs: two puts never share one)."""
        self.made += n
        return [str(uuid.UUID(int=0x5EED_0000 + self.made - i)) for i in range(n)]

    def put(self, session: str, kind: str, ids: list[str]) -> bool:
        keys = [(key_id, bits(key_id, self.made)) for key_id in ids]
        return self.pair.same(Put(session=session, kind=kind, keys=keys))[0] == "value"

    def pending(self) -> bool:
        """Whether any key is taken and not yet released (by this run or an earlier one)."""
        return any(row.run is not None for row in self.pair.model._rows.values())

    def some(self, a: int, b: int) -> list[Copy]:
        """1 to 3 known copies, from position ``a`` on (some may be gone by now)."""
        if not self.copies:
            return []
        n = 1 + b % 3
        return [self.copies[(a + i * 7) % len(self.copies)] for i in range(n)]

    def step(self, op: str, a: int, b: int) -> None:
        session = SESSIONS[a % len(SESSIONS)]
        if op == "deliver":  # slave copies arrive from AKMS B
            ids = self.fresh(1 + b % 3)
            assert self.put(session, KSA, ids)
            self.copies += [(session, key_id) for key_id in ids]
        elif op == "again":  # a put naming a key stored before (all or none)
            for owner, key_id in self.some(a, b)[:1]:
                self.put(owner, KSA, [key_id, *self.fresh(b % 2)])
        elif op == "refill":  # a master's stock grows (a refill, or a lease given back)
            assert self.put(session, STOCK, self.fresh(1 + b % 3))
        elif op == "take":  # dec_keys, pending; by the copies' session, or another one
            mine = list(dict.fromkeys(self.some(a, b)))
            if mine:
                owner = mine[0][0] if b % 5 else session
                self.pair.same(Take(session=owner, key_ids=[k for _, k in mine]))
        elif op == "settle":  # release or restore once a dec_keys answer left or not
            mine = self.some(a, b)
            owner = mine[0][0] if mine else session
            kind = Restore if b % 2 else Release
            self.pair.same(kind(session=owner, key_ids=[k for s, k in mine if s == owner]))
        elif op == "lease":  # the stock lease: a master's oldest keys, deleted at once
            self.pair.same(TakeOldest(session=session, kind=STOCK, n=b % 4))
        elif op == "wait":
            self.pair.clock.advance(STEPS[b % len(STEPS)])
        elif op == "restart":
            self.pair.restart()
        elif not self.pending():  # see test_a_restore_after_housekeeping_counts_the_key
            real, model = self.pair.purge()
            assert real == model, f"purge: store {real}, model {model}"
        for kind in KINDS:
            real, model = self.pair.levels(kind)
            assert real == model, f"levels({kind}) after {op}: store {real}, model {model}"
        assert self.pair.alarms == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_the_model_store_behaves_as_the_sharded_store(sequence: list[Step]):
    pair = Pair()
    try:
        walk = Walk(pair)
        for op, a, b in sequence:
            walk.step(op, a, b)
    finally:
        pair.close()


# -- the life of a slave copy, step by step (the machine's main path, made certain) ---------
def test_a_copy_taken_before_a_crash_is_taken_again_within_the_window_only(pair):
    s, (k1, k2) = SESSIONS[0], POOLS[(SESSIONS[0], KSA)][:2]
    keys = [(k1, bits(k1, 1)), (k2, bits(k2, 1))]
    assert pair.same(Put(session=s, keys=keys)) == ("value", 2)
    assert pair.same(Take(session=s, key_ids=[k1])) == ("keys", keys[:1])
    assert pair.same(Take(session=s, key_ids=[k1])) == ("unavailable", [k1])  # pending
    assert pair.same(Take(session=SESSIONS[1], key_ids=[k2])) == ("unavailable", [k2])
    pair.restart()
    pair.clock.advance(REFETCH_WINDOW - 1)
    assert pair.same(Take(session=s, key_ids=[k1])) == ("keys", keys[:1])  # same bits
    assert pair.same(Take(session=s, key_ids=[k2])) == ("keys", keys[1:])
    pair.restart()
    pair.clock.advance(2)  # k1's first take is now more than a window ago; k2's is not
    assert pair.same(Take(session=s, key_ids=[k1, k2])) == ("unavailable", [k1])
    assert pair.same(Take(session=s, key_ids=[k2])) == ("keys", keys[1:])
    assert pair.same(Restore(session=s, key_ids=[k1, k2])) == ("value", 1)  # k2: this run's
    assert pair.levels(KSA) == (("value", {s: 1}),) * 2
    assert pair.same(Take(session=s, key_ids=[k2])) == ("keys", keys[1:])
    assert pair.same(Release(session=s, key_ids=[k2])) == ("value", 1)
    assert pair.same(Take(session=s, key_ids=[k2])) == ("unavailable", [k2])
    real, model = pair.purge()
    assert real == model == ("value", 1)  # k1, pending past the window
    assert pair.levels(KSA) == (("value", {}),) * 2


def test_the_stock_is_leased_oldest_first_and_expires(pair):
    s = SESSIONS[2]
    ids = POOLS[(s, STOCK)]
    for n, key_id in enumerate(ids[:3]):
        pair.same(Put(session=s, kind=STOCK, keys=[(key_id, bits(key_id, n))]))
        pair.clock.advance(7)
    assert pair.same(TakeOldest(session=s, kind=STOCK, n=2))[1] == [
        (ids[0], bits(ids[0], 0)),
        (ids[1], bits(ids[1], 1)),
    ]
    assert pair.levels(STOCK) == (("value", {s: 1}),) * 2
    pair.clock.advance(TTL)
    assert pair.levels(STOCK) == (("value", {}),) * 2
    assert pair.same(TakeOldest(session=s, kind=STOCK, n=2)) == ("keys", [])


# -- where the model and the store part ---------------------------------------------------
def test_a_take_again_exactly_one_window_after_the_first(pair):
    s, k = SESSIONS[0], POOLS[(SESSIONS[0], KSA)][0]
    pair.same(Put(session=s, keys=[(k, bits(k, 0))]))
    pair.same(Take(session=s, key_ids=[k]))
    pair.restart()
    pair.clock.advance(REFETCH_WINDOW)
    real, model = pair.both(Take(session=s, key_ids=[k]))
    assert real == ("unavailable", [k])
    assert model == real


def test_housekeeping_exactly_one_window_after_a_take(pair):
    s, k = SESSIONS[0], POOLS[(SESSIONS[0], KSA)][0]
    pair.same(Put(session=s, keys=[(k, bits(k, 0))]))
    pair.same(Take(session=s, key_ids=[k]))
    pair.clock.advance(REFETCH_WINDOW)
    real, model = pair.purge()
    assert real == ("value", 1)
    assert model == real


def test_a_take_names_keys_of_its_kind_only(pair):
    s, k = SESSIONS[0], POOLS[(SESSIONS[0], STOCK)][0]
    pair.same(Put(session=s, kind=STOCK, keys=[(k, bits(k, 0))]))
    real, model = pair.both(Take(session=s, kind=KSA, key_ids=[k]))
    assert real == ("unavailable", [k])
    assert model == real


# -- a defect of the real store the comparison found ----------------------------------------
def test_a_restore_after_housekeeping_counts_the_key(pair):
    s, k = SESSIONS[0], POOLS[(SESSIONS[0], KSA)][0]
    pair.same(Put(session=s, keys=[(k, bits(k, 0))]))
    pair.same(Take(session=s, key_ids=[k]))
    real, model = pair.purge()
    assert real == model == ("value", 0)
    pair.same(Restore(session=s, key_ids=[k]))
    assert pair.real.count(s, KSA) == 1
    assert pair.levels(KSA) == (("value", {s: 1}),) * 2


# -- the simulated QKD module pair --------------------------------------------------------
def sim_link(clock: Clock, *, rate: float = 2.0) -> SimLink:
    return SimLink("link-2-3", "seed", rate=rate, key_bytes=32, clock=clock)


@pytest.mark.parametrize("master", [True, False], ids=["master-end", "slave-end"])
def test_both_ends_of_a_sim_link_pass_the_qkdm_conformance_kit(master: bool):
    clock = Clock(0.0)
    link = sim_link(clock)
    check_qkdm(
        lambda: link.end(master=master),
        peer=lambda: link.end(master=not master),
        advance=clock.advance,
        keys=12,
    )
    assert clock.now == pytest.approx(6.0, abs=1.0)  # 12 keys at 2 keys/s: time moved, not us


def test_a_sim_link_distils_on_its_clock_runs_dry_and_goes_down():
    clock = Clock(10.0)
    link = sim_link(clock)
    master, slave = link.end(master=True), link.end(master=False)
    assert master.key_count() == 20 == master.status().keys_produced
    first = master.get_key()
    assert slave.get_key_by_id(first.key_id).material == first.material
    ahead = link.key(25)  # an ID the link has not distilled yet
    with pytest.raises(hal.KeyNotYetAvailable):
        slave.get_key_by_id(ahead.key_id)
    link.dry_since = clock.now
    clock.advance(100)
    assert link.produced() == 20
    link.dry_since = None
    assert link.produced() == 220
    link.down = True
    with pytest.raises(hal.LinkDownError):
        master.get_key()
    assert master.status().state is hal.LinkState.DOWN
