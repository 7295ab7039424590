"""Errors of the hsm package (smartcards, PSK sources, the PKCS#11 keystore).

One root, :class:`HsmError`, each subclass with a machine-readable ``code``; the CLI prints
``qkdn: error [CODE]: message``. Messages name readers, tokens, card serials and status
words, never PINs or key material.
"""

from __future__ import annotations


class HsmError(Exception):
    """Root of every error raised by ``hsm``."""

    code = "HSM"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class PskError(HsmError):
    """A pre-shared-key source is missing, malformed, locked or removed (fail closed)."""

    code = "HSM-PSK"


class ApduError(HsmError):
    """Bytes that are not a well-formed ISO 7816-4 command or response APDU."""

    code = "HSM-APDU"


class ReaderError(HsmError):
    """PC/SC trouble: pcscd not running, no such reader, no card, transmit failure."""

    code = "HSM-READER"


class CardRemovedError(ReaderError):
    """The card left the reader (or the emulator disconnected) during a session."""

    code = "HSM-CARD-REMOVED"


class CardError(HsmError):
    """The card refused a command; ``sw`` keeps the card's own status word."""

    code = "HSM-CARD"

    def __init__(self, message: str, *, sw: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.sw = sw


class PinError(CardError):
    """A wrong PIN, admin PIN or PUK; ``remaining`` tries are left before it blocks."""

    code = "HSM-PIN"

    def __init__(self, message: str, *, sw: int, remaining: int) -> None:
        super().__init__(message, sw=sw)
        self.remaining = remaining


class PinBlockedError(CardError):
    """The retry counter of a PIN, admin PIN or PUK is at zero."""

    code = "HSM-PIN-BLOCKED"


class CardStateError(CardError):
    """The card's lifecycle does not allow the command (blank, locked, terminated...)."""

    code = "HSM-CARD-STATE"


class EnrollmentError(HsmError):
    """The enrollment ceremony stopped; the message says what state the cards are left in."""

    code = "HSM-ENROLL"
