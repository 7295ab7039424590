"""Enrollment helpers without a card: zeroising, key check values, secrets files, and the
signed audit record (canonical form, tampering, key types)."""

from __future__ import annotations

import json
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hsm.enroll import (
    CardSecrets,
    append_record,
    canonical,
    kcv,
    load_public_key,
    load_signing_key,
    read_records,
    scrub_bytes,
    sign_record,
    verify_record,
)
from hsm.errors import HsmError
from hsm.psk import kdf


def test_scrub_bytes_overwrites_a_fresh_bytes_object():
    data = os.urandom(32)
    scrub_bytes(data)
    assert data == bytes(32)
    short = b"\x07"  # shared singletons are left alone
    scrub_bytes(short)
    assert short == b"\x07"


def test_kcv_is_the_head_of_the_kcv_derivation():
    psk = bytes(range(32))
    assert kcv(psk) == kdf(psk, b"qkdn-kcv", b"")[:3].hex().upper()
    assert len(kcv(psk)) == 6 and kcv(psk) != kcv(bytes(32))


def write(tmp_path, name, text, mode=0o600):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secrets_files(tmp_path):
    ok = write(tmp_path, "ok", "pin=123456\n\nadmin-pin = 1234abcd\npuk=zzzzzzzz\n")
    secrets = CardSecrets.from_file(ok)
    assert (secrets.pin, secrets.admin_pin, secrets.puk) == (b"123456", b"1234abcd", b"zzzzzzzz")
    secrets.wipe()
    assert secrets.pin == bytes(6)
    for text, fragment in [
        ("pin=123456\npin=123456\nadmin-pin=12345678\npuk=12345678\n", "one line each"),
        ("pin=123456\nadmin=12345678\npuk=12345678\n", "one line each"),
        ("pin 123456\n", "one line each"),
        ("pin=123456\npuk=12345678\n", "missing admin-pin"),
        ("pin=123456\nadmin-pin=123456\npuk=12345678\n", "must differ"),
        ("pin=123456\nadmin-pin=12345678\npuk=1234567890123456789\n", "puk: a PIN is 6 to 16"),
    ]:
        with pytest.raises(HsmError, match=fragment):
            CardSecrets.from_file(write(tmp_path, "bad", text))


def test_signed_records_verify_and_tampering_is_caught(tmp_path):
    key = Ed25519PrivateKey.generate()
    record = {"type": "qkdn-card-enrollment", "operator": "alice", "kcv": "A1B2C3", "n": 1}
    signed = sign_record(record, key)
    assert verify_record(signed, key.public_key()) == record
    assert (
        canonical(record)
        == b'{"kcv":"A1B2C3","n":1,"operator":"alice","type":"qkdn-card-enrollment"}'
    )
    for forged in (
        {**signed, "operator": "mallory"},
        {**signed, "extra": True},
        {**signed, "signature": {**signed["signature"], "value": "AAAA"}},
        {**signed, "signature": {**signed["signature"], "alg": "none"}},
        record,
    ):
        with pytest.raises(HsmError) as err:
            verify_record(forged, key.public_key())
        assert err.value.code == "HSM-AUDIT"
    with pytest.raises(HsmError, match="does not verify"):
        verify_record(signed, Ed25519PrivateKey.generate().public_key())

    log = tmp_path / "audit.jsonl"
    append_record(log, signed)
    append_record(log, sign_record({**record, "n": 2}, key))
    assert [r["n"] for r in read_records(log)] == [1, 2]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(signed, indent=2))
    assert read_records(single)[0] == signed


def test_key_files(tmp_path):
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "k.pem").write_bytes(pem)
    assert load_signing_key(tmp_path / "k.pem").public_key() == key.public_key()
    assert load_public_key(tmp_path / "k.pem") == key.public_key()  # the private PEM will do
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "p256.pem").write_bytes(p256)
    for loader in (load_signing_key, load_public_key):
        with pytest.raises(HsmError, match="not an Ed25519 key"):
            loader(tmp_path / "p256.pem")
