"""The card applet, sans-IO: lifecycle, retry counters, PUK, status words, and fuzzing that
shows no response ever carries the PSK (exhaustive over CLA x INS, then Hypothesis)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hsm.apdu import SW, Command, Response, build_tlv, parse_response
from hsm.applet import (
    AID,
    ATR,
    FACTORY_PINS,
    RULES,
    TRANSITIONS,
    Applet,
    CardState,
    Ins,
    Lifecycle,
    Ref,
    pin_block,
)
from hsm.errors import HsmError
from hsm.psk import kdf

PSK = bytes(range(0xA0, 0xC0))
PIN, ADMIN, PUK = "246810", "13572468", "97531864"


class Session:
    """One applet and a few shorthands (every call goes through APDU bytes)."""

    def __init__(self, state: CardState | None = None) -> None:
        self.applet = Applet(state or CardState.blank("T-0001"))
        self.responses: list[bytes] = []

    def send(self, cla: int, ins: int, p1: int = 0, p2: int = 0, data: bytes = b"", le=None):
        raw = self.applet.process(Command(cla=cla, ins=ins, p1=p1, p2=p2, data=data, le=le).build())
        self.responses.append(raw)
        return parse_response(raw)

    def sw(self, *args, **kwargs) -> int:
        return self.send(*args, **kwargs).sw

    def select(self) -> int:
        return self.sw(0x00, Ins.SELECT, 0x04, 0x0C, AID)

    def verify(self, ref: Ref, pin: str) -> int:
        return self.sw(0x00, Ins.VERIFY, 0x00, ref, bytes(pin_block(pin)))

    def derive(self, context=b"ctx", nonce=b"nonce", le=None, slot=1) -> Response:
        body = build_tlv(0x81, context) + build_tlv(0x82, nonce)
        return self.send(0x80, Ins.DERIVE, 0, slot, body, le)

    def get(self, tag: int) -> bytes:
        r = self.send(0x00, Ins.GET_DATA, tag >> 8, tag & 0xFF)
        assert r.ok
        return r.data


def personalise(s: Session, psk: bytes = PSK) -> None:
    assert s.select() == SW.OK
    assert s.verify(Ref.ADMIN_PIN, FACTORY_PINS[Ref.ADMIN_PIN]) == SW.OK
    assert s.sw(0x00, Ins.CHANGE_REFERENCE_DATA, 0x01, Ref.USER_PIN, bytes(pin_block(PIN))) == SW.OK
    assert s.sw(0x00, Ins.CHANGE_REFERENCE_DATA, 0x01, Ref.PUK, bytes(pin_block(PUK))) == SW.OK
    old_new = bytes(pin_block(FACTORY_PINS[Ref.ADMIN_PIN]) + pin_block(ADMIN))
    assert s.sw(0x00, Ins.CHANGE_REFERENCE_DATA, 0x00, Ref.ADMIN_PIN, old_new) == SW.OK
    assert s.sw(0x80, Ins.PUT_KEY, 0x80, 1, psk) == SW.OK


@pytest.fixture
def card() -> Session:
    s = Session()
    personalise(s)
    return s


def test_personalised_card_derives_exactly_the_psk_kdf(card):
    assert card.get(0x0102) == bytes([Lifecycle.PERSONALISED])
    assert card.get(0x0104) == b"\x01\x00\x00\x00"
    assert card.derive().sw == SW.SECURITY_STATUS_NOT_SATISFIED
    assert card.verify(Ref.USER_PIN, PIN) == SW.OK
    for context, nonce, le in [
        (b"ctx", b"nonce", None),
        (b"", b"", 1),
        (b"c" * 128, b"n" * 64, 64),
    ]:
        r = card.derive(context, nonce, le)
        assert r.ok and r.data == bytes(kdf(PSK, context, nonce, le or 32))


def test_wrong_pin_decrements_blocks_at_zero_and_puk_unblocks(card):
    retries = lambda: card.get(0x0103)[1]  # noqa: E731 - (ref, left, max) rows, user first
    for left in (2, 1, 0):
        assert card.verify(Ref.USER_PIN, "000000") == SW.VERIFY_FAILED | left
        assert retries() == left
    assert card.verify(Ref.USER_PIN, PIN) == SW.AUTH_METHOD_BLOCKED  # even the right PIN
    assert card.sw(0x00, Ins.VERIFY, 0, Ref.USER_PIN) == SW.AUTH_METHOD_BLOCKED
    assert card.derive().sw == SW.SECURITY_STATUS_NOT_SATISFIED
    wrong_puk = bytes(pin_block("00000000") + pin_block("111111"))
    assert card.sw(0x00, Ins.RESET_RETRY_COUNTER, 0, Ref.USER_PIN, wrong_puk) == 0x63C4
    good = bytes(pin_block(PUK) + pin_block("111111"))
    assert card.sw(0x00, Ins.RESET_RETRY_COUNTER, 0, Ref.USER_PIN, good) == SW.OK
    assert card.get(0x0103) == bytes([0x81, 3, 3, 0x83, 3, 3, 0x82, 5, 5])
    assert card.verify(Ref.USER_PIN, PIN) == 0x63C2  # the old PIN is gone
    assert card.verify(Ref.USER_PIN, "111111") == SW.OK and card.derive().ok


def test_puk_alone_resets_the_counter_and_a_blocked_puk_stays_blocked(card):
    for _ in range(3):
        card.verify(Ref.USER_PIN, "000000")
    assert card.sw(0x00, Ins.RESET_RETRY_COUNTER, 1, Ref.USER_PIN, bytes(pin_block(PUK))) == SW.OK
    assert card.verify(Ref.USER_PIN, PIN) == SW.OK
    for left in range(4, -1, -1):
        bad = bytes(pin_block("00000000"))
        assert card.sw(0x00, Ins.RESET_RETRY_COUNTER, 1, Ref.USER_PIN, bad) == 0x63C0 | left
    good = bytes(pin_block(PUK))
    assert card.sw(0x00, Ins.RESET_RETRY_COUNTER, 1, Ref.USER_PIN, good) == SW.AUTH_METHOD_BLOCKED


def test_admin_pin_has_its_own_reference_and_counter(card):
    assert card.verify(Ref.ADMIN_PIN, PIN) == 0x63C2  # the user PIN is not the admin PIN
    assert card.verify(Ref.USER_PIN, ADMIN) == 0x63C2
    assert card.get(0x0103) == bytes([0x81, 2, 3, 0x83, 2, 3, 0x82, 5, 5])
    assert card.verify(Ref.ADMIN_PIN, ADMIN) == SW.OK
    assert card.derive().sw == SW.SECURITY_STATUS_NOT_SATISFIED  # admin does not derive


def test_put_key_after_personalisation_is_refused(card):
    assert card.verify(Ref.ADMIN_PIN, ADMIN) == SW.OK
    for p1, slot in itertools.product((0x00, 0x80), (1, 2, 4)):
        assert card.sw(0x80, Ins.PUT_KEY, p1, slot, bytes(32)) == SW.CONDITIONS_NOT_SATISFIED
    assert card.verify(Ref.USER_PIN, PIN) == SW.OK
    assert card.derive().data == bytes(kdf(PSK, b"ctx", b"nonce"))


def test_personalisation_needs_admin_and_new_pins():
    s = Session()
    assert s.select() == SW.OK
    assert s.sw(0x80, Ins.PUT_KEY, 0x80, 1, PSK) == SW.SECURITY_STATUS_NOT_SATISFIED
    assert s.verify(Ref.ADMIN_PIN, FACTORY_PINS[Ref.ADMIN_PIN]) == SW.OK
    assert s.sw(0x80, Ins.PUT_KEY, 0x80, 1, PSK) == SW.CONDITIONS_NOT_SATISFIED  # factory PINs
    assert s.get(0x0104) == bytes(4)  # ...and nothing was stored
    assert s.sw(0x80, Ins.PUT_KEY, 0x00, 2, PSK) == SW.OK  # a non-final key may go in
    assert s.sw(0x80, Ins.PUT_KEY, 0x00, 2, PSK) == SW.CONDITIONS_NOT_SATISFIED  # not twice
    assert s.verify(Ref.USER_PIN, FACTORY_PINS[Ref.USER_PIN]) == SW.OK
    assert s.derive(slot=2).sw == SW.CONDITIONS_NOT_SATISFIED  # blank cards do not derive


def test_select_and_verify_reset_clear_the_security_status(card):
    assert card.verify(Ref.USER_PIN, PIN) == SW.OK
    assert card.sw(0x00, Ins.VERIFY, 0, Ref.USER_PIN) == SW.OK  # status query: verified
    assert card.sw(0x00, Ins.VERIFY, 0xFF, Ref.USER_PIN) == SW.OK
    assert card.derive().sw == SW.SECURITY_STATUS_NOT_SATISFIED
    assert card.sw(0x00, Ins.VERIFY, 0, Ref.USER_PIN) == 0x63C3
    assert card.verify(Ref.USER_PIN, PIN) == SW.OK
    assert card.select() == SW.OK
    assert card.derive().sw == SW.SECURITY_STATUS_NOT_SATISFIED
    card.verify(Ref.USER_PIN, PIN)
    card.applet.power_on()
    assert card.derive().sw == SW.CONDITIONS_NOT_SATISFIED  # nothing selected after a reset


def test_change_reference_data(card):
    old_new = bytes(pin_block(PIN) + pin_block("654321"))
    assert card.sw(0x00, Ins.CHANGE_REFERENCE_DATA, 0, Ref.USER_PIN, old_new) == SW.OK
    assert card.sw(0x00, Ins.CHANGE_REFERENCE_DATA, 0, Ref.USER_PIN, old_new) == 0x63C2
    assert card.verify(Ref.USER_PIN, "654321") == SW.OK
    new_only = bytes(pin_block("777777"))
    card.verify(Ref.ADMIN_PIN, ADMIN)
    assert card.sw(0x00, Ins.CHANGE_REFERENCE_DATA, 1, Ref.USER_PIN, new_only) == 0x6985


def test_lock_and_terminate(card):
    assert card.select() == SW.OK
    assert card.sw(0x00, Ins.LOCK) == SW.SECURITY_STATUS_NOT_SATISFIED
    assert card.verify(Ref.ADMIN_PIN, ADMIN) == SW.OK
    assert card.sw(0x00, Ins.LOCK) == SW.OK
    assert card.get(0x0102) == bytes([Lifecycle.LOCKED])
    assert card.select() == SW.WARNING_DEACTIVATED
    assert card.verify(Ref.USER_PIN, PIN) == SW.OK
    assert card.derive().sw == SW.CONDITIONS_NOT_SATISFIED
    assert card.sw(0x00, Ins.LOCK) == SW.CONDITIONS_NOT_SATISFIED  # locked already
    assert card.sw(0x00, Ins.TERMINATE) == SW.SECURITY_STATUS_NOT_SATISFIED  # SELECT reset admin
    card.verify(Ref.ADMIN_PIN, ADMIN)
    assert card.sw(0x00, Ins.TERMINATE) == SW.OK
    assert card.applet.state.slots == [None] * 4
    assert card.select() == SW.WARNING_TERMINATED
    assert card.get(0x0102) == bytes([Lifecycle.TERMINATED])
    assert card.verify(Ref.ADMIN_PIN, ADMIN) == SW.CONDITIONS_NOT_SATISFIED


MALFORMED = [
    # (description, raw APDU hex or a Command, status word)
    ("3 bytes", "00A404", SW.WRONG_LENGTH),
    ("Lc larger than the data", "00A4040009F0514B", SW.WRONG_LENGTH),
    ("extended Lc of 0", "00A4040000000001", SW.WRONG_LENGTH),
    ("CLA FF", "FFCA0101", SW.CLA_NOT_SUPPORTED),
    ("CLA 40 (further interindustry)", "40CA0101", SW.CLA_NOT_SUPPORTED),
    ("CLA 80 on an ISO instruction", "80CA0101", SW.CLA_NOT_SUPPORTED),
    ("CLA 00 on a proprietary instruction", "0030000100", SW.CLA_NOT_SUPPORTED),
    ("secure messaging", "0CCA0101", SW.SECURE_MESSAGING_NOT_SUPPORTED),
    ("logical channel 1", "01CA0101", SW.LOGICAL_CHANNEL_NOT_SUPPORTED),
    ("command chaining", "10CA0101", SW.CHAINING_NOT_SUPPORTED),
    ("unknown instruction", "00B00000", SW.INS_NOT_SUPPORTED),
    ("SELECT by file identifier", "00A4000C023F00", SW.INCORRECT_P1P2),
    ("SELECT with P2=04 (FCP)", "00A4040409F0514B444E50534B01", SW.INCORRECT_P1P2),
    ("SELECT of another AID", "00A4040C05A000000308", SW.FILE_NOT_FOUND),
    ("GET DATA of an unknown tag", "00CA0199", SW.REFERENCED_DATA_NOT_FOUND),
    ("GET DATA with data", "00CA010101AA", SW.WRONG_LENGTH),
    ("GET DATA with a short Le", "00CA010102", 0x6C06),
    ("VERIFY of an unknown reference", "0020008510" + "31" * 6 + "FF" * 10, 0x6A88),
    ("VERIFY with P1=01", "0020018110" + "31" * 6 + "FF" * 10, SW.INCORRECT_P1P2),
    ("VERIFY with 15 bytes", "002000810F" + "31" * 6 + "FF" * 9, SW.WRONG_LENGTH),
    ("VERIFY with a PIN too short", "0020008110" + "31" * 5 + "FF" * 11, SW.WRONG_DATA),
    ("VERIFY with bad padding", "0020008110" + "31" * 6 + "00" * 10, SW.WRONG_DATA),
    ("VERIFY reset with data", "0020FF8110" + "31" * 6 + "FF" * 10, SW.WRONG_LENGTH),
    ("CHANGE of an unknown reference", "0024008420" + "31" * 32, 0x6A88),
    ("RESET RETRY COUNTER of the PUK", "002C008220" + "31" * 32, 0x6A88),
    ("RESET RETRY COUNTER, P1=02", "002C028120" + "31" * 32, SW.INCORRECT_P1P2),
    ("PUT KEY with 31 bytes", "80D880011F" + "00" * 31, SW.WRONG_LENGTH),
    ("PUT KEY into slot 5", "80D8800520" + "00" * 32, SW.INCORRECT_P1P2),
    ("PUT KEY with P1=01", "80D8010120" + "00" * 32, SW.INCORRECT_P1P2),
    ("DERIVE without data", "8030000120", SW.WRONG_LENGTH),
    ("DERIVE with Le 65", "803000010281" + "0041", SW.WRONG_LENGTH),
    ("DERIVE with Le 00 (256)", "80300001028100" + "00", SW.WRONG_LENGTH),
    ("DERIVE of slot 0", "80300000028100", SW.INCORRECT_P1P2),
    ("DERIVE, empty slot", "80300002028100", SW.REFERENCED_DATA_NOT_FOUND),
    ("DERIVE, no context tag", "8030000103820100", SW.WRONG_DATA),
    ("DERIVE, tags reversed", "80300001068201008101AA", SW.WRONG_DATA),
    ("DERIVE, truncated TLV", "803000010381" + "05AA", SW.WRONG_DATA),
    ("DERIVE, context of 129 bytes", "8030000184818181" + "AA" * 129, SW.WRONG_DATA),
    ("LOCK with P1", "00040100", SW.INCORRECT_P1P2),
    ("TERMINATE with data", "00E6000001AA", SW.WRONG_LENGTH),
]


@pytest.mark.parametrize("what, hexstr, sw", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_commands_get_the_iso_status_word(card, what, hexstr, sw):
    card.verify(Ref.USER_PIN, PIN)
    card.verify(Ref.ADMIN_PIN, ADMIN)
    r = parse_response(card.applet.process(bytes.fromhex(hexstr)))
    assert r.sw == sw and r.data == b""


def test_commands_before_select_are_refused():
    s = Session()
    assert s.sw(0x00, Ins.GET_DATA, 0x01, 0x01) == SW.CONDITIONS_NOT_SATISFIED
    assert s.sw(0x00, Ins.SELECT, 0x04, 0x00, AID).bit_length() == 16
    r = s.send(0x00, Ins.SELECT, 0x04, 0x00, AID, 256)
    assert r.ok and r.data == bytes.fromhex("6F0B8409") + AID


def state_in(lifecycle: Lifecycle) -> CardState:
    """A card in ``lifecycle`` with a PSK loaded (blank: loaded in slot 1, not final)."""
    s = Session()
    if lifecycle == Lifecycle.BLANK:
        s.select()
        s.verify(Ref.ADMIN_PIN, FACTORY_PINS[Ref.ADMIN_PIN])
        assert s.sw(0x80, Ins.PUT_KEY, 0x00, 1, PSK) == SW.OK
        return s.applet.state
    personalise(s)
    s.verify(Ref.ADMIN_PIN, ADMIN)
    if lifecycle == Lifecycle.LOCKED:
        assert s.sw(0x00, Ins.LOCK) == SW.OK
    if lifecycle == Lifecycle.TERMINATED:
        assert s.sw(0x00, Ins.TERMINATE) == SW.OK
    return s.applet.state


def verified_session(lifecycle: Lifecycle) -> Session:
    state = CardState.from_dict(TEMPLATES[lifecycle])
    s = Session(state)
    s.select()
    blank = lifecycle == Lifecycle.BLANK
    s.verify(Ref.USER_PIN, FACTORY_PINS[Ref.USER_PIN] if blank else PIN)
    s.verify(Ref.ADMIN_PIN, FACTORY_PINS[Ref.ADMIN_PIN] if blank else ADMIN)
    s.responses.clear()
    return s


TEMPLATES = {lc: state_in(lc).to_dict() for lc in Lifecycle}
WELL_FORMED = {
    Ins.SELECT: (0x04, 0x0C, AID),
    Ins.GET_DATA: (0x01, 0x02, b""),
    Ins.VERIFY: (0x00, Ref.USER_PIN, b""),
    Ins.CHANGE_REFERENCE_DATA: (0x00, Ref.USER_PIN, bytes(pin_block("000000") * 2)),
    Ins.RESET_RETRY_COUNTER: (0x01, Ref.USER_PIN, bytes(pin_block("00000000"))),
    Ins.PUT_KEY: (0x00, 2, bytes(32)),
    Ins.DERIVE: (0x00, 1, build_tlv(0x81, b"c")),
    Ins.LOCK: (0x00, 0x00, b""),
    Ins.TERMINATE: (0x00, 0x00, b""),
}


@pytest.mark.parametrize("lifecycle", list(Lifecycle), ids=lambda lc: lc.name.lower())
@pytest.mark.parametrize("ins", list(Ins), ids=lambda i: i.name.lower())
def test_every_lifecycle_instruction_pair_follows_the_table(lifecycle, ins):
    """With every PIN verified, 6985 comes exactly when the table refuses the pair."""
    s = verified_session(lifecycle)
    rule = RULES[ins]
    p1, p2, data = WELL_FORMED[ins]
    before = s.applet.state.lifecycle
    sw = s.sw(rule.cla, ins, p1, p2, data)
    allowed = lifecycle in rule.lifecycles
    assert (sw == SW.CONDITIONS_NOT_SATISFIED) != allowed or (
        ins == Ins.PUT_KEY and lifecycle == Lifecycle.BLANK  # slot-level refusal
    ), hex(sw)
    after = s.applet.state.lifecycle
    assert after == before or TRANSITIONS[(before, rule.name)] == after


def windows(secret: bytes, width: int = 8) -> set[bytes]:
    return {secret[i : i + width] for i in range(len(secret) - width + 1)}


def assert_no_psk(responses: list[bytes], psk: bytes = PSK) -> None:
    parts = windows(psk)
    for raw in responses:
        assert not any(p in raw for p in parts), raw.hex()
        assert raw[-2:] != b"\x6f\x00", "the applet hit a bug"


SCANNED = [Lifecycle.BLANK, Lifecycle.PERSONALISED, Lifecycle.LOCKED]
BODIES = [
    (0x00, 0x00, b"", None),
    (0x00, 0x01, b"", 256),
    (0x80, 0x01, PSK, None),  # the PSK itself as data: never echoed
    (0x00, 0x01, build_tlv(0x81, PSK) + build_tlv(0x82, PSK), 64),
    (0x01, 0x04, b"", 32),
    (0x00, 0x81, bytes(pin_block(PIN)), None),
    (0x00, 0x83, bytes(pin_block(ADMIN) + pin_block(PIN)), None),
]


def test_exhaustive_class_by_instruction_scan_never_returns_the_psk():
    """All 65,536 CLA x INS pairs on a personalised card with both PINs verified."""
    for ins in range(256):
        s = verified_session(Lifecycle.PERSONALISED)
        for cla in range(256):
            s.responses.append(s.applet.process(bytes([cla, ins, 0x00, 0x01])))
        assert_no_psk(s.responses)


@pytest.mark.parametrize("lifecycle", SCANNED, ids=lambda lc: lc.name.lower())
def test_exhaustive_instruction_scan_with_bodies_never_returns_the_psk(lifecycle):
    """Every INS, both classes, bodies that reach each handler (PSK-sized data included)."""
    for ins in range(256):
        s = verified_session(lifecycle)
        for cla, (p1, p2, data, le) in itertools.product((0x00, 0x80), BODIES):
            s.send(cla, ins, p1, p2, data, le)
        assert_no_psk(s.responses)
        assert PSK not in b"".join(s.responses)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lifecycle=st.sampled_from([Lifecycle.BLANK, Lifecycle.PERSONALISED, Lifecycle.LOCKED]),
    apdus=st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.builds(
                lambda cla, ins, p1, p2, data, le: Command(
                    cla=cla, ins=ins, p1=p1, p2=p2, data=data, le=le
                ).build(),
                st.sampled_from([0x00, 0x80]),
                st.sampled_from(list(Ins)),
                st.integers(0, 255) | st.sampled_from([0, 1, 0x80, 0xFF]),
                st.integers(0, 255) | st.sampled_from([1, 2, 0x81, 0x82, 0x83]),
                st.binary(max_size=70) | st.just(PSK),
                st.none() | st.integers(1, 300),
            ),
        ),
        max_size=40,
    ),
)
def test_random_command_sequences_never_return_the_psk(lifecycle, apdus):
    s = verified_session(lifecycle)
    for raw in apdus:
        s.responses.append(s.applet.process(raw))
    assert_no_psk(s.responses)


class CardMachine(RuleBasedStateMachine):
    """Random valid and invalid operations; invariants hold after each one."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Session()
        personalise(self.s)
        self.lifecycles = [self.s.applet.state.lifecycle]

    @rule()
    def select(self):
        self.s.select()

    @rule(pin=st.sampled_from([PIN, "000000", ADMIN]), ref=st.sampled_from(list(Ref)))
    def verify(self, pin, ref):
        self.s.verify(ref, pin)

    @rule(
        context=st.binary(max_size=130),
        nonce=st.binary(max_size=66),
        le=st.none() | st.integers(1, 70),
    )
    def derive(self, context, nonce, le):
        r = self.s.derive(context, nonce, le)
        if r.ok:
            assert r.data == bytes(kdf(PSK, context, nonce, le or 32))

    @rule(
        p1=st.sampled_from([0x00, 0x80]),
        slot=st.integers(1, 4),
        key=st.binary(min_size=32, max_size=32),
    )
    def put_key(self, p1, slot, key):
        assert self.s.sw(0x80, Ins.PUT_KEY, p1, slot, key) != SW.OK  # personalised or later

    @rule(puk=st.sampled_from([PUK, "00000000"]))
    def unblock(self, puk):
        self.s.sw(0x00, Ins.RESET_RETRY_COUNTER, 1, Ref.USER_PIN, bytes(pin_block(puk)))

    @rule(ins=st.sampled_from([Ins.LOCK, Ins.TERMINATE]))
    def admin(self, ins):
        self.s.sw(0x00, ins)
        self.lifecycles.append(self.s.applet.state.lifecycle)

    @rule(raw=st.binary(max_size=60))
    def garbage(self, raw):
        self.s.responses.append(self.s.applet.process(raw))

    @invariant()
    def psk_never_leaves(self):
        assert_no_psk(self.s.responses[-1:])

    @invariant()
    def lifecycle_moves_only_along_the_table(self):
        now = self.s.applet.state.lifecycle
        if now != self.lifecycles[-1]:
            assert any(
                TRANSITIONS.get((self.lifecycles[-1], ev)) == now for ev in ("lock", "terminate")
            )
            self.lifecycles.append(now)
        tries = {r: p.tries for r, p in self.s.applet.state.pins.items()}
        assert all(0 <= t <= 5 for t in tries.values())


CardMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_card_state_machine = CardMachine.TestCase


def test_state_survives_serialisation_with_its_counters(card):
    card.verify(Ref.USER_PIN, "000000")
    doc = card.applet.state.to_dict()
    assert PSK.hex() in str(doc)  # the emulator's store holds it (mode 0600): documented
    again = Session(CardState.from_dict(doc))
    assert again.select() == SW.OK
    assert again.get(0x0103)[1] == 2
    assert again.verify(Ref.USER_PIN, PIN) == SW.OK
    assert again.derive().data == bytes(kdf(PSK, b"ctx", b"nonce"))
    for bad in ({}, {**doc, "slots": ["00"] * 4}, {**doc, "lifecycle": "lost"}):
        with pytest.raises(HsmError):
            CardState.from_dict(bad)


def test_pin_blocks_and_atr():
    assert pin_block("123456") == bytearray(b"123456" + b"\xff" * 10)
    for bad in ("12345", "x" * 17, "12345\n"):
        with pytest.raises(HsmError):
            pin_block(bad)
    tck = 0
    for b in ATR[1:]:
        tck ^= b
    assert ATR[0] == 0x3B and tck == 0
