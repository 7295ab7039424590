"""``spy://`` wrapper for field debugging: logs every call and frame, never key bits.

URL format: ``spy://`` followed by the URL of the device to watch, e.g.
``spy://serial:///dev/ttyUSB0?baud=115200`` or ``spy://usb://1209:0a51?serial=Q1``
(all query parameters belong to the inner URL). Like pyserial's ``spy://``, but it
decodes: each frame of a framed driver (serial, USB) is logged with its type, sequence
number and length; payloads are shown only when they cannot hold secrets (status, info,
error text). Key material and raw noise samples are always redacted, key IDs are shown.
Other drivers (emulated, ETSI 014) are logged call by call.

Lines go to the ``hal.spy`` logger at INFO, or to a ``sink`` passed to :class:`SpyQkdm`.
This module must never log a key, a sample, or a payload it does not understand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import hal
from hal.clock import Clock
from hal.entropy import EntropySource, Samples, SourceStatus
from hal.errors import DeviceUrlError, HalError
from hal.firmware import protocol as wire
from hal.frames import FrameReceived, key_id_str
from hal.qkdm import LinkState, QkdKey, Qkdm, QkdmStatus, StateCallback
from hal.url import DeviceUrl

LOG = logging.getLogger("hal.spy")
T = TypeVar("T")
Sink = Callable[[str], None]

_NAMES = {
    wire.T_INFO: "INFO",
    wire.T_STATUS: "STATUS",
    wire.T_GET_KEY: "GET_KEY",
    wire.T_GET_KEY_BY_ID: "GET_KEY_BY_ID",
    wire.T_KEY_COUNT: "KEY_COUNT",
    wire.T_READ_SAMPLES: "READ_SAMPLES",
    wire.T_SOURCE_STATUS: "SOURCE_STATUS",
    wire.T_BOOT: "BOOT",
    wire.T_ERROR: "ERROR",
}
_PUBLIC = (wire.T_INFO, wire.T_STATUS, wire.T_KEY_COUNT, wire.T_SOURCE_STATUS, wire.T_BOOT)


def describe_frame(direction: str, frame: FrameReceived) -> str:
    """One log line for a frame, with secrets redacted."""
    base = frame.type & 0x7F if frame.type != wire.T_ERROR else wire.T_ERROR
    name = _NAMES.get(base, f"0x{frame.type:02x}")
    kind = "response" if frame.type & wire.RESPONSE and frame.type != wire.T_ERROR else ""
    head = (
        f"{direction} {name}{' ' + kind if kind else ''} seq={frame.seq} len={len(frame.payload)}"
    )
    return f"{head} {_payload(base, frame)}".rstrip()


def _payload(base: int, frame: FrameReceived) -> str:
    payload, is_response = frame.payload, bool(frame.type & wire.RESPONSE)
    if base == wire.T_ERROR:
        code = payload[0] if payload else -1
        return f"code={code} message={payload[1:201].decode('utf-8', 'replace')!r}"
    if base in (wire.T_GET_KEY, wire.T_GET_KEY_BY_ID) and len(payload) >= wire.KEY_ID_SIZE:
        key_id = key_id_str(payload[: wire.KEY_ID_SIZE])
        rest = len(payload) - wire.KEY_ID_SIZE
        return f"key_id={key_id}" + (f" key=<redacted {rest} bytes>" if is_response else "")
    if base == wire.T_READ_SAMPLES:
        if is_response:
            return f"samples=<redacted {max(0, len(payload) - 1)} bytes>"
        return f"n={int.from_bytes(payload, 'big')}" if len(payload) == 4 else "n=?"
    if base in _PUBLIC:
        return f"payload={payload[:64].hex()}"
    return "payload=<redacted>" if payload else ""


class SpyQkdm(Qkdm):
    """Logs the calls to a QKDM driver and, for framed drivers, its frames."""

    def __init__(self, inner: Qkdm, sink: Sink | None = None) -> None:
        self.inner = inner
        self.sink: Sink = sink or LOG.info
        client = getattr(inner, "client", None)
        if client is not None and hasattr(client, "tap"):
            client.tap = lambda direction, frame: self.sink(describe_frame(direction, frame))

    def get_key(self) -> QkdKey:
        return self._key("get_key()", self.inner.get_key)

    def get_key_by_id(self, key_id: str) -> QkdKey:
        return self._key(f"get_key_by_id({key_id!r})", lambda: self.inner.get_key_by_id(key_id))

    def key_count(self) -> int:
        return self._logged("key_count()", self.inner.key_count, str)

    def status(self) -> QkdmStatus:
        return self._logged("status()", self.inner.status, repr)

    def subscribe(self, callback: StateCallback) -> Callable[[], None]:
        return self.inner.subscribe(callback)

    def poll_state(self) -> LinkState:
        return self._logged("poll_state()", self.inner.poll_state, str)

    def close(self) -> None:
        self.sink("close()")
        self.inner.close()

    def _key(self, call: str, take: Callable[[], QkdKey]) -> QkdKey:
        return self._logged(call, take, _show_key)

    def _logged(self, call: str, fn: Callable[[], T], show: Callable[[T], str]) -> T:
        try:
            result = fn()
        except HalError as exc:
            self.sink(f"{call} !! {exc.code}: {exc.message}")
            raise
        self.sink(f"{call} -> {show(result)}")
        return result


def _show_key(key: QkdKey) -> str:
    return f"key_id={key.key_id} bits=<redacted {key.size_bits}>"


class SpyEntropySource(EntropySource):
    """Logs the calls to an entropy source and its frames; samples are never shown."""

    def __init__(self, inner: EntropySource, sink: Sink | None = None) -> None:
        self.inner = inner
        self.bits_per_sample = inner.bits_per_sample
        self.sink: Sink = sink or LOG.info
        client = getattr(inner, "client", None)
        if client is not None and hasattr(client, "tap"):
            client.tap = lambda direction, frame: self.sink(describe_frame(direction, frame))

    def read(self, n: int) -> Samples:
        try:
            samples = self.inner.read(n)
        except HalError as exc:
            self.sink(f"read({n}) !! {exc.code}: {exc.message}")
            raise
        self.sink(f"read({n}) -> <redacted {len(samples)} samples>")
        return samples

    def status(self) -> SourceStatus:
        status = self.inner.status()
        self.sink(f"status() -> {status!r}")
        return status

    def close(self) -> None:
        self.sink("close()")
        self.inner.close()


def _inner(url: DeviceUrl) -> str:
    inner = url.raw.split("://", 1)[1]
    if "://" not in inner or inner.lower().startswith("spy://"):
        raise DeviceUrlError(f"{url.raw}: expected spy://SCHEME://... around another device URL")
    return inner


def open_qkdm(url: DeviceUrl, clock: Clock | None = None) -> SpyQkdm:
    """Open the inner QKDM and watch it."""
    return SpyQkdm(hal.open_qkdm(_inner(url), clock=clock))


def open_entropy_source(url: DeviceUrl, clock: Clock | None = None) -> SpyEntropySource:
    """Open the inner entropy source and watch it."""
    return SpyEntropySource(hal.open_entropy_source(_inner(url), clock=clock))
