"""The AKMS-AKMS channel (sans-IO): PSK bootstrap, tags, re-keying from QKDN keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.kms import channel
from appliance.kms.channel import CalleeChannel, CallerChannel
from appliance.kms.errors import IntegrityFailure, ProtocolError, UnknownChannel
from hsm.psk import FilePskSource, write_psk_file

PATH = "/v1/cn"


def sources(tmp_path: Path, same: bool = True) -> tuple[FilePskSource, FilePskSource]:
    psk = os.urandom(32)
    write_psk_file(tmp_path / "a.hex", psk)
    write_psk_file(tmp_path / "b.hex", psk if same else os.urandom(32))
    return FilePskSource(tmp_path / "a.hex"), FilePskSource(tmp_path / "b.hex")


def open_pair(tmp_path: Path, same: bool = True) -> tuple[CallerChannel, CalleeChannel, str]:
    """What the two nodes do at /v1/channel/open, minus the transport."""
    psk_a, psk_b = sources(tmp_path, same)
    nonce_a, nonce_b, channel_id = os.urandom(16), os.urandom(16), os.urandom(8).hex()
    ctx = channel.context("akms-berlin", "akms-bonn", channel_id)
    key_b = psk_b.derive(ctx, nonce_a + nonce_b)
    confirm = channel.confirmation(key_b, nonce_a, nonce_b)
    key_a = psk_a.derive(ctx, nonce_a + nonce_b)
    return (
        CallerChannel(channel_id, key_a),
        CalleeChannel(channel_id, {0: key_b}),
        confirm if channel.confirmation(key_a, nonce_a, nonce_b) == confirm else "",
    )


def exchange(a: CallerChannel, b: CalleeChannel, body: bytes = b'{"n":1}') -> int:
    epoch = b.verify_request(PATH, body, a.tag_request(PATH, body))
    a.check_response(PATH, b"answer", b.tag_response(epoch, PATH, b"answer"))
    return epoch


def test_both_ends_derive_the_same_key_and_tags_verify(tmp_path):
    a, b, confirmed = open_pair(tmp_path)
    assert confirmed
    assert exchange(a, b) == 0


def test_another_psk_fails_the_confirmation_and_the_tags(tmp_path):
    a, b, confirmed = open_pair(tmp_path, same=False)
    assert not confirmed
    with pytest.raises(IntegrityFailure):
        b.verify_request(PATH, b"{}", a.tag_request(PATH, b"{}"))


def test_tampered_body_path_or_tag_is_an_integrity_failure(tmp_path):
    a, b, _ = open_pair(tmp_path)
    header = a.tag_request(PATH, b'{"number":1}')
    with pytest.raises(IntegrityFailure):
        b.verify_request(PATH, b'{"number":9}', header)
    with pytest.raises(IntegrityFailure):
        b.verify_request("/v1/ksa", b'{"number":1}', header)
    with pytest.raises(IntegrityFailure):
        b.verify_request(PATH, b'{"number":1}', header[:-1] + ("0" if header[-1] != "0" else "1"))
    epoch = b.verify_request(PATH, b"{}", a.tag_request(PATH, b"{}"))
    with pytest.raises(IntegrityFailure):  # a request tag is not a response tag
        a.check_response(PATH, b"{}", a.tag_request(PATH, b"{}"))
    a.check_response(PATH, b"{}", b.tag_response(epoch, PATH, b"{}"))


def test_unknown_channel_or_epoch_asks_for_a_new_open(tmp_path):
    a, b, _ = open_pair(tmp_path)
    other = CalleeChannel("feedfeedfeedfeed", {0: bytearray(32)})
    with pytest.raises(UnknownChannel):
        other.verify_request(PATH, b"{}", a.tag_request(PATH, b"{}"))
    with pytest.raises(ProtocolError):
        b.verify_request(PATH, b"{}", "no-header")
    with pytest.raises(UnknownChannel):
        b.verify_request(PATH, b"{}", f"{a.channel_id};7;00")


def test_rekey_moves_both_ends_on_and_retires_old_keys(tmp_path):
    a, b, _ = open_pair(tmp_path)
    assert a.needs_rekey()  # the PSK-derived key protects only the first re-key
    old_header = a.tag_request(PATH, b"in flight")
    new_key = os.urandom(32)
    b.add_next(0, bytearray(new_key))  # AKMS B answers the re-key request
    a.rekey(bytearray(new_key))  # AKMS A opens the answer (relayed under a CN key)
    assert a.epoch == 1 and not a.needs_rekey()
    assert b.verify_request(PATH, b"in flight", old_header) == 0  # sent before the re-key
    assert exchange(a, b) == 1
    for epoch in (2, 3):
        key = os.urandom(32)
        b.add_next(epoch - 1, bytearray(key))
        a.rekey(bytearray(key))
        assert exchange(a, b) == epoch
    with pytest.raises(UnknownChannel):  # epoch 0 (the PSK-derived key) is erased
        b.verify_request(PATH, b"in flight", old_header)
    assert set(b.keys) == {2, 3}


def test_a_lost_rekey_answer_is_asked_again(tmp_path):
    a, b, _ = open_pair(tmp_path)
    b.add_next(0, bytearray(os.urandom(32)))  # the answer never reached A
    again = os.urandom(32)
    b.add_next(0, bytearray(again))
    a.rekey(bytearray(again))
    assert exchange(a, b) == 1
    with pytest.raises(ProtocolError):
        b.add_next(5, bytearray(32))


def test_rekey_is_due_after_many_requests(tmp_path, monkeypatch):
    monkeypatch.setattr(channel, "REKEY_AFTER", 3)
    a, b, _ = open_pair(tmp_path)
    b.add_next(0, bytearray(b"k" * 32))
    a.rekey(bytearray(b"k" * 32))
    for _ in range(3):
        assert not a.needs_rekey()
        exchange(a, b)
    assert a.needs_rekey()
    a.close()
    b.close()
    assert b.keys == {}
