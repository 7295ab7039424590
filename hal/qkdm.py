"""What a KMS sees of a QKD module (QKDM), whatever the transport.

A QKDM pair shares key material under common key IDs. The KMS at the *initiating* end
takes the next key with :meth:`Qkdm.get_key`; the peer KMS fetches the same key with
:meth:`Qkdm.get_key_by_id`. Either way a key leaves the module exactly once.

:class:`QkdKey` holds key bytes in a ``bytearray`` so they can be erased after use, and
its ``repr`` never shows them: a key that reaches a log line prints as its ID only.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import StrEnum


class LinkState(StrEnum):
    """Operational state of a QKD link as its module reports it."""

    UP = "up"
    """Keys are being distilled."""
    DOWN = "down"
    """No quantum signal (fibre cut, module off): no keys."""
    ABORT = "abort"
    """QBER above the abort threshold: the protocol discards the key."""


@dataclass(eq=False, slots=True)
class QkdKey:
    """One key from a QKDM. Call :meth:`erase` once it has been used."""

    key_id: str
    """The key's ID (a UUID string), the same at both ends of the link."""
    material: bytearray = field(repr=False)
    """The key bits. Never logged, never compared outside constant-time helpers."""

    @property
    def size_bits(self) -> int:
        """Key length in bits."""
        return len(self.material) * 8

    def erase(self) -> None:
        """Overwrite the key bytes with zeros and drop them."""
        for i in range(len(self.material)):
            self.material[i] = 0
        del self.material[:]

    def __repr__(self) -> str:
        return f"QkdKey(key_id={self.key_id!r}, bits=<redacted>)"


@dataclass(frozen=True, kw_only=True, slots=True)
class QkdmStatus:
    """A status reading, as a real QKDM exposes it to its KMS."""

    link: str
    """Link name, e.g. ``link-8-9``."""
    state: LinkState
    """Up, down, or aborted because of the QBER."""
    skr_bps: float
    """Secret key rate being distilled now, bits per second (0 when not up)."""
    qber: float | None
    """Quantum bit error ratio now (0..0.5), or None when there is no signal."""
    key_count: int
    """Keys waiting in this end's buffer."""
    max_key_count: int
    """Capacity of the key buffer."""
    key_size: int
    """Size of each key, in bits."""
    keys_produced: int
    """Keys distilled since the link started (monotonic counter, includes evicted ones)."""


class Qkdm(abc.ABC):
    """One end of a QKD link. Drivers implement this; the KMS uses nothing else."""

    @abc.abstractmethod
    def get_key(self) -> QkdKey:
        """Take the oldest key in the buffer; raise NoKeyAvailable or LinkDownError."""

    @abc.abstractmethod
    def get_key_by_id(self, key_id: str) -> QkdKey:
        """Take the key with this ID; raise KeyNotFound or KeyNotYetAvailable."""

    @abc.abstractmethod
    def key_count(self) -> int:
        """Number of keys in this end's buffer now."""

    @abc.abstractmethod
    def status(self) -> QkdmStatus:
        """Current SKR, QBER, link state and buffer level."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device."""

    def __enter__(self) -> Qkdm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
