"""Drivers for devices that speak the frame protocol (:mod:`hal.frames`) over a byte pipe.

The serial and USB drivers differ only in their :class:`Transport`; this module holds what
they share: :class:`FramedClient` (sequence numbers, bounded timeouts, retransmission,
reconnection with backoff), :class:`FramedQkdm` and :class:`FramedEntropySource`.

Retransmitting a request is safe here, unlike in ETSI 014: a retransmission carries the
same sequence number, and the firmware answers it from its reply cache instead of taking
a second key. A key is checked against the module's key size before it is returned, so
a torn or short key never leaves this module; failures surface as typed errors, and a
QKDM whose device is unreachable reports a ``down`` status instead of raising.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hal.entropy import EntropySource, Samples, SourceStatus, sample_dtype
from hal.errors import DeviceDisconnected, DeviceError, DeviceTimeout, HalError, ProtocolError
from hal.firmware import protocol as wire
from hal.frames import (
    OVERHEAD,
    STATES,
    FrameDecoder,
    FrameReceived,
    InfoPayload,
    KeyPayload,
    SourceStatusPayload,
    StatusPayload,
    encode_frame,
    error_from_frame,
    key_id_bytes,
    key_id_str,
    parse_payload,
    qber_value,
)
from hal.qkdm import LinkState, QkdKey, Qkdm, QkdmStatus
from hal.url import DeviceUrl


class Transport(Protocol):
    """A byte pipe to one device. Errors that mean "device gone" raise DeviceDisconnected."""

    def write(self, data: bytes) -> None:
        """Send all of ``data``."""
        ...

    def read(self, timeout: float) -> bytes:
        """Whatever arrives within ``timeout`` seconds (b"" if nothing)."""
        ...

    def close(self) -> None:
        """Release the pipe (idempotent)."""
        ...


Tap = Callable[[str, FrameReceived], None]
"""Frame observer: ("tx" or "rx", frame). Used by ``spy://``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceInfo:
    """What a device says about itself in answer to INFO."""

    name: str
    """The device's name (its firmware's idea, not the URL's)."""
    qkdm: bool
    """It serves keys."""
    bits: int
    """Bits per sample of its noise source; 0 if it has none."""
    max_payload: int
    """Largest payload it accepts and sends."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientOptions:
    """Timing of a framed client, from the device URL."""

    timeout: float = 1.0
    """Seconds to wait for each answer."""
    retries: int = 2
    """Retransmissions after a timeout (same sequence number)."""
    backoff: float = 0.05
    """First wait before reconnecting after a failure, seconds; doubles up to backoff_max."""
    backoff_max: float = 2.0
    """Longest wait between reconnection attempts."""

    @classmethod
    def from_url(cls, url: DeviceUrl) -> ClientOptions:
        """Take ``timeout``, ``retries``, ``backoff`` and ``backoff_max`` from ``url``."""
        return cls(
            timeout=url.take_float("timeout", 1.0, lo=0.001, hi=600.0),
            retries=url.take_int("retries", 2, lo=0, hi=20),
            backoff=url.take_float("backoff", 0.05, lo=0.0, hi=600.0),
            backoff_max=url.take_float("backoff_max", 2.0, lo=0.0, hi=3600.0),
        )


class FramedClient:
    """Request/response over a transport, reconnecting when the device comes back."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], Transport],
        options: ClientOptions,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.options = options
        self.info: DeviceInfo | None = None
        self.resets = 0  # BOOT frames seen: device restarts
        self.down_reason: str | None = "not connected yet"
        self.tap: Tap | None = None
        self._connect, self._monotonic, self._on_connect = connect, monotonic, on_connect
        self._lock = threading.RLock()
        self._transport: Transport | None = None
        self._decoder = FrameDecoder()
        self._inbox: list[FrameReceived] = []  # answers that arrived ahead of their turn
        self._in_flight: set[int] = set()
        self._seq = secrets.randbelow(0x10000)  # a restarted host never reuses the last seq
        self._retry_at = -float("inf")
        self._backoff = options.backoff

    def request(self, ftype: int, payload: bytes = b"") -> bytes:
        """Send one request; return the response payload or raise a typed HalError."""
        with self._lock:
            transport = self._connected()
            return self._exchange(transport, ftype, payload)

    def stream(
        self, ftype: int, payloads: list[bytes], sink: Callable[[bytes], None], window: int = 4
    ) -> None:
        """Send requests with up to ``window`` in flight; pass each answer to ``sink`` in order.

        For requests whose loss costs nothing (samples): there is no retransmission, a
        timeout raises DeviceTimeout and the transport is dropped. Never used for keys."""
        with self._lock:
            transport = self._connected()
            queue = list(reversed(payloads))
            waiting: list[int] = []
            try:
                while queue or waiting:
                    while queue and len(waiting) < window:
                        waiting.append(self._send(transport, ftype, queue.pop()))
                    reply = self._await(transport, ftype, waiting.pop(0))
                    if reply is None:
                        raise DeviceTimeout(f"{self.name}: no answer in {self.options.timeout:g} s")
                    if reply.type == wire.T_ERROR:
                        raise error_from_frame(self.name, reply.payload)
                    sink(reply.payload)
            except DeviceError as exc:
                self._drop(exc.message)
                raise
            finally:
                self._in_flight.clear()
                self._inbox.clear()

    def _send(self, transport: Transport, ftype: int, payload: bytes) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        self._in_flight.add(self._seq)
        if self.tap is not None:
            self.tap("tx", FrameReceived(type=ftype, seq=self._seq, payload=payload))
        transport.write(encode_frame(ftype, self._seq, payload))
        return self._seq

    def close(self) -> None:
        """Release the transport; the next request reconnects."""
        with self._lock:
            self._drop("closed")

    # -- connection -----------------------------------------------------------------------
    def _connected(self) -> Transport:
        if self._transport is not None:
            return self._transport
        wait = self._retry_at - self._monotonic()
        if wait > 0:
            raise DeviceDisconnected(f"{self.name}: {self.down_reason} (retry in {wait:.2f} s)")
        try:
            self._transport = self._connect()
        except DeviceError as exc:
            self._drop(exc.message)
            raise
        self._decoder = FrameDecoder()
        self.info = self._handshake(self._transport)
        self.down_reason, self._backoff = None, self.options.backoff
        if self._on_connect is not None:
            self._on_connect()
        return self._transport

    def _handshake(self, transport: Transport) -> DeviceInfo:
        info: Any = parse_payload(InfoPayload, self._exchange(transport, wire.T_INFO), "INFO")
        return DeviceInfo(
            name=bytes(info.name).decode("utf-8", "replace"),
            qkdm=bool(info.capabilities & wire.CAP_QKDM),
            bits=int(info.bits),
            max_payload=int(info.max_payload),
        )

    def _drop(self, reason: str) -> None:
        """Forget the transport; reconnect no sooner than the current backoff."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self.down_reason = reason
        self._retry_at = self._monotonic() + self._backoff
        self._backoff = min(self.options.backoff_max, max(self._backoff * 2, 0.001))

    # -- one exchange ---------------------------------------------------------------------
    def _exchange(self, transport: Transport, ftype: int, payload: bytes = b"") -> bytes:
        self._seq = (self._seq + 1) & 0xFFFF
        frame = encode_frame(ftype, self._seq, payload)
        if self.tap is not None:
            self.tap("tx", FrameReceived(type=ftype, seq=self._seq, payload=payload))
        for _ in range(self.options.retries + 1):
            try:
                transport.write(frame)
                reply = self._await(transport, ftype, self._seq)
            except DeviceError as exc:
                self._drop(exc.message)
                raise
            if reply is not None:
                if reply.type == wire.T_ERROR:
                    raise error_from_frame(self.name, reply.payload)
                return reply.payload
            self._decoder.give_up_partial()
        attempts = self.options.retries + 1
        message = f"{self.name}: no answer in {attempts} x {self.options.timeout:g} s"
        self._drop(message)
        raise DeviceTimeout(message)

    def _await(self, transport: Transport, ftype: int, seq: int) -> FrameReceived | None:
        """The answer to request ``seq``; answers to other requests in flight are kept."""
        deadline = self._monotonic() + self.options.timeout
        while True:
            for i, frame in enumerate(self._inbox):
                if frame.seq == seq and frame.type in (ftype | wire.RESPONSE, wire.T_ERROR):
                    self._in_flight.discard(seq)
                    return self._inbox.pop(i)
            left = deadline - self._monotonic()
            if left <= 0:
                return None
            for event in self._decoder.receive_data(transport.read(left)):
                if isinstance(event, FrameReceived):
                    self._file(event, seq)

    def _file(self, frame: FrameReceived, seq: int) -> None:
        """Keep an answer to a request in flight; count BOOTs; drop stale answers."""
        if self.tap is not None:
            self.tap("rx", frame)
        if frame.type == wire.T_BOOT:
            self.resets += 1
        elif frame.seq == seq or frame.seq in self._in_flight:
            self._inbox.append(frame)


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


class FramedQkdm(Qkdm):
    """A QKD module behind the frame protocol (serial or USB)."""

    def __init__(self, name: str, connect: Callable[[], Transport], options: ClientOptions):
        self.name = name
        self.client = FramedClient(name, connect, options, on_connect=self._connected)
        self._last: QkdmStatus | None = None

    def get_key(self) -> QkdKey:
        return self._key(self._call(wire.T_GET_KEY))

    def get_key_by_id(self, key_id: str) -> QkdKey:
        return self._key(self._call(wire.T_GET_KEY_BY_ID, key_id_bytes(key_id)))

    def key_count(self) -> int:
        return int.from_bytes(self._call(wire.T_KEY_COUNT), "big")

    def status(self) -> QkdmStatus:
        try:
            raw: Any = parse_payload(StatusPayload, self._call(wire.T_STATUS), "STATUS")
        except DeviceError as exc:
            return self._down_status(exc.message)
        state = STATES.get(raw.state)
        if state is None:
            return self._down_status(f"{self.name}: unknown link state {raw.state}")
        self._last = QkdmStatus(
            link=bytes(raw.link).decode("utf-8", "replace"),
            state=state,
            skr_bps=float(raw.skr),
            qber=qber_value(raw.qber),
            key_count=int(raw.key_count),
            max_key_count=int(raw.max_key_count),
            key_size=int(raw.key_size),
            keys_produced=int(raw.keys_produced),
        )
        self._observe_state(state, "status reading", link=self._last.link)
        return self._last

    def close(self) -> None:
        self.client.close()

    # -- internals ------------------------------------------------------------------------
    def _call(self, ftype: int, payload: bytes = b"") -> bytes:
        try:
            return self.client.request(ftype, payload)
        except DeviceError as exc:
            self._observe_state(LinkState.DOWN, exc.message)
            raise

    def _connected(self) -> None:
        """Called inside the client after each (re)connection: learn key size and state."""
        self.status()

    def _down_status(self, reason: str) -> QkdmStatus:
        self._observe_state(LinkState.DOWN, reason)
        last = self._last
        return QkdmStatus(
            link=last.link if last else self.name,
            state=LinkState.DOWN,
            skr_bps=0.0,
            qber=None,
            key_count=0,
            max_key_count=last.max_key_count if last else 0,
            key_size=last.key_size if last else 0,
            keys_produced=last.keys_produced if last else 0,
        )

    def _key(self, payload: bytes) -> QkdKey:
        raw: Any = parse_payload(KeyPayload, payload, "key")
        material = bytearray(raw.material)
        expected = self._last.key_size // 8 if self._last else 0
        if not material or (expected and len(material) != expected):
            _wipe(material)
            raise ProtocolError(
                f"{self.name}: key of {len(payload) - 16} bytes, expected {expected}; discarded"
            )
        return QkdKey(key_id=key_id_str(bytes(raw.key_id)), material=material)


_SAMPLE_FRAME = 64 * 1024 - 512
"""Largest sample frame asked for, bytes on the wire. A frame that overflows a 64 KiB
pipe buffer (a pty's is 64 KiB) stalls the device until the host has drained part of it;
one that fits lets the device write it whole and start on the next. Measured over a pty:
65 547-byte frames 12.7 MB/s, 65 012-byte frames 17.8 MB/s (medians, interleaved runs)."""


class FramedEntropySource(EntropySource):
    """A QRNG board behind the frame protocol: samples in chunks of one frame each."""

    def __init__(self, name: str, connect: Callable[[], Transport], options: ClientOptions):
        self.name = name
        self.client = FramedClient(name, connect, options)
        self.bits_per_sample = self._info().bits
        self._read = 0
        self._last: SourceStatus | None = None

    def read(self, n: int) -> Samples:
        if n < 0:
            raise ValueError("n must be >= 0")
        info = self._info()
        dtype = np.dtype(sample_dtype(info.bits)).newbyteorder("<")
        payload = min(info.max_payload, _SAMPLE_FRAME - OVERHEAD)
        chunk = (payload - 1) // dtype.itemsize
        out = np.empty(n, dtype=sample_dtype(info.bits))
        sizes = [min(chunk, n - start) for start in range(0, n, chunk)]
        done = 0

        def store(payload: bytes) -> None:
            nonlocal done
            want = sizes[len(sizes) - len(pending)]
            pending.pop()
            if len(payload) != 1 + want * dtype.itemsize or payload[0] != info.bits:
                raise ProtocolError(f"{self.name}: malformed sample frame ({len(payload)} bytes)")
            out[done : done + want] = np.frombuffer(payload, dtype=dtype, offset=1)
            done += want

        pending = list(sizes)
        # Two requests in flight: the device fills the next frame while this end parses.
        self.client.stream(wire.T_READ_SAMPLES, [k.to_bytes(4, "big") for k in sizes], store)
        self._read += n
        return out

    def status(self) -> SourceStatus:
        try:
            payload = self.client.request(wire.T_SOURCE_STATUS)
        except DeviceError as exc:
            return self._fault_status(exc.message)
        raw: Any = parse_payload(SourceStatusPayload, payload, "SOURCE_STATUS")
        self._last = SourceStatus(
            name=self.name,
            bits_per_sample=int(raw.bits),
            sample_rate=float(raw.rate),
            model_min_entropy=float(raw.min_entropy),
            expected_mean=float(raw.mean),
            expected_std=float(raw.std),
            expected_rho=float(raw.rho),
            samples_read=self._read,
            fault=str(raw.fault) or None,
        )
        return self._last

    def close(self) -> None:
        self.client.close()

    def _info(self) -> DeviceInfo:
        if self.client.info is None:
            self.client.request(wire.T_INFO)  # connects, handshakes, fills client.info
        info = self.client.info
        if info is None or not info.bits:
            raise ProtocolError(f"{self.name}: device has no noise source")
        return info

    def _fault_status(self, reason: str) -> SourceStatus:
        """The last reading with ``fault`` set to the transport failure (never raises)."""
        last = self._last
        return SourceStatus(
            name=self.name,
            bits_per_sample=self.bits_per_sample,
            sample_rate=last.sample_rate if last else 0.0,
            model_min_entropy=last.model_min_entropy if last else 0.0,
            expected_mean=last.expected_mean if last else 0.0,
            expected_std=last.expected_std if last else 0.0,
            expected_rho=last.expected_rho if last else 0.0,
            samples_read=self._read,
            fault=f"device unreachable: {reason}"[:200],
        )


def wrap_errors(name: str, exc: BaseException) -> HalError:
    """A transport's OS/pyserial/pyusb failure as DeviceDisconnected (no traceback text)."""
    detail = getattr(exc, "strerror", None) or type(exc).__name__
    return DeviceDisconnected(f"{name}: device gone ({detail})")
