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
