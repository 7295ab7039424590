"""The card client and the smartcard PSK source through the real PC/SC stack:
pyscard -> pcscd -> vpcd -> the emulated card. Nothing is mocked below pyscard."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest

from hsm.apdu import SW, Command
from hsm.applet import AID, FACTORY_PINS, Ins, Lifecycle, Ref
from hsm.card import Card, CardPskSource, open_card_psk_source
from hsm.errors import (
    CardRemovedError,
    CardStateError,
    PinBlockedError,
    PinError,
    PskError,
    ReaderError,
)
from hsm.pcsc import PcscTransport, list_readers, parse_url
from hsm.psk import kdf, open_psk_source, write_psk_file
from hsm.testing import CardRack, card_events, wait_for_card, wait_for_removal
from tests.hsm.conftest import PORT_A, PORT_B, url_of

PSK = bytes.fromhex("5a" * 16 + "c3" * 16)
PIN, ADMIN, PUK = "246810", "13572468", "97531864"


def personalise(card: Card, psk: bytes = PSK) -> None:
    card.personalise(
        transport_admin_pin=FACTORY_PINS[Ref.ADMIN_PIN],
        psk=bytearray(psk),
        pin=PIN,
        admin_pin=ADMIN,
        puk=PUK,
    )


@pytest.fixture
def card(card_a):
    with Card.open(url_of(card_a)) as c:
        yield c


def pin_file(tmp_path, pin: str = PIN, mode: int = 0o600, name: str = "card.pin"):
    path = tmp_path / name
    path.write_text(pin + "\n")
    path.chmod(mode)
    return path


def test_urls_choose_readers_by_name_prefix_or_index(card_a, card_b):
    readers = list_readers()
    assert readers[:2] == ["Virtual PCD 00 00", "Virtual PCD 00 01"]
    for url, name in [
        ("pcsc://#1", "Virtual PCD 00 01"),
        ("pcsc://Virtual%20PCD%2000%2000", "Virtual PCD 00 00"),
        ("pcsc://Virtual PCD 00 01?pin-file=x", "Virtual PCD 00 01"),
    ]:
        with PcscTransport(url) as transport:
            assert transport.name == name
    assert parse_url("pcsc://#0?pin-env=PIN&slot=2").params == {"pin-env": "PIN", "slot": "2"}
    for url, code in [
        ("pcsc://#7", "HSM-NO-READER"),
        ("pcsc://Virtual", "HSM-NO-READER"),  # two readers match
        ("pcsc://#x", "HSM-URL"),
        ("pcsc://", "HSM-URL"),
        ("file:x", "HSM-URL"),
    ]:
        with pytest.raises(ReaderError) as err:
            PcscTransport(url).close()
        assert err.value.code == code


def test_malformed_apdus_through_pcscd_get_the_iso_status_words(card, card_a):
    personalise(card)
    cases = [
        ("00A404", 0x6700),  # too short for a command
        ("00A4040009F0514B", 0x6700),  # Lc says 9, 3 bytes follow
        ("00B00000", 0x6D00),  # unknown instruction
        ("FFCA0101", 0x6E00),  # invalid class
        ("80CA0101", 0x6E00),  # proprietary class on an ISO instruction
        ("00A4000C023F00", 0x6A86),  # SELECT by file identifier
        ("00CA0101" + "02", 0x6C00 | len(card_a.serial)),  # Le too short: SW2 = available
        ("0020008110" + "31" * 6 + "00" * 10, 0x6A80),  # badly padded PIN block
        ("8030000120", 0x6700),  # DERIVE without data
        ("80300001028100", 0x6982),  # DERIVE without the PIN
        ("0020008510" + "31" * 6 + "FF" * 10, 0x6A88),  # unknown PIN reference
    ]
    with card.transport.transaction():
        card._select()
        for hexstr, sw in cases:
            raw = card.transport.transmit(bytes.fromhex(hexstr))
            assert int.from_bytes(raw, "big") == sw, (hexstr, raw.hex())
    assert card.info().retries["pin"] == (3, 3)  # malformed PIN blocks are not tries


def test_status_of_a_blank_card(card, card_a):
    info = card.info()
    assert info.serial == card_a.serial and info.lifecycle == Lifecycle.BLANK
    assert info.retries == {"pin": (3, 3), "admin-pin": (3, 3), "puk": (5, 5)}
    assert info.to_dict()["slots"] == []


def test_personalised_card_derives_the_psk_kdf_and_refuses_put_key(card):
    personalise(card)
    info = card.info()
    assert info.lifecycle == Lifecycle.PERSONALISED and info.to_dict()["slots"] == [1]
    for context, nonce, n in [
        (b"akms-1|akms-2", os.urandom(16), 32),
        (b"", b"", 64),
        (b"x", b"", 1),
    ]:
        assert card.derive(PIN, context, nonce, n) == kdf(PSK, context, nonce, n)
    put_key = Command(cla=0x80, ins=Ins.PUT_KEY, p1=0x80, p2=2, data=bytes(32)).build()
    with pytest.raises(CardStateError), card.transport.transaction():  # admin PIN verified
        card._select()
        card._verify(Ref.ADMIN_PIN, ADMIN)
        card._send(put_key, "PUT KEY")
    with pytest.raises(CardStateError, match="personalised, not blank"):
        personalise(card)
    assert card.info().retries["admin-pin"] == (3, 3)  # refused before any PIN was presented


def test_wrong_pin_decrements_locks_at_zero_and_the_puk_unblocks(card):
    personalise(card)
    for left in (2, 1, 0):
        with pytest.raises(PinError) as err:
            card.check_pin("000000")
        assert err.value.remaining == left and err.value.sw == 0x63C0 | left
        assert card.info().retries["pin"] == (left, 3)
    with pytest.raises(PinBlockedError):
        card.derive(PIN, b"c", b"n")
    with pytest.raises(PinError) as err:
        card.unblock("00000000", "112233")
    assert err.value.remaining == 4
    card.unblock(PUK, "112233")
    assert card.info().retries == {"pin": (3, 3), "admin-pin": (3, 3), "puk": (5, 5)}
    assert card.derive("112233", b"c", b"n") == kdf(PSK, b"c", b"n")


def test_change_pin_admin_pin_and_puk(card):
    personalise(card)
    card.change_pin(PIN, "999999")
    card.change_pin(ADMIN, "88888888", Ref.ADMIN_PIN)
    card.change_pin(PUK, "77777777", Ref.PUK)
    with pytest.raises(PinError):
        card.change_pin(PIN, "111111")
    card.check_pin("999999")
    card.check_pin("88888888", Ref.ADMIN_PIN)
    card.unblock("77777777")


def test_card_removed_mid_derive_gives_a_clean_error(card, card_a):
    personalise(card)
    card_a.remove_on = lambda apdu: apdu[1] == Ins.DERIVE  # pulled as DERIVE arrives
    with pytest.raises(CardRemovedError) as err:  # not HSM-NO-CARD after a wait to reconnect
        card.derive(PIN, b"ctx", b"nonce")
    assert err.value.code == "HSM-CARD-REMOVED" and "removed" in err.value.message
    with pytest.raises(CardRemovedError):
        card.info()


def test_card_and_file_sources_holding_the_same_psk_derive_identical_keys(card, card_a, tmp_path):
    personalise(card)
    write_psk_file(tmp_path / "peer.psk", PSK)
    pin_file(tmp_path)
    file_source = open_psk_source("file:peer.psk", base=tmp_path)
    card_source = open_psk_source(url_of(card_a, pin_file="card.pin"), base=tmp_path)
    try:
        assert isinstance(card_source, CardPskSource)
        for i in range(5):
            context, nonce = f"akms-1|akms-2|{i}".encode(), os.urandom(32)
            for n in (16, 32, 64):
                assert card_source.derive(context, nonce, n) == file_source.derive(
                    context, nonce, n
                )
    finally:
        file_source.close()
        card_source.close()


def test_psk_source_pin_from_environment(card, card_a, monkeypatch):
    personalise(card)
    monkeypatch.setenv("QKDN_TEST_CARD_PIN", PIN)
    source = open_card_psk_source(url_of(card_a, pin_env="QKDN_TEST_CARD_PIN", slot="1"))
    assert source.derive(b"c", b"n") == kdf(PSK, b"c", b"n")
    source.close()
    with pytest.raises(PskError, match="source closed"):
        source.derive(b"c", b"n")


def test_psk_source_configuration_errors(card, card_a, tmp_path, monkeypatch):
    personalise(card)
    monkeypatch.delenv("QKDN_UNSET_PIN", raising=False)
    monkeypatch.setenv("QKDN_TEST_PIN", PIN)
    cases = [
        (url_of(card_a), "exactly one of pin-file= or pin-env="),
        (url_of(card_a, pin_env="QKDN_UNSET_PIN"), "QKDN_UNSET_PIN is not set"),
        (url_of(card_a, pin_file=tmp_path / "none"), "unreadable"),
        (
            url_of(card_a, pin_file=pin_file(tmp_path, mode=0o644, name="open")),
            "readable by others",
        ),
        (url_of(card_a, pin_file=pin_file(tmp_path), pinfile="x"), "unknown parameter"),
        (url_of(card_a, pin_file=pin_file(tmp_path), slot="2"), "key slot 2 is empty"),
        ("pcsc://#9?pin-env=QKDN_TEST_PIN", "HSM-NO-READER"),
    ]
    for url, fragment in cases:
        with pytest.raises(PskError) as err:
            open_card_psk_source(url, base=tmp_path)
        assert fragment in f"{err.value.code} {err.value}"
        assert PIN not in str(err.value)


def test_psk_source_fails_closed_with_an_alarm(card, card_a, rack, tmp_path, caplog):
    personalise(card)
    url = url_of(card_a, pin_file=pin_file(tmp_path))
    caplog.set_level(logging.CRITICAL, logger="qkdn.hsm.card")
    source = open_card_psk_source(url)
    assert source.derive(b"c", b"n") == kdf(PSK, b"c", b"n")
    card_a.remove_on = lambda apdu: True  # pulled at the next command
    with pytest.raises(PskError) as err:
        source.derive(b"c", b"n")
    assert err.value.code == "HSM-CARD-REMOVED"
    alarm = caplog.records[-1]
    assert alarm.alarm == "psk-card" and alarm.error == "HSM-CARD-REMOVED"
    assert alarm.serial == card_a.serial
    with pytest.raises(PskError) as err:  # still out: no card in the reader
        source.derive(b"c", b"n")
    assert err.value.code == "HSM-NO-CARD"
    rack.fresh(PORT_A, state=card_a.applet.state)  # the same card, inserted again
    assert source.derive(b"c", b"n") == kdf(PSK, b"c", b"n")
    source.close()
    pin_file(tmp_path, "000000")  # a wrong PIN: refused at start, with an alarm
    with pytest.raises(PskError) as err:
        open_card_psk_source(url)
    assert err.value.code == "HSM-PIN" and "2 tries left" in err.value.message


def test_psk_source_never_retries_a_refused_pin(card, card_a, tmp_path):
    personalise(card)
    source = open_card_psk_source(url_of(card_a, pin_file=pin_file(tmp_path)))
    card.change_pin(PIN, "135790")  # someone changed it behind the AKMS's back
    for _ in range(3):
        with pytest.raises(PskError) as err:
            source.derive(b"c", b"n")
        assert err.value.code == "HSM-PIN"
    assert card.info().retries["pin"] == (2, 3)  # one try spent, not three
    source.close()


def test_locked_card_fails_closed(card, card_a, tmp_path):
    personalise(card)
    source = open_card_psk_source(url_of(card_a, pin_file=pin_file(tmp_path)))
    card.lock(ADMIN)
    with pytest.raises(PskError) as err:
        source.derive(b"c", b"n")
    assert err.value.code == "HSM-CARD-STATE"
    source.close()
    with pytest.raises(PskError, match="is locked"):
        open_card_psk_source(url_of(card_a, pin_file=tmp_path / "card.pin"))
    card.terminate(ADMIN)
    assert card.info().lifecycle == Lifecycle.TERMINATED


def test_another_application_resetting_the_card_does_not_break_the_source(card, card_a, tmp_path):
    personalise(card)
    source = open_card_psk_source(url_of(card_a, pin_file=pin_file(tmp_path)))
    for _ in range(3):
        with Card.open(url_of(card_a)) as other:  # closing resets the card
            assert other.info().lifecycle == Lifecycle.PERSONALISED
        assert source.derive(b"c", b"n") == kdf(PSK, b"c", b"n")
    source.close()


def test_two_cards_bootstrap_the_akms_channel_key(card_a, card_b, tmp_path):
    """Each AKMS of a pair derives the channel's epoch-0 key on its own card (issue item 5:
    the KMS side, appliance.kms.channel, is the main developer's); the confirmation tag
    the callee sends matches what the caller computes, from threads as the node calls it."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance.kms import channel

    for virtual in (card_a, card_b):
        with Card.open(url_of(virtual)) as c:
            personalise(c)
    write_psk_file(tmp_path / "file.psk", PSK)
    sources = [
        open_psk_source(url_of(card_a, pin_file=pin_file(tmp_path))),
        open_psk_source(url_of(card_b, pin_file=pin_file(tmp_path, name="b.pin"))),
        open_psk_source(f"file:{tmp_path / 'file.psk'}"),
    ]
    try:
        nonce_a, nonce_b = os.urandom(channel.NONCE_BYTES), os.urandom(channel.NONCE_BYTES)
        ctx = channel.context("akms-1", "akms-2", os.urandom(8).hex())
        with ThreadPoolExecutor(6) as pool:
            keys = list(pool.map(lambda s: s.derive(ctx, nonce_a + nonce_b), sources * 4))
        assert all(k == keys[0] for k in keys)
        tags = {channel.confirmation(k, nonce_a, nonce_b) for k in keys}
        assert len(tags) == 1
    finally:
        for source in sources:
            source.close()


@pytest.mark.skipif(shutil.which("opensc-tool") is None, reason="opensc is not installed")
def test_opensc_tool_selects_our_applet(card_a):
    select = "00:A4:04:00:09:" + ":".join(f"{b:02X}" for b in AID)
    out = subprocess.run(
        ["opensc-tool", "-r", card_a.reader, "-s", select],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Received (SW1=0x90, SW2=0x00)" in out.stdout, out.stdout + out.stderr
    listed = subprocess.run(["opensc-tool", "-l"], capture_output=True, text=True, timeout=30)
    assert card_a.reader in listed.stdout and "Yes" in listed.stdout
    other = subprocess.run(
        ["opensc-tool", "-r", card_a.reader, "-s", "00:A4:04:00:05:A0:00:00:03:08"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "SW1=0x6A, SW2=0x82" in other.stdout


def test_emulator_subprocess_keeps_its_state_across_restarts(rack, tmp_path):
    """``qkdn card emulate --state DIR``: PSK, PINs and counters survive a restart."""
    rack.release(PORT_B)
    state = tmp_path / "card-b"
    command = [sys.executable, "-m", "appliance.cli", "card", "emulate", "--port", str(PORT_B)]
    command += ["--state", str(state), "--serial", "QKDN-TEST-B"]
    reader = "Virtual PCD 00 01"

    def start() -> tuple[subprocess.Popen[str], int]:
        """The emulator process, and pcscd's event count once it saw the card."""
        before = card_events(reader)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and "QKDN-TEST-B" in proc.stdout.readline()
            return proc, wait_for_card(reader, after=before)
        except BaseException:
            proc.kill()
            proc.wait()
            raise

    proc, seen = start()
    try:
        with Card.open(f"pcsc://{reader}") as c:
            personalise(c)
            with pytest.raises(PinError):
                c.check_pin("000000")
        assert oct((state / "card.json").stat().st_mode & 0o777) == "0o600"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    wait_for_removal(reader, after=seen)
    proc, seen = start()
    try:
        with Card.open(f"pcsc://{reader}") as c:
            info = c.info()
            assert (info.serial, info.lifecycle) == ("QKDN-TEST-B", Lifecycle.PERSONALISED)
            assert info.retries["pin"] == (2, 3)
            assert c.derive(PIN, b"c", b"n") == kdf(PSK, b"c", b"n")
        second = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "[HSM-EMU-BUSY]" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    wait_for_removal(reader, after=seen)


def test_a_card_replaced_at_once_is_the_card_pcscd_sees(rack):
    """A slot takes its next card right after the last one goes: pulled by the rack, pulled
    mid-command, or left in by a closed rack (a module's end). The next card must be the one
    pcscd powers and reads (issue 13 item 23: a probe of a pulled card made vpcd drop it
    unseen by pcscd's poller, which then never powered the next card: "no card in reader")."""

    def serial_read(url: str) -> str:
        with Card.open(url) as c:
            return c.info().serial

    for _ in range(2):
        rack.release(PORT_A)
        card = rack.fresh(PORT_A)
        assert serial_read(url_of(card)) == card.serial
    card.remove_on = lambda apdu: True  # pulled at its next command
    with pytest.raises(CardRemovedError):
        serial_read(url_of(card))
    card = rack.fresh(PORT_A)
    assert serial_read(url_of(card)) == card.serial
    rack.close()
    other = CardRack()
    try:
        card = other.fresh(PORT_A)
        assert serial_read(url_of(card)) == card.serial
    finally:
        other.close()


def test_sw_constants_match_the_wire():
    assert SW.OK == 0x9000 and SW.CONDITIONS_NOT_SATISFIED == 0x6985
