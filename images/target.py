"""The target disk: its GPT layout, the boot area's records, and raw slot I/O (adapter).

A target is a GPT disk (a block device in the field, an image file on the bench) with four
partitions found by name: ``qkdn-boot`` (1 MiB boot area), ``qkdn-a`` and ``qkdn-b`` (the
slots) and ``qkdn-data`` (the writable data partition). The boot area holds, at fixed
offsets, three double-buffered record regions (:mod:`images.records`)::

    0     .. 128 KiB   device policy  (:mod:`images.policy`)
    128   .. 256 KiB   boot state     (:mod:`images.bootstate`)
    256   .. 640 KiB   manifest of slot a
    640   .. 1024 KiB  manifest of slot b

All writes go through a :class:`Device` (``pwrite``/``sync``), which tests replace with
one that loses power at a chosen write. Every record update is followed by a sync, and a
record is only ever written to the copy that does not hold the current one.
This module never decides what to write: that is :mod:`images.bootstate`'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from images import records
from images.bootstate import SLOTS, BootState, decode_state, encode_state
from images.errors import BootStateError, ImageUsageError, TargetError
from images.mapping import map_region
from images.policy import DevicePolicy, decode_policy

MiB = 1 << 20
SECTOR = 512
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
NAMES = {"boot": "qkdn-boot", "a": "qkdn-a", "b": "qkdn-b", "data": "qkdn-data"}
REGIONS = {
    "policy": (0, 128 << 10),
    "state": (128 << 10, 128 << 10),
    "a": (256 << 10, 384 << 10),
    "b": (640 << 10, 384 << 10),
}
KIND = {"policy": records.Kind.POLICY, "state": records.Kind.STATE}


class PowerLoss(Exception):
    """Raised by a fault-injecting device: power was lost during a write (tests only)."""


class Device:
    """Positioned reads and writes on a disk image file or block device."""

    def __init__(self, path: Path) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise TargetError(f"cannot open target {path}: {exc.strerror}") from None

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def copy_in(self, src_fd: int, src_offset: int, size: int, offset: int) -> None:
        """Copy ``size`` bytes of another file into this device, inside the kernel."""
        while size:
            done = os.copy_file_range(src_fd, self.fd, size, src_offset, offset)
            if done == 0:
                raise TargetError("the bundle ended while copying it into the slot")
            src_offset, offset, size = src_offset + done, offset + done, size - done

    @contextmanager
    def mapped(self, offset: int, size: int) -> Iterator[memoryview]:
        """A read-only memory map of ``size`` bytes at ``offset``: reads without a copy."""
        with map_region(self.fd, offset, size) as part:
            yield part

    def flush(self) -> None:
        """Make what was written so far durable (``fdatasync``), from a background thread.

        Not a write step and never needed for correctness: :meth:`sync` after the last
        write is what makes data durable. Flushing while later chunks are still being
        written lets the disk (and a host's cache, under a VM) work in parallel, so the
        final sync has little left to wait for.
        """
        os.fdatasync(self.fd)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Partition:
    start: int
    size: int


def read_layout(path: Path) -> dict[str, Partition]:
    """The four partitions of a target, by role; IMG-TARGET when any is missing."""
    if not path.exists():
        raise TargetError(f"{path}: no such target (create one with 'qkdn image init-target')")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise TargetError(f"{path}: a target is a disk image file or a block device")
    try:
        out = subprocess.run(
            ["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True
        ).stdout
        table = json.loads(out)["partitiontable"]
        sector = int(table.get("sectorsize", SECTOR))
        parts = {p.get("name"): p for p in table["partitions"]}
        return {
            role: Partition(parts[name]["start"] * sector, parts[name]["size"] * sector)
            for role, name in NAMES.items()
        }
    except FileNotFoundError:
        raise TargetError("sfdisk not found (install the fdisk package)") from None
    except (subprocess.CalledProcessError, ValueError, KeyError, TypeError):
        raise TargetError(
            f"{path}: not a qkdn target (needs a GPT with partitions {', '.join(NAMES.values())})"
        ) from None


class Target:
    """One target disk: layout, records in the boot area, and the device to write through."""

    def __init__(self, path: Path, device: Device | None = None) -> None:
        self.path = path
        self.layout = read_layout(path)
        if self.layout["boot"].size < MiB:
            raise TargetError(f"{path}: the boot partition is smaller than 1 MiB")
        self.device = device or Device(path)

    def close(self) -> None:
        self.device.close()

    def slot_size(self, slot: str) -> int:
        return self.layout[slot].size

    def _region(self, name: str) -> tuple[int, bytes]:
        start, size = REGIONS[name]
        base = self.layout["boot"].start + start
        return base, self.device.pread(size, base)

    def _read(self, name: str, kind: records.Kind) -> bytes | None:
        _, region = self._region(name)
        record, _ = records.newest(region, kind)
        return None if record is None else record.data

    def _write(self, name: str, kind: records.Kind, data: bytes) -> None:
        base, region = self._region(name)
        try:
            offset, raw, _ = records.plan_write(region, kind, data)
        except ValueError as exc:
            raise TargetError(f"{name} record: {exc}") from None
        self.device.pwrite(raw, base + offset)
        self.device.sync()

    def policy(self) -> DevicePolicy:
        data = self._read("policy", records.Kind.POLICY)
        if data is None:
            raise BootStateError(f"{self.path}: no valid device policy (not initialised?)")
        return decode_policy(data)

    def write_policy(self, policy: DevicePolicy) -> None:
        self._write("policy", records.Kind.POLICY, policy.encode())

    def state(self) -> BootState:
        data = self._read("state", records.Kind.STATE)
        if data is None:
            raise BootStateError(f"{self.path}: both boot-state records are invalid")
        return decode_state(data)

    def write_state(self, state: BootState) -> None:
        self._write("state", records.Kind.STATE, encode_state(state))

    def slot_manifest(self, slot: str, expected_sha256: str) -> bytes:
        """The manifest stored for ``slot``, checked against the digest in the boot state."""
        data = self._read(slot, records.Kind.MANIFEST)
        if data is None or hashlib.sha256(data).hexdigest() != expected_sha256:
            raise BootStateError(f"slot {slot}: its manifest record is missing or altered")
        return data

    def write_slot_manifest(self, slot: str, data: bytes) -> None:
        self._write(slot, records.Kind.MANIFEST, data)


def _uuid(label: str) -> str:
    # Pinned identifiers make an empty target byte-reproducible.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"qkdn-image-target:{label}"))


def plan_layout(size: int, slot_size: int | None, data_size: int | None) -> dict[str, int]:
    """Sizes in bytes: 1 MiB GPT, 1 MiB boot area, two slots, data, 1 MiB for the backup GPT."""
    usable = size - 3 * MiB
    if data_size is None:
        default = max(MiB, (size // 8) // MiB * MiB)
        data_size = default if slot_size is None else usable - 2 * slot_size
    data = data_size
    slot = slot_size if slot_size is not None else (usable - data) // 2 // MiB * MiB
    if slot < MiB or data < MiB or 2 * slot + data > usable or slot % MiB or data % MiB:
        raise ImageUsageError(
            f"a {size}-byte target cannot hold two slots of {slot} and data of {data} bytes "
            "(slot and data sizes are whole MiB, at least 1 MiB each)"
        )
    return {"slot": slot, "data": usable - 2 * slot}


def init_target(
    path: Path,
    size: int,
    policy: DevicePolicy,
    *,
    slot_size: int | None = None,
    data_size: int | None = None,
    force: bool = False,
) -> Target:
    """Create an empty target: GPT, the four partitions, the policy and an empty boot state."""
    block = path.exists() and stat.S_ISBLK(path.stat().st_mode)
    if path.exists() and not force:
        raise ImageUsageError(f"{path} exists; pass --force to overwrite it")
    sizes = plan_layout(size, slot_size, data_size)
    if not block:
        try:
            with path.open("wb") as fh:
                fh.truncate(size)
        except OSError as exc:
            raise TargetError(f"cannot create target {path}: {exc.strerror}") from None
    _partition(path, sizes)
    target = Target(path)
    for name in REGIONS:  # a reused device must not keep records from an earlier life
        start, length = REGIONS[name]
        target.device.pwrite(bytes(length), target.layout["boot"].start + start)
    target.write_policy(policy)
    target.write_state(BootState(floor=policy.floor, revoked=tuple(sorted(policy.revoked))))
    return target


def _partition(path: Path, sizes: dict[str, int]) -> None:
    lines = ["label: gpt", f"label-id: {_uuid('disk')}", "unit: sectors", "first-lba: 2048", ""]
    start = MiB // SECTOR
    for role, length in (
        ("boot", MiB),
        ("a", sizes["slot"]),
        ("b", sizes["slot"]),
        ("data", sizes["data"]),
    ):
        lines.append(
            f"start={start}, size={length // SECTOR}, type={LINUX_FS}, "
            f'uuid={_uuid(role)}, name="{NAMES[role]}"'
        )
        start += length // SECTOR
    try:
        subprocess.run(
            ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            check=True,
        )
    except FileNotFoundError:
        raise TargetError("sfdisk not found (install the fdisk package)") from None
    except subprocess.CalledProcessError as exc:
        raise TargetError(f"sfdisk failed on {path}: {exc.stderr.strip()}") from None


__all__ = ["SLOTS", "Device", "PowerLoss", "Target", "init_target", "read_layout"]
