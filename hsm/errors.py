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
