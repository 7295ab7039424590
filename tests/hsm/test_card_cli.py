"""``qkdn card``: the enrollment ceremony end to end through pcscd, the signed audit record,
status/change-pin/unblock/lock/terminate, and one-line errors with codes."""

from __future__ import annotations

import base64
import getpass
import io
import json
import logging
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import qrng
from hsm.applet import FACTORY_PINS, Ref
from hsm.card import KCV_CONTEXT, Card, open_card_psk_source
from hsm.enroll import kcv
from hsm.psk import kdf
from tests.cli_run import run
from tests.hsm.conftest import url_of

SECRETS_A = {"pin": "111222", "admin-pin": "a-admin-77", "puk": "a-puk-9999"}
SECRETS_B = {"pin": "333444", "admin-pin": "b-admin-88", "puk": "b-puk-0000"}


def one_line_error(err: str, code: str) -> str:
    assert err.startswith(f"qkdn: error [{code}]: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(autouse=True)
def own_generator(monkeypatch):
    """Each test opens the node's one PTG.3 generator afresh."""
    monkeypatch.setattr(qrng, "_node", None)


@pytest.fixture
def station(tmp_path):
    """The enrollment station's files: signing key, public key, PIN files."""
    key = Ed25519PrivateKey.generate()
    (tmp_path / "station.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "station.pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for name, secrets in (("a.pins", SECRETS_A), ("b.pins", SECRETS_B)):
        path = tmp_path / name
        path.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
        path.chmod(0o600)
    return tmp_path


def secret_file(tmp_path, name: str, value: str, mode: int = 0o600):
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(mode)
    return str(path)


def enroll_args(card_a, card_b, station, *extra: str) -> list[str]:
    return [
        "card",
        "enroll",
        "--pair",
        "akms-1",
        "akms-2",
        "--card-a",
        url_of(card_a),
        "--card-b",
        url_of(card_b),
        "--pins-a",
        str(station / "a.pins"),
        "--pins-b",
        str(station / "b.pins"),
        "--signing-key",
        str(station / "station.pem"),
        "--audit",
        str(station / "audit.jsonl"),
        "--operator",
        "alice",
        *extra,
    ]


def test_enrollment_end_to_end(capsys, card_a, card_b, station, caplog):
    caplog.set_level(logging.DEBUG)
    status, out, err = run(capsys, "--log-level", "debug", *enroll_args(card_a, card_b, station))
    assert status == 0, err  # its duration (target < 2 s) is measured by bench/card_derive.py
    assert "enrolled akms-1 (card" in out and "PSK zeroised" in out

    # both cards hold one PSK (read from the emulators' insides: the test oracle)
    psk_a, psk_b = card_a.applet.state.slots[0], card_b.applet.state.slots[0]
    assert psk_a is not None and psk_a == psk_b and any(psk_a)
    audit = (station / "audit.jsonl").read_text()
    record = json.loads(audit)
    assert record["kcv"] == kcv(psk_a)
    assert record["cards"] == {
        "a": {"serial": card_a.serial, "reader": card_a.reader},
        "b": {"serial": card_b.serial, "reader": card_b.reader},
    }
    assert record["operator"] == "alice" and record["pair"] == {"a": "akms-1", "b": "akms-2"}
    assert record["signature"]["alg"] == "Ed25519" and record["rng"].startswith("PTG.3")

    # never the key, in any form, anywhere
    haystack = "\n".join([out, err, audit, caplog.text, *(str(r.__dict__) for r in caplog.records)])
    raw = bytes(psk_a)
    for form in (raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()):
        assert form not in haystack
    for secret in [*SECRETS_A.values(), *SECRETS_B.values()]:
        assert secret not in haystack

    # the AKMS pair's sources agree, each card with its own PIN
    (station / "a.pin").write_text(SECRETS_A["pin"])
    (station / "b.pin").write_text(SECRETS_B["pin"])
    for name in ("a.pin", "b.pin"):
        (station / name).chmod(0o600)
    a = open_card_psk_source(url_of(card_a, pin_file=station / "a.pin"))
    b = open_card_psk_source(url_of(card_b, pin_file=station / "b.pin"))
    try:
        assert a.derive(b"akms-1|akms-2", b"n1n2") == b.derive(b"akms-1|akms-2", b"n1n2")
        assert a.derive(KCV_CONTEXT, b"")[:3].hex().upper() == record["kcv"]
        assert a.derive(b"x", b"y") == kdf(psk_a, b"x", b"y")
    finally:
        a.close()
        b.close()

    # the record verifies; a changed record or another key does not
    pub = str(station / "station.pub.pem")
    status, out, _ = run(
        capsys, "card", "audit-verify", str(station / "audit.jsonl"), "--public-key", pub
    )
    assert status == 0 and "1 record(s) signed by key" in out and record["kcv"] in out
    forged = dict(record, operator="mallory")
    (station / "forged.json").write_text(json.dumps(forged))
    status, _, err = run(
        capsys, "card", "audit-verify", str(station / "forged.json"), "--public-key", pub
    )
    assert status == 1 and "does not verify" in one_line_error(err, "HSM-AUDIT")

    # a second ceremony on the same cards is refused before anything is touched
    status, _, err = run(capsys, *enroll_args(card_a, card_b, station))
    assert "is personalised: only blank cards" in one_line_error(err, "HSM-ENROLL")
    assert card_a.applet.state.slots[0] == psk_a


@pytest.mark.skipif(
    not (shutil.which("jq") and shutil.which("openssl")), reason="needs jq, openssl"
)
def test_audit_record_verifies_by_hand_with_openssl(capsys, card_a, card_b, station):
    """The procedure documented in hsm/enroll.py, run as written."""
    assert run(capsys, *enroll_args(card_a, card_b, station))[0] == 0
    script = """set -e
    sed -n 1p audit.jsonl > rec.json
    jq -cS 'del(.signature)' rec.json | tr -d '\\n' > body
    jq -r .signature.value rec.json | base64 -d > sig
    openssl pkeyutl -verify -pubin -inkey station.pub.pem -rawin -in body -sigfile sig
    """
    result = subprocess.run(["bash", "-c", script], cwd=station, capture_output=True, text=True)
    assert result.returncode == 0 and "Signature Verified Successfully" in result.stdout
    (station / "audit.jsonl").write_text(
        (station / "audit.jsonl").read_text().replace('"alice"', '"mallory"')
    )
    result = subprocess.run(["bash", "-c", script], cwd=station, capture_output=True, text=True)
    assert result.returncode != 0


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_enrollment_prompts_with_hidden_entry(
    capsys, card_a, card_b, station, monkeypatch
):
    answers = iter(
        [v for v in SECRETS_A.values() for _ in range(2)]
        + [v for v in SECRETS_B.values() for _ in range(2)]
    )
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    monkeypatch.setattr("sys.stdin", Terminal())
    args = [a for a in enroll_args(card_a, card_b, station) if not a.endswith(".pins")]
    args = [a for a in args if a not in ("--pins-a", "--pins-b")]
    status, _, err = run(capsys, *args)
    assert status == 0, err
    assert prompts[:2] == ["card A new PIN: ", "card A new PIN (again): "] and len(prompts) == 12
    with Card.open(url_of(card_b)) as card:
        card.check_pin(SECRETS_B["pin"])


def test_enrollment_refusals(capsys, card_a, card_b, station, tmp_path):
    def file(name: str, value: str, mode: int = 0o600) -> str:
        return secret_file(tmp_path, name, value, mode)

    cases = [
        (["--transport-pin-file", file("t", "00000000")], "HSM-PIN", "nothing was written"),
        (["--card-b", url_of(card_a)], "USAGE", "same reader"),
        (["--signing-key", file("k.pem", "nope")], "HSM-AUDIT-KEY", "unreadable"),
        (["--pins-b", file("p", "pin=111111")], "HSM-PIN-FILE", "missing admin-pin, puk"),
        (["--pins-b", file("q", "pin=111")], "HSM-PIN-FILE", "missing"),
        (["--pins-a", file("r", "pin=1", 0o644)], "HSM-PIN-FILE", "readable by others"),
    ]
    for extra, code, fragment in cases:
        status, _, err = run(capsys, *enroll_args(card_a, card_b, station), *extra)
        assert status == 1 and fragment in one_line_error(err, code)
    assert card_a.applet.state.slots == [None] * 4 and card_b.applet.state.slots == [None] * 4
    short = secret_file(tmp_path, "s", "pin=123\nadmin-pin=12345678\npuk=12345678")
    status, _, err = run(capsys, *enroll_args(card_a, card_b, station), "--pins-a", short)
    assert "pin: a PIN is 6 to 16 printable ASCII characters" in one_line_error(
        err, "HSM-PIN-FORMAT"
    )


def personalise(card_url: str) -> None:
    with Card.open(card_url) as card:
        card.personalise(
            transport_admin_pin=FACTORY_PINS[Ref.ADMIN_PIN],
            psk=bytearray(range(32)),
            pin="111222",
            admin_pin="22223333",
            puk="33334444",
        )


def test_status_change_pin_unblock_lock_terminate(capsys, card_a, card_b, tmp_path):
    url = url_of(card_a)
    personalise(url)
    status, out, _ = run(capsys, "card", "status", "--json")
    doc = json.loads(out)
    assert status == 0 and [r["reader"] for r in doc["readers"]][:2] == [
        card_a.reader,
        card_b.reader,
    ]
    assert doc["readers"][0]["card"]["lifecycle"] == "personalised"
    assert doc["readers"][1]["card"]["lifecycle"] == "blank"
    status, out, _ = run(capsys, "card", "status")
    assert status == 0 and card_a.serial in out and "personalised" in out and "3/3" in out

    old, new = secret_file(tmp_path, "old", "111222"), secret_file(tmp_path, "new", "999888")
    args = ["card", "change-pin", "--reader", url, "--old-pin-file", old, "--new-pin-file", new]
    assert run(capsys, *args)[0] == 0
    status, _, err = run(capsys, *args)  # the old PIN no longer works
    assert status == 1 and "wrong PIN, 2 tries left" in one_line_error(err, "HSM-PIN")
    for _ in range(2):
        run(capsys, *args)
    status, _, err = run(capsys, *args)
    assert status == 1 and "the PIN is blocked" in one_line_error(err, "HSM-PIN-BLOCKED")

    puk = secret_file(tmp_path, "puk", "33334444")
    status, out, err = run(
        capsys, "card", "unblock", "--reader", url, "--puk-file", puk, "--new-pin-file", old
    )
    assert status == 0 and "(3/3 tries)" in out, err
    with Card.open(url) as card:
        card.check_pin("111222")

    admin = secret_file(tmp_path, "admin", "22223333")
    status, out, _ = run(
        capsys, "card", "lock", "--reader", url, "--admin-pin-file", admin, "--yes"
    )
    assert status == 0 and "locked" in out
    status, _, err = run(capsys, "card", "lock", "--reader", url, "--admin-pin-file", admin)
    assert status == 1 and "needs --yes" in one_line_error(err, "USAGE")
    status, out, _ = run(
        capsys, "card", "terminate", "--reader", url, "--admin-pin-file", admin, "--yes"
    )
    assert status == 0 and "terminated" in out
    status, out, _ = run(capsys, "card", "status", "--reader", url, "--json")
    assert json.loads(out)["readers"][0]["card"]["lifecycle"] == "terminated"


def test_one_line_errors(capsys, card_a, tmp_path):
    reader = url_of(card_a)
    bad_pin = ["--old-pin-file", secret_file(tmp_path, "o", "123")]
    bad_pin += ["--new-pin-file", secret_file(tmp_path, "n", "654321")]
    open_puk = secret_file(tmp_path, "p", "12345678", 0o640)
    nowhere = str(tmp_path / "none")
    cases = [
        (["card", "status", "--reader", "pcsc://Nowhere"], "HSM-NO-READER", "no reader 'Nowhere'"),
        (["card", "status", "--reader", "pcsc://#x"], "HSM-URL", "#0, #1"),
        (["card", "change-pin", "--reader", reader], "USAGE", "no terminal"),
        (["card", "unblock", "--puk-file", open_puk], "HSM-PIN-FILE", "readable by others"),
        (["card", "change-pin", "--reader", reader, *bad_pin], "HSM-PIN-FORMAT", "6 to 16"),
        (["card", "audit-verify", nowhere, "--public-key", nowhere], "HSM-AUDIT-KEY", "unreadable"),
    ]
    for argv, code, fragment in cases:
        status, _, err = run(capsys, *argv)
        assert status == 1 and fragment in one_line_error(err, code)
    status, _, err = run(capsys, "card", "enroll")
    assert status == 2 and "[USAGE]" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv", [["card", "--help"], ["card", "enroll", "--help"], ["card", "emulate", "--help"]]
)
def test_card_help_teaches(capsys, argv):
    status, out, _ = run(capsys, *argv)
    assert status == 0 and "usage: qkdn card" in out
    if "--help" in argv[-1:] and len(argv) == 3:
        assert "example" in out
