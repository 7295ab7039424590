"""Hop-by-hop relay of CN keys (ITU-T Y.3803): the cryptography and bookkeeping of one hop,
without I/O. Adapters fetch link keys from QKDMs and move the bytes.

A hop message is ``header || ciphertext || tag``; the header is the AAD and binds the
request ID, hop number, direction, link, mode and the exact link-key material used.

* **OTP** (information-theoretic): the CN key is XORed with link-key bytes, and a fresh
  one-time Poly1305 key (32 more link-key bytes) authenticates header and ciphertext.
  Link-key bytes come from a :class:`PadStream` over the QKDM keys of the link, consumed
  byte-exactly: a message spends ``len(CN) + 32`` bytes, so batching keys into one CN key
  drives the efficiency ``n / (n + 32)`` towards 1 (95 % from 608 bytes).
* **GCM**: one QKDM key (256 bits) is the AES-256-GCM key of at most :data:`GCM_USES`
  messages, with the message counter as nonce. A compromised link key exposes at most
  that many CN keys; one QKDM key serves that many hops instead of one.

Reuse is impossible by construction and rejected on receipt: the sender's stream never
hands out a byte twice and erases spent keys; the receiver's :class:`PadLedger` refuses a
byte range or a (key, counter) it has seen, and erases a key once all of it is spent.
Only one end of a link takes keys from its QKDM in order (the link's master, the lower
node ID); the other end works with key IDs only, so the two ends never spend the same
bits for different messages.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

import msgspec
from construct import (
    Byte,
    Bytes,
    Const,
    Enum,
    Int16ub,
    Int32ub,
    PascalString,
    PrefixedArray,
    Struct,
)
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

from appliance.kms import keyids
from appliance.kms.errors import IntegrityFailure, KeyUnavailable, ProtocolError, ReplayDetected

GCM_USES = 1024
"""Messages one link key may encrypt in GCM mode (its documented usage limit)."""
MAC_KEY_BYTES = 32
"""Link-key bytes spent on the one-time Poly1305 key of each OTP message."""
TAG_BYTES = 16
QKDM_KEY_BYTES = 32
MAX_CN_BYTES = 1 << 16


class Mode(IntEnum):
    OTP = 1
    GCM = 2


class Direction(IntEnum):
    """Which way a hop message travels along the path."""

    TO_REQUESTER = 0
    """From the responding access node (AKMS B) towards the requesting one (AKMS A)."""
    TO_RESPONDER = 1


HEADER = Struct(  # the wire layout, declared; encode_header/decode pack it by hand for speed
    "magic" / Const(b"QKR1"),
    "mode" / Enum(Byte, OTP=1, GCM=2),
    "direction" / Byte,
    "hop" / Byte,
    "request_id" / Bytes(16),
    "link" / PascalString(Byte, "ascii"),
    "segments"
    / PrefixedArray(Byte, Struct("key_id" / Bytes(16), "offset" / Int16ub, "length" / Int16ub)),
    "counter" / Int32ub,
    "body_length" / Int32ub,
)


class Segment(msgspec.Struct, frozen=True, gc=False):
    """``length`` bytes of QKDM key ``key_id`` starting at ``offset``."""

    key_id: str
    offset: int
    length: int


class Hop(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The header of one hop message (all of it is authenticated)."""

    request_id: bytes
    """16-byte ID of the key request this CN key belongs to."""
    hop: int
    """Hop number along the path, from 0."""
    direction: Direction
    link: str
    """Name of the QKD link this hop crosses, e.g. ``link-8-9``."""
    mode: Mode
    segments: tuple[Segment, ...]
    """Link-key material: OTP pad then MAC key; for GCM the one AES key."""
    counter: int = 0
    """GCM: the message number under this link key (the nonce)."""


_DIRECTIONS = {int(d): d for d in Direction}
_MODES = {int(m): m for m in Mode}  # a dict, not Mode(...): decoding is on the hot path
_FIXED = struct.Struct(">4sBBB16s")  # magic, mode, direction, hop, request ID
_SEGMENT = struct.Struct(">16sHH")
_TAIL = struct.Struct(">II")  # counter, body length


def encode_header(hop: Hop, body_length: int) -> bytes:
    """The header in the wire layout of :data:`HEADER` (hand-packed: it is on the hot path)."""
    try:
        link = hop.link.encode("ascii")
        parts = [
            _FIXED.pack(b"QKR1", int(hop.mode), int(hop.direction), hop.hop, hop.request_id),
            bytes([len(link)]),
            link,
            bytes([len(hop.segments)]),
        ]
        parts += [
            _SEGMENT.pack(keyids.to_bytes(s.key_id), s.offset, s.length) for s in hop.segments
        ]
        parts.append(_TAIL.pack(hop.counter, body_length))
    except (struct.error, ValueError, UnicodeEncodeError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode hop header: {exc}") from None
    if len(link) > 255 or len(hop.segments) > 255 or len(hop.request_id) != 16:
        raise ProtocolError("cannot encode hop header: field too long")
    return b"".join(parts)


def decode(message: bytes) -> tuple[Hop, bytes, bytes]:
    """Split a hop message into (header, header bytes = AAD, body); malformed -> ProtocolError."""
    try:
        magic, mode, direction, hop_no, request_id = _FIXED.unpack_from(message, 0)
        at = _FIXED.size
        link = message[at + 1 : at + 1 + message[at]].decode("ascii")
        at += 1 + message[at]
        count, at = message[at], at + 1
        segments = []
        for _ in range(count):
            key_id, offset, length = _SEGMENT.unpack_from(message, at)
            segments.append(Segment(keyids.from_bytes(key_id), offset, length))
            at += _SEGMENT.size
        counter, body_length = _TAIL.unpack_from(message, at)
        at += _TAIL.size
        if magic != b"QKR1" or len(link) != message[_FIXED.size]:
            raise ValueError("bad magic or truncated link name")
        hop = Hop(
            request_id=request_id,
            hop=hop_no,
            direction=_DIRECTIONS[direction],
            link=link,
            mode=_MODES[mode],
            counter=counter,
            segments=tuple(segments),
        )
    except (struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed hop message: {exc.__class__.__name__}") from None
    body = message[at:]
    if len(body) != body_length or len(body) < TAG_BYTES:
        raise ProtocolError("malformed hop message: body length mismatch")
    return hop, message[:at], body


# -- OTP with a one-time Poly1305 MAC -------------------------------------------------------
def seal_otp(hop: Hop, cn_key: bytes | bytearray, pad: bytearray) -> bytes:
    """Encrypt ``cn_key`` with ``pad`` (len(cn) + 32 bytes, consumed here and erased)."""
    n = len(cn_key)
    if len(pad) != n + MAC_KEY_BYTES or hop.mode is not Mode.OTP:
        raise ProtocolError("OTP needs a pad of len(CN key) + 32 bytes")
    ct = xor(cn_key, pad[:n])
    header = encode_header(hop, n + TAG_BYTES)
    tag = Poly1305.generate_tag(bytes(pad[n:]), header + ct)
    _erase(pad)
    return header + ct + tag


def open_otp(header: bytes, body: bytes, pad: bytearray) -> bytearray:
    """Check the tag and decrypt; the pad is erased whatever happens."""
    n = len(body) - TAG_BYTES
    try:
        if len(pad) != n + MAC_KEY_BYTES:
            raise IntegrityFailure("OTP pad length does not match the message")
        Poly1305.verify_tag(bytes(pad[n:]), header + body[:n], body[n:])
        return bytearray(xor(body[:n], pad[:n]))
    except Exception as exc:
        if isinstance(exc, IntegrityFailure):
            raise
        raise IntegrityFailure("hop message failed authentication") from None
    finally:
        _erase(pad)


# -- AES-256-GCM under a link key -----------------------------------------------------------
def seal_gcm(hop: Hop, cn_key: bytes | bytearray, link_key: bytes | bytearray) -> bytes:
    if hop.mode is not Mode.GCM or not 0 <= hop.counter < GCM_USES:
        raise ProtocolError(f"GCM needs a counter below {GCM_USES}")
    header = encode_header(hop, len(cn_key) + TAG_BYTES)
    return header + AESGCM(bytes(link_key)).encrypt(_nonce(hop.counter), bytes(cn_key), header)


def open_gcm(hop: Hop, header: bytes, body: bytes, link_key: bytes | bytearray) -> bytearray:
    if not 0 <= hop.counter < GCM_USES:
        raise IntegrityFailure("GCM counter out of range")
    try:
        return bytearray(AESGCM(bytes(link_key)).decrypt(_nonce(hop.counter), body, header))
    except InvalidTag:
        raise IntegrityFailure("hop message failed authentication") from None


def xor(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    """``a`` XOR ``b`` (equal lengths), as one big-integer operation."""
    if len(a) != len(b):
        raise ProtocolError("XOR of unequal lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(12, "big")


def _erase(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


# -- the sender's side of a link: a stream of QKDM keys -------------------------------------
@dataclass
class _Chunk:
    key_id: str
    material: bytearray
    used: int = 0
    since: float = 0.0


class PadStream:
    """Link-key bytes for sending, from QKDM keys fed in order; each byte handed out once."""

    def __init__(self) -> None:
        self._chunks: deque[_Chunk] = deque()

    def feed(self, key_id: str, material: bytearray, since: float = 0.0) -> None:
        """Add a QKDM key read at time ``since`` (the stream owns and erases ``material``)."""
        self._chunks.append(_Chunk(key_id, material, since=since))

    def drop_older(self, cutoff: float) -> None:
        """Erase and forget keys read before ``cutoff``, used or not: the receiving end
        forgets a key some time after it fetched it, so a key may serve only so long."""
        while self._chunks and self._chunks[0].since < cutoff:
            _erase(self._chunks.popleft().material)

    def available(self) -> int:
        return sum(len(c.material) - c.used for c in self._chunks)

    def oldest_since(self) -> float:
        """When the first key in the stream was read."""
        return self._chunks[0].since if self._chunks else 0.0

    def whole_key_ready(self) -> bool:
        """Whether :meth:`take_key` has an unused key to give."""
        return any(c.used == 0 for c in self._chunks)

    def allocate(self, n: int) -> tuple[tuple[Segment, ...], bytearray]:
        """``n`` fresh bytes and the segments that name them; KeyUnavailable if short."""
        if self.available() < n:
            raise KeyUnavailable(f"link key stream has {self.available()} bytes, {n} needed")
        segments, pad = [], bytearray()
        while len(pad) < n:
            chunk = self._chunks[0]
            take = min(n - len(pad), len(chunk.material) - chunk.used)
            segments.append(Segment(chunk.key_id, chunk.used, take))
            pad += chunk.material[chunk.used : chunk.used + take]
            chunk.used += take
            if chunk.used == len(chunk.material):
                _erase(self._chunks.popleft().material)
        return tuple(segments), pad

    def clear(self) -> None:
        """Erase and forget every byte not yet handed out."""
        while self._chunks:
            _erase(self._chunks.popleft().material)

    def take_key(self) -> tuple[str, bytearray]:
        """A whole unused QKDM key (GCM mode)."""
        if not self._chunks or self._chunks[0].used:
            if self._chunks and self._chunks[0].used:
                _erase(self._chunks.popleft().material)  # the unused tail is wasted, not reused
            if not self._chunks:
                raise KeyUnavailable("no whole link key in the stream")
        chunk = self._chunks.popleft()
        return chunk.key_id, chunk.material


@dataclass
class GcmSender:
    """The current GCM link key of one link direction and its use count."""

    key_id: str = ""
    key: bytearray = field(default_factory=bytearray)
    uses: int = GCM_USES
    since: float = 0.0
    """When the current key was read."""

    def clear(self) -> None:
        """Erase the current key; the next message takes a fresh one."""
        _erase(self.key)
        self.uses = GCM_USES

    def next(self, stream: PadStream) -> tuple[str, bytearray, int]:
        """(key ID, key, counter) for the next message; rotates after GCM_USES messages."""
        if self.uses >= GCM_USES:
            _erase(self.key)
            self.since = stream.oldest_since()
            self.key_id, self.key = stream.take_key()
            self.uses = 0
        counter = self.uses
        self.uses += 1
        return self.key_id, self.key, counter


# -- the receiver's side: which link-key bytes have been spent ------------------------------
@dataclass
class _Held:
    material: bytearray
    spent: bytearray  # one flag per byte (OTP) or per counter (GCM)
    since: float = 0.0


class PadLedger:
    """Link keys fetched by ID on the receiving end, and what of them has been spent.

    Sans-IO: :meth:`missing` says which QKDM keys to fetch, :meth:`add` hands them in.
    A byte (OTP) or counter (GCM) used twice is a replay; a fully spent key is erased.
    """

    GONE_MEMORY = 100_000
    """Retired key IDs remembered for a fast replay verdict; older ones are refused by the
    QKDM itself, which hands out each key ID once."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._gone: dict[str, None] = {}  # insertion-ordered set of retired key IDs

    def missing(self, hop: Hop) -> list[str]:
        return [
            s.key_id
            for s in hop.segments
            if s.key_id not in self._held and s.key_id not in self._gone
        ]

    def add(self, key_id: str, material: bytearray, now: float = 0.0) -> None:
        if key_id in self._held or key_id in self._gone:
            _erase(material)
            return
        self._held[key_id] = _Held(material, bytearray(max(len(material), GCM_USES)), now)

    def sweep(self, older_than: float) -> int:
        """Retire keys fetched before ``older_than`` (their messages were lost); return how many."""
        stale = [k for k, held in self._held.items() if held.since < older_than]
        for key_id in stale:
            self._retire(key_id)
        return len(stale)

    def pad(self, hop: Hop) -> bytearray:
        """The OTP pad the header names, marked spent (ReplayDetected if any byte was)."""
        self._check_fresh(hop)
        pad = bytearray()
        for s in hop.segments:
            held = self._held[s.key_id]
            if s.offset + s.length > len(held.material):
                raise IntegrityFailure(f"segment beyond the end of link key {s.key_id}")
            pad += held.material[s.offset : s.offset + s.length]
        for s in hop.segments:
            held = self._held[s.key_id]
            held.spent[s.offset : s.offset + s.length] = b"\x01" * s.length
            if all(held.spent[: len(held.material)]):
                self._retire(s.key_id)
        return pad

    def gcm_key(self, hop: Hop) -> bytearray:
        """The GCM key the header names; its counter is marked spent."""
        if len(hop.segments) != 1:
            raise IntegrityFailure("a GCM hop names exactly one link key")
        key_id = hop.segments[0].key_id
        if key_id in self._gone:
            raise ReplayDetected(f"link key {key_id} already retired")
        held = self._held[key_id]
        if held.spent[hop.counter]:
            raise ReplayDetected(f"link key {key_id} counter {hop.counter} seen before")
        held.spent[hop.counter] = 1
        key = bytearray(held.material)
        if hop.counter == GCM_USES - 1:
            self._retire(key_id)
        return key

    def _check_fresh(self, hop: Hop) -> None:
        for s in hop.segments:
            if s.key_id in self._gone:
                raise ReplayDetected(f"link key {s.key_id} already spent")
            held = self._held.get(s.key_id)
            if held is None:
                raise KeyUnavailable(f"link key {s.key_id} not fetched")
            if any(held.spent[s.offset : s.offset + s.length]):
                raise ReplayDetected(f"link key {s.key_id} bytes reused")

    def _retire(self, key_id: str) -> None:
        _erase(self._held.pop(key_id).material)
        self._gone[key_id] = None
        if len(self._gone) > self.GONE_MEMORY:
            del self._gone[next(iter(self._gone))]

    def held(self) -> int:
        """Link keys currently held (fetched, not fully spent)."""
        return len(self._held)
