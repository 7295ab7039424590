"""KSA batches under a CN key: round trip, every byte authenticated, IDs in clear."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kms import ksa
from appliance.kms.errors import IntegrityFailure
from appliance.kms.relay import Mode


def batch(count: int, size: int = 32) -> list[tuple[str, bytes]]:
    return [(str(uuid.uuid4()), os.urandom(size)) for _ in range(count)]


def seal(mode: Mode, keys, request_id: bytes) -> tuple[bytes, bytearray]:
    cn_key = bytearray(os.urandom(ksa.cn_key_bytes(mode, len(keys), len(keys[0][1]))))
    kept = bytearray(cn_key)
    return ksa.seal_batch(mode, cn_key, request_id, ksa.encode_batch(keys)), kept


@pytest.mark.parametrize("mode", list(Mode))
def test_round_trip_erases_the_cn_key_and_the_batch(mode):
    keys, rid = batch(7), os.urandom(16)
    cn_key = bytearray(os.urandom(ksa.cn_key_bytes(mode, 7, 32)))
    kept, encoded = bytearray(cn_key), ksa.encode_batch(keys)
    sealed = ksa.seal_batch(mode, cn_key, rid, encoded)
    assert not any(cn_key) and not any(encoded)
    opened = ksa.decode_batch(ksa.open_batch(mode, kept, rid, sealed))
    assert opened == [(i, bytearray(k)) for i, k in keys] and not any(kept)


@pytest.mark.parametrize("mode", list(Mode))
def test_every_byte_and_the_request_id_are_authenticated(mode):
    keys, rid = batch(3), os.urandom(16)
    sealed, cn_key = seal(mode, keys, rid)
    for pos in range(len(sealed)):
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityFailure):
            ksa.open_batch(mode, bytearray(cn_key), rid, bytes(bad))
    with pytest.raises(IntegrityFailure):
        ksa.open_batch(mode, bytearray(cn_key), os.urandom(16), sealed)
    with pytest.raises(IntegrityFailure):
        ksa.open_batch(mode, bytearray(cn_key), rid, sealed[:-1])


def test_ids_travel_in_clear_and_otp_spends_pad_on_key_bits_only():
    keys = batch(128)
    sealed, _ = seal(Mode.OTP, keys, os.urandom(16))
    assert all(uuid.UUID(i).bytes in sealed for i, _ in keys)
    assert not any(k in sealed for _, k in keys)
    pad = ksa.cn_key_bytes(Mode.OTP, 128, 32)
    assert pad == 128 * 32 + 32 and 128 * 32 / pad > 0.99


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(list(Mode)))
def test_garbage_never_opens(data, mode):
    with pytest.raises(IntegrityFailure):
        ksa.open_batch(mode, bytearray(os.urandom(64)), os.urandom(16), data)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 64))
def test_hand_packed_batches_equal_the_declared_layout(count, size):
    keys = batch(count, size)
    encoded = ksa.encode_batch(keys)
    built = ksa.BATCH.build(
        {"size": size, "entries": [{"key_id": uuid.UUID(i).bytes, "key": k} for i, k in keys]}
    )
    assert bytes(encoded) == built
    parsed = ksa.BATCH.parse(built)
    assert ksa.decode_batch(encoded) == [
        (str(uuid.UUID(bytes=e.key_id)), bytearray(e.key)) for e in parsed.entries
    ]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_malformed_batches_are_protocol_errors_or_parse(data):
    """Any input either parses into keys that re-encode to it, or is a ProtocolError."""
    from appliance.kms.errors import ProtocolError

    try:
        keys = ksa.decode_batch(data)
    except ProtocolError:
        return
    assert bytes(ksa.encode_batch(keys)) == data
