"""Errors raised by the random number pipeline (``qrng``).

One root, :class:`QrngError`, with a machine-readable ``code``. The generator fails
closed: a health failure raises :class:`EntropySourceFailure` and no output is produced.
"""

from __future__ import annotations


class QrngError(Exception):
    """Root of every error raised by ``qrng``."""

    code = "QRNG"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class QrngUsageError(QrngError):
    """Bad arguments or input data (caller misuse): wrong sample width, empty file, ..."""

    code = "QRNG-USAGE"


class EntropySourceFailure(QrngError):
    """The noise source failed a health test; output is refused until a new start-up test."""

    code = "QRNG-SOURCE-FAILED"


class DrbgError(QrngError):
    """A DRBG was used outside its specification (request too long, not instantiated...)."""

    code = "QRNG-DRBG"


class GeneratorTimeout(QrngError):
    """Not enough healthy entropy arrived before the timeout (retryable)."""

    code = "QRNG-TIMEOUT"
