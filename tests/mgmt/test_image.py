"""qkdnSlotRollback from its real source: a node's target disk (:mod:`images.target`) whose
boot record says the node runs the slot a rollback fell back to. The reader takes slot,
version and rollback from the record; the detector raises the alarm once and clears it
when a good image runs; the manager files it as a ``rollback`` alarm of the node."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from appliance.mgmt.detect import Detector
from appliance.mgmt.image import ImageReading, ImageWatch, read_image
from appliance.mgmt.nodeview import NodeReading
from appliance.mgmt.store import Store
from images.bootstate import BootState, Rollback, Slot, SlotState
from images.policy import DevicePolicy
from images.signing import KeyPair
from images.target import Target, init_target

GOOD_A = Slot(state=SlotState.GOOD, version="1.4.0", security_version=1)
BAD_B = Slot(state=SlotState.BAD, version="1.5.0", security_version=1, health="failed: kms")
ROLLBACK = Rollback(slot="b", version="1.5.0", to="a", reason="failed: kms did not start")


def disk(tmp_path: Path) -> Path:
    policy = DevicePolicy(
        compatible="qkdn-appliance-x86_64", anchor=KeyPair.generate("root", os.urandom).public
    )
    path = tmp_path / "disk.img"
    init_target(path, 16 << 20, policy, slot_size=6 << 20).close()
    return path


def write(path: Path, state: BootState) -> None:
    target = Target(path)
    try:
        target.write_state(state)
    finally:
        target.close()


def reading(image: ImageReading) -> NodeReading:
    return NodeReading(
        id=8, name="ckms-minden", role="ckms", software=f"qkdn {image.version}",
        slot=image.slot, rollback=image.rollback,
    )  # fmt: skip


def test_a_rollback_on_the_target_disk_raises_slot_rollback_until_a_good_image_runs(
    tmp_path: Path,
):
    path = disk(tmp_path)
    assert read_image(path) == ImageReading()  # never booted
    assert read_image(tmp_path / "none.img") == ImageReading()
    rolled = BootState(slots={"a": GOOD_A, "b": BAD_B}, primary="a", booted="a",
                       last_rollback=ROLLBACK)  # fmt: skip
    write(path, rolled)
    watch, detector = ImageWatch(path), Detector()
    image = watch.read()
    assert (image.slot, image.version) == ("slotA", "1.4.0")
    assert "slot b (1.5.0) rolled back to slot a" in image.rollback
    [notice] = detector.observe(reading(image))  # the first reading raises what is wrong
    assert (notice.name, notice.severity, notice.resource) == ("qkdnSlotRollback", "major", "image")
    assert detector.observe(reading(watch.read())) == []  # once
    # a new image installed in slot b, booted and committed: the rollback is history
    fixed = replace(
        rolled, booted="b", primary="b",
        slots={"a": GOOD_A, "b": Slot(state=SlotState.GOOD, version="1.5.1", security_version=1)},
    )  # fmt: skip
    write(path, fixed)
    image = watch.read()
    assert (image.slot, image.version, image.rollback) == ("slotB", "1.5.1", "")
    [cleared] = detector.observe(reading(image))
    assert (cleared.name, cleared.severity) == ("qkdnSlotRollback", "cleared")
    store = Store(tmp_path / "m.db")
    raised = store.notify("qkdnSlotRollback", "ckms-minden", "major", "image", notice.text)
    [alarm] = store.alarms()
    assert (alarm.id, alarm.kind, alarm.resource) == (raised, "rollback", "ckms-minden")
    assert store.notify("qkdnSlotRollback", "ckms-minden", "cleared", "image", "ok") == raised
    assert store.alarms() == []
    store.close()


def test_a_damaged_boot_record_reads_as_no_image(tmp_path: Path):
    path = disk(tmp_path)
    path.write_bytes(b"\0" * 4096)
    assert read_image(path) == ImageReading()
