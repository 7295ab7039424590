"""The one place where MicroPython and CPython module names are reconciled.

In the style of micropython-lib: firmware modules import ``time``, ``struct``, ``hashlib``
and ``crc32`` from here, never ``utime``/``ustruct``/``uhashlib``/``ubinascii`` directly,
so the rest of the firmware reads the same on both interpreters. This module must stay
importable by MicroPython: no ``typing``, no CPython-only modules at import time.
"""

# MicroPython >= 1.20 has the plain names; older ports only the u-prefixed ones.
try:
    import time
except ImportError:
    import utime as time  # type: ignore[import-not-found, no-redef]

try:
    import struct
except ImportError:
    import ustruct as struct  # type: ignore[import-not-found, no-redef]

try:
    import hashlib
except ImportError:
    import uhashlib as hashlib  # type: ignore[import-not-found, no-redef]

try:
    import binascii
except ImportError:
    import ubinascii as binascii  # type: ignore[import-not-found, no-redef]

try:
    from micropython import const  # type: ignore[import-not-found]
except ImportError:

    def const(value: int) -> int:
        """CPython stand-in for MicroPython's compile-time constant marker."""
        return value


__all__ = [
    "binascii",
    "const",
    "crc32",
    "hashlib",
    "sha256",
    "struct",
    "ticks_diff",
    "ticks_ms",
    "time",
]

_CRC_TABLE: list[int] = []


def _crc32_soft(data: bytes, crc: int = 0) -> int:
    """CRC-32 (IEEE 802.3, as zlib) for ports built without ``binascii.crc32``."""
    if not _CRC_TABLE:
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32(data: bytes, crc: int = 0) -> int:
    """CRC-32 of ``data`` continuing ``crc``, as an unsigned 32-bit integer."""
    if hasattr(binascii, "crc32"):
        return int(binascii.crc32(data, crc)) & 0xFFFFFFFF
    return _crc32_soft(data, crc)


def ticks_ms() -> int:
    """A millisecond counter for timeouts (wraps on MicroPython: use :func:`ticks_diff`)."""
    if hasattr(time, "ticks_ms"):
        return int(time.ticks_ms())
    return int(time.monotonic() * 1000)


def ticks_diff(later: int, earlier: int) -> int:
    """Milliseconds from ``earlier`` to ``later``, correct across wrap-around."""
    if hasattr(time, "ticks_diff"):
        return int(time.ticks_diff(later, earlier))
    return later - earlier


def sha256(data: bytes) -> bytes:
    """SHA-256 digest (uhashlib has no ``hexdigest`` and no keyword arguments)."""
    h = hashlib.sha256(data)
    return bytes(h.digest())
