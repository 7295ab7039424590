"""Fault injection: power is lost at every write step of flashing and of every boot-state
update (before the write, or with the write torn in half); the next power-on must always
boot a slot whose content verifies, never grant extra boot attempts, and never lose the
committed image.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from images.boot import boot, commit, slot_manifest, verify_slot
from images.bootstate import SlotState
from images.build import BuildSpec, build
from images.install import flash
from images.target import Device, PowerLoss, Target
from tests.images.conftest import EPOCH, fake_wheel


class FaultyDevice(Device):
    """Loses power at write step ``fail_at`` (a pwrite or a sync), tearing the write."""

    def __init__(self, path: Path, fail_at: int, tear: float) -> None:
        super().__init__(path)
        self.fail_at, self.tear, self.steps = fail_at, tear, 0

    def _tick(self) -> bool:
        self.steps += 1
        return self.steps - 1 == self.fail_at

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        if self._tick():
            super().pwrite(bytes(data)[: int(len(data) * self.tear)], offset)
            raise PowerLoss(f"power lost in a write at {offset}")
        super().pwrite(data, offset)

    def copy_in(self, src_fd: int, src_offset: int, size: int, offset: int) -> None:
        self.pwrite(os.pread(src_fd, size, src_offset), offset)

    def sync(self) -> None:
        if self._tick():
            raise PowerLoss("power lost before sync")
        super().sync()


def passes(ctx: Any) -> str | None:
    return None


def b_fails(ctx: Any) -> str | None:
    return "injected failure" if ctx.slot == "b" else None


def count_steps(disk: Path, op: Any) -> int:
    device = FaultyDevice(disk, fail_at=-1, tear=0)
    op(Target(disk, device))
    return device.steps


def interrupted(base: Path, work: Path, op: Any, step: int, tear: float) -> Path:
    disk = Path(shutil.copyfile(base, work))
    target = Target(disk, FaultyDevice(disk, step, tear))
    with pytest.raises(PowerLoss):
        op(target)
    target.close()
    return disk


def assert_boots_good_slot(disk: Path, max_attempts: dict[str, int]) -> None:
    target = Target(disk)
    before = target.state()
    for slot, limit in max_attempts.items():
        assert before.slots[slot].attempts <= limit, "a crash granted extra boot attempts"
    result = boot(target, passes)
    state = target.state()
    assert state.slots[result.slot].state in (SlotState.GOOD, SlotState.TRIAL)
    assert verify_slot(target, result.slot, slot_manifest(target, state, result.slot)) is None
    assert result.rollback is None or "differs" not in result.rollback.reason
    target.close()


@pytest.fixture(scope="module")
def multi_chunk_bundle(tmp_path_factory: pytest.TempPathFactory, keys: Any, topo: Any) -> Path:
    """v2 with a 4 KiB chunk size and 40 KiB of extra data: a dozen payload writes."""
    base = tmp_path_factory.mktemp("pl")
    spec = BuildSpec(
        topology=topo,
        node=topo.node(2),
        wheelhouse=fake_wheel(base / "w"),
        version="2.5.0",
        security_version=2,
        epoch=EPOCH,
        chunk_size=4096,
        extra_files={"usr/lib/qkdn/blob.bin": os.urandom(40 << 10)},
    )
    return build(spec, keys.release, keys.ring, base / "v25.qkdnb").bundle


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory, keys: Any, images: Any) -> Path:
    """A target with v1 committed in slot a."""
    from images.target import init_target
    from tests.images.conftest import policy_for

    disk = tmp_path_factory.mktemp("base") / "disk.img"
    target = init_target(disk, 16 << 20, policy_for(keys), slot_size=6 << 20)
    flash(images["v1"], target)
    boot(target, passes)
    commit(target)
    target.close()
    return disk


@pytest.mark.parametrize("tear", [0.0, 0.5])
def test_power_loss_during_flash(committed, multi_chunk_bundle, tmp_path, tear):
    def op(t: Target) -> Any:
        return flash(multi_chunk_bundle, t)

    steps = count_steps(Path(shutil.copyfile(committed, tmp_path / "count.img")), op)
    assert steps >= 12
    for step in range(steps):
        disk = interrupted(committed, tmp_path / "disk.img", op, step, tear)
        assert_boots_good_slot(disk, {"a": 0, "b": 3})


@pytest.fixture(scope="module")
def trial_b(tmp_path_factory: pytest.TempPathFactory, committed: Path, images: Any) -> Path:
    """v1 good in a, the failing v3 flashed as a trial in b (3 attempts)."""
    disk = Path(shutil.copyfile(committed, tmp_path_factory.mktemp("trial") / "disk.img"))
    target = Target(disk)
    flash(images["v3bad"], target)
    target.close()
    return disk


@pytest.mark.parametrize("tear", [0.0, 0.5])
def test_power_loss_in_every_boot_state_update(trial_b, tmp_path, tear):
    """Through the whole life of a failing trial: three failing boots, then the rollback."""
    stage = Path(shutil.copyfile(trial_b, tmp_path / "stage.img"))
    for _ in range(4):  # three failing boots, then the rollback
        attempts_before = Target(stage).state().slots["b"].attempts

        def op(t: Target) -> Any:
            return boot(t, b_fails)

        steps = count_steps(Path(shutil.copyfile(stage, tmp_path / "count.img")), op)
        for step in range(steps):
            disk = interrupted(stage, tmp_path / "disk.img", op, step, tear)
            assert_boots_good_slot(disk, {"b": attempts_before})
        boot(Target(stage), b_fails)  # the uninterrupted boot moves the story on
    final = Target(stage).state()
    assert final.slots["b"].state is SlotState.BAD and final.primary == "a"


@pytest.mark.parametrize("tear", [0.0, 0.5])
def test_power_loss_during_commit(committed, images, tmp_path, tear):
    stage = Path(shutil.copyfile(committed, tmp_path / "stage.img"))
    target = Target(stage)
    flash(images["v2"], target)
    boot(target, passes)
    target.close()
    steps = count_steps(Path(shutil.copyfile(stage, tmp_path / "count.img")), commit)
    for step in range(steps):
        disk = interrupted(stage, tmp_path / "disk.img", commit, step, tear)
        assert_boots_good_slot(disk, {"b": 2})
        assert Target(disk).state().floor in (1, 2)
