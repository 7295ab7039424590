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


class StoreDiskFull(StoreError):
    """The disk (or the file's page limit) is full: nothing of the transaction stands."""

    code = "KMS-STORE-FULL-DISK"


class StoreBusy(StoreError):
    """Another connection held the store past the busy timeout: nothing was done."""

    code = "KMS-STORE-BUSY"


class StoreCorrupt(StoreError):
    """SQLite finds the store file damaged (not a database, malformed pages): an alarm; a
    sharded store quarantines the file."""

    code = "KMS-STORE-CORRUPT"


class StoreKeyMismatch(StoreError):
    """The store's key-check record does not open under this node key: the file was sealed
    under another key (an alarm; a sharded store quarantines the file)."""

    code = "KMS-STORE-KEY"


class NodeKeyMissing(StoreError):
    """The node key file is missing while key stores sealed under it exist: the node
    refuses to start rather than make a key that cannot open them."""

    code = "KMS-NODE-KEY-MISSING"


class KeyUnavailable(KmsError):
    """No such key (unknown, already taken) or no key in stock. ``missing`` lists the key
    IDs asked for that are not available, when known; ``held`` those of them that are held
    for the asking session but not available now (expired, or being served). The others
    are not held for it: never issued, issued to another session, or already handed out."""

    code = "KMS-NO-KEY"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        missing: list[str] | None = None,
        held: list[str] | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.missing: list[str] = missing or []
        self.held: list[str] = held or []


class KeyExpired(KeyUnavailable):
    """The key existed but its lifetime is over; it has been deleted."""

    code = "KMS-KEY-EXPIRED"


class IntegrityFailure(KmsError):
    """A message or record failed authentication: dropped, and an alarm is raised."""

    code = "KMS-INTEGRITY"


class Resync(KmsError):
    """The two ends of a link disagree about which keys are live because one of them
    restarted: routine after a crash, not an attack. The sender drops its link keys and
    seals once more with fresh ones; nothing is raised as an alarm."""

    code = "KMS-RESYNC"


class StaleGrant(Resync):
    """The sender used link keys granted by an earlier run of the link's master end: it must
    drop them and ask for a fresh grant (no key was spent, the message was not opened)."""

    code = "KMS-STALE-GRANT"


class UnknownChannel(KmsError):
    """The callee has no such AKMS channel or epoch (it restarted, or the key was retired):
    the caller opens the channel again."""

    code = "KMS-CHANNEL"


class StaleKey(Resync):
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


class MessageError(ProtocolError):
    """An inter-node message could not be read (or, sending, would not be): see
    :mod:`appliance.kms.messages`. The subclasses say which rule it broke."""

    code = "KMS-MSG"


class MessageSyntaxError(MessageError):
    """Not MessagePack, not a map, trailing bytes, or not the canonical encoding."""

    code = "KMS-MSG-SYNTAX"


class MessageVersionError(MessageError):
    """The message's version (``v``) is not one this node reads."""

    code = "KMS-MSG-VERSION"


class MessageTypeError(MessageError):
    """The message's type (``type``) is missing, unknown, or not the one the endpoint takes."""

    code = "KMS-MSG-TYPE"


class MessageFieldError(MessageError):
    """A field is unknown, missing, of the wrong type, or out of its bounds."""

    code = "KMS-MSG-FIELD"
