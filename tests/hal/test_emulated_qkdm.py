"""The emulated QKDM pair: identical keys, exactly-once delivery, rate, buffer, faults."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import hal
from hal.emulated import Fault, add_fault, write_faults
from hal.emulated.keys import KeyIdCodec, derive, secret_from_seed
from tests.conftest import url


def test_both_ends_yield_the_same_key_for_an_id(make_pair, clock):
    a, b = make_pair()
    clock.advance(5)
    key = a.get_key()
    peer = b.get_key_by_id(key.key_id)
    assert key.key_id == peer.key_id
    assert key.material == peer.material and key.size_bits == 256
    assert uuid.UUID(key.key_id).version == 4


def test_get_keys_equals_repeated_get_key(make_pair, clock):
    """One run of keys is key for key what as many get_key calls hand out, IDs and bits,
    around a key the same end gave out by ID before, and the peer finds each by ID."""
    a, b = make_pair()
    c, _ = make_pair()
    clock.advance(5)
    skipped = a.get_key_by_id(_codec(a).encode(3)).key_id
    assert c.get_key_by_id(skipped).key_id == skipped
    run = a.get_keys(10)
    one_by_one = [c.get_key() for _ in range(10)]
    assert [k.key_id for k in run] == [k.key_id for k in one_by_one]
    assert [k.material for k in run] == [k.material for k in one_by_one]
    assert skipped not in {k.key_id for k in run}
    for key in run:
        assert b.get_key_by_id(key.key_id).material == key.material


def test_get_keys_short_and_empty(make_pair, clock):
    """Fewer keys than asked when the buffer runs short; get_key's error when empty."""
    a, _ = make_pair()
    clock.advance(1)
    held = a.key_count()
    assert 0 < held < 1000
    assert len(a.get_keys(1000)) == held
    with pytest.raises(hal.NoKeyAvailable):
        a.get_keys(5)
    assert a.get_keys(0) == []


def _codec(q: hal.Qkdm) -> KeyIdCodec:
    return q._codec  # type: ignore[attr-defined]


def test_keys_differ_between_links_and_secrets(clock):
    def first_key(**params: object) -> bytes:
        q = hal.open_qkdm(url("a", **params), clock=clock)
        clock.advance(1)
        return bytes(q.get_key().material)

    base = first_key()
    assert first_key(link="link-t-2") != base
    assert first_key(seed="other") != base


def test_independent_of_polling_pattern(make_pair, clock):
    """End A looks every 0.1 s, end B only at the end: same counters, same keys."""
    a, b = make_pair(skr=5000, skr_std=1500, tau=5)
    for _ in range(600):
        clock.advance(0.1)
        a.key_count()
    sa, sb = a.status(), b.status()
    assert sa.keys_produced == sb.keys_produced > 0
    for _ in range(50):
        key = a.get_key()
        assert b.get_key_by_id(key.key_id).material == key.material


@settings(max_examples=40, deadline=None)
@given(
    steps_a=st.lists(st.floats(0.001, 50), min_size=1, max_size=30),
    steps_b=st.lists(st.floats(0.001, 50), min_size=1, max_size=30),
    skr=st.floats(100, 50_000),
    std=st.floats(0, 0.5),
)
def test_counters_agree_whatever_the_time_steps(steps_a, steps_b, skr, std):
    ca, cb = hal.ManualClock(), hal.ManualClock()
    params = {"skr": skr, "skr_std": skr * std, "tau": 7, "seed": "prop"}
    a = hal.open_qkdm(url("a", **params), clock=ca)
    b = hal.open_qkdm(url("b", **params), clock=cb)
    for step in steps_a:
        ca.advance(step)
        a.key_count()
    for step in steps_b:
        cb.advance(step)
        b.key_count()
    end = max(ca.now(), cb.now()) + 1
    ca.set(end)
    cb.set(end)
    assert a.status().keys_produced == b.status().keys_produced


class PairMachine(RuleBasedStateMachine):
    """Random interleavings of time, takes at either end, in order or by ID."""

    taken_a = Bundle("taken_a")
    taken_b = Bundle("taken_b")

    def __init__(self) -> None:
        super().__init__()
        self.clock = hal.ManualClock()
        params = {"skr": 3000, "skr_std": 900, "tau": 3, "buffer": 40, "seed": "machine"}
        self.a = hal.open_qkdm(url("a", **params), clock=self.clock)
        self.b = hal.open_qkdm(url("b", **params), clock=self.clock)
        self.material: dict[str, bytes] = {}
        self.ids_from = {"a": set(), "b": set()}

    def _record(self, end: str, key: hal.QkdKey) -> str:
        assert key.key_id not in self.ids_from[end], "a key was handed out twice"
        self.ids_from[end].add(key.key_id)
        known = self.material.setdefault(key.key_id, bytes(key.material))
        assert known == bytes(key.material), "ends disagree on a key"
        return key.key_id

    @rule(seconds=st.floats(0.0, 3.0))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule(target=taken_a)
    def take_at_a(self):
        try:
            return self._record("a", self.a.get_key())
        except hal.NoKeyAvailable:
            return "none"

    @rule(target=taken_b)
    def take_at_b(self):
        try:
            return self._record("b", self.b.get_key())
        except hal.NoKeyAvailable:
            return "none"

    @rule(key_id=consumes(taken_a))
    def fetch_at_b(self, key_id):
        self._fetch(self.b, "b", key_id)

    @rule(key_id=consumes(taken_b))
    def fetch_at_a(self, key_id):
        self._fetch(self.a, "a", key_id)

    def _fetch(self, qkdm, end, key_id):
        if key_id == "none":
            return
        # KeyNotFound: already taken at this end, or aged out of the 40-key buffer.
        with contextlib.suppress(hal.KeyNotFound):
            self._record(end, qkdm.get_key_by_id(key_id))
        with pytest.raises(hal.KeyNotFound):
            qkdm.get_key_by_id(key_id)

    @invariant()
    def buffers_are_bounded(self):
        for q in (self.a, self.b):
            assert 0 <= q.key_count() <= 40


TestPairMachine = PairMachine.TestCase
TestPairMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@settings(max_examples=30, deadline=None)
@given(
    skr=st.floats(10, 100_000),
    rel_std=st.floats(0, 1.0),
    times=st.lists(st.floats(0, 3600), min_size=2, max_size=25, unique=True),
)
def test_rate_limit_holds_over_any_window(skr, rel_std, times):
    clock = hal.ManualClock()
    q = hal.open_qkdm(url("a", skr=skr, skr_std=skr * rel_std, tau=10, seed="rate"), clock=clock)
    skr_max = 2 * skr + 6 * skr * rel_std
    counts = []
    for t in sorted(times):
        clock.set(t)
        counts.append((t, q.status().keys_produced))
    for i, (t0, n0) in enumerate(counts):
        for t1, n1 in counts[i + 1 :]:
            assert (n1 - n0) * 256 <= skr_max * (t1 - t0) + 256


def test_rate_limit_holds_for_keys_handed_out(make_pair, clock):
    a, _ = make_pair(skr=2560, skr_std=2000, skr_max=5120, tau=1)
    for second in range(1, 301):
        clock.set(second)
        taken = 0
        while True:
            try:
                a.get_key().erase()
                taken += 1
            except hal.NoKeyAvailable:
                break
        assert taken <= 5120 / 256 + 1


def test_buffer_is_bounded_and_oldest_keys_drop_at_both_ends(make_pair, clock):
    a, b = make_pair(skr=25600, buffer=50)
    clock.advance(1)
    early = a.get_key()
    clock.advance(60)
    assert a.key_count() == b.key_count() == 50
    assert a.status().keys_produced > 1000
    with pytest.raises(hal.KeyNotFound):
        b.get_key_by_id(early.key_id)  # aged out at B although B never took it
    late = a.get_key()
    assert b.get_key_by_id(late.key_id).material == late.material


def test_not_yet_received_and_foreign_ids(make_pair, clock):
    _, b = make_pair()
    clock.advance(1)
    codec = KeyIdCodec(derive(secret_from_seed("test"), "link-t-1", "key-id"))
    with pytest.raises(hal.KeyNotYetAvailable):
        b.get_key_by_id(codec.encode(10_000))
    for foreign in (str(uuid.uuid4()), "not-a-uuid", "", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(hal.KeyNotFound):
            b.get_key_by_id(foreign)


@settings(max_examples=200)
@given(index=st.integers(0, 2**64 - 1))
def test_key_id_codec_round_trips(index):
    codec = KeyIdCodec(derive(b"k" * 32, "link", "key-id"))
    key_id = codec.encode(index)
    assert len(key_id) == 36 and uuid.UUID(key_id).version == 4
    assert codec.decode(key_id) == index
    assert KeyIdCodec(derive(b"j" * 32, "link", "key-id")).decode(key_id) is None


def _drain(q: hal.Qkdm) -> None:
    while True:
        try:
            q.get_key().erase()
        except (hal.NoKeyAvailable, hal.LinkDownError):
            return


@pytest.mark.parametrize(
    "fault",
    [Fault(kind="down", start=100, end=200), Fault(kind="qber", start=100, end=200, qber=0.2)],
)
def test_faults_stop_key_output_at_both_ends(make_pair, clock, faults_file, fault):
    a, b = make_pair(skr=2560, faults=faults_file)
    clock.set(50)
    write_faults(faults_file, [fault])
    clock.set(100)
    _drain(a)
    before = a.status().keys_produced
    clock.set(199)
    sa, sb = a.status(), b.status()
    assert sa.keys_produced == sb.keys_produced == before
    assert sa.skr_bps == 0
    expected = hal.LinkState.DOWN if fault.kind == "down" else hal.LinkState.ABORT
    assert sa.state is expected and sb.state is expected
    assert (sa.qber is None) == (fault.kind == "down")
    with pytest.raises(hal.LinkDownError):
        a.get_key()
    clock.set(260)
    assert a.status().state is hal.LinkState.UP
    assert a.status().keys_produced == b.status().keys_produced > before
    key = a.get_key()
    assert b.get_key_by_id(key.key_id).material == key.material


def test_open_ended_fault_and_add_fault(make_pair, clock, faults_file):
    a, _ = make_pair(faults=faults_file)
    clock.set(10)
    add_fault(faults_file, Fault(kind="down", start=20))
    clock.set(21)
    produced = a.status().keys_produced
    clock.set(5000)
    assert a.status().keys_produced == produced


@pytest.mark.parametrize(
    "body",
    [
        "{",
        '{"faults": 3}',
        '{"faults": [{"kind": "cut", "start": 1}]}',
        '{"faults": [{"kind": "down", "start": 5, "end": 1}]}',
        '{"faults": [{"kind": "qber", "start": 1, "qber": 0.9}]}',
        '{"faults": [], "extra": 1}',
    ],
)
def test_malformed_fault_file_fails_closed(make_pair, clock, faults_file, body):
    a, _ = make_pair(faults=faults_file)
    clock.set(10)
    faults_file.write_text(body)
    with pytest.raises(hal.DeviceError, match="faults file"):
        a.get_key()


@pytest.mark.parametrize(
    "bad, message",
    [
        ("emulated://link?skr=1&seed=x&colour=red", "unknown parameter"),
        ("emulated://link?seed=x", "missing parameter 'skr'"),
        ("emulated://link?skr=-1&seed=x", "parameter 'skr'"),
        ("emulated://link?skr=nan&seed=x", "parameter 'skr'"),
        ("emulated://link?skr=1&seed=x&key_size=100", "multiple of 8"),
        ("emulated://link?skr=1&seed=x&qber=0.2", "parameter 'qber'"),
        ("emulated://link?skr=1&seed=x&end=c", "parameter 'end'"),
        ("emulated://link?skr=1", "exactly one of"),
        ("emulated://link?skr=1&seed=x&secret_file=/nonexistent", "exactly one of"),
        ("emulated://link?skr=1&seed=x&seed=y", "given twice"),
        ("emulated://?skr=1&seed=x", "LINK-NAME"),
        ("quantum://link?skr=1", "no QKDM driver for scheme 'quantum'"),
        ("no-scheme", "not a device URL"),
    ],
)
def test_bad_urls_are_clear_errors(bad, message):
    with pytest.raises(hal.DeviceUrlError, match=message):
        hal.open_qkdm(bad, clock=hal.ManualClock())


def test_secret_file_errors(tmp_path):
    short = tmp_path / "short.secret"
    short.write_text("abcd")
    notes = tmp_path / "notes.secret"
    notes.write_text("not hex at all")
    for path, message in (
        (short, "at least 16 bytes"),
        (notes, "expected hex"),
        (tmp_path / "missing", "No such file"),
    ):
        with pytest.raises(hal.DeviceUrlError, match=message):
            hal.open_qkdm(f"emulated://l?skr=1&secret_file={path}", clock=hal.ManualClock())


def test_ends_in_separate_processes_agree_without_talking(tmp_path):
    """End B runs in another Python process that only shares the secret file."""
    secret = tmp_path / "link.secret"
    secret.write_text(os.urandom(32).hex())
    params = f"skr=9000&skr_std=2000&secret_file={secret}"
    clock = hal.ManualClock(0.0)
    a = hal.open_qkdm(f"emulated://link-x?end=a&{params}", clock=clock)
    clock.set(30)
    keys = [a.get_key() for _ in range(5)]
    script = (
        "import sys, hashlib, hal\n"
        f"q = hal.open_qkdm('emulated://link-x?end=b&{params}', clock=hal.ManualClock(30.0))\n"
        "for key_id in sys.argv[1:]:\n"
        "    print(hashlib.sha256(q.get_key_by_id(key_id).material).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *(k.key_id for k in keys)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.split() == [hashlib.sha256(k.material).hexdigest() for k in keys]


def test_key_erase_and_repr_hide_material(make_pair, clock):
    a, _ = make_pair()
    clock.advance(1)
    key = a.get_key()
    hexed = key.material.hex()
    assert hexed not in repr(key) and key.key_id in repr(key)
    key.erase()
    assert key.material == bytearray() and key.size_bits == 0


def test_start_far_in_the_past_is_refused():
    with pytest.raises(hal.DeviceUrlError, match="400 days"):
        hal.open_qkdm("emulated://l?skr=1&seed=x&start=0", clock=hal.SystemClock())


def test_long_run_mean_rate_matches_configuration(make_pair, clock):
    a, _ = make_pair(skr=1200, skr_std=100, qber=0.017, qber_std=0.005)
    clock.set(3 * 86400)
    rate = a.status().keys_produced * 256 / clock.now()
    assert math.isclose(rate, 1200, rel_tol=0.02)


@pytest.mark.parametrize("tau", [300.0, 5.0, 1.5, 0.2, 0.0])
def test_vectorised_fluctuation_equals_the_plain_recursion(tau):
    import numpy as np

    from hal.emulated.faults import FaultWatcher
    from hal.emulated.model import LinkModel, LinkParams
    from hal.emulated.noise import ar1

    model = LinkModel(LinkParams(skr=1, skr_max=2, tau=tau), b"k" * 32, FaultWatcher(None))
    eps = np.random.default_rng(7).standard_normal(4096)
    phi = model._phi
    c = math.sqrt(1 - phi * phi)
    z, expected = 0.7, []
    for e in eps:
        z = phi * z + c * e
        expected.append(z)
    got = ar1(eps, phi, 0.7, 64)
    tolerance = 1e-12 if phi >= 1e-4 else 1e-3  # below 1e-4, phi is treated as white noise
    assert np.max(np.abs(got - np.array(expected))) < tolerance


def test_keys_handed_out_in_order_survive_clock_skew_at_the_peer():
    """A full buffer drops its oldest keys; get_key must not hand those out, or the peer,
    reading its clock a little later, would have dropped them already."""
    ca, cb = hal.ManualClock(0), hal.ManualClock(0)
    params = {"skr": 25600, "buffer": 1000, "seed": "skew"}
    a = hal.open_qkdm(url("a", **params), clock=ca)
    b = hal.open_qkdm(url("b", **params), clock=cb)
    ca.set(500)  # 50,000 keys produced: the buffer has been full for a long time
    cb.set(501)  # the peer is 1 s (100 keys) ahead
    for _ in range(50):
        key = a.get_key()
        assert b.get_key_by_id(key.key_id).material == key.material


def test_state_file_prevents_handing_out_a_key_twice_across_restarts(tmp_path):
    """A restarted end resumes above its persisted mark, by order and by ID."""
    state_a, state_b = tmp_path / "a.state", tmp_path / "b.state"
    clock = hal.ManualClock(0)
    a = hal.open_qkdm(url("a", state=state_a), clock=clock)
    b = hal.open_qkdm(url("b", state=state_b), clock=clock)
    clock.set(100)
    used = [a.get_key() for _ in range(5)]
    for key in used:
        b.get_key_by_id(key.key_id)
    clock.set(1000)  # the restart skips up to RESERVE reserved keys: let more arrive
    a2 = hal.open_qkdm(url("a", state=state_a), clock=clock)  # both ends restart
    b2 = hal.open_qkdm(url("b", state=state_b), clock=clock)
    fresh = a2.get_key()
    assert fresh.key_id not in {k.key_id for k in used}
    for key in used:
        with pytest.raises(hal.KeyNotFound):
            b2.get_key_by_id(key.key_id)
    assert b2.get_key_by_id(fresh.key_id).material == fresh.material
    state_a.write_text("garbage")
    with pytest.raises(hal.DeviceError, match="state file"):
        hal.open_qkdm(url("a", state=state_a), clock=clock)


def test_a_prepared_end_hands_out_its_first_keys_without_an_fsync(tmp_path, monkeypatch):
    """prepare() reserves ahead at the start (one fsync), so the first keys in order (a
    first grant of 64) write nothing; a restart resumes above the reservation."""
    from hal.emulated import driver

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(driver.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    state = tmp_path / "a.state"
    clock = hal.ManualClock(0)
    a = hal.open_qkdm(url("a", state=state, buffer=1000), clock=clock)
    clock.set(500)  # a full buffer: the next key in order is its oldest handed-out one
    a.prepare()
    assert len(synced) == 1
    mark = int(state.read_text())
    used = [a.get_key() for _ in range(64)]
    assert len(synced) == 1 and int(state.read_text()) == mark
    a.prepare()  # a reservation that holds is not written again
    assert len(synced) == 1
    a2 = hal.open_qkdm(url("a", state=state, buffer=1000), clock=clock)
    assert a2.get_key().key_id not in {k.key_id for k in used}
    b = hal.open_qkdm(url("b"), clock=clock)
    assert b.get_key_by_id(used[-1].key_id).material == used[-1].material


def test_a_restarted_by_id_end_still_serves_the_ids_its_peer_hands_out_next(tmp_path):
    clock = hal.ManualClock(0)
    a = hal.open_qkdm(url("a"), clock=clock)
    b = hal.open_qkdm(url("b", state=tmp_path / "b.state"), clock=clock)
    clock.set(100)
    first = a.get_key()
    b.get_key_by_id(first.key_id)
    b2 = hal.open_qkdm(url("b", state=tmp_path / "b.state"), clock=clock)  # the by-ID end restarts
    nxt = a.get_key()  # the very next key in the peer's order
    assert b2.get_key_by_id(nxt.key_id).material == nxt.material
    with pytest.raises(hal.KeyNotFound):
        b2.get_key_by_id(first.key_id)


def test_a_fault_shows_in_the_state_at_once_and_the_key_of_its_epoch_still_comes(
    make_pair, clock, faults_file
):
    """Loss of signal is seen from the fault's start; both ends still count the bits of
    the epoch it began in (delivered by post-processing), whenever they looked."""
    a, b = make_pair(skr=2560, faults=faults_file)
    clock.set(10.2)
    assert a.status().state is hal.LinkState.UP
    add_fault(faults_file, Fault(kind="down", start=10.5))
    clock.set(10.6)
    sa = a.status()
    assert sa.state is hal.LinkState.DOWN and sa.skr_bps == 0 and sa.qber is None
    clock.set(11.0)  # the epoch the fault began in ends: its 2,560 bits are distilled
    assert a.status().keys_produced == b.status().keys_produced == 11 * 2560 // 256
    clock.set(30)
    assert a.status().keys_produced == b.status().keys_produced == 11 * 2560 // 256


def test_a_qber_fault_aborts_the_state_at_once(make_pair, clock, faults_file):
    a, _ = make_pair(faults=faults_file)
    clock.set(3.1)
    add_fault(faults_file, Fault(kind="qber", start=3.2, end=3.4, qber=0.3))
    clock.set(3.3)
    got = a.status()
    assert got.state is hal.LinkState.ABORT and got.qber == 0.3
    clock.set(3.5)
    assert a.status().state is hal.LinkState.UP


def _events(q: hal.Qkdm) -> tuple[list[hal.LinkStateChanged], Callable[[], None]]:
    seen: list[hal.LinkStateChanged] = []
    return seen, q.subscribe(seen.append)


def test_a_subscriber_hears_of_a_cut_when_the_faults_file_changes(make_pair, clock, faults_file):
    """No status reading by anyone: the module's own follower wakes on the file's change
    (inotify) and reads the state again."""
    from tests.kms.conftest import poll

    write_faults(faults_file, [])
    a, b = make_pair(faults=faults_file)
    try:
        clock.set(10.1)
        seen, _ = _events(a)
        assert a.follows_file_changes
        add_fault(faults_file, Fault(kind="down", start=10.05))
        poll(lambda: any(e.new is hal.LinkState.DOWN for e in seen), "the cut heard")
        assert seen[-1].link == "link-t-1"
    finally:
        a.close()
        b.close()


def test_on_the_wall_clock_a_fault_is_heard_when_it_starts(tmp_path):
    """A fault written ahead of its start wakes the follower at the start time."""
    import time

    from tests.kms.conftest import poll

    faults_file = tmp_path / "faults.json"
    write_faults(faults_file, [])
    q = hal.open_qkdm(url("a", start=int(time.time()) - 5, faults=faults_file))
    try:
        seen, _ = _events(q)
        q.poll_state()
        assert [e.new for e in seen] == [hal.LinkState.UP]
        add_fault(faults_file, Fault(kind="down", start=time.time() + 0.3, end=None))
        poll(lambda: seen[-1].new is hal.LinkState.DOWN, "the cut heard at its start")
        assert len([e for e in seen if e.new is hal.LinkState.DOWN]) == 1
    finally:
        q.close()
