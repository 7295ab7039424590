"""Card client for the qkdn PSK applet, and the smartcard PSK source of an AKMS.

:class:`Card` turns the applet's APDUs (:mod:`hsm.applet`) into operations: status,
PIN change and unblock, personalisation, derivation, lock and terminate. Each operation
runs in one PC/SC transaction that starts with SELECT, so it survives other applications
and card resets; an operation that verifies a PIN resets that verification before the
transaction ends, so no other application can use it. Refusals become typed errors
carrying the card's status word (:class:`~hsm.errors.PinError` with the tries left, ...).

:class:`CardPskSource` is the :class:`hsm.psk.PskSource` of a card, opened by URL::

    pcsc://READER?pin-file=PATH[&slot=1][&timeout=5]
    pcsc://#0?pin-env=VAR[&slot=1][&timeout=5]

``pin-file`` is a file holding the user PIN on its first line, readable by its owner only
(a relative path is taken from the node's configuration directory); ``pin-env`` names an
environment variable holding it. ``slot`` is the key slot (default 1, the one enrollment
writes); ``timeout`` how long to wait for the card at start (seconds, default 5).

The source fails closed: a card that is removed, locked, blocked or refuses the PIN makes
:meth:`CardPskSource.derive` raise :class:`~hsm.errors.PskError` and logs a critical
``alarm`` record. After a PIN refusal it never presents the PIN again (that would burn the
retry counter); after a removal the next call reconnects. PINs and derived keys are never
logged; buffers holding them are overwritten when done (copies made inside pyscard and by
Python's immutable ``bytes`` cannot be, which is why APDUs carrying secrets are built in
``bytearray``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.files import KiB, read_bounded
from hsm.apdu import SW, Command, build_tlv, describe_sw, parse_response
from hsm.applet import (
    AID,
    RETRIES,
    TAG_CONTEXT,
    TAG_LIFECYCLE,
    TAG_NONCE,
    TAG_RETRIES,
    TAG_SERIAL,
    TAG_SLOTS,
    Ins,
    Lifecycle,
    Ref,
    pin_block,
)
from hsm.errors import (
    CardError,
    CardStateError,
    HsmError,
    PinBlockedError,
    PinError,
    PskError,
)
from hsm.pcsc import PcscTransport, ReaderUrl, Transport, parse_url
from hsm.psk import MAX_DERIVE_BYTES, PSK_BYTES

log = logging.getLogger("qkdn.hsm.card")

DEFAULT_SLOT = 1
KCV_CONTEXT = b"qkdn-kcv"
"""Key check value: the first 3 bytes of ``kdf(PSK, "qkdn-kcv", nonce="")``."""
MAX_CONTEXT = 128
MAX_NONCE = 64
MAX_PIN_FILE = 4 * KiB
"""PIN files hold one secret (``--*-pin-file``) or three lines (``--pins-a``)."""
REF_NAMES = {Ref.USER_PIN: "PIN", Ref.ADMIN_PIN: "admin PIN", Ref.PUK: "PUK"}
Secret = str | bytes | bytearray


@dataclass(frozen=True, kw_only=True)
class CardInfo:
    """What a card tells without a PIN."""

    reader: str
    """PC/SC reader name."""
    serial: str
    """Card serial number."""
    lifecycle: Lifecycle
    """Blank, personalised, locked or terminated."""
    retries: dict[str, tuple[int, int]]
    """Tries left and maximum for ``pin``, ``admin-pin`` and ``puk``."""
    slots: list[bool]
    """Which key slots hold a key."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able document (``qkdn card status --json``)."""
        return {
            "reader": self.reader,
            "serial": self.serial,
            "lifecycle": self.lifecycle.name.lower(),
            "retries": {k: {"left": v[0], "max": v[1]} for k, v in self.retries.items()},
            "slots": [i + 1 for i, full in enumerate(self.slots) if full],
        }


def _wipe(*buffers: bytearray) -> None:
    for buf in buffers:
        buf[:] = bytes(len(buf))


def _secret_apdu(cla: int, ins: int, p1: int, p2: int, *parts: bytearray) -> bytearray:
    """A case-3 short APDU in a bytearray, so the caller can wipe it after sending."""
    body = bytearray().join(parts)
    try:
        return bytearray([cla, ins, p1, p2, len(body)]) + body
    finally:
        _wipe(body)


class Card:
    """The qkdn PSK applet on one card, over a transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @classmethod
    def open(cls, url: str | ReaderUrl, *, timeout: float = 5.0) -> Card:
        """The card in the reader a ``pcsc://`` URL names (waits ``timeout`` s for it)."""
        return cls(PcscTransport(url, timeout=timeout))

    @property
    def reader(self) -> str:
        return self.transport.name

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Card:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw exchange ---------------------------------------------------------------
    def _send(self, apdu: bytes | bytearray, what: str, ref: Ref | None = None) -> bytes:
        """Transmit; return the response data on 9000 (and the 62xx warnings of SELECT)."""
        response = parse_response(self.transport.transmit(apdu))
        if response.ok or response.sw in (SW.WARNING_DEACTIVATED, SW.WARNING_TERMINATED):
            return response.data
        raise self._refusal(response.sw, what, ref)

    def _refusal(self, sw: int, what: str, ref: Ref | None) -> CardError:
        name = REF_NAMES.get(ref, "PIN") if ref is not None else "PIN"
        where = f"card in {self.reader!r}: {what}"
        if sw & 0xFFF0 == SW.VERIFY_FAILED:
            left = sw & 0x0F
            return PinError(f"{where}: wrong {name}, {left} tries left", sw=sw, remaining=left)
        if sw == SW.AUTH_METHOD_BLOCKED:
            return PinBlockedError(f"{where}: the {name} is blocked", sw=sw)
        if sw == SW.CONDITIONS_NOT_SATISFIED:
            return CardStateError(f"{where}: refused in the card's current state (6985)", sw=sw)
        if sw == SW.FILE_NOT_FOUND:
            return CardError(f"{where}: no qkdn PSK applet on this card", sw=sw, code="HSM-APPLET")
        return CardError(f"{where}: card answered {sw:04X} ({describe_sw(sw)})", sw=sw)

    def _get(self, tag: int) -> bytes:
        return self._send(
            Command(cla=0, ins=Ins.GET_DATA, p1=tag >> 8, p2=tag & 0xFF).build(), "GET DATA"
        )

    def _select(self) -> None:
        self._send(Command(cla=0, ins=Ins.SELECT, p1=0x04, p2=0x0C, data=AID).build(), "SELECT")

    def _verify(self, ref: Ref, pin: Secret) -> None:
        block = pin_block(pin)
        apdu = _secret_apdu(0x00, Ins.VERIFY, 0x00, ref, block)
        try:
            self._send(apdu, f"VERIFY {REF_NAMES[ref]}", ref)
        finally:
            _wipe(block, apdu)

    def _logout(self, ref: Ref) -> None:
        """Reset the verification of ``ref``; quiet if the card is gone already."""
        with contextlib.suppress(HsmError):
            self._send(Command(cla=0, ins=Ins.VERIFY, p1=0xFF, p2=ref).build(), "VERIFY reset")

    def _change(self, p1: int, ref: Ref, *pins: Secret) -> None:
        blocks = [pin_block(p) for p in pins]
        apdu = _secret_apdu(0x00, Ins.CHANGE_REFERENCE_DATA, p1, ref, *blocks)
        try:
            self._send(apdu, f"CHANGE REFERENCE DATA ({REF_NAMES[ref]})", ref)
        finally:
            _wipe(apdu, *blocks)

    # -- operations -----------------------------------------------------------------
    def info(self) -> CardInfo:
        """Serial, lifecycle, retry counters and key slots (no PIN needed)."""
        names = {Ref.USER_PIN: "pin", Ref.ADMIN_PIN: "admin-pin", Ref.PUK: "puk"}
        with self.transport.transaction():
            self._select()
            serial = self._get(TAG_SERIAL).decode("ascii", "replace")
            try:
                lifecycle = Lifecycle(self._get(TAG_LIFECYCLE)[0])
                rows = RETRIES.parse(self._get(TAG_RETRIES))
                retries = {names[Ref(r.ref)]: (r.left, r.max) for r in rows}
            except (ValueError, IndexError, KeyError):
                raise CardError(
                    f"card in {self.reader!r}: GET DATA answers are not the qkdn applet's",
                    sw=SW.OK,
                    code="HSM-APPLET",
                ) from None
            slots = [bool(b) for b in self._get(TAG_SLOTS)]
        return CardInfo(
            reader=self.reader, serial=serial, lifecycle=lifecycle, retries=retries, slots=slots
        )

    def check_pin(self, pin: Secret, ref: Ref = Ref.USER_PIN) -> None:
        """Verify a PIN (PinError if wrong) and reset the verification at once."""
        with self.transport.transaction():
            self._select()
            try:
                self._verify(ref, pin)
            finally:
                self._logout(ref)

    def change_pin(self, old: Secret, new: Secret, ref: Ref = Ref.USER_PIN) -> None:
        """Change the PIN, admin PIN or PUK, given its current value."""
        with self.transport.transaction():
            self._select()
            self._change(0x00, ref, old, new)

    def unblock(self, puk: Secret, new_pin: Secret | None = None) -> None:
        """Reset the PIN's retry counter with the PUK, and set a new PIN if given."""
        blocks = [pin_block(puk)] + ([pin_block(new_pin)] if new_pin is not None else [])
        apdu = _secret_apdu(
            0x00, Ins.RESET_RETRY_COUNTER, 0x01 if new_pin is None else 0x00, Ref.USER_PIN, *blocks
        )
        try:
            with self.transport.transaction():
                self._select()
                self._send(apdu, "RESET RETRY COUNTER", Ref.PUK)
        finally:
            _wipe(apdu, *blocks)

    def personalise(
        self,
        *,
        transport_admin_pin: Secret,
        psk: bytearray,
        pin: Secret,
        admin_pin: Secret,
        puk: Secret,
        slot: int = DEFAULT_SLOT,
    ) -> None:
        """Blank card -> personalised: set the three PINs, write the PSK, close personalisation."""
        if len(psk) != PSK_BYTES:
            raise HsmError(f"a PSK is {PSK_BYTES} bytes, got {len(psk)}")
        with self.transport.transaction():
            self._select()
            lifecycle = Lifecycle(self._get(TAG_LIFECYCLE)[0])
            if lifecycle != Lifecycle.BLANK:  # refuse before presenting (and burning) a PIN
                raise CardStateError(
                    f"card in {self.reader!r} is {lifecycle.name.lower()}, not blank",
                    sw=SW.CONDITIONS_NOT_SATISFIED,
                )
            try:
                self._verify(Ref.ADMIN_PIN, transport_admin_pin)
                self._change(0x01, Ref.USER_PIN, pin)
                self._change(0x01, Ref.PUK, puk)
                self._change(0x00, Ref.ADMIN_PIN, transport_admin_pin, admin_pin)
                apdu = _secret_apdu(0x80, Ins.PUT_KEY, 0x80, slot, psk)
                try:
                    self._send(apdu, "PUT KEY")
                finally:
                    _wipe(apdu)
            finally:
                self._logout(Ref.ADMIN_PIN)

    def derive(
        self,
        pin: Secret,
        context: bytes,
        nonce: bytes,
        length: int = 32,
        slot: int = DEFAULT_SLOT,
    ) -> bytearray:
        """The card's ``kdf(PSK[slot], context, nonce, length)`` (see :mod:`hsm.psk`)."""
        if not 0 < length <= MAX_DERIVE_BYTES:
            raise HsmError(f"derive length must be 1..{MAX_DERIVE_BYTES} bytes, got {length}")
        if len(context) > MAX_CONTEXT or len(nonce) > MAX_NONCE:
            raise HsmError(
                f"a card takes contexts up to {MAX_CONTEXT} and nonces up to {MAX_NONCE} bytes"
            )
        data = build_tlv(TAG_CONTEXT, context) + build_tlv(TAG_NONCE, nonce)
        apdu = Command(cla=0x80, ins=Ins.DERIVE, p1=0, p2=slot, data=data, le=length).build()
        with self.transport.transaction():
            self._select()
            try:
                self._verify(Ref.USER_PIN, pin)
                key = bytearray(self._send(apdu, "DERIVE"))
            finally:
                self._logout(Ref.USER_PIN)
        if len(key) != length:
            _wipe(key)
            raise CardError(f"card in {self.reader!r}: DERIVE returned a wrong length", sw=SW.OK)
        return key

    def lock(self, admin_pin: Secret) -> None:
        """Personalised -> locked: the card keeps its key and refuses to use it."""
        self._admin_command(admin_pin, Ins.LOCK, "LOCK")

    def terminate(self, admin_pin: Secret) -> None:
        """Wipe the keys and end the card's life (irreversible)."""
        self._admin_command(admin_pin, Ins.TERMINATE, "TERMINATE")

    def _admin_command(self, admin_pin: Secret, ins: int, what: str) -> None:
        with self.transport.transaction():
            self._select()
            try:
                self._verify(Ref.ADMIN_PIN, admin_pin)
                self._send(Command(cla=0, ins=ins).build(), what)
            finally:
                self._logout(Ref.ADMIN_PIN)


class CardPskSource:
    """A PSK held by a smartcard: every derivation runs on the card (fails closed)."""

    def __init__(
        self,
        where: ReaderUrl,
        *,
        pin: bytearray,
        slot: int = DEFAULT_SLOT,
        timeout: float = 5.0,
    ) -> None:
        self.where, self.slot, self.timeout = where, slot, timeout
        self._lock = threading.Lock()  # callers derive from worker threads (asyncio.to_thread)
        self._pin: bytearray | None = pin
        self._card: Card | None = None
        self._failed: PskError | None = None
        self.serial: str | None = None
        try:
            card = self._connect(self.timeout)  # waits for the card at start only
            card.check_pin(pin)
        except HsmError as exc:
            raise self._fail(exc) from None

    def _connect(self, timeout: float = 0.0) -> Card:
        if self._card is None:
            card = Card.open(self.where, timeout=timeout)
            try:
                info = card.info()
            except BaseException:
                card.close()
                raise
            self._card, self.serial = card, info.serial
            if info.lifecycle != Lifecycle.PERSONALISED:
                raise CardStateError(
                    f"card {info.serial} in {info.reader!r} is {info.lifecycle.name.lower()}",
                    sw=SW.CONDITIONS_NOT_SATISFIED,
                )
            if not 1 <= self.slot <= len(info.slots) or not info.slots[self.slot - 1]:
                raise CardError(
                    f"card {info.serial}: key slot {self.slot} is empty",
                    sw=SW.REFERENCED_DATA_NOT_FOUND,
                )
        return self._card

    def derive(self, context: bytes, nonce: bytes, length: int = 32) -> bytearray:
        """The card's session key for ``context`` and ``nonce`` (PskError: fail closed)."""
        if not 0 < length <= MAX_DERIVE_BYTES:
            raise PskError(f"derive length must be 1..{MAX_DERIVE_BYTES} bytes, got {length}")
        if len(context) > MAX_CONTEXT or len(nonce) > MAX_NONCE:
            raise PskError(
                f"a card takes contexts up to {MAX_CONTEXT} and nonces up to {MAX_NONCE} bytes"
            )
        with self._lock:
            if self._pin is None:
                raise PskError(f"PSK card {self.where}: source closed")
            if self._failed is not None:
                raise PskError(self._failed.message, code=self._failed.code)
            try:
                return self._connect().derive(self._pin, context, nonce, length, self.slot)
            except HsmError as exc:
                raise self._fail(exc) from None

    def present(self) -> bool:
        """Whether the card answers now (the management agent's probe): a card pulled
        since the last look fails closed as a derivation would, with the alarm; a card
        put back after a failure is connected again (no alarm while it stays out)."""
        with self._lock:
            if self._pin is None or self._failed is not None:
                return False
            if self._card is None:  # out since the last failure: is it back?
                try:
                    self._connect()
                except HsmError:
                    return False
                return True
            try:
                self._card.info()
            except HsmError as exc:
                self._fail(exc)
                return False
            return True

    def _fail(self, exc: HsmError) -> PskError:
        """Log the alarm, drop the connection, and (after PIN trouble) stay failed."""
        what = f"PSK card {self.where} ({self.serial or 'unknown serial'}): {exc.message}"
        log.critical(
            "PSK card alarm: failing closed",
            extra={
                "alarm": "psk-card",
                "reader": str(self.where),
                "serial": self.serial,
                "error": exc.code,
            },
        )
        failure = PskError(what, code=exc.code)
        if isinstance(exc, CardError):
            self._failed = failure  # wrong PIN, blocked, locked: never present the PIN again
        if self._card is not None:
            with contextlib.suppress(HsmError):
                self._card.close()
            self._card = None
        return failure

    def close(self) -> None:
        with self._lock:
            if self._pin is not None:
                _wipe(self._pin)
                self._pin = None
            if self._card is not None:
                with contextlib.suppress(HsmError):
                    self._card.close()
                self._card = None

    def __repr__(self) -> str:
        return f"CardPskSource({str(self.where)!r}, slot={self.slot})"


def read_pin_file(path: Path) -> bytearray:
    """The first line of a PIN file readable by its owner only."""
    try:
        mode = path.stat().st_mode
        line = bytearray(read_bounded(path, MAX_PIN_FILE).partition(b"\n")[0])
    except OSError as exc:
        raise HsmError(
            f"PIN file {path}: unreadable ({exc.strerror})", code="HSM-PIN-FILE"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _wipe(line)
        raise HsmError(f"PIN file {path}: readable by others (chmod 600 it)", code="HSM-PIN-FILE")
    while line and line[-1] in (0x0A, 0x0D):
        line.pop()
    return line


def open_card_psk_source(url: str, *, base: Path | None = None) -> CardPskSource:
    """Open the smartcard PSK source a ``pcsc://`` URL names (see the module docstring)."""
    try:
        where = parse_url(url)
        params = dict(where.params)
        unknown = set(params) - {"pin-file", "pin-env", "slot", "timeout"}
        if unknown:
            raise HsmError(f"unknown parameter(s) {', '.join(sorted(unknown))}")
        if ("pin-file" in params) == ("pin-env" in params):
            raise HsmError("give the PIN's source: exactly one of pin-file= or pin-env=")
        pin = _pin_from(params, base)
        try:
            slot, timeout = int(params.get("slot", DEFAULT_SLOT)), float(params.get("timeout", 5))
        except ValueError:
            _wipe(pin)
            raise HsmError("slot must be an integer and timeout a number of seconds") from None
    except HsmError as exc:
        raise PskError(f"PSK source {_redact(url)}: {exc.message}", code=exc.code) from None
    return CardPskSource(where, pin=pin, slot=slot, timeout=timeout)


def _pin_from(params: dict[str, str], base: Path | None) -> bytearray:
    if "pin-env" in params:
        value = os.environ.get(params["pin-env"])
        if not value:
            raise HsmError(f"environment variable {params['pin-env']} is not set")
        return bytearray(value.encode())
    path = Path(params["pin-file"])
    if not path.is_absolute() and base is not None:
        path = base / path
    return read_pin_file(path)


def _redact(url: str) -> str:
    """The URL without its query (it names where the PIN is, never the PIN, but stay terse)."""
    return url.partition("?")[0]
