"""Key IDs converted by hand agree with :mod:`uuid` in every direction."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.kms import keyids


def test_new_ids_are_distinct_version_4_uuids():
    raw = keyids.new_raw(2000)
    ids = [keyids.from_bytes(raw[i : i + 16]) for i in range(0, len(raw), 16)]
    assert len(set(ids)) == 2000
    for key_id in ids:
        parsed = uuid.UUID(key_id)
        assert str(parsed) == key_id and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize("n", [1, 2, 32, 1024])
def test_a_batchs_ids_are_distinct_version_8_uuids_sharing_their_front(n):
    batches = [keyids.batch_raw(n) for _ in range(50)]
    fronts = set()
    every: set[str] = set()
    for raw in batches:
        assert len(raw) == 16 * n
        ids = [keyids.from_bytes(raw[i : i + 16]) for i in range(0, len(raw), 16)]
        for key_id in ids:
            parsed = uuid.UUID(key_id)
            assert str(parsed) == key_id and parsed.version == 8
            assert parsed.variant == uuid.RFC_4122
        assert len({k[:13] for k in ids}) == 1  # the batch's prefix: 6 bytes, 12 hex digits
        fronts.add(ids[0][:13])
        every.update(ids)
    assert len(fronts) == len(batches)  # another prefix for every batch
    assert len(every) == n * len(batches)  # and no ID twice


def test_a_batchs_ids_use_every_byte_drawn_once():
    drawn = bytes(range(6 + 10 * 3))
    raw = keyids.batch_raw(3, lambda size: drawn[:size])
    assert [raw[i : i + 6] for i in (0, 16, 32)] == [drawn[:6]] * 3
    rest = b"".join(raw[i + 6 : i + 16] for i in (0, 16, 32))
    masked = bytearray(drawn[6:])
    for i in (0, 10, 20):  # the version and variant bits, as RFC 9562 places them
        masked[i] = (masked[i] & 0x0F) | 0x80
        masked[i + 2] = (masked[i + 2] & 0x3F) | 0x80
    assert rest == bytes(masked)


@given(st.uuids())
def test_bytes_and_text_round_trip_as_uuid_does(value):
    assert keyids.from_bytes(value.bytes) == str(value)
    assert keyids.to_bytes(str(value)) == value.bytes
    assert keyids.to_bytes(str(value).upper()) == value.bytes
    assert keyids.canonical(str(value).upper()) == str(value)


@given(st.text(max_size=40))
def test_canonical_accepts_exactly_the_dashed_uuid_forms(text):
    try:
        expected = str(uuid.UUID(text)) if len(text) == 36 else None
    except ValueError:
        expected = None
    if expected is not None and [i for i, c in enumerate(text) if c == "-"] != [8, 13, 18, 23]:
        expected = None  # uuid also takes braces, a urn: prefix, dashes anywhere; 014 does not
    assert keyids.canonical(text) == expected


@pytest.mark.parametrize("bad", ["", "not-a-uuid", "{12345678-1234-1234-1234-123456789abc}"])
def test_to_bytes_refuses_what_is_not_a_uuid(bad):
    with pytest.raises(ValueError):
        keyids.to_bytes(bad)
