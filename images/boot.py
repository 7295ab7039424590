"""The emulated bootloader: pick a slot, count the attempt, check the slot, run health checks.

One call of :func:`boot` is one power-on. It persists the decision of
:func:`images.bootstate.choose_boot` (rollbacks and the decremented attempt counter)
*before* anything from the slot runs, then checks the slot's content against its stored
manifest (what dm-verity does on a real device), then runs the health check and records
its result. :func:`commit` marks the booted trial slot good and raises the anti-rollback
floor. Power loss between any two writes leaves a state from which the next boot still
picks a slot whose content verifies.

Health checks (:func:`default_health`): the image's node configuration must parse and name
the node and role of the manifest, and the node's self-tests must pass *from the slot's
own application*: the slot's squashfs is unpacked with ``unsquashfs``, and
``appliance.cli.main(["qrng", "selftest", "--json"])`` runs from its site-packages in a
Python started with ``-S`` in an empty directory, so nothing of the host's installation is
used. An optional hook command (``--health-hook``) runs afterwards with the slot's location
in its environment; exit status 0 passes.

This module never boots a slot in state ``writing``, ``empty`` or ``bad``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from images.bootstate import BootState, Detail, Event, Rollback, SlotState, choose_boot, step
from images.errors import BootStateError, BundleRejected, ImageError, NoBootableSlot
from images.manifest import Manifest, parse_manifest
from images.target import Target


@dataclass(frozen=True, kw_only=True)
class SlotContext:
    """What a health check gets to know about the booted slot."""

    target: Path
    slot: str
    offset: int
    manifest: Manifest


HealthCheck = Callable[[SlotContext], str | None]
"""Returns None when healthy, else a one-line reason."""


@dataclass(frozen=True, kw_only=True)
class BootResult:
    slot: str
    version: str
    state: SlotState
    attempts_left: int
    healthy: bool
    reason: str
    rollback: Rollback | None
    """Set when this boot rolled back from another slot."""


def slot_manifest(target: Target, state: BootState, slot: str) -> Manifest:
    data = target.slot_manifest(slot, state.slots[slot].manifest_sha256)
    try:
        return parse_manifest(data)
    except BundleRejected:
        raise BootStateError(f"slot {slot}: its stored manifest is malformed") from None


def verify_slot(target: Target, slot: str, manifest: Manifest) -> str | None:
    """None when every chunk of the slot matches the manifest, else the reason."""
    base, dev = target.layout[slot].start, target.device
    for i, start in enumerate(range(0, manifest.payload_size, manifest.chunk_size)):
        size = min(manifest.chunk_size, manifest.payload_size - start)
        if hashlib.sha256(dev.pread(size, base + start)).hexdigest() != manifest.chunks[i]:
            return f"slot content differs from its manifest at chunk {i}"
    return None


def boot(target: Target, health: HealthCheck) -> BootResult:
    """One emulated power-on of ``target``."""
    before = target.state().last_rollback
    for _ in range(2):  # at most one fall-back to the other slot per power-on
        state, slot = choose_boot(target.state())
        target.write_state(state)
        problem, manifest = _check_content(target, state, slot)
        if problem is None:
            break
        target.write_state(step(state, slot, Event.CORRUPT, Detail(reason=problem)))
    else:
        raise NoBootableSlot("no slot holds an image whose content verifies")
    assert manifest is not None
    reason = _run_health(
        health,
        SlotContext(
            target=target.path, slot=slot, offset=target.layout[slot].start, manifest=manifest
        ),
    )
    event = Event.HEALTH_PASSED if reason is None else Event.HEALTH_FAILED
    state = step(state, slot, event, Detail(reason="" if reason is None else f"failed: {reason}"))
    target.write_state(state)
    s = state.slots[slot]
    rb = state.last_rollback if state.last_rollback != before else None
    return BootResult(
        slot=slot,
        version=s.version,
        state=s.state,
        attempts_left=s.attempts,
        healthy=reason is None,
        reason=reason or "",
        rollback=rb,
    )


def _check_content(
    target: Target, state: BootState, slot: str
) -> tuple[str | None, Manifest | None]:
    try:
        manifest = slot_manifest(target, state, slot)
    except BootStateError as exc:
        return exc.message, None
    return verify_slot(target, slot, manifest), manifest


def _run_health(health: HealthCheck, ctx: SlotContext) -> str | None:
    try:
        return health(ctx)
    except (ImageError, OSError, subprocess.SubprocessError) as exc:
        return f"health check could not run: {exc}"


def commit(target: Target) -> BootState:
    """Mark the booted trial slot good (after it passed its health check)."""
    state = target.state()
    if not state.booted:
        raise BootStateError("nothing was booted yet: run 'qkdn image boot' first")
    new = step(state, state.booted, Event.COMMIT)
    target.write_state(new)
    return new


# --- health checks ------------------------------------------------------------------------

SELFTEST = (
    "import sys; from appliance.cli import main; sys.exit(main(['qrng', 'selftest', '--json']))"
)


def _unsquash(ctx: SlotContext, dest: Path, *paths: str) -> None:
    cmd = [
        "unsquashfs",
        "-q",
        "-n",
        "-o",
        str(ctx.offset),
        "-d",
        str(dest),
        str(ctx.target),
        *paths,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"unsquashfs failed: {proc.stderr.strip()[:200]}", code="IMG-HEALTH")


def check_config(ctx: SlotContext, root: Path) -> str | None:
    from appliance.config.node import load_node_config
    from appliance.errors import ApplianceError

    try:
        cfg = load_node_config(root / "etc/qkdn/node.toml")
    except ApplianceError as exc:
        return f"node configuration: {exc}"
    m = ctx.manifest
    if cfg.node.id != m.node or cfg.node.role != m.role:
        return f"node configuration is for node {cfg.node.id} ({cfg.node.role}), not {m.node}"
    return None


def check_selftest(root: Path, timeout: float = 120.0) -> str | None:
    site = root / "usr/lib/qkdn/site-packages"
    if not (site / "appliance").is_dir():
        return "the image carries no application (usr/lib/qkdn/site-packages/appliance)"
    env = {"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", ""), "HOME": str(root)}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", SELFTEST],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return f"self-test exited {proc.returncode}: {last[:200]}"
    return None


def run_hook(command: str, ctx: SlotContext) -> str | None:
    env = {
        **os.environ,
        "QKDN_TARGET": str(ctx.target),
        "QKDN_SLOT": ctx.slot,
        "QKDN_SLOT_OFFSET": str(ctx.offset),
        "QKDN_IMAGE_VERSION": ctx.manifest.version,
        "QKDN_IMAGE_SIZE": str(ctx.manifest.image_size),
    }
    proc = subprocess.run(
        shlex.split(command), env=env, capture_output=True, text=True, check=False, timeout=300
    )
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return f"health hook exited {proc.returncode}: {why[:200]}"
    return None


def default_health(hook: str | None = None, selftest: bool = True) -> HealthCheck:
    """Configuration check, the slot's own self-test, then the optional hook."""

    def check(ctx: SlotContext) -> str | None:
        with tempfile.TemporaryDirectory(prefix="qkdn-boot-") as tmp:
            root = Path(tmp) / "root"
            wanted = ["etc/qkdn/node.toml"] + (["usr/lib/qkdn/site-packages"] if selftest else [])
            _unsquash(ctx, root, *wanted)
            problem = check_config(ctx, root)
            if problem is None and selftest:
                problem = check_selftest(root)
        if problem is None and hook:
            problem = run_hook(hook, ctx)
        return problem

    return check
