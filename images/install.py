"""Flashing a bundle into the inactive slot (adapter around :mod:`images.bootstate`).

Order, chosen so that a refusal writes nothing and a power loss at any write leaves a
bootable device:

1. read the device policy and boot state; pick the inactive slot;
2. verify the bundle: signatures through the keyring chain, compatible string, node,
   anti-rollback floor, slot size, and every payload chunk against its signed digest;
3. persist the slot as ``writing`` (it is never bootable in that state);
4. store the slot's manifest record, write the payload chunk by chunk while a second
   thread reads each written chunk back and hashes it and a third flushes what was
   written so far to the disk in the background; sync;
5. only if every chunk read back matches, persist the slot as ``trial`` with N attempts.

This module never writes to the slot that is booted, and never marks a slot ``trial``
without having read all of it back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from images.bootstate import SLOTS, BootState, Detail, Event, other, step
from images.bundle import VerifiedBundle, check_for_device, chunk_digests, mapped, verify_bundle
from images.errors import BundleRejected, TargetError
from images.target import Target

FLUSH_EVERY = 32 << 20
"""Bytes written between background flushes while a slot is written."""

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``, called after each chunk is written."""


@dataclass(frozen=True, kw_only=True)
class FlashResult:
    slot: str
    version: str
    security_version: int
    bytes: int
    attempts: int


def inactive_slot(state: BootState) -> str:
    """The slot to install into: never the booted one."""
    if state.booted:
        return other(state.booted)
    return other(state.primary) if state.primary else SLOTS[0]


def verify_for_target(bundle_path: Path, target: Target) -> tuple[VerifiedBundle, str]:
    """All the checks that precede any write; returns the bundle and the slot to write."""
    policy, state = target.policy(), target.state()
    slot = inactive_slot(state)
    vb = verify_bundle(bundle_path, policy, frozenset(state.revoked))
    check_for_device(vb, policy, state.floor, target.slot_size(slot))
    return vb, slot


def flash(bundle_path: Path, target: Target, progress: Progress | None = None) -> FlashResult:
    """Verify ``bundle_path`` and install it into the inactive slot of ``target``."""
    vb, slot = verify_for_target(bundle_path, target)
    m = vb.manifest
    with mapped(vb.path, vb.offset, m.payload_size) as payload:
        _check_chunks(
            chunk_digests(lambda s, n: payload[s : s + n], m.payload_size, m.chunk_size), vb
        )
        state = _begin(target, slot, vb)
        target.write_slot_manifest(slot, vb.manifest_bytes)
        got = _write_and_read_back(target, slot, vb, progress)
    if list(got) != list(m.chunks):
        raise TargetError(
            f"slot {slot}: read-back does not match the image; the slot stays unbootable",
            code="IMG-READBACK",
        )
    armed = Detail(
        attempts=target.policy().attempts,
        manifest_sha256=hashlib.sha256(vb.manifest_bytes).hexdigest(),
    )
    target.write_state(step(state, slot, Event.WRITTEN, armed))
    return FlashResult(
        slot=slot,
        version=m.version,
        security_version=m.security_version,
        bytes=m.payload_size,
        attempts=armed.attempts,
    )


def _check_chunks(got: list[str], vb: VerifiedBundle) -> None:
    for i, (a, b) in enumerate(zip(got, vb.manifest.chunks, strict=True)):
        if a != b:
            raise BundleRejected(
                f"payload chunk {i} (offset {i * vb.manifest.chunk_size}) does "
                "not match the signed manifest",
                code="IMG-TAMPERED",
            )


def _begin(target: Target, slot: str, vb: VerifiedBundle) -> BootState:
    m, trust = vb.manifest, vb.trust
    state = target.state()
    state = step(
        state, slot, Event.INSTALL, Detail(version=m.version, security_version=m.security_version)
    )
    if trust.revocation_serial > state.revocation_serial:
        # A newer signed revocation list sticks to the device, so stripping it from a later
        # bundle does not resurrect a revoked key.
        state = replace(
            state, revoked=tuple(sorted(trust.revoked)), revocation_serial=trust.revocation_serial
        )
    target.write_state(state)
    return state


def _write_and_read_back(
    target: Target, slot: str, vb: VerifiedBundle, progress: Progress | None
) -> list[str]:
    """Copy the payload into ``slot``, read every chunk back and hash it, and sync.

    Three things overlap: the copy (this thread), the read-back (a second thread hashes
    each chunk from the slot, through a memory map of the target so without copying it,
    while the next one is copied) and the disk (a third thread flushes what was written so
    far every FLUSH_EVERY bytes, so the final sync has only the tail left to wait for).
    """
    m, dev = vb.manifest, target.device
    base = target.layout[slot].start
    hashes: list[Future[str]] = []
    flushes: list[Future[None]] = []
    # The map outlives the reader thread: the executors wait for their work on the way out.
    with dev.mapped(base, m.payload_size) as written:

        def read_back(start: int, size: int) -> str:
            with written[start : start + size] as part:
                return hashlib.sha256(part).hexdigest()

        with (
            ThreadPoolExecutor(1) as reader,
            ThreadPoolExecutor(1) as flusher,
            vb.path.open("rb") as src,
        ):
            unflushed = 0
            for start in range(0, m.payload_size, m.chunk_size):
                size = min(m.chunk_size, m.payload_size - start)
                # In-kernel copy, as fast as dd; a bundle changed after the check above is
                # caught by the read-back, which compares with the signed digests.
                dev.copy_in(src.fileno(), vb.offset + start, size, base + start)
                hashes.append(reader.submit(read_back, start, size))
                unflushed += size
                if unflushed >= FLUSH_EVERY and (not flushes or flushes[-1].done()):
                    flushes.append(flusher.submit(dev.flush))
                    unflushed = 0
                if progress is not None:
                    progress(start + size, m.payload_size)
            for f in flushes:
                # An I/O error is reported to one flush only: raise it, never drop it.
                f.result()
            dev.sync()
            return [f.result() for f in hashes]
