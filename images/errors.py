"""Errors raised by the appliance image tooling (``images``).

One root, :class:`ImageError`, with a machine-readable ``code``. Subclasses separate
trust failures (a bundle is refused: :class:`BundleRejected`, whose ``code`` names the
reason), caller misuse (:class:`ImageUsageError`), the target disk and its boot state
(:class:`TargetError`, :class:`BootStateError`, :class:`NoBootableSlot`), illegal state
transitions (:class:`TransitionError`) and build failures (:class:`BuildError`).
Messages never contain private key material.
"""

from __future__ import annotations


class ImageError(Exception):
    """Root of every error raised by ``images``."""

    code = "IMG"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ImageUsageError(ImageError):
    """Bad arguments or unreadable input files (caller misuse)."""

    code = "IMG-USAGE"


class KeyFileError(ImageError):
    """A key, public key or keyring file is unreadable or malformed."""

    code = "IMG-KEY"


class BundleRejected(ImageError):
    """A bundle is refused. ``code`` says why; nothing has been written to the target.

    Codes: IMG-MALFORMED (not a bundle), IMG-SIGNATURE (a signature or the key chain does
    not verify, or a signature is missing), IMG-REVOKED, IMG-DEV-KEY (a development key on a
    device that accepts release keys only), IMG-COMPATIBLE, IMG-DOWNGRADE, IMG-TRUNCATED,
    IMG-TOO-LARGE, IMG-TAMPERED (the payload does not match the signed manifest).
    """

    code = "IMG-REJECTED"


class TargetError(ImageError):
    """The target disk is missing, has the wrong layout, or cannot be read or written."""

    code = "IMG-TARGET"


class BootStateError(TargetError):
    """A boot-state, policy or slot-manifest record is unreadable or malformed."""

    code = "IMG-STATE"


class NoBootableSlot(TargetError):
    """Neither slot holds an image that may boot."""

    code = "IMG-NO-BOOTABLE"


class TransitionError(ImageError):
    """An event that the slot's state does not accept (an unknown (state, event) pair)."""

    code = "IMG-TRANSITION"


class BuildError(ImageError):
    """Building an image failed: a missing tool, a bad input tree, a forbidden file."""

    code = "IMG-BUILD"
