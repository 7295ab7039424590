"""Errors raised by device access (``hal``).

One root, :class:`HalError`, with a machine-readable ``code``. Subclasses separate
caller misuse (a bad URL, a bad argument), device misbehaviour, and the ordinary
"no key yet" conditions a KMS polls through. Messages never contain key material.
"""

from __future__ import annotations


class HalError(Exception):
    """Root of every error raised by ``hal``."""

    code = "HAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DeviceUrlError(HalError):
    """The device URL is malformed, has an unknown scheme or bad parameters (caller misuse)."""

    code = "HAL-URL"


class DeviceError(HalError):
    """The device misbehaved or is unusable (peer/device failure)."""

    code = "HAL-DEVICE"


class LinkDownError(DeviceError):
    """The QKD link delivers no key: link down or QBER above the abort threshold."""

    code = "HAL-LINK-DOWN"


class NoKeyAvailable(HalError):
    """The key buffer is empty right now; retry later (retryable, not a failure)."""

    code = "HAL-NO-KEY"


class KeyNotYetAvailable(HalError):
    """The key ID is valid but this end has not received that key yet (retryable)."""

    code = "HAL-KEY-PENDING"


class KeyNotFound(HalError):
    """No key with this ID at this end: unknown, already taken, or aged out of the buffer."""

    code = "HAL-KEY-NOT-FOUND"


class ProtocolError(DeviceError):
    """The device or KME broke its protocol: bad frame, malformed JSON, unexpected reply."""

    code = "HAL-PROTOCOL"


class DeviceTimeout(DeviceError):
    """The device stopped answering within the bounded time (retries included)."""

    code = "HAL-TIMEOUT"


class DeviceDisconnected(DeviceError):
    """The device is gone (unplugged, port closed, connection refused); it may come back."""

    code = "HAL-DISCONNECTED"


class DeviceUnavailable(DeviceError):
    """The device answered but is temporarily unable to serve (e.g. HTTP 503 after retries)."""

    code = "HAL-UNAVAILABLE"


class TrustError(DeviceError):
    """The peer failed authentication (TLS certificate, SAE identity): never retried."""

    code = "HAL-TRUST"


class KeyOutcomeUnknown(DeviceError):
    """A key request may have been served but its answer was lost: the key is unusable.

    Raised instead of retrying a non-idempotent request (ETSI 014 ``enc_keys``), so a key
    is never delivered twice; the peer end's copy ages out of its buffer."""

    code = "HAL-KEY-OUTCOME-UNKNOWN"
