"""Errors of the key management system, under the appliance's error root.

Codes separate caller misuse, peer misbehaviour (including integrity failures, which are
also alarms) and ordinary scarcity (no key yet, store full). Messages carry key IDs at
most, never key material.
"""

from __future__ import annotations

from appliance.errors import ApplianceError


class KmsError(ApplianceError):
    """Root of the KMS errors."""

    code = "KMS"


class StoreError(KmsError):
    """The key store cannot do what was asked (full, unreadable, busy)."""

    code = "KMS-STORE"


class StoreFull(StoreError):
    """Adding these keys would exceed the store's capacity."""

    code = "KMS-STORE-FULL"


class KeyUnavailable(KmsError):
    """No such key (unknown, already taken) or no key in stock."""

    code = "KMS-NO-KEY"


class KeyExpired(KeyUnavailable):
    """The key existed but its lifetime is over; it has been deleted."""

    code = "KMS-KEY-EXPIRED"


class IntegrityFailure(KmsError):
    """A message or record failed authentication: dropped, and an alarm is raised."""

    code = "KMS-INTEGRITY"


class StaleGrant(IntegrityFailure):
    """The sender used link keys granted by an earlier run of the link's master end: it must
    drop them and ask for a fresh grant (no key was spent, the message was not opened)."""

    code = "KMS-STALE-GRANT"


class UnknownChannel(KmsError):
    """The callee has no such AKMS channel or epoch (it restarted, or the key was retired):
    the caller opens the channel again."""

    code = "KMS-CHANNEL"


class StaleKey(IntegrityFailure):
    """The receiving end cannot fetch the link key a message names (its QKDM handed that
    key out already: the receiver restarted and lost it, or the ID is forged). The sender
    drops its current link keys and tries once more with fresh ones."""

    code = "KMS-STALE-KEY"


class ReplayDetected(IntegrityFailure):
    """A relay message was seen before."""

    code = "KMS-REPLAY"


class ProtocolError(KmsError):
    """A peer sent a malformed or out-of-order message."""

    code = "KMS-PROTOCOL"
