"""ISO 7816-4 APDU layouts: every case, short and extended, round trips, malformed lengths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsm.apdu import (
    SW,
    Command,
    Response,
    build_tlv,
    case_of,
    describe_sw,
    parse_command,
    parse_response,
    parse_tlvs,
)
from hsm.errors import ApduError

SELECT = "00A4040009F0514B444E50534B01"


@pytest.mark.parametrize(
    "hexstr, case, layout, data_len, le",
    [
        ("00CA0101", 1, "1", 0, None),
        ("00CA010100", 2, "2S", 0, 256),
        ("00CA010110", 2, "2S", 0, 16),
        (SELECT, 3, "3S", 9, None),
        (SELECT + "00", 4, "4S", 9, 256),
        ("00CA0101000000", 2, "2E", 0, 65536),
        ("00CA0101000101", 2, "2E", 0, 257),
        ("00DA0000000003AABBCC", 3, "3E", 3, None),
        ("00DA0000000003AABBCC0400", 4, "4E", 3, 1024),
    ],
)
def test_every_case_parses_and_rebuilds_byte_for_byte(hexstr, case, layout, data_len, le):
    raw = bytes.fromhex(hexstr)
    assert case_of(raw) == layout
    cmd = parse_command(raw)
    assert (cmd.case, len(cmd.data), cmd.le) == (case, data_len, le)
    assert cmd.build(extended=layout.endswith("E")) == raw


@pytest.mark.parametrize(
    "hexstr",
    [
        "",
        "00",
        "00A404",
        "00A4040002AA",  # Lc=2, one byte of data
        "00A4040002AABBCCDD",  # Lc=2, four bytes
        "00A404000000",  # extended marker, 6 bytes
        "00A4040000000000",  # B1=0, 8 bytes: no form fits
        "00A4040000000001",  # extended Lc=0 is not allowed
        "00A40400000002AA",  # extended Lc=2, one byte
    ],
)
def test_inconsistent_lengths_are_rejected(hexstr):
    with pytest.raises(ApduError):
        parse_command(bytes.fromhex(hexstr))


def test_lengths_choose_short_or_extended_form():
    assert len(Command(cla=0, ins=1, data=b"x" * 255, le=256).build()) == 4 + 1 + 255 + 1
    assert len(Command(cla=0, ins=1, data=b"x" * 256).build()) == 4 + 3 + 256
    assert Command(cla=0, ins=1, le=257).build() == bytes.fromhex("00010000000101")
    assert Command(cla=0, ins=1, le=65536).build() == bytes.fromhex("00010000000000")


def test_invalid_fields_are_caller_errors():
    for bad in ({"cla": 256}, {"le": 0}, {"le": 65537}, {"data": b"x" * 65536}):
        with pytest.raises(ApduError):
            Command(**{"cla": 0, "ins": 0, **bad})


@given(
    head=st.tuples(*[st.integers(0, 255)] * 4),
    data=st.binary(max_size=600),
    le=st.none() | st.integers(1, 65536),
    extended=st.booleans(),
)
def test_build_parse_round_trip(head, data, le, extended):
    cla, ins, p1, p2 = head
    cmd = Command(cla=cla, ins=ins, p1=p1, p2=p2, data=data, le=le)
    assert parse_command(cmd.build(extended=extended)) == cmd


@given(st.binary(max_size=300))
def test_parser_takes_any_bytes_without_crashing(raw):
    try:
        cmd = parse_command(raw)
    except ApduError:
        return
    assert cmd.build(extended=case_of(raw).endswith("E")) == raw


def test_responses():
    assert parse_response(bytes.fromhex("019000")) == Response(data=b"\x01", sw=SW.OK)
    assert Response(data=b"ab", sw=SW.FILE_NOT_FOUND).build() == b"ab\x6a\x82"
    assert not Response(sw=0x63C2).ok and describe_sw(0x63C2) == "verification failed, 2 tries left"
    assert describe_sw(0x6985) == "conditions of use not satisfied"
    with pytest.raises(ApduError):
        parse_response(b"\x90")


def test_tlv_lengths_in_all_three_forms():
    objs = [(0x81, b"c" * 5), (0x82, b"n" * 200), (0x83, b"x" * 300)]
    raw = b"".join(build_tlv(t, v) for t, v in objs)
    assert raw[:2] == b"\x81\x05" and raw[7:10] == b"\x82\x81\xc8"
    assert parse_tlvs(raw) == objs
    for bad in (b"\x81", b"\x81\x03ab", b"\x81\x85ab", b"\x81\x81\x03ab"):
        with pytest.raises(ApduError):
            parse_tlvs(bad)
