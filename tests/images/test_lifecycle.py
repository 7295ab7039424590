"""Flash, boot, commit, update, anti-rollback and automatic rollback on one target."""

from __future__ import annotations

import subprocess

from images.boot import boot, commit, default_health
from images.bootstate import SlotState
from images.errors import BundleRejected, TransitionError
from images.install import flash
from tests.images.helpers import manifest_of, parts


def healthy(ctx):
    return None


def test_update_cycle_and_floor(images, make_target):
    target = make_target()
    assert flash(images["v1"], target).slot == "a"
    first = boot(target, default_health())  # self-test from the slot's own application
    assert (first.slot, first.healthy, first.attempts_left) == ("a", True, 2)
    assert commit(target).floor == 1
    second = flash(images["v2"], target)
    assert second.slot == "b"
    assert target.state().slots["a"].state is SlotState.GOOD  # the fallback stays intact
    assert boot(target, healthy).slot == "b"
    state = commit(target)
    assert (state.floor, state.primary, state.slots["b"].state) == (2, "b", SlotState.GOOD)
    try:
        flash(images["v1"], target)
        raise AssertionError("downgrade accepted")
    except BundleRejected as exc:
        assert exc.code == "IMG-DOWNGRADE"


def test_failing_image_rolls_back_after_its_attempts(images, make_target):
    target = make_target()
    flash(images["v1"], target)
    boot(target, healthy)
    commit(target)
    flash(images["v3bad"], target)
    for left in (2, 1, 0):
        result = boot(target, default_health())
        assert (result.slot, result.healthy, result.attempts_left) == ("b", False, left)
        assert "self-test exited 1" in result.reason
    try:
        commit(target)
        raise AssertionError("a failed trial was committed")
    except TransitionError:
        pass
    result = boot(target, healthy)
    assert result.slot == "a" and result.healthy
    assert result.rollback is not None and result.rollback.slot == "b"
    assert "no boot attempts left" in result.rollback.reason
    assert "self-test exited 1" in result.rollback.reason
    state = target.state()
    assert state.slots["b"].state is SlotState.BAD and state.last_rollback == result.rollback


def test_corrupted_slot_is_abandoned(images, make_target):
    target = make_target()
    flash(images["v1"], target)
    boot(target, healthy)
    commit(target)
    flash(images["v2"], target)
    target.device.pwrite(b"\xff" * 16, target.layout["b"].start + 5000)
    result = boot(target, healthy)
    assert result.slot == "a" and result.rollback is not None
    assert "differs from its manifest" in result.rollback.reason


def test_flashed_slot_verifies_with_veritysetup(images, make_target, tmp_path):
    target = make_target()
    flash(images["v2"], target)
    env, _ = parts(images["v2"])
    v = manifest_of(env)["verity"]
    slot = tmp_path / "slot.bin"
    with target.path.open("rb") as fh:
        fh.seek(target.layout["b" if target.state().primary == "b" else "a"].start)
        slot.write_bytes(fh.read(manifest_of(env)["payload_size"]))
    cmd = [
        "veritysetup",
        "verify",
        str(slot),
        str(slot),
        f"--hash-offset={v['hash_offset']}",
        f"--data-blocks={v['data_blocks']}",
        v["root_hash"],
    ]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    bad = bytearray(slot.read_bytes())
    bad[10] ^= 1
    slot.write_bytes(bytes(bad))
    assert subprocess.run(cmd, capture_output=True).returncode != 0
