"""The state table, pair by pair, and fuzzing of every parser of untrusted bytes."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from images import records
from images.bootstate import (
    TRANSITIONS,
    BootState,
    Detail,
    Event,
    Slot,
    SlotState,
    decode_state,
    encode_state,
    step,
)
from images.bundle import read_envelope
from images.errors import BootStateError, BundleRejected, ImageError, TransitionError
from images.manifest import parse_manifest
from images.policy import decode_policy

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("state, event", list(itertools.product(SlotState, Event)))
def test_every_pair_is_in_the_table_or_a_typed_error(state, event):
    slots = {"a": Slot(state=state, attempts=1, health="passed"), "b": Slot()}
    boot = BootState(slots=slots, primary="a", booted="a")
    if (state, event) not in TRANSITIONS:
        with pytest.raises(TransitionError):
            step(boot, "a", event)
        return
    new = step(boot, "a", event, Detail(attempts=3, reason="why"))
    assert new.slots["a"].state is TRANSITIONS[(state, event)][1]
    assert decode_state(encode_state(new)) == new
    assert new.floor >= boot.floor


def test_commit_needs_a_passed_health_check():
    slots = {"a": Slot(state=SlotState.TRIAL, attempts=2), "b": Slot()}
    with pytest.raises(TransitionError):
        step(BootState(slots=slots, primary="a", booted="a"), "a", Event.COMMIT)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(list(records.Kind)))
def test_record_decode_never_raises(raw, kind):
    rec = records.decode(raw, kind)
    assert rec is None or rec.kind == kind


@FUZZ
@given(st.binary(min_size=1, max_size=60), st.integers(0, 200), st.integers(0, 255))
def test_any_torn_or_flipped_record_falls_back(data, cut, bit):
    region = bytearray(2048)
    for payload in (b"old", data):
        off, raw, _ = records.plan_write(bytes(region), records.Kind.STATE, payload)
        region[off : off + len(raw)] = raw
    good_old = records.newest(bytes(region), records.Kind.STATE)[0]
    assert good_old is not None and good_old.data == data
    off, raw, _ = records.plan_write(bytes(region), records.Kind.STATE, b"new")
    torn = bytearray(region)
    torn[off : off + min(cut, len(raw))] = raw[: min(cut, len(raw))]
    if cut < len(raw):
        torn[off + cut % len(raw)] ^= 1 << (bit % 8)
    got = records.newest(bytes(torn), records.Kind.STATE)[0]
    assert got is not None and got.data in (data, b"new")


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@FUZZ
@given(st.one_of(st.binary(max_size=200), JSONISH.map(lambda d: json.dumps(d).encode())))
def test_state_policy_manifest_parsers_fail_with_codes(data):
    for parse, error in (
        (decode_state, BootStateError),
        (decode_policy, BootStateError),
        (parse_manifest, BundleRejected),
    ):
        try:
            parse(data)
        except error as exc:
            assert exc.code in ("IMG-STATE", "IMG-MALFORMED")


@FUZZ
@given(st.sampled_from(["slots", "primary", "floor", "revoked", "last_rollback"]), JSONISH)
def test_boot_state_fields_fuzzed(key, value):
    doc = json.loads(encode_state(BootState()))
    doc[key] = value
    with contextlib.suppress(BootStateError):
        decode_state(json.dumps(doc).encode())


@FUZZ
@given(data=st.data())
def test_bundle_header_and_envelope_fuzzed(images, tmp_path_factory, data):
    raw = images["v1"].read_bytes()
    cut = data.draw(st.integers(0, 4096))
    junk = data.draw(st.binary(max_size=64))
    at = data.draw(st.integers(0, 4000))
    mutated = raw[:at] + junk + raw[at + len(junk) : cut] if cut > at else raw[:cut]
    path = Path(tmp_path_factory.mktemp("fz")) / "b.qkdnb"
    path.write_bytes(mutated)
    try:
        read_envelope(path)
    except ImageError as exc:
        assert exc.code in ("IMG-MALFORMED", "IMG-TRUNCATED")


@FUZZ
@given(
    st.sampled_from(["compatible", "node", "chunks", "verity", "payload_size", "image_size"]),
    JSONISH,
)
def test_manifest_fields_fuzzed(images, key, value):
    env, _ = read_envelope(images["v1"])
    doc = json.loads(env["manifest"])
    doc[key] = value
    try:
        parse_manifest(json.dumps(doc).encode())
    except BundleRejected as exc:
        assert exc.code == "IMG-MALFORMED"
