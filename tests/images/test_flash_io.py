"""The overlapped write path of flashing: background flushes while the slot is written."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import images.install as install
from images.boot import boot, slot_manifest, verify_slot
from images.bootstate import SlotState
from images.install import flash
from images.target import Device, Target


class CountingDevice(Device):
    def __init__(self, path: Path, fail_flush: bool = False) -> None:
        super().__init__(path)
        self.flushes, self.fail_flush = 0, fail_flush

    def flush(self) -> None:
        self.flushes += 1
        if self.fail_flush:
            raise OSError(errno.EIO, "injected I/O error")
        super().flush()


def healthy(ctx):
    return None


def test_background_flushes_and_read_back(images, make_target, monkeypatch):
    monkeypatch.setattr(install, "FLUSH_EVERY", 4096)
    path = make_target().path
    target = Target(path, CountingDevice(path))
    result = flash(images["v1"], target)
    assert target.device.flushes >= 1
    state = target.state()
    assert state.slots[result.slot].state is SlotState.TRIAL
    manifest = slot_manifest(target, state, result.slot)
    assert verify_slot(target, result.slot, manifest) is None
    assert boot(target, healthy).slot == result.slot


def test_a_failed_background_flush_is_not_dropped(images, make_target, monkeypatch):
    """An I/O error seen by a flush fails the install; the slot is never armed."""
    monkeypatch.setattr(install, "FLUSH_EVERY", 4096)
    path = make_target().path
    target = Target(path, CountingDevice(path, fail_flush=True))
    with pytest.raises(OSError, match="injected"):
        flash(images["v1"], target)
    assert target.state().slots["a"].state is SlotState.WRITING
