"""Double-buffered, CRC-protected records: how the boot area survives power loss.

Rules of this file: it does no I/O (callers pass the bytes of a region and get back the
bytes to write and where); a record is valid only if its magic, kind, length and CRC all
check; of two valid copies the higher generation wins; a new record always goes to the
copy that does *not* hold the current one, so a torn write can only damage the stale copy.

A region of ``size`` bytes holds two copies of ``size // 2`` bytes each::

    "QKBS" | version u8 | kind u8 | reserved u16 | generation u64 | length u32 | data | crc32 u32

(big-endian; the CRC-32 covers everything before it).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"QKBS"
VERSION = 1
HEADER = struct.Struct(">4sBBHQI")


class Kind(IntEnum):
    POLICY = 1
    STATE = 2
    MANIFEST = 3


@dataclass(frozen=True)
class Record:
    kind: Kind
    generation: int
    data: bytes


def capacity(copy_size: int) -> int:
    """The largest ``data`` a copy of ``copy_size`` bytes can hold."""
    return copy_size - HEADER.size - 4


def encode(record: Record, copy_size: int) -> bytes:
    if len(record.data) > capacity(copy_size):
        raise ValueError(f"record of {len(record.data)} bytes exceeds {capacity(copy_size)}")
    head = HEADER.pack(MAGIC, VERSION, record.kind, 0, record.generation, len(record.data))
    body = head + record.data
    return body + struct.pack(">I", zlib.crc32(body))


def decode(raw: bytes, kind: Kind) -> Record | None:
    """The record in ``raw``, or None when it is blank, torn, corrupt or another kind."""
    if len(raw) < HEADER.size + 4:
        return None
    magic, version, got_kind, _, generation, length = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or got_kind != kind:
        return None
    end = HEADER.size + length
    if end + 4 > len(raw):
        return None
    (crc,) = struct.unpack_from(">I", raw, end)
    if zlib.crc32(raw[:end]) != crc:
        return None
    return Record(kind, generation, bytes(raw[HEADER.size : end]))


def newest(region: bytes, kind: Kind) -> tuple[Record | None, int]:
    """The newest valid record in a two-copy region, and the index of the copy to write next."""
    half = len(region) // 2
    copies = [decode(region[:half], kind), decode(region[half : 2 * half], kind)]
    valid = [(r.generation, i) for i, r in enumerate(copies) if r is not None]
    if not valid:
        return None, 0
    _, best = max(valid)
    return copies[best], 1 - best


def plan_write(region: bytes, kind: Kind, data: bytes) -> tuple[int, bytes, int]:
    """(offset within the region, bytes to write, new generation) for a new record."""
    current, target = newest(region, kind)
    generation = 1 if current is None else current.generation + 1
    half = len(region) // 2
    return target * half, encode(Record(kind, generation, data), half), generation
