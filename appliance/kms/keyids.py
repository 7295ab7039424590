"""Key IDs: UUIDs as ETSI 014 shows them (``8-4-4-4-12`` lowercase hex) and as 16 bytes on
the wire, converted without :class:`uuid.UUID` objects.

A batch of 1,024 keys carries 1,024 IDs through several conversions at each end (made,
packed into the KSA batch, unpacked, checked in ``dec_keys``); ``uuid.UUID`` costs 3-6 µs
per conversion, the functions here under 1 µs. They accept exactly what ``str(UUID(...))``
produces, so IDs made either way compare equal. Key IDs are not secret: they come from
``os.urandom`` here, never from the PTG.3 generator, whose output is only for key material.
The keys of one KSA batch share the front of their IDs (:func:`batch_raw`), so that they
sit together in a key store.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable

_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ANY_CASE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def _stamped(raw: bytearray, version: int) -> bytes:
    """16-byte UUIDs with the version and the RFC variant set where RFC 9562 puts them."""
    raw[6::16] = bytes((b & 0x0F) | version << 4 for b in raw[6::16])
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])
    return bytes(raw)


def new_raw(n: int, source: Callable[[int], bytes] = os.urandom) -> bytes:
    """``n`` random version-4 UUIDs (RFC 9562) as 16 bytes each, from one draw of ``source``
    (``os.urandom``; a seeded source in simulations)."""
    return _stamped(bytearray(source(16 * n)), 4)


PREFIX = 6
"""Bytes at the front of a batch's key IDs that are the same for the whole batch."""


def batch_raw(n: int, source: Callable[[int], bytes] = os.urandom) -> bytes:
    """The IDs of ``n`` keys made together (one KSA batch), 16 bytes each: version-8 UUIDs
    (RFC 9562) whose first :data:`PREFIX` bytes are one random prefix for the whole batch,
    the rest (74 bits) random per key, all from one draw of ``source``.

    A key store keeps its keys ordered by ID, so a batch's keys sit side by side there:
    taking, releasing or deleting a few keys of one pair touches one page of the store's
    index, not a page per key (with random IDs, at 10,000 pairs every request of a pair
    not drawn on lately wrote pages of its own, at both UKMSs). The prefix tells only that
    keys came in one batch, and only to the two SAEs of the pair that get them."""
    drawn = source(PREFIX + (16 - PREFIX) * n)
    raw = bytearray(16 * n)
    for i in range(PREFIX):
        raw[i::16] = drawn[i : i + 1] * n
    for i in range(16 - PREFIX):
        raw[PREFIX + i :: 16] = drawn[PREFIX + i :: 16 - PREFIX]
    return _stamped(raw, 8)


def from_hex(h: str) -> str:
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def from_bytes(raw: bytes | bytearray | memoryview) -> str:
    """The text form of a 16-byte key ID."""
    return from_hex(bytes(raw).hex())


def to_bytes(key_id: str) -> bytes:
    """The 16 bytes of a key ID in text form; ValueError if it is not one."""
    if not _ANY_CASE.fullmatch(key_id):
        raise ValueError(f"not a UUID: {key_id!r}")
    return bytes.fromhex(key_id.replace("-", ""))


def canonical(key_id: str) -> str | None:
    """The ID as we issue it (lowercase), or None if ``key_id`` is not a UUID in text form."""
    if _CANONICAL.fullmatch(key_id):
        return key_id
    return key_id.lower() if _ANY_CASE.fullmatch(key_id) else None


def stream_raw(ksid: bytes, first: int, n: int) -> bytes:
    """The key IDs of ``n`` chunks of an ETSI 004 key stream from index ``first``, 16 bytes
    each: version-8 UUIDs (RFC 9562) from SHA-256 of the Key_stream_ID and the index, so
    both UKMSs of a stream name chunk (KSID, index) alike without telling each other."""
    out = bytearray()
    for index in range(first, first + n):
        out += hashlib.sha256(b"qkdn/004-chunk\0" + ksid + index.to_bytes(4, "big")).digest()[:16]
    return _stamped(out, 8)


def stream_id(ksid: bytes, index: int) -> str:
    """The key ID of chunk ``index`` of stream ``ksid`` (see :func:`stream_raw`)."""
    return from_bytes(stream_raw(ksid, index, 1))
