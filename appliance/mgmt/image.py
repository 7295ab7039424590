"""The appliance image a node runs, from its target disk's boot state (:mod:`images`).

A node installed from an appliance image has a target disk (GPT, A/B slots, boot records:
:class:`images.target.Target`); the bootloader's state machine (:mod:`images.bootstate`)
records there which slot booted and, when a trial image failed or ran out of attempts,
the rollback (``last_rollback``: the abandoned slot, its version, the slot booted
instead, why). :func:`read_image` turns that record into what QKDN-MIB shows: the booted
slot (``slotA``, ``slotB``, ``none``), the image version, and, while the node runs the
slot a rollback fell back to and the abandoned slot is still marked bad, the rollback's
text (the agent raises ``qkdnSlotRollback`` on it and clears it when a good image runs
again). :class:`ImageWatch` re-reads the disk only when its modification time changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from images.bootstate import SLOTS, SlotState
from images.errors import ImageError
from images.target import Target

SLOT_LABELS = {"a": "slotA", "b": "slotB"}


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageReading:
    slot: str = "none"
    """QKDN-MIB's label of the booted slot."""
    version: str = ""
    rollback: str = ""
    """Non-empty while the node runs on the slot a rollback fell back to."""


def read_image(path: Path) -> ImageReading:
    """The image state recorded on the target disk at ``path`` (``none`` if unreadable)."""
    try:
        target = Target(path)
    except (ImageError, OSError, ValueError):
        return ImageReading()
    try:
        state = target.state()
    except (ImageError, OSError, ValueError):
        return ImageReading()
    finally:
        target.close()
    booted = state.booted
    if booted not in SLOTS:
        return ImageReading()
    rb = state.last_rollback
    text = ""
    if rb is not None and rb.to == booted and state.slots[rb.slot].state is SlotState.BAD:
        text = f"slot {rb.slot} ({rb.version}) rolled back to slot {rb.to}: {rb.reason}"
    return ImageReading(
        slot=SLOT_LABELS[booted], version=state.slots[booted].version, rollback=text[:200]
    )


class ImageWatch:
    """:func:`read_image` of one target disk, read again when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._last = ImageReading()

    def read(self) -> ImageReading:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            return ImageReading()
        if stamp != self._stamp:
            self._last, self._stamp = read_image(self.path), stamp
        return self._last
