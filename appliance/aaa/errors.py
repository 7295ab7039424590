"""Errors of the AAA device: one root, :class:`AaaError`, each with a machine-readable code.

Caller misuse (a bad registry entry, an unknown name) is :class:`RegistryError`; a broken
accounting chain or signature is :class:`AccountingError` (a trust failure, never retried);
an SNMP exchange that failed or was refused is :class:`SnmpError` (transport, retryable).
"""

from __future__ import annotations

from appliance.errors import printable


class AaaError(Exception):
    """Root of every error raised by ``appliance.aaa``."""

    code = "AAA"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(printable(message))
        self.message = printable(message)
        if code is not None:
            self.code = code


class RegistryError(AaaError):
    """The registry refuses an entry or does not know a name."""

    code = "AAA-REGISTRY"


class NotFound(RegistryError):
    code = "AAA-UNKNOWN"


class AccountingError(AaaError):
    """An accounting record conflicts, or the chain or a signed head does not verify."""

    code = "AAA-ACCOUNTING"


class SnmpError(AaaError):
    """An SNMP exchange with the AAA device failed (timeout, refusal, error status)."""

    code = "AAA-SNMP"
