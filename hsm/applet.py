"""The qkdn PSK card applet: a sans-IO state machine that holds a PSK and only derives from it.

A smartcard enrolled by ``qkdn card enroll`` runs this applet (the emulator in
:mod:`hsm.vpcd` runs it behind vsmartcard's vpcd; a real card would run a port of it).
:meth:`Applet.process` takes C-APDU bytes and returns R-APDU bytes; there is no I/O here.

Rules of this file:

* ``process`` never raises: a malformed command gets a status word, a bug gets 6F00.
* The PSK flows only into :func:`hsm.psk.kdf`. No response is ever built from a key slot,
  its length or a digest of it (fuzzing tests hold the applet to this).
* Every change to persistent state bumps :attr:`Applet.revision`; the host stores the state
  before it sends the response, so a retry counter cannot be reset by pulling the card.
* :data:`RULES` says which class, lifecycle and verified reference each instruction needs;
  :data:`TRANSITIONS` is the whole lifecycle: ``(state, event) -> next state``. Checks run
  in the order: CLA, INS, Lc/Le consistency, selected, P1-P2 and lengths, lifecycle,
  security status, data.

Commands (CLA 00 = ISO/IEC 7816-4 interindustry, 80 = proprietary):

==============================  ==============  ====================================
command                         CLA INS P1 P2   data / response
==============================  ==============  ====================================
SELECT by AID                   00 A4 04 00|0C  AID / FCI (6F 84 AID) unless P2=0C
GET DATA                        00 CA tag       - / value (tags ``TAG_*`` below)
VERIFY                          00 20 00 ref    PIN block, or none: query status
VERIFY (reset security status)  00 20 FF ref    -
CHANGE REFERENCE DATA           00 24 00 ref    old || new block
                                00 24 01 ref    new block (blank card, admin verified)
RESET RETRY COUNTER             00 2C 00 81     PUK || new PIN block (01: PUK only)
PUT KEY (blank card, admin)     80 D8 00|80 s   32-byte PSK for slot s; P1=80 ends
                                                personalisation
DERIVE (user PIN verified)      80 30 00 s      81 context 82 nonce / Le bytes (default 32)
LOCK (DEACTIVATE FILE, admin)   00 04 00 00     -
TERMINATE (TERMINATE DF, admin) 00 E6 00 00     -
==============================  ==============  ====================================

PIN references: 81 user PIN, 82 PUK, 83 admin PIN. A PIN block is the PIN (6 to 16
printable ASCII characters) padded to 16 bytes with FF. A blank card carries factory
PINs (:data:`FACTORY_PINS`); personalisation cannot end until all three are changed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from construct import GreedyRange, Int8ub, Struct

from hsm.apdu import SW, Command, Response, build_tlv, parse_command, parse_tlvs
from hsm.errors import ApduError, HsmError
from hsm.psk import MAX_DERIVE_BYTES, PSK_BYTES, kdf

AID = bytes.fromhex("F0514B444E50534B01")
"""Proprietary AID: F0 (unregistered RID) + ASCII ``QKDNPSK`` + version 01."""

SLOTS = 4
PIN_BLOCK = 16
PIN_MIN = 6
MAX_CONTEXT = 128
MAX_NONCE = 64
DEFAULT_DERIVE_BYTES = 32


def _atr(historical: bytes) -> bytes:
    """An ATR for T=1: TS, T0 (TD1 present), TD1 (T=1), historical bytes, TCK."""
    body = bytes([0x80 | len(historical), 0x01]) + historical
    tck = 0
    for b in body:
        tck ^= b
    return b"\x3b" + body + bytes([tck])


ATR = _atr(b"\x80\x58" + b"QKDN-PSK")
"""ATR of the emulated card; historical bytes: compact-TLV card issuer's data ``QKDN-PSK``."""


class Lifecycle(IntEnum):
    """Card lifecycle, coded as the ISO/IEC 7816-4 life cycle status byte."""

    BLANK = 0x03  # initialisation: factory PINs, no key
    PERSONALISED = 0x05  # operational, activated: derives
    LOCKED = 0x04  # operational, deactivated: keeps its key, refuses to use it
    TERMINATED = 0x0C  # termination: keys wiped, for good


class Ref(IntEnum):
    """Reference data (P2 of VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER)."""

    USER_PIN = 0x81
    PUK = 0x82
    ADMIN_PIN = 0x83


class Ins(IntEnum):
    """Instruction bytes."""

    SELECT = 0xA4
    GET_DATA = 0xCA
    VERIFY = 0x20
    CHANGE_REFERENCE_DATA = 0x24
    RESET_RETRY_COUNTER = 0x2C
    PUT_KEY = 0xD8
    DERIVE = 0x30
    LOCK = 0x04
    TERMINATE = 0xE6


TAG_SERIAL = 0x0101
TAG_LIFECYCLE = 0x0102
TAG_RETRIES = 0x0103
TAG_SLOTS = 0x0104
TAG_CONTEXT = 0x81
TAG_NONCE = 0x82

RETRIES = GreedyRange(Struct("ref" / Int8ub, "left" / Int8ub, "max" / Int8ub))
"""GET DATA 0103: (reference, tries left, maximum) for 81, 83 and 82."""

MAX_TRIES = {Ref.USER_PIN: 3, Ref.ADMIN_PIN: 3, Ref.PUK: 5}
FACTORY_PINS = {Ref.USER_PIN: "123456", Ref.ADMIN_PIN: "12345678", Ref.PUK: "12345678"}


def pin_block(pin: str | bytes | bytearray) -> bytearray:
    """The 16-byte block for a PIN (HsmError if it is not 6..16 printable ASCII characters)."""
    raw = pin.encode() if isinstance(pin, str) else bytes(pin)
    if not PIN_MIN <= len(raw) <= PIN_BLOCK or not all(0x20 <= b <= 0x7E for b in raw):
        raise HsmError(
            f"a PIN is {PIN_MIN} to {PIN_BLOCK} printable ASCII characters", code="HSM-PIN-FORMAT"
        )
    return bytearray(raw) + b"\xff" * (PIN_BLOCK - len(raw))


def valid_block(block: bytes) -> bool:
    """True if ``block`` is a well-formed PIN block."""
    n = block.find(0xFF)
    n = len(block) if n < 0 else n
    return (
        len(block) == PIN_BLOCK
        and n >= PIN_MIN
        and all(0x20 <= b <= 0x7E for b in block[:n])
        and all(b == 0xFF for b in block[n:])
    )


@dataclass(kw_only=True)
class PinState:
    """One reference datum: salted digest of its block and its retry counter."""

    salt: bytes
    """Random salt of the digest."""
    digest: bytes
    """SHA-256(salt || PIN block)."""
    tries: int
    """Tries left; 0 = blocked."""
    max_tries: int
    """Value the counter is reset to."""
    factory: bool = False
    """Still the factory value (personalisation must change it)."""

    @classmethod
    def of(cls, block: bytes, max_tries: int, salt: bytes, *, factory: bool = False) -> PinState:
        digest = hashlib.sha256(salt + block).digest()
        return cls(salt=salt, digest=digest, tries=max_tries, max_tries=max_tries, factory=factory)

    def matches(self, block: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha256(self.salt + block).digest(), self.digest)


@dataclass(kw_only=True)
class CardState:
    """Everything the card keeps across power cycles (serialisable with to_dict/from_dict)."""

    serial: str
    """Card serial number (printable ASCII)."""
    lifecycle: Lifecycle = Lifecycle.BLANK
    """Where the card is in its life."""
    pins: dict[Ref, PinState] = field(default_factory=dict)
    """User PIN, admin PIN and PUK."""
    slots: list[bytearray | None] = field(default_factory=lambda: [None] * SLOTS)
    """The PSKs (None = empty slot)."""

    @classmethod
    def blank(cls, serial: str, salt: Callable[[int], bytes] = os.urandom) -> CardState:
        """A factory-fresh card with the factory PINs."""
        pins = {
            ref: PinState.of(bytes(pin_block(FACTORY_PINS[ref])), MAX_TRIES[ref], salt(16))
            for ref in Ref
        }
        for pin in pins.values():
            pin.factory = True
        return cls(serial=serial, pins=pins)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able document (holds the PSK: the emulator stores it mode 0600)."""
        return {
            "version": 1,
            "serial": self.serial,
            "lifecycle": self.lifecycle.name.lower(),
            "pins": {
                ref.name.lower(): {
                    "salt": p.salt.hex(),
                    "digest": p.digest.hex(),
                    "tries": p.tries,
                    "max_tries": p.max_tries,
                    "factory": p.factory,
                }
                for ref, p in self.pins.items()
            },
            "slots": [None if s is None else s.hex() for s in self.slots],
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CardState:
        """Inverse of :meth:`to_dict`; HsmError if the document is not a card state."""
        try:
            pins = {
                Ref[name.upper()]: PinState(
                    salt=bytes.fromhex(p["salt"]),
                    digest=bytes.fromhex(p["digest"]),
                    tries=int(p["tries"]),
                    max_tries=int(p["max_tries"]),
                    factory=bool(p["factory"]),
                )
                for name, p in doc["pins"].items()
            }
            slots = [None if s is None else bytearray.fromhex(s) for s in doc["slots"]]
            state = cls(
                serial=str(doc["serial"]),
                lifecycle=Lifecycle[str(doc["lifecycle"]).upper()],
                pins=pins,
                slots=slots,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HsmError(f"not a card state document ({exc})", code="HSM-CARD-STATE") from None
        if set(pins) != set(Ref) or len(slots) != SLOTS:
            raise HsmError("card state: wrong PINs or slots", code="HSM-CARD-STATE")
        if any(s is not None and len(s) != PSK_BYTES for s in slots):
            raise HsmError("card state: a key slot of the wrong size", code="HSM-CARD-STATE")
        return state


# -- the state machine as data ---------------------------------------------------------

TRANSITIONS: dict[tuple[Lifecycle, str], Lifecycle] = {
    (Lifecycle.BLANK, "personalise"): Lifecycle.PERSONALISED,
    (Lifecycle.PERSONALISED, "lock"): Lifecycle.LOCKED,
    (Lifecycle.BLANK, "terminate"): Lifecycle.TERMINATED,
    (Lifecycle.PERSONALISED, "terminate"): Lifecycle.TERMINATED,
    (Lifecycle.LOCKED, "terminate"): Lifecycle.TERMINATED,
}
"""The lifecycle: ``(state, event) -> next state``; any other pair is refused with 6985."""

ANY = frozenset(Lifecycle)
LIVE = frozenset({Lifecycle.BLANK, Lifecycle.PERSONALISED})


def _from(event: str) -> frozenset[Lifecycle]:
    return frozenset(state for state, ev in TRANSITIONS if ev == event)


@dataclass(frozen=True, kw_only=True)
class Rule:
    """What one instruction needs before its handler runs."""

    name: str
    """Handler suffix: ``Applet._do_<name>``."""
    cla: int
    """0x00 (interindustry) or 0x80 (proprietary)."""
    lifecycles: frozenset[Lifecycle]
    """Lifecycles in which it runs (else 6985)."""
    needs: Ref | None = None
    """Reference that must be verified in this session (else 6982)."""


RULES: dict[int, Rule] = {
    Ins.SELECT: Rule(name="select", cla=0x00, lifecycles=ANY),
    Ins.GET_DATA: Rule(name="get_data", cla=0x00, lifecycles=ANY),
    Ins.VERIFY: Rule(name="verify", cla=0x00, lifecycles=LIVE | {Lifecycle.LOCKED}),
    Ins.CHANGE_REFERENCE_DATA: Rule(name="change", cla=0x00, lifecycles=LIVE),
    Ins.RESET_RETRY_COUNTER: Rule(name="reset_retry", cla=0x00, lifecycles=LIVE),
    Ins.PUT_KEY: Rule(
        name="put_key", cla=0x80, lifecycles=_from("personalise"), needs=Ref.ADMIN_PIN
    ),
    Ins.DERIVE: Rule(
        name="derive", cla=0x80, lifecycles=frozenset({Lifecycle.PERSONALISED}), needs=Ref.USER_PIN
    ),
    Ins.LOCK: Rule(name="lock", cla=0x00, lifecycles=_from("lock"), needs=Ref.ADMIN_PIN),
    Ins.TERMINATE: Rule(
        name="terminate", cla=0x00, lifecycles=_from("terminate"), needs=Ref.ADMIN_PIN
    ),
}


@functools.lru_cache(maxsize=64)
def _status(sw: int) -> bytes:
    """A response without data (cached: most answers are one of a few status words)."""
    return Response(sw=sw).build()


def _cla_error(cla: int) -> int | None:
    """Status word for a class byte this applet cannot serve, else None."""
    if cla & 0x60 or cla == 0xFF:
        return SW.CLA_NOT_SUPPORTED
    if cla & 0x10:
        return SW.CHAINING_NOT_SUPPORTED
    if cla & 0x0C:
        return SW.SECURE_MESSAGING_NOT_SUPPORTED
    if cla & 0x03:
        return SW.LOGICAL_CHANNEL_NOT_SUPPORTED
    return None


def _syntax_error(cmd: Command) -> int | None:
    """P1-P2 and length checks of each instruction (before lifecycle and security)."""
    p1, p2, n = cmd.p1, cmd.p2, len(cmd.data)
    match cmd.ins:
        case Ins.SELECT:
            if p1 != 0x04 or p2 not in (0x00, 0x0C):
                return SW.INCORRECT_P1P2
            return None if n else SW.WRONG_LENGTH
        case Ins.GET_DATA:
            return SW.WRONG_LENGTH if n else None
        case Ins.VERIFY:
            if p1 not in (0x00, 0xFF):
                return SW.INCORRECT_P1P2
            if p2 not in (Ref.USER_PIN, Ref.ADMIN_PIN):
                return SW.REFERENCED_DATA_NOT_FOUND
            return None if n in ((0, PIN_BLOCK) if p1 == 0 else (0,)) else SW.WRONG_LENGTH
        case Ins.CHANGE_REFERENCE_DATA | Ins.RESET_RETRY_COUNTER:
            if p1 not in (0x00, 0x01):
                return SW.INCORRECT_P1P2
            refs = tuple(Ref) if cmd.ins == Ins.CHANGE_REFERENCE_DATA else (Ref.USER_PIN,)
            if p2 not in refs:
                return SW.REFERENCED_DATA_NOT_FOUND
            return None if n == (2 - p1) * PIN_BLOCK else SW.WRONG_LENGTH
        case Ins.PUT_KEY:
            if p1 not in (0x00, 0x80) or not 1 <= p2 <= SLOTS:
                return SW.INCORRECT_P1P2
            return None if n == PSK_BYTES else SW.WRONG_LENGTH
        case Ins.DERIVE:
            if p1 != 0 or not 1 <= p2 <= SLOTS:
                return SW.INCORRECT_P1P2
            if not n or (cmd.le is not None and cmd.le > MAX_DERIVE_BYTES):
                return SW.WRONG_LENGTH
            return None
        case _:  # LOCK, TERMINATE
            if p1 or p2:
                return SW.INCORRECT_P1P2
            return SW.WRONG_LENGTH if n else None


class Applet:
    """The applet of one card: persistent :class:`CardState` plus the session state."""

    def __init__(self, state: CardState, *, salt: Callable[[int], bytes] = os.urandom) -> None:
        self.state = state
        self.revision = 0
        """Bumped by every change of :attr:`state` (the host persists it before answering)."""
        self._salt = salt
        self._selected = False
        self._verified: set[Ref] = set()

    def power_on(self) -> None:
        """Cold or warm reset: nothing selected, nothing verified."""
        self._selected = False
        self._verified.clear()

    def process(self, apdu: bytes | bytearray) -> bytes:
        """Handle one C-APDU; return the R-APDU."""
        try:
            response = self._dispatch(apdu)
            return response.build() if response.data else _status(response.sw)
        except Exception:  # a bug must not leak state: answer "no precise diagnosis"
            return _status(SW.NO_PRECISE_DIAGNOSIS)

    def _dispatch(self, apdu: bytes | bytearray) -> Response:
        # CLA and INS first, from the raw header (as a card's dispatcher does), then lengths
        if len(apdu) < 4:
            return Response(sw=SW.WRONG_LENGTH)
        sw = _cla_error(apdu[0])
        if sw is not None:
            return Response(sw=sw)
        rule = RULES.get(apdu[1])
        if rule is None:
            return Response(sw=SW.INS_NOT_SUPPORTED)
        if apdu[0] & 0x80 != rule.cla:
            return Response(sw=SW.CLA_NOT_SUPPORTED)
        try:
            cmd = parse_command(apdu)
        except ApduError:
            return Response(sw=SW.WRONG_LENGTH)
        if not self._selected and cmd.ins != Ins.SELECT:
            return Response(sw=SW.CONDITIONS_NOT_SATISFIED)
        sw = _syntax_error(cmd)
        if sw is None and self.state.lifecycle not in rule.lifecycles:
            sw = SW.CONDITIONS_NOT_SATISFIED
        if sw is None and rule.needs is not None and rule.needs not in self._verified:
            sw = SW.SECURITY_STATUS_NOT_SATISFIED
        if sw is not None:
            return Response(sw=sw)
        handler: Callable[[Command], Response] = getattr(self, f"_do_{rule.name}")
        return handler(cmd)

    # -- helpers ----------------------------------------------------------------------
    def _changed(self) -> None:
        self.revision += 1

    def _advance(self, event: str) -> None:
        self.state.lifecycle = TRANSITIONS[(self.state.lifecycle, event)]
        self._changed()

    def _check(self, ref: Ref, block: bytes) -> Response | None:
        """Compare a block with reference ``ref``; None on success, else 63Cx or 6983."""
        pin = self.state.pins[ref]
        if pin.tries == 0:
            self._verified.discard(ref)
            return Response(sw=SW.AUTH_METHOD_BLOCKED)
        if pin.matches(block):
            if pin.tries != pin.max_tries:
                pin.tries = pin.max_tries
                self._changed()
            return None
        pin.tries -= 1
        self._verified.discard(ref)
        self._changed()
        return Response(sw=SW.VERIFY_FAILED | pin.tries)

    def _set(self, ref: Ref, block: bytes) -> None:
        self.state.pins[ref] = PinState.of(block, MAX_TRIES[ref], self._salt(16))
        self._changed()

    # -- handlers (syntax, lifecycle and security already checked) -----------------------
    def _do_select(self, cmd: Command) -> Response:
        self._verified.clear()
        if cmd.data != AID:
            self._selected = False
            return Response(sw=SW.FILE_NOT_FOUND)
        self._selected = True
        fci = build_tlv(0x6F, build_tlv(0x84, AID)) if cmd.p2 == 0x00 else b""
        warning = {
            Lifecycle.LOCKED: SW.WARNING_DEACTIVATED,
            Lifecycle.TERMINATED: SW.WARNING_TERMINATED,
        }
        return Response(data=fci, sw=warning.get(self.state.lifecycle, SW.OK))

    def _do_get_data(self, cmd: Command) -> Response:
        tag = cmd.p1 << 8 | cmd.p2
        state = self.state
        if tag == TAG_SERIAL:
            data = state.serial.encode()
        elif tag == TAG_LIFECYCLE:
            data = bytes([state.lifecycle])
        elif tag == TAG_RETRIES:
            order = (Ref.USER_PIN, Ref.ADMIN_PIN, Ref.PUK)
            rows = [
                {"ref": r, "left": state.pins[r].tries, "max": state.pins[r].max_tries}
                for r in order
            ]
            data = bytes(RETRIES.build(rows))
        elif tag == TAG_SLOTS:
            data = bytes(0 if s is None else 1 for s in state.slots)
        else:
            return Response(sw=SW.REFERENCED_DATA_NOT_FOUND)
        if cmd.le is not None and cmd.le < len(data):
            return Response(sw=0x6C00 | len(data))  # wrong Le: SW2 = bytes available
        return Response(data=data)

    def _do_verify(self, cmd: Command) -> Response:
        ref = Ref(cmd.p2)
        if cmd.p1 == 0xFF:
            self._verified.discard(ref)
            return Response()
        if not cmd.data:
            tries = self.state.pins[ref].tries
            if tries == 0:
                return Response(sw=SW.AUTH_METHOD_BLOCKED)
            return Response() if ref in self._verified else Response(sw=SW.VERIFY_FAILED | tries)
        if not valid_block(cmd.data):
            return Response(sw=SW.WRONG_DATA)
        failed = self._check(ref, cmd.data)
        if failed:
            return failed
        self._verified.add(ref)
        return Response()

    def _do_change(self, cmd: Command) -> Response:
        ref = Ref(cmd.p2)
        blocks = [cmd.data[i : i + PIN_BLOCK] for i in range(0, len(cmd.data), PIN_BLOCK)]
        if not all(valid_block(b) for b in blocks):
            return Response(sw=SW.WRONG_DATA)
        if cmd.p1 == 0x01:  # new value only: personalisation by the admin
            if ref == Ref.ADMIN_PIN:
                return Response(sw=SW.INCORRECT_P1P2)
            if self.state.lifecycle != Lifecycle.BLANK:
                return Response(sw=SW.CONDITIONS_NOT_SATISFIED)
            if Ref.ADMIN_PIN not in self._verified:
                return Response(sw=SW.SECURITY_STATUS_NOT_SATISFIED)
        else:
            failed = self._check(ref, blocks[0])
            if failed:
                return failed
        self._set(ref, blocks[-1])
        return Response()

    def _do_reset_retry(self, cmd: Command) -> Response:
        puk, new = cmd.data[:PIN_BLOCK], cmd.data[PIN_BLOCK:]
        if not valid_block(puk) or (new and not valid_block(new)):
            return Response(sw=SW.WRONG_DATA)
        failed = self._check(Ref.PUK, puk)
        if failed:
            return failed
        if new:
            self._set(Ref.USER_PIN, new)
        else:
            self.state.pins[Ref.USER_PIN].tries = MAX_TRIES[Ref.USER_PIN]
            self._changed()
        return Response()

    def _do_put_key(self, cmd: Command) -> Response:
        slot, last = cmd.p2 - 1, cmd.p1 == 0x80
        if self.state.slots[slot] is not None:
            return Response(sw=SW.CONDITIONS_NOT_SATISFIED)
        if last and any(p.factory for p in self.state.pins.values()):
            return Response(sw=SW.CONDITIONS_NOT_SATISFIED)  # factory PINs still set
        self.state.slots[slot] = bytearray(cmd.data)
        self._changed()
        if last:
            self._advance("personalise")
        return Response()

    def _do_derive(self, cmd: Command) -> Response:
        psk = self.state.slots[cmd.p2 - 1]
        if psk is None:
            return Response(sw=SW.REFERENCED_DATA_NOT_FOUND)
        try:
            objects = parse_tlvs(cmd.data)
        except ApduError:
            return Response(sw=SW.WRONG_DATA)
        tags = [tag for tag, _ in objects]
        if tags not in ([TAG_CONTEXT], [TAG_CONTEXT, TAG_NONCE]):
            return Response(sw=SW.WRONG_DATA)
        context = objects[0][1]
        nonce = objects[1][1] if len(objects) > 1 else b""
        if len(context) > MAX_CONTEXT or len(nonce) > MAX_NONCE:
            return Response(sw=SW.WRONG_DATA)
        key = kdf(psk, context, nonce, cmd.le or DEFAULT_DERIVE_BYTES)
        try:
            return Response(data=bytes(key))
        finally:
            key[:] = bytes(len(key))

    def _do_lock(self, cmd: Command) -> Response:
        self._advance("lock")
        return Response()

    def _do_terminate(self, cmd: Command) -> Response:
        for i, psk in enumerate(self.state.slots):
            if psk is not None:
                psk[:] = bytes(len(psk))
            self.state.slots[i] = None
        self._verified.clear()
        self._advance("terminate")
        return Response()
