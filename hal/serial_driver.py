"""Driver for QKD modules and QRNG boards on a serial line: ``serial://DEVICE?...``.

URL format::

    serial:///dev/ttyUSB0?baud=115200&timeout=1&retries=2
    serial:///dev/serial/by-id/usb-Vendor_QKDM_0042-if00     (survives re-plugging)
    serial://loop                                            (pyserial's loop://: self-test)

=========== ============================================================ =========
parameter   meaning                                                      default
=========== ============================================================ =========
baud        line speed, bit/s                                            115200
timeout     seconds to wait for each answer                              1
retries     retransmissions of a request after a timeout                 2
backoff     first wait before reconnecting after a failure, s            0.05
backoff_max longest wait between reconnection attempts, s                2
=========== ============================================================ =========

The path names the port; a name instead of a path (``serial://loop``,
``serial://socket/host:port``) selects a pyserial URL handler (``loop://``,
``socket://host:port``). The port speaks the frame protocol of :mod:`hal.frames`; the
request logic is :mod:`hal.framed`'s. This module only moves bytes: it never interprets
a payload, and it reports a vanished port as DeviceDisconnected, never as a traceback.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import serial

from hal.clock import Clock
from hal.errors import DeviceUrlError
from hal.framed import (
    ClientOptions,
    FramedEntropySource,
    FramedQkdm,
    Transport,
    wrap_errors,
)
from hal.url import DeviceUrl

_POLL = 0.02  # pyserial read timeout: the longest a read blocks before re-checking the deadline


class SerialTransport:
    """A pyserial port as a :class:`~hal.framed.Transport`."""

    def __init__(self, port: serial.SerialBase, name: str) -> None:
        self.port, self.name = port, name

    def write(self, data: bytes) -> None:
        try:
            self.port.write(data)
        except (serial.SerialException, OSError) as exc:
            raise wrap_errors(self.name, exc) from None

    def read(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        try:
            while True:
                waiting = self.port.in_waiting
                if waiting:
                    return bytes(self.port.read(waiting))
                first = bytes(self.port.read(1))  # blocks up to _POLL
                if first:
                    # Take what arrived with it: one pass through the decoder, not two.
                    waiting = self.port.in_waiting
                    return first + bytes(self.port.read(waiting)) if waiting else first
                if time.monotonic() >= deadline:
                    return b""
        except (serial.SerialException, OSError, TypeError) as exc:
            # pyserial raises TypeError when a closed port's fd is gone mid-read.
            raise wrap_errors(self.name, exc) from None

    def close(self) -> None:
        with contextlib.suppress(serial.SerialException, OSError):  # already gone
            self.port.close()


def device_of(url: DeviceUrl) -> str:
    """The pyserial port name or URL that ``url`` designates."""
    if url.name and url.path not in ("", "/"):
        return f"{url.name}://{url.path.lstrip('/')}"
    if url.name:
        return f"{url.name}://"
    if not url.path.startswith("/"):
        raise DeviceUrlError(f"{url.raw}: expected serial:///path/to/port or serial://HANDLER")
    return url.path


def connector(device: str, baud: int, name: str) -> Callable[[], Transport]:
    """A function that opens the port afresh (called again after each disconnection)."""

    def connect() -> Transport:
        try:
            port = serial.serial_for_url(device, baudrate=baud, timeout=_POLL, write_timeout=5)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise wrap_errors(name, exc) from None
        return SerialTransport(port, name)

    return connect


def _parse(url: DeviceUrl) -> tuple[Callable[[], Transport], ClientOptions, str]:
    device = device_of(url)
    baud = url.take_int("baud", 115200, lo=50, hi=16_000_000)
    options = ClientOptions.from_url(url)
    url.finish()
    name = f"serial:{device}"
    return connector(device, baud, name), options, name


def open_qkdm(url: DeviceUrl, clock: Clock | None = None) -> FramedQkdm:
    """Open a QKD module on a serial line (lazily: an absent port reports ``down``)."""
    connect, options, name = _parse(url)
    return FramedQkdm(name, connect, options)


def open_entropy_source(url: DeviceUrl, clock: Clock | None = None) -> FramedEntropySource:
    """Open a QRNG board on a serial line; raise DeviceDisconnected if it is absent."""
    connect, options, name = _parse(url)
    return FramedEntropySource(name, connect, options)
