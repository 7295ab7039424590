"""The boot state of an A/B device and the state machine that changes it (no I/O).

Rules of this file (after ``h11/_state.py``):

- Every change goes through :func:`step`, which looks ``(slot state, event)`` up in
  :data:`TRANSITIONS` and applies the named effect to an immutable :class:`BootState`.
  An unknown pair is a :class:`TransitionError`; nothing is half-applied.
- Nothing here reads a disk, a clock or a random source; the adapters in
  :mod:`images.target` and :mod:`images.device` persist each new state atomically.
- A boot attempt is counted *before* the image runs, so a crash never grants an extra try.
- The security-version floor only rises, on commit.

Slot states: ``empty`` (never written), ``writing`` (an install is in progress or was
interrupted: never bootable), ``trial`` (written and read back, boot attempts left, not yet
committed), ``good`` (committed), ``bad`` (rolled back or failed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from images.errors import BootStateError, NoBootableSlot, TransitionError
from images.signing import canonical

SLOTS = ("a", "b")


class SlotState(StrEnum):
    EMPTY = "empty"
    WRITING = "writing"
    TRIAL = "trial"
    GOOD = "good"
    BAD = "bad"


class Event(StrEnum):
    INSTALL = "install"
    """Flashing starts on this (inactive) slot."""
    WRITTEN = "written"
    """The payload was written and read back correctly."""
    BOOT = "boot"
    """The bootloader starts this slot."""
    HEALTH_PASSED = "health-passed"
    HEALTH_FAILED = "health-failed"
    EXHAUSTED = "exhausted"
    """The bootloader found a trial slot with no attempts left."""
    CORRUPT = "corrupt"
    """The slot's content no longer matches its manifest."""
    COMMIT = "commit"


class Effect(StrEnum):
    BEGIN = "begin"
    ARM = "arm"
    COUNT = "count"
    SELECT = "select"
    NOTE = "note"
    ROLL_BACK = "roll-back"
    PROMOTE = "promote"
    NOTHING = "nothing"


S, E, F = SlotState, Event, Effect
TRANSITIONS: dict[tuple[SlotState, Event], tuple[Effect, SlotState]] = {
    (S.EMPTY, E.INSTALL): (F.BEGIN, S.WRITING),
    (S.WRITING, E.INSTALL): (F.BEGIN, S.WRITING),
    (S.TRIAL, E.INSTALL): (F.BEGIN, S.WRITING),
    (S.GOOD, E.INSTALL): (F.BEGIN, S.WRITING),
    (S.BAD, E.INSTALL): (F.BEGIN, S.WRITING),
    (S.WRITING, E.WRITTEN): (F.ARM, S.TRIAL),
    (S.TRIAL, E.BOOT): (F.COUNT, S.TRIAL),
    (S.GOOD, E.BOOT): (F.SELECT, S.GOOD),
    (S.TRIAL, E.HEALTH_PASSED): (F.NOTE, S.TRIAL),
    (S.TRIAL, E.HEALTH_FAILED): (F.NOTE, S.TRIAL),
    (S.GOOD, E.HEALTH_PASSED): (F.NOTE, S.GOOD),
    (S.GOOD, E.HEALTH_FAILED): (F.NOTE, S.GOOD),
    (S.TRIAL, E.EXHAUSTED): (F.ROLL_BACK, S.BAD),
    (S.TRIAL, E.CORRUPT): (F.ROLL_BACK, S.BAD),
    (S.GOOD, E.CORRUPT): (F.ROLL_BACK, S.BAD),
    (S.TRIAL, E.COMMIT): (F.PROMOTE, S.GOOD),
    (S.GOOD, E.COMMIT): (F.NOTHING, S.GOOD),
}
"""(state of the slot, event) -> (effect, next state of the slot)."""


@dataclass(frozen=True, kw_only=True)
class Slot:
    state: SlotState = SlotState.EMPTY
    version: str = ""
    security_version: int = 0
    attempts: int = 0
    """Boot attempts left (trial slots only)."""
    manifest_sha256: str = ""
    """SHA-256 of the slot's manifest record, which holds the chunk digests."""
    health: str = ""
    """Result of the last health check in this slot: '', 'passed' or 'failed: why'."""


@dataclass(frozen=True, kw_only=True)
class Rollback:
    slot: str
    """The slot that was abandoned."""
    version: str
    to: str
    """The slot booted instead ('' when none was bootable)."""
    reason: str


@dataclass(frozen=True, kw_only=True)
class BootState:
    slots: dict[str, Slot] = field(default_factory=lambda: {s: Slot() for s in SLOTS})
    primary: str = ""
    """The slot the bootloader tries first ('' before the first install)."""
    booted: str = ""
    """The slot started by the last boot ('' before the first boot)."""
    floor: int = 0
    revoked: tuple[str, ...] = ()
    """Key ids revoked by the newest revocation list this device has accepted."""
    revocation_serial: int = 0
    last_rollback: Rollback | None = None


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True, kw_only=True)
class Detail:
    """What an event carries: the new image (INSTALL/WRITTEN), a reason, the arming count."""

    version: str = ""
    security_version: int = 0
    manifest_sha256: str = ""
    attempts: int = 0
    reason: str = ""


def step(state: BootState, slot: str, event: Event, detail: Detail | None = None) -> BootState:
    """Apply ``event`` to ``slot``; a pair missing from the table is a TransitionError."""
    if slot not in SLOTS:
        raise TransitionError(f"no slot {slot!r}")
    current = state.slots[slot].state
    try:
        effect, nxt = TRANSITIONS[(current, event)]
    except KeyError:
        raise TransitionError(f"slot {slot} is {current}: cannot {event}") from None
    new = _EFFECTS[effect](state, slot, detail or Detail())
    slots = dict(new.slots)
    slots[slot] = replace(slots[slot], state=nxt)
    return replace(new, slots=slots)


def _with_slot(state: BootState, slot: str, **changes: Any) -> BootState:
    slots = dict(state.slots)
    slots[slot] = replace(slots[slot], **changes)
    return replace(state, slots=slots)


def _begin(state: BootState, slot: str, d: Detail) -> BootState:
    # The slot forgets its old image at once: its bytes are about to change.
    fresh = Slot(version=d.version, security_version=d.security_version)
    return replace(state, slots={**state.slots, slot: fresh})


def _arm(state: BootState, slot: str, d: Detail) -> BootState:
    s = _with_slot(state, slot, attempts=d.attempts, manifest_sha256=d.manifest_sha256, health="")
    return replace(s, primary=slot)


def _count(state: BootState, slot: str, d: Detail) -> BootState:
    left = state.slots[slot].attempts
    if left <= 0:
        raise TransitionError(f"slot {slot} has no boot attempts left")
    return replace(_with_slot(state, slot, attempts=left - 1, health=""), booted=slot)


def _select(state: BootState, slot: str, d: Detail) -> BootState:
    return replace(_with_slot(state, slot, health=""), booted=slot)


def _note(state: BootState, slot: str, d: Detail) -> BootState:
    return _with_slot(state, slot, health=d.reason or "passed")


def _roll_back(state: BootState, slot: str, d: Detail) -> BootState:
    alt = other(slot)
    to = alt if state.slots[alt].state in (SlotState.GOOD, SlotState.TRIAL) else ""
    rb = Rollback(slot=slot, version=state.slots[slot].version, to=to, reason=d.reason)
    new = _with_slot(state, slot, attempts=0)
    return replace(new, primary=to or state.primary, last_rollback=rb)


def _promote(state: BootState, slot: str, d: Detail) -> BootState:
    if state.booted != slot or state.slots[slot].health != "passed":
        raise TransitionError(f"slot {slot} must be booted and pass its health check first")
    floor = max(state.floor, state.slots[slot].security_version)
    return replace(_with_slot(state, slot, attempts=0), floor=floor, primary=slot)


def _nothing(state: BootState, slot: str, d: Detail) -> BootState:
    return state


_EFFECTS = {
    Effect.BEGIN: _begin,
    Effect.ARM: _arm,
    Effect.COUNT: _count,
    Effect.SELECT: _select,
    Effect.NOTE: _note,
    Effect.ROLL_BACK: _roll_back,
    Effect.PROMOTE: _promote,
    Effect.NOTHING: _nothing,
}


def choose_boot(state: BootState) -> tuple[BootState, str]:
    """The bootloader's decision: roll back exhausted trials, then count and pick a slot."""
    order = [state.primary, other(state.primary)] if state.primary else list(SLOTS)
    for slot in order:
        s = state.slots[slot]
        if s.state is SlotState.TRIAL and s.attempts == 0:
            reason = f"no boot attempts left; last health check: {s.health or 'never completed'}"
            state = step(state, slot, Event.EXHAUSTED, Detail(reason=reason))
    for slot in [state.primary, other(state.primary)] if state.primary else list(SLOTS):
        if state.slots[slot].state in (SlotState.TRIAL, SlotState.GOOD):
            return step(state, slot, Event.BOOT), slot
    raise NoBootableSlot("no slot holds a committed or trial image")


# --- encoding ---------------------------------------------------------------------------

_ID = re.compile(r"^[0-9a-f]{32}$")


def encode_state(state: BootState) -> bytes:
    doc = {
        "slots": {k: {**v.__dict__, "state": str(v.state)} for k, v in state.slots.items()},
        "primary": state.primary,
        "booted": state.booted,
        "floor": state.floor,
        "revoked": list(state.revoked),
        "revocation_serial": state.revocation_serial,
        "last_rollback": None if state.last_rollback is None else state.last_rollback.__dict__,
    }
    return canonical(doc)


def decode_state(data: bytes) -> BootState:
    """Parse a boot-state record; anything unexpected is IMG-STATE."""
    try:
        return _decode(json.loads(data))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise BootStateError("the boot-state record is malformed") from None


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind:
        raise TypeError(kind.__name__)
    return value


def _decode_slot(doc: dict[str, Any]) -> Slot:
    if set(doc) != set(Slot.__dataclass_fields__):
        raise KeyError("slot")
    attempts = _typed(doc["attempts"], int)
    sv = _typed(doc["security_version"], int)
    if not 0 <= attempts <= 255 or sv < 0:
        raise ValueError("range")
    return Slot(
        state=SlotState(doc["state"]),
        version=_typed(doc["version"], str),
        security_version=sv,
        attempts=attempts,
        manifest_sha256=_typed(doc["manifest_sha256"], str),
        health=_typed(doc["health"], str),
    )


def _decode(doc: dict[str, Any]) -> BootState:
    if set(doc) != {
        "slots",
        "primary",
        "booted",
        "floor",
        "revoked",
        "revocation_serial",
        "last_rollback",
    } or set(doc["slots"]) != set(SLOTS):
        raise KeyError("keys")
    if doc["primary"] not in ("", *SLOTS) or doc["booted"] not in ("", *SLOTS):
        raise ValueError("slot name")
    revoked = tuple(_typed(r, str) for r in _typed(doc["revoked"], list))
    if not all(_ID.match(r) for r in revoked) or _typed(doc["floor"], int) < 0:
        raise ValueError("revoked/floor")
    rb = doc["last_rollback"]
    return BootState(
        slots={k: _decode_slot(_typed(v, dict)) for k, v in doc["slots"].items()},
        primary=doc["primary"],
        booted=doc["booted"],
        floor=doc["floor"],
        revoked=revoked,
        revocation_serial=_typed(doc["revocation_serial"], int),
        last_rollback=None if rb is None else _decode_rollback(_typed(rb, dict)),
    )


def _decode_rollback(doc: dict[str, Any]) -> Rollback:
    if set(doc) != set(Rollback.__dataclass_fields__):
        raise KeyError("rollback")
    return Rollback(**{k: _typed(v, str) for k, v in doc.items()})
