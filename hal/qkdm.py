"""What a KMS sees of a QKD module (QKDM), whatever the transport.

A QKDM pair shares key material under common key IDs. The KMS at the *initiating* end
takes the next key with :meth:`Qkdm.get_key`; the peer KMS fetches the same key with
:meth:`Qkdm.get_key_by_id`. Either way a key leaves the module exactly once.

:class:`QkdKey` holds key bytes in a ``bytearray`` so they can be erased after use, and
its ``repr`` never shows them: a key that reaches a log line prints as its ID only.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

_STATE_LOCK = threading.Lock()


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


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkStateChanged:
    """A QKDM's link state changed, as seen by its driver."""

    link: str
    """Link name (or device name when the device never answered)."""
    old: LinkState | None
    """The previous state; None for the first observation."""
    new: LinkState
    """The state now."""
    reason: str
    """Why, in words (an error message, never key material)."""


StateCallback = Callable[[LinkStateChanged], None]


class Qkdm(abc.ABC):
    """One end of a QKD link. Drivers implement this; the KMS uses nothing else.

    State-change notifications: :meth:`subscribe` a callback; drivers report what they
    observe through :meth:`_observe_state` (a failed request, a status reading), and
    :meth:`poll_state` reads the status on demand, so even a driver that never calls
    ``_observe_state`` (the emulated one) notifies when polled. Callbacks run in the
    caller's thread, after the state is recorded; one that raises is not retried.
    """

    @abc.abstractmethod
    def get_key(self) -> QkdKey:
        """Take the oldest key in the buffer; raise NoKeyAvailable or LinkDownError."""

    def get_keys(self, count: int) -> list[QkdKey]:
        """Take up to ``count`` of the oldest keys in order, as ``count`` calls of
        :meth:`get_key` would; fewer when the buffer runs short, and the error of
        :meth:`get_key` when it holds none. Drivers that can read a run of keys at once
        override this (the emulated one derives them in one cipher call)."""
        from hal.errors import HalError  # as in poll_state

        keys: list[QkdKey] = []
        for _ in range(count):
            try:
                keys.append(self.get_key())
            except HalError:
                if not keys:
                    raise
                break
        return keys

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

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Get ready to hand out keys in order (:meth:`get_key`) without a delay on the
        first: called once, at its start, by the end that takes keys in order."""

    # -- state-change notifications (default implementation, no driver cooperation) ------
    def subscribe(self, callback: StateCallback) -> Callable[[], None]:
        """Call ``callback`` on every link-state change; return a function that unsubscribes."""
        watchers = self._watchers()
        watchers.append(callback)

        def unsubscribe() -> None:
            if callback in watchers:
                watchers.remove(callback)

        return unsubscribe

    def poll_state(self) -> LinkState:
        """Read the status now, notify subscribers if the state changed, return it."""
        from hal.errors import HalError  # hal.errors imports nothing from here; keep it so

        try:
            reading = self.status()
        except HalError as exc:
            self._observe_state(LinkState.DOWN, exc.message)
            return LinkState.DOWN
        self._observe_state(reading.state, "status reading", link=reading.link)
        return reading.state

    def _observe_state(self, state: LinkState, reason: str, *, link: str | None = None) -> None:
        """Record ``state``; notify subscribers if it differs from the last one recorded."""
        with _STATE_LOCK:
            old: LinkState | None = getattr(self, "_hal_state", None)
            self._hal_state = state
            if link is not None:
                self._hal_link = link
            name = getattr(self, "_hal_link", None) or type(self).__name__
        if old is state:
            return
        event = LinkStateChanged(link=name, old=old, new=state, reason=reason)
        for callback in list(self._watchers()):
            callback(event)

    def _watchers(self) -> list[StateCallback]:
        # Created lazily so drivers need not call an ABC __init__ (the emulated one does not).
        with _STATE_LOCK:
            watchers: list[StateCallback] | None = getattr(self, "_hal_watchers", None)
            if watchers is None:
                watchers = []
                self._hal_watchers = watchers
            return watchers

    def __enter__(self) -> Qkdm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
