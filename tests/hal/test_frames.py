"""The frame protocol: host (construct) and firmware (struct) agree; resync; no crashes."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hal.errors import ProtocolError
from hal.firmware import protocol as wire
from hal.firmware.compat import _crc32_soft
from hal.frames import (
    Frame,
    FrameDecoder,
    FrameReceived,
    GarbageSkipped,
    encode_frame,
    parse_frame,
)

TYPES = st.sampled_from([*wire.REQUEST_TYPES, *(t | 0x80 for t in wire.REQUEST_TYPES), 0xFF])
FRAMES = st.tuples(TYPES, st.integers(0, 0xFFFF), st.binary(max_size=300))


def frames_of(events: list[object]) -> list[tuple[int, int, bytes]]:
    return [(e.type, e.seq, e.payload) for e in events if isinstance(e, FrameReceived)]


def test_layout_is_the_documented_one():
    frame = encode_frame(wire.T_GET_KEY, 0x1234, b"abc")
    assert frame[:8] == bytes.fromhex("a55a 01 03 1234 0003")
    assert frame[8:11] == b"abc"
    assert int.from_bytes(frame[11:], "big") == zlib.crc32(frame[2:11])
    assert len(frame) == 3 + wire.HEADER_SIZE + wire.TRAILER_SIZE


@settings(max_examples=200, deadline=None)
@given(FRAMES)
def test_host_and_firmware_encoders_agree_and_parse_each_other(f):
    ftype, seq, payload = f
    host = encode_frame(ftype, seq, payload)
    assert host == Frame.build({"body": {"value": {"type": ftype, "seq": seq, "payload": payload}}})
    assert host == wire.encode(ftype, seq, payload)
    assert wire.encode(ftype, seq, bytearray(payload)) == host
    assert parse_frame(host) == FrameReceived(type=ftype, seq=seq, payload=payload)
    assert wire.Parser().feed(host) == [(ftype, seq, payload)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=40), FRAMES), max_size=6),
    st.lists(st.integers(1, 64), min_size=1, max_size=8),
)
def test_garbage_between_frames_and_any_chunking(items, cuts):
    """Every frame survives any garbage before it that contains no sync, in any chunking."""
    stream, want = b"", []
    for garbage, (ftype, seq, payload) in items:
        stream += garbage.replace(b"\xa5", b"\x00") + encode_frame(ftype, seq, payload)
        want.append((ftype, seq, payload))
    decoder, parser, got_host, got_fw, i = FrameDecoder(), wire.Parser(), [], [], 0
    while i < len(stream):
        step = cuts[i % len(cuts)]
        got_host += frames_of(decoder.receive_data(stream[i : i + step]))
        got_fw += parser.feed(stream[i : i + step])
        i += step
    assert got_host == want and got_fw == want


def test_torn_frame_then_whole_frame():
    good = encode_frame(wire.T_STATUS | 0x80, 7, b"x" * 50)
    torn = encode_frame(wire.T_GET_KEY | 0x80, 6, b"k" * 48)[:20]
    events = FrameDecoder().receive_data(torn + good)
    assert frames_of(events) == [(wire.T_STATUS | 0x80, 7, b"x" * 50)]
    assert sum(e.count for e in events if isinstance(e, GarbageSkipped)) == len(torn)
    assert wire.Parser().feed(torn + good) == [(wire.T_STATUS | 0x80, 7, b"x" * 50)]


def test_torn_frame_claiming_more_bytes_is_dropped_after_give_up():
    torn = encode_frame(wire.T_GET_KEY | 0x80, 6, b"k" * 1000)[:30]
    decoder = FrameDecoder()
    assert frames_of(decoder.receive_data(torn)) == []
    assert decoder.buffered == 30
    decoder.give_up_partial()
    assert decoder.buffered == 0
    good = encode_frame(wire.T_KEY_COUNT | 0x80, 9, b"\0\0\0\1")
    assert frames_of(decoder.receive_data(good)) == [(wire.T_KEY_COUNT | 0x80, 9, b"\0\0\0\1")]


@pytest.mark.parametrize("flip", [2, 3, 5, 7, 9, 12])
def test_any_corrupted_byte_loses_only_that_frame(flip):
    bad = bytearray(encode_frame(wire.T_GET_KEY | 0x80, 1, b"secret-key-bytes"))
    bad[flip] ^= 0x40
    good = encode_frame(wire.T_INFO | 0x80, 2, b"info")
    decoder = FrameDecoder()
    got = frames_of(decoder.receive_data(bytes(bad) + good))
    if flip == 7:  # a longer length: the decoder waits until the driver's timeout gives up
        assert got == []
        got = frames_of(decoder.give_up_partial())
    assert got == [(wire.T_INFO | 0x80, 2, b"info")]
    with pytest.raises(ProtocolError) as err:
        parse_frame(bytes(bad))
    assert "secret" not in str(err.value)


def test_oversized_length_is_garbage_and_payload_limit_enforced():
    decoder = FrameDecoder(max_payload=16)
    big = encode_frame(wire.T_READ_SAMPLES | 0x80, 1, bytes(17))
    small = encode_frame(wire.T_READ_SAMPLES | 0x80, 2, bytes(16))
    assert frames_of(decoder.receive_data(big + small)) == [
        (wire.T_READ_SAMPLES | 0x80, 2, bytes(16))
    ]
    with pytest.raises(ValueError):
        encode_frame(1, 1, bytes(wire.MAX_PAYLOAD + 1))


def test_frame_repr_hides_payload():
    assert "secret" not in repr(FrameReceived(type=0x83, seq=1, payload=b"secret"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 50))
def test_decoders_never_crash_on_random_bytes(data, step):
    decoder, parser = FrameDecoder(), wire.Parser()
    for i in range(0, len(data), step):
        decoder.receive_data(data[i : i + step])
        parser.feed(data[i : i + step])
    decoder.give_up_partial()
    parser.drop_partial()


@given(st.binary(max_size=200), st.integers(0, 0xFFFFFFFF))
def test_firmware_soft_crc_matches_zlib(data, start):
    assert _crc32_soft(data, start) == zlib.crc32(data, start)
