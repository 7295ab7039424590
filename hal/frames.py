"""The QKDM/QRNG frame protocol, host side, sans-IO: bytes in, events out.

Wire format, defined below with ``construct`` (constants shared with the device
firmware in :mod:`hal.firmware.protocol`)::

    sync A5 5A | version u8 | type u8 | seq u16 | length u16 | payload | crc32 u32

All fields big-endian; the CRC-32 (zlib's) covers version through payload. Requests and
responses carry a sequence number; a response has its request's type with bit 7 set, or
``T_ERROR``. :class:`FrameDecoder` resynchronises after garbage or a torn frame: a bad
candidate costs one byte, and the search resumes after its sync.

This module never touches a port, a socket or a clock, and never puts payload bytes
(which may be key material) into an exception message.
"""

from __future__ import annotations

import math
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

from construct import (
    Bytes,
    Checksum,
    ChecksumError,
    Const,
    ConstructError,
    Float64b,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    RawCopy,
    Rebuild,
    Struct,
    len_,
    this,
)

from hal.errors import (
    DeviceError,
    HalError,
    KeyNotFound,
    KeyNotYetAvailable,
    LinkDownError,
    NoKeyAvailable,
    ProtocolError,
)
from hal.firmware import protocol as wire
from hal.qkdm import LinkState

SYNC = wire.SYNC
VERSION = wire.VERSION
OVERHEAD = wire.HEADER_SIZE + wire.TRAILER_SIZE
"""Bytes a frame adds around its payload."""

Header = Struct(
    "sync" / Const(SYNC),
    "version" / Int8ub,
    "type" / Int8ub,
    "seq" / Int16ub,
    "length" / Int16ub,
)
"""The fixed 8-byte head of a frame."""

Frame = Struct(
    "sync" / Const(SYNC),
    "body"
    / RawCopy(
        Struct(
            "version" / Const(VERSION, Int8ub),
            "type" / Int8ub,
            "seq" / Int16ub,
            "length" / Rebuild(Int16ub, len_(this.payload)),
            "payload" / Bytes(this.length),
        )
    ),
    "crc" / Checksum(Int32ub, lambda data: zlib.crc32(data), this.body.data),
)
"""A whole frame; building computes length and CRC."""

# The hot paths (every frame of a sample stream) use these precompiled equivalents of
# ``Header`` and ``Frame``: construct costs ~50 us a frame, a third of the host's per-frame
# work at 64 KiB frames. ``tests/hal/test_frames.py`` checks them against the construct
# definitions above, which stay the specification (and :func:`parse_frame`'s parser).
_HEAD = struct.Struct(">BBHH")  # version, type, seq, length (after the sync)
_CRC = struct.Struct(">I")

InfoPayload = Struct(
    "capabilities" / Int8ub, "bits" / Int8ub, "max_payload" / Int16ub, "name" / GreedyBytes
)
StatusPayload = Struct(
    "state" / Int8ub,
    "skr" / Float64b,
    "qber" / Float64b,
    "key_count" / Int32ub,
    "max_key_count" / Int32ub,
    "key_size" / Int32ub,
    "keys_produced" / Int64ub,
    "link" / GreedyBytes,
)
SourceStatusPayload = Struct(
    "bits" / Int8ub,
    "rate" / Float64b,
    "min_entropy" / Float64b,
    "mean" / Float64b,
    "std" / Float64b,
    "rho" / Float64b,
    "samples_read" / Int64ub,
    "fault" / PascalString(Int8ub, "utf8"),
    "name" / GreedyBytes,
)
KeyPayload = Struct("key_id" / Bytes(wire.KEY_ID_SIZE), "material" / GreedyBytes)
ErrorPayload = Struct("code" / Int8ub, "message" / GreedyBytes)

STATES = {wire.STATE_UP: LinkState.UP, wire.STATE_DOWN: LinkState.DOWN}
STATES[wire.STATE_ABORT] = LinkState.ABORT


@dataclass(frozen=True, kw_only=True, slots=True)
class FrameReceived:
    """A whole frame with a good CRC arrived."""

    type: int
    """Frame type (a request type, request type | 0x80, T_BOOT or T_ERROR)."""
    seq: int
    """Sequence number of the request this frame belongs to."""
    payload: bytes = field(repr=False)
    """The payload; may be key material, so never log it raw (hidden from ``repr``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GarbageSkipped:
    """Bytes that were not part of any good frame were dropped."""

    count: int
    """How many bytes were dropped."""


Event = FrameReceived | GarbageSkipped


def encode_frame(ftype: int, seq: int, payload: bytes = b"") -> bytes:
    """One complete frame."""
    if len(payload) > wire.MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {wire.MAX_PAYLOAD}")
    head = _HEAD.pack(VERSION, ftype, seq & 0xFFFF, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((SYNC, head, payload, _CRC.pack(crc)))


def _known_type(ftype: int) -> bool:
    return (ftype & 0x7F) in wire.REQUEST_TYPES or ftype in (wire.T_BOOT, wire.T_ERROR)


class FrameDecoder:
    """Stream decoder: feed bytes with :meth:`receive_data`, get events back."""

    def __init__(self, max_payload: int = wire.MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._skipped = 0
        self._need = 0  # bytes the frame at the head of the buffer needs (0: not parsed yet)

    def receive_data(self, data: bytes) -> list[Event]:
        """Add bytes from the line; return the frames (and skipped garbage) found."""
        self._buf += data
        if len(self._buf) < self._need:
            return []  # mid-frame, header already checked: most reads of a long frame
        events: list[Event] = []
        while (frame := self._next()) is not None:
            self._flush_skipped(events)
            events.append(frame)
        self._flush_skipped(events)
        return events

    def give_up_partial(self) -> list[Event]:
        """The line went quiet mid-frame: treat its first byte as garbage and rescan."""
        if self._buf:
            self._skip(1)
        return self.receive_data(b"")

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def _flush_skipped(self, events: list[Event]) -> None:
        if self._skipped:
            events.append(GarbageSkipped(count=self._skipped))
            self._skipped = 0

    def _skip(self, n: int) -> None:
        del self._buf[:n]
        self._skipped += n
        self._need = 0

    def _seek_sync(self) -> bool:
        at = self._buf.find(SYNC)
        if at < 0:
            keep = 1 if self._buf.endswith(SYNC[:1]) else 0
            self._skip(len(self._buf) - keep)
            return False
        self._skip(at)
        return True

    def _next(self) -> FrameReceived | None:
        if len(self._buf) < self._need:
            return None  # the head's header was checked already: just wait for the rest
        while self._seek_sync():
            if len(self._buf) < wire.HEADER_SIZE:
                return None
            version, ftype, seq, length = _HEAD.unpack_from(self._buf, len(SYNC))
            if version != VERSION or not _known_type(ftype) or length > self.max_payload:
                self._skip(1)
                continue
            end = wire.HEADER_SIZE + length
            if len(self._buf) < end + wire.TRAILER_SIZE:
                self._need = end + wire.TRAILER_SIZE
                return None
            view = memoryview(self._buf)
            good = zlib.crc32(view[2:end]) == int.from_bytes(view[end : end + 4], "big")
            payload = bytes(view[wire.HEADER_SIZE : end]) if good else b""
            view.release()
            if not good:
                self._skip(1)
                continue
            del self._buf[: end + wire.TRAILER_SIZE]
            self._need = 0
            return FrameReceived(type=ftype, seq=seq, payload=payload)
        return None


def parse_frame(data: bytes) -> FrameReceived:
    """Parse exactly one frame with ``construct`` (strict: for tests and the spy)."""
    try:
        parsed: Any = Frame.parse(data)
    except ChecksumError:
        raise ProtocolError("frame CRC mismatch") from None
    except ConstructError as exc:
        raise ProtocolError(f"malformed frame: {type(exc).__name__}") from None
    body = parsed.body.value
    return FrameReceived(type=body.type, seq=body.seq, payload=bytes(body.payload))


# -- payloads ---------------------------------------------------------------------------
def parse_payload(schema: Struct, payload: bytes, what: str) -> Any:
    """Parse a payload with ``schema``; a malformed one is a ProtocolError (no bytes shown)."""
    try:
        return schema.parse(payload)
    except (ConstructError, UnicodeDecodeError):
        raise ProtocolError(f"malformed {what} payload ({len(payload)} bytes)") from None


def key_id_bytes(key_id: str) -> bytes:
    """The 16 bytes of a UUID key ID; raise KeyNotFound for anything that is not one."""
    try:
        return uuid.UUID(key_id).bytes
    except (ValueError, AttributeError, TypeError):
        raise KeyNotFound(f"not a key ID (expected a UUID): {str(key_id)[:40]!r}") from None


def key_id_str(raw: bytes) -> str:
    """The canonical UUID string of 16 key-ID bytes."""
    return str(uuid.UUID(bytes=raw))


def qber_value(raw: float) -> float | None:
    """NaN on the wire means no QBER reading (no signal)."""
    return None if math.isnan(raw) else raw


_ERRORS: dict[int, type[HalError]] = {
    wire.E_NO_KEY: NoKeyAvailable,
    wire.E_LINK_DOWN: LinkDownError,
    wire.E_KEY_NOT_FOUND: KeyNotFound,
    wire.E_KEY_PENDING: KeyNotYetAvailable,
}


def error_from_frame(device: str, payload: bytes) -> Exception:
    """The typed HalError an ERROR frame stands for (the device's code kept in the text)."""
    try:
        parsed: Any = ErrorPayload.parse(payload)
        code = int(parsed.code)
        message = bytes(parsed.message).decode("utf-8", "replace")[:200]
    except ConstructError:
        return ProtocolError(f"{device}: malformed error frame")
    cls = _ERRORS.get(code)
    if cls is not None:
        return cls(f"{device}: {message}")
    if code in (wire.E_BAD_REQUEST, wire.E_UNSUPPORTED):
        return ProtocolError(f"{device}: device refused the request (code {code}): {message}")
    return DeviceError(f"{device}: device fault (code {code}): {message}")
