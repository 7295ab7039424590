"""The QKDM/QRNG frame protocol, device side: constants, frame encoder, stream parser.

Wire format (big-endian)::

    sync 0xA5 0x5A | version u8 | type u8 | seq u16 | length u16 | payload | crc32 u32

The CRC-32 (zlib's) covers version through payload. A response carries the sequence
number of its request and the request type with bit 7 set, or ``T_ERROR``. The host side
defines the same format with ``construct`` in :mod:`hal.frames`; the constants below are
the single source of both. This module does no I/O and must stay MicroPython-compatible.
"""

from .compat import const, crc32, struct

SYNC = b"\xa5\x5a"
VERSION = const(1)
HEADER_SIZE = const(8)
TRAILER_SIZE = const(4)
MAX_PAYLOAD = const(65535)

# Request types; the response type is the request type | RESPONSE.
T_INFO = const(0x01)
T_STATUS = const(0x02)
T_GET_KEY = const(0x03)
T_GET_KEY_BY_ID = const(0x04)
T_KEY_COUNT = const(0x05)
T_READ_SAMPLES = const(0x10)
T_SOURCE_STATUS = const(0x11)
T_BOOT = const(0x7E)  # unsolicited: the device (re)started
T_ERROR = const(0xFF)
RESPONSE = const(0x80)
REQUEST_TYPES = (
    T_INFO,
    T_STATUS,
    T_GET_KEY,
    T_GET_KEY_BY_ID,
    T_KEY_COUNT,
    T_READ_SAMPLES,
    T_SOURCE_STATUS,
)

# Error codes carried by T_ERROR frames.
E_NO_KEY = const(1)
E_LINK_DOWN = const(2)
E_KEY_NOT_FOUND = const(3)
E_KEY_PENDING = const(4)
E_BAD_REQUEST = const(5)
E_UNSUPPORTED = const(6)
E_DEVICE_FAULT = const(7)

# Capability bits in the INFO response.
CAP_QKDM = const(1)
CAP_QRNG = const(2)

# Link states in the STATUS response.
STATE_UP = const(0)
STATE_DOWN = const(1)
STATE_ABORT = const(2)

INFO_FMT = ">BBH"  # capabilities, bits per sample (0: no QRNG), max payload
STATUS_FMT = ">BddIIIQ"  # state, skr, qber (NaN: none), count, max, key size, produced
SOURCE_STATUS_FMT = ">BdddddQ"  # bits, rate, min-entropy, mean, std, rho, samples read
KEY_ID_SIZE = const(16)


def encode(ftype: int, seq: int, payload: bytes = b"") -> bytes:
    """One complete frame."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too long")
    head = struct.pack(">BBHH", VERSION, ftype, seq & 0xFFFF, len(payload))
    # One copy of the payload (a 64 KiB sample frame), the CRC continued over both parts.
    return b"".join((SYNC, head, payload, struct.pack(">I", crc32(payload, crc32(head)))))


def _known_type(ftype: int) -> bool:
    base = ftype & 0x7F
    return base in REQUEST_TYPES or ftype in (T_BOOT, T_ERROR)


class Parser:
    """Turns a byte stream into (type, seq, payload) frames, skipping garbage.

    A candidate header with a bad version, an unknown type or an oversized length, or a
    frame whose CRC fails, costs one byte: the search resumes right after its sync, so a
    torn frame followed by a whole one loses only the torn one.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.buf = bytearray()
        self.skipped = 0  # bytes discarded as garbage since creation

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Add bytes; return the complete frames now available, in order."""
        self.buf.extend(data)
        frames: list[tuple[int, int, bytes]] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def pending(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self.buf)

    def drop_partial(self) -> list[tuple[int, int, bytes]]:
        """Give up on a frame that stopped arriving (after an idle timeout); return any
        whole frames found behind it."""
        if self.buf:
            self._skip(1)
        return self.feed(b"")

    def _skip(self, n: int) -> None:
        self.skipped += n
        self.buf = self.buf[n:]

    def _seek_sync(self) -> bool:
        """Drop bytes before the next sync; False if no full sync is buffered yet."""
        i = bytes(self.buf).find(SYNC)
        if i < 0:
            # Keep a trailing 0xA5: it may be the first half of a sync.
            keep = 1 if self.buf and self.buf[-1] == 0xA5 else 0
            if len(self.buf) > keep:
                self._skip(len(self.buf) - keep)
            return False
        if i:
            self._skip(i)
        return True

    def _next(self) -> tuple[int, int, bytes] | None:
        while self._seek_sync():
            if len(self.buf) < HEADER_SIZE:
                return None
            version, ftype, seq, length = struct.unpack(">BBHH", bytes(self.buf[2:HEADER_SIZE]))
            if version != VERSION or not _known_type(ftype) or length > self.max_payload:
                self._skip(1)
                continue
            total = HEADER_SIZE + length + TRAILER_SIZE
            if len(self.buf) < total:
                return None
            frame = bytes(self.buf[:total])
            (crc,) = struct.unpack(">I", frame[total - TRAILER_SIZE :])
            if crc32(frame[2 : total - TRAILER_SIZE]) != crc:
                self._skip(1)
                continue
            self.buf = self.buf[total:]
            return ftype, seq, frame[HEADER_SIZE : total - TRAILER_SIZE]
        return None
