"""The firmware's request handler: frames in, frames out, over an injected key store/ADC.

:class:`Device` answers request frames from the host. It never executes a request twice:
the reply to the last request is kept, and a retransmission (same sequence number, type
and payload, after the host timed out) gets that reply again. An INFO request starts a
new host session and forgets the kept reply, so a restarted host never receives a key
meant for its predecessor. The key store and the ADC are backends passed in: the
module's hardware on a board, the emulated QKDM/QRNG under CPython.

This module does no I/O, never puts key bytes in an error frame, and stays
MicroPython-compatible.
"""

from . import protocol as p
from .compat import struct


class DeviceFault(Exception):
    """A request the device cannot serve; ``code`` is one of the protocol's ``E_*``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class QkdmBackend:
    """The module's key store, as the firmware sees it (a board implements this)."""

    def status(self) -> tuple[int, float, float, int, int, int, int, str]:
        """(state, skr, qber or NaN, key count, max key count, key size, produced, link)."""
        raise NotImplementedError

    def take_key(self) -> tuple[bytes, bytearray]:
        """(16-byte key ID, key bytes) of the oldest key; raise DeviceFault."""
        raise NotImplementedError

    def take_key_by_id(self, key_id: bytes) -> tuple[bytes, bytearray]:
        """(key ID, key bytes) of the key with this 16-byte ID; raise DeviceFault."""
        raise NotImplementedError

    def key_count(self) -> int:
        """Keys in the buffer."""
        raise NotImplementedError


class QrngBackend:
    """The board's ADC, as the firmware sees it."""

    bits = 8

    def read(self, n: int) -> bytes:
        """``n`` samples, one byte each up to 8 bits, else two bytes little-endian."""
        raise NotImplementedError

    def status(self) -> tuple[float, float, float, float, float, int, str]:
        """(rate, model min-entropy, mean, std, rho, samples read, fault or "")."""
        raise NotImplementedError


_SECRET_REPLIES = (p.T_GET_KEY, p.T_GET_KEY_BY_ID)  # requests whose reply carries a key


def _wipe(buf: bytearray) -> None:
    """Overwrite in place: slice assignment where the port has it, else byte by byte."""
    try:
        buf[:] = bytes(len(buf))
    except (TypeError, NotImplementedError):
        for i in range(len(buf)):
            buf[i] = 0


class Device:
    """One device: a QKDM end, a QRNG, or both behind one port."""

    def __init__(
        self,
        name: str,
        qkdm: QkdmBackend | None = None,
        qrng: QrngBackend | None = None,
        max_payload: int = p.MAX_PAYLOAD,
    ) -> None:
        self.name = name
        self.qkdm = qkdm
        self.qrng = qrng
        self.max_payload = max_payload
        self.parser = p.Parser(max_payload)
        self._last_request = b""  # type, seq and payload of the last request served
        self._last_reply: bytes | bytearray = b""  # a bytearray (wiped when replaced): a key
        self.requests = 0

    # -- byte stream ------------------------------------------------------------------
    def boot(self) -> bytes:
        """The frame a device sends when it (re)starts."""
        return p.encode(p.T_BOOT, 0, self._info())

    def receive(self, data: bytes) -> bytes:
        """Feed bytes from the host; return the bytes to send back."""
        return b"".join(self.replies(data))

    def replies(self, data: bytes):  # type: ignore[no-untyped-def]  # a generator
        """Feed bytes from the host; yield each reply as soon as it is computed.

        The main loop sends each one before computing the next: with several requests
        in flight, the host parses one frame while the device builds the next, instead of
        waiting for the whole batch (which halved sample throughput over a pty)."""
        for ftype, seq, payload in self.parser.feed(data):
            reply = self.handle(ftype, seq, payload)
            if reply:
                yield reply

    def idle(self) -> bytes:
        """The line went quiet with a partial frame buffered: drop it."""
        frames = self.parser.drop_partial()
        return b"".join([self.handle(ftype, seq, payload) for ftype, seq, payload in frames])

    # -- one request ------------------------------------------------------------------
    def handle(self, ftype: int, seq: int, payload: bytes) -> bytes:
        """The reply to one request frame (responses from a confused peer are ignored)."""
        if ftype & p.RESPONSE or ftype == p.T_BOOT:
            return b""
        request = struct.pack(">BH", ftype, seq) + payload
        if ftype != p.T_INFO and request == self._last_request:
            return bytes(self._last_reply)
        self.requests += 1
        try:
            reply = p.encode(ftype | p.RESPONSE, seq, self._serve(ftype, payload))
        except DeviceFault as fault:
            reply = p.encode(p.T_ERROR, seq, self._error(fault.code, fault.message))
        if isinstance(self._last_reply, bytearray):
            _wipe(self._last_reply)
        self._last_request = request
        # Only a key reply is secret: keep a wipeable copy of it, and the others as they
        # are (copying and zeroing every 64 KiB sample frame cost the sample stream ~5 %).
        self._last_reply = bytearray(reply) if ftype in _SECRET_REPLIES else reply
        return reply

    def _serve(self, ftype: int, payload: bytes) -> bytes:
        if ftype == p.T_INFO:
            return self._info()
        if ftype in (p.T_READ_SAMPLES, p.T_SOURCE_STATUS):
            return self._serve_qrng(ftype, payload)
        return self._serve_qkdm(ftype, payload)

    def _info(self) -> bytes:
        caps = (p.CAP_QKDM if self.qkdm else 0) | (p.CAP_QRNG if self.qrng else 0)
        bits = self.qrng.bits if self.qrng else 0
        return struct.pack(p.INFO_FMT, caps, bits, self.max_payload) + self.name.encode()

    def _serve_qkdm(self, ftype: int, payload: bytes) -> bytes:
        qkdm = self.qkdm
        if qkdm is None:
            raise DeviceFault(p.E_UNSUPPORTED, "not a QKD module")
        if ftype == p.T_STATUS:
            state, skr, qber, count, most, size, produced, link = qkdm.status()
            head = struct.pack(p.STATUS_FMT, state, skr, qber, count, most, size, produced)
            return head + link.encode()
        if ftype == p.T_KEY_COUNT:
            return struct.pack(">I", qkdm.key_count())
        if ftype == p.T_GET_KEY:
            _expect_size(payload, 0)
            return _key_payload(qkdm.take_key())
        if ftype == p.T_GET_KEY_BY_ID:
            _expect_size(payload, p.KEY_ID_SIZE)
            return _key_payload(qkdm.take_key_by_id(payload))
        raise DeviceFault(p.E_UNSUPPORTED, "unknown request type")

    def _serve_qrng(self, ftype: int, payload: bytes) -> bytes:
        qrng = self.qrng
        if qrng is None:
            raise DeviceFault(p.E_UNSUPPORTED, "not a random number generator")
        if ftype == p.T_SOURCE_STATUS:
            rate, h, mean, std, rho, count, fault = qrng.status()
            head = struct.pack(p.SOURCE_STATUS_FMT, qrng.bits, rate, h, mean, std, rho, count)
            fault_bytes = fault.encode()[:255]
            return head + bytes([len(fault_bytes)]) + fault_bytes + self.name.encode()
        _expect_size(payload, 4)
        (n,) = struct.unpack(">I", payload)
        width = 1 if qrng.bits <= 8 else 2
        if n * width + 1 > self.max_payload:
            raise DeviceFault(p.E_BAD_REQUEST, "too many samples for one frame")
        return bytes([qrng.bits]) + qrng.read(n)

    def _error(self, code: int, message: str) -> bytes:
        return bytes([code & 0xFF]) + message.encode()[:200]


def _expect_size(payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise DeviceFault(p.E_BAD_REQUEST, "bad payload length")


def _key_payload(key: tuple[bytes, bytearray]) -> bytes:
    key_id, material = key
    if len(key_id) != p.KEY_ID_SIZE:
        raise DeviceFault(p.E_DEVICE_FAULT, "key store returned a malformed key ID")
    out = bytes(key_id) + bytes(material)
    _wipe(material)
    return out
