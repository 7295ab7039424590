"""One relay hop: OTP with a one-time MAC and AES-256-GCM, byte-exact pad accounting,
tampering and replays rejected, link keys erased after use."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hal
from appliance.kms.errors import IntegrityFailure, KeyUnavailable, ProtocolError, ReplayDetected
from appliance.kms.relay import (
    GCM_USES,
    MAC_KEY_BYTES,
    Direction,
    GcmSender,
    Hop,
    Mode,
    PadLedger,
    PadStream,
    Segment,
    decode,
    encode_header,
    open_gcm,
    open_otp,
    seal_gcm,
    seal_otp,
)


def qkdm_keys(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    return [(str(uuid.UUID(int=(seed << 64) + i + 1, version=4)), os.urandom(32)) for i in range(n)]


def link(n: int = 200) -> tuple[PadStream, PadLedger, list[tuple[str, bytes]]]:
    keys = qkdm_keys(n)
    stream, ledger = PadStream(), PadLedger()
    for key_id, material in keys:
        stream.feed(key_id, bytearray(material))
    return stream, ledger, keys


def hop_for(mode: Mode, segments=(), counter: int = 0, hop: int = 3) -> Hop:
    return Hop(
        request_id=b"R" * 16,
        hop=hop,
        direction=Direction.TO_REQUESTER,
        link="link-8-9",
        mode=mode,
        segments=tuple(segments),
        counter=counter,
    )


def send_otp(stream: PadStream, cn: bytes) -> bytes:
    segments, pad = stream.allocate(len(cn) + MAC_KEY_BYTES)
    return seal_otp(hop_for(Mode.OTP, segments), cn, pad)


def receive(ledger: PadLedger, keys: dict[str, bytes], message: bytes) -> bytearray:
    hop, header, body = decode(message)
    for key_id in ledger.missing(hop):
        ledger.add(key_id, bytearray(keys[key_id]))
    if hop.mode is Mode.OTP:
        return open_otp(header, body, ledger.pad(hop))
    return open_gcm(hop, header, body, ledger.gcm_key(hop))


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 700), min_size=1, max_size=12))
def test_otp_round_trips_and_spends_exactly_len_plus_32(sizes):
    stream, ledger, keys = link(400)
    table = dict(keys)
    before = stream.available()
    for n in sizes:
        cn = os.urandom(n)
        assert receive(ledger, table, send_otp(stream, cn)) == cn
    assert before - stream.available() == sum(n + MAC_KEY_BYTES for n in sizes)


def test_segments_never_overlap_and_follow_the_stream():
    stream, _, keys = link(50)
    seen: list[tuple[str, int]] = []
    for n in (10, 50, 3, 64, 200):
        segments, _ = stream.allocate(n)
        for s in segments:
            seen += [(s.key_id, s.offset + i) for i in range(s.length)]
    expected = [(key_id, i) for key_id, _ in keys for i in range(32)][: len(seen)]
    assert seen == expected


def test_spent_link_keys_are_erased_at_both_ends():
    keys = qkdm_keys(3)
    materials = [bytearray(m) for _, m in keys]
    stream, ledger = PadStream(), PadLedger()
    for (key_id, _), material in zip(keys, materials, strict=True):
        stream.feed(key_id, material)
    message = send_otp(stream, os.urandom(32))  # 64 bytes: the first two keys
    assert materials[0] == bytes(32) and materials[1] == bytes(32) and materials[2] != bytes(32)
    held = [bytearray(m) for _, m in keys[:2]]
    hop, header, body = decode(message)
    for key_id, material in zip(ledger.missing(hop), held, strict=True):
        ledger.add(key_id, material)
    open_otp(header, body, ledger.pad(hop))
    assert held == [bytes(32), bytes(32)] and ledger.held() == 0


def test_replays_are_rejected():
    stream, ledger, keys = link()
    message = send_otp(stream, b"k" * 32)
    receive(ledger, dict(keys), message)
    with pytest.raises(ReplayDetected):
        receive(ledger, dict(keys), message)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_any_tampered_byte_is_rejected(position, flip):
    stream, ledger, keys = link()
    message = bytearray(send_otp(stream, b"c" * 48))
    message[position % len(message)] ^= flip
    with pytest.raises((IntegrityFailure, ProtocolError, KeyUnavailable, KeyError)):
        receive(ledger, dict(keys), bytes(message))


def test_aad_binds_hop_and_direction():
    stream, ledger, keys = link()
    segments, pad = stream.allocate(64)
    sealed = seal_otp(hop_for(Mode.OTP, segments, hop=3), b"x" * 32, pad)
    hop, _, body = decode(sealed)
    forged = hop_for(Mode.OTP, segments, hop=4)  # same keys, claims another hop
    forged_header = encode_header(forged, len(body))
    for key_id in ledger.missing(hop):
        ledger.add(key_id, bytearray(dict(keys)[key_id]))
    with pytest.raises(IntegrityFailure):
        open_otp(forged_header, body, ledger.pad(forged))


def test_gcm_round_trip_rotation_and_counter_replay():
    stream, ledger, keys = link(5)
    table = dict(keys)
    sender = GcmSender()
    messages = []
    for i in range(GCM_USES + 2):
        key_id, key, counter = sender.next(stream)
        messages.append(seal_gcm(hop_for(Mode.GCM, [_seg(key_id)], counter), b"%04d" % i, key))
    for i, message in enumerate(messages):
        assert receive(ledger, table, message) == b"%04d" % i
    assert decode(messages[-1])[0].segments[0].key_id == keys[1][0]  # rotated once
    with pytest.raises(ReplayDetected):
        receive(ledger, table, messages[-1])
    with pytest.raises(ReplayDetected):
        receive(ledger, table, messages[0])  # first key retired after its last counter


def _seg(key_id: str) -> Segment:
    return Segment(key_id, 0, 32)


def test_a_short_stream_refuses_instead_of_reusing():
    stream, _, _ = link(2)
    stream.allocate(60)
    with pytest.raises(KeyUnavailable):
        stream.allocate(10)


def test_lost_messages_keys_are_swept():
    stream, ledger, keys = link()
    message = send_otp(stream, b"z" * 100)
    hop, _, _ = decode(message)
    for key_id in ledger.missing(hop):
        ledger.add(key_id, bytearray(dict(keys)[key_id]), now=10.0)
    assert ledger.sweep(older_than=20.0) == len(hop.segments) and ledger.held() == 0


@settings(max_examples=2000, deadline=None)
@given(blob=st.binary(max_size=200))
def test_decoding_garbage_is_a_protocol_error(blob):
    with pytest.raises(ProtocolError):
        decode(b"QKR1" + blob if blob[:1] == b"\x00" else blob)


def test_relay_over_an_emulated_qkdm_pair():
    """The link master takes keys in order; the other end fetches them by ID."""
    clock = hal.ManualClock(0)
    master = hal.open_qkdm("emulated://link-8-9?skr=25600&seed=r", clock=clock)
    slave = hal.open_qkdm("emulated://link-8-9?end=b&skr=25600&seed=r", clock=clock)
    clock.advance(2)
    stream, ledger = PadStream(), PadLedger()
    while stream.available() < 96:
        key = master.get_key()
        stream.feed(key.key_id, key.material)
    message = send_otp(stream, b"N" * 64)
    hop, header, body = decode(message)
    for key_id in ledger.missing(hop):
        ledger.add(key_id, slave.get_key_by_id(key_id).material)
    assert open_otp(header, body, ledger.pad(hop)) == b"N" * 64


@settings(max_examples=300, deadline=None)
@given(
    hop_no=st.integers(0, 255),
    counter=st.integers(0, 2**32 - 1),
    body=st.integers(0, 2**20),
    link=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40),
    segs=st.lists(
        st.tuples(st.uuids(version=4), st.integers(0, 65535), st.integers(0, 65535)), max_size=5
    ),
    mode=st.sampled_from(list(Mode)),
    direction=st.sampled_from(list(Direction)),
)
def test_hand_packed_header_equals_the_declared_layout(
    hop_no, counter, body, link, segs, mode, direction
):
    from appliance.kms.relay import HEADER

    hop = Hop(
        request_id=os.urandom(16),
        hop=hop_no,
        direction=direction,
        link=link,
        mode=mode,
        segments=tuple(Segment(str(u), o, n) for u, o, n in segs),
        counter=counter,
    )
    packed = encode_header(hop, body)
    declared = HEADER.build(
        {
            "mode": mode.name,
            "direction": int(direction),
            "hop": hop_no,
            "request_id": hop.request_id,
            "link": link,
            "segments": [{"key_id": u.bytes, "offset": o, "length": n} for u, o, n in segs],
            "counter": counter,
            "body_length": body,
        }
    )
    assert packed == declared
    if body >= 16:
        decoded, header, _ = decode(packed + bytes(body))
        assert decoded == hop and header == packed
