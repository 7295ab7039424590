"""Driver for QKD modules and QRNG boards on USB bulk endpoints: ``usb://VID:PID?...``.

URL format (VID and PID in hex)::

    usb://1209:0a51?serial=QKDM-0042&timeout=1&retries=2

=========== ============================================================ =========
parameter   meaning                                                      default
=========== ============================================================ =========
serial      the device's serial-number string; required if several match none
timeout     seconds to wait for each answer                              1
retries     retransmissions of a request after a timeout                 2
backoff     first wait before reconnecting after a failure, s            0.05
backoff_max longest wait between reconnection attempts, s                2
backend     name of a pyusb backend given to :func:`register_backend`    libusb
=========== ============================================================ =========

The device exposes one interface with a bulk OUT and a bulk IN endpoint carrying the
frame protocol of :mod:`hal.frames` (the request logic is :mod:`hal.framed`'s). The
``backend`` parameter exists for emulation: tests register a fake pyusb backend
(:mod:`hal.emulated.usb_backend`) under a name, since these machines have no kernel USB.
This module only moves bytes; an unplugged device is a DeviceDisconnected error, never a
traceback, and the driver finds the device again when it comes back.
"""

from __future__ import annotations

import contextlib
import errno
import re
import threading
from collections.abc import Callable
from typing import Any

import usb.core
import usb.util

from hal.clock import Clock
from hal.errors import DeviceDisconnected, DeviceUrlError
from hal.framed import ClientOptions, FramedEntropySource, FramedQkdm, Transport, wrap_errors
from hal.url import DeviceUrl

_BACKENDS: dict[str, Any] = {}
_BACKENDS_LOCK = threading.Lock()
_VID_PID = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$")
_READ_SIZE = 65536 + 16


def register_backend(name: str, backend: Any) -> Callable[[], None]:
    """Make a pyusb backend available as ``usb://...?backend=NAME``; return an unregister."""
    with _BACKENDS_LOCK:
        _BACKENDS[name] = backend

    def unregister() -> None:
        with _BACKENDS_LOCK:
            if _BACKENDS.get(name) is backend:
                del _BACKENDS[name]

    return unregister


class UsbTransport:
    """Bulk IN/OUT endpoints of a pyusb device as a :class:`~hal.framed.Transport`."""

    def __init__(self, dev: Any, ep_out: Any, ep_in: Any, name: str) -> None:
        self.dev, self.ep_out, self.ep_in, self.name = dev, ep_out, ep_in, name

    def write(self, data: bytes) -> None:
        try:
            self.ep_out.write(data, timeout=5000)
        except usb.core.USBError as exc:
            raise wrap_errors(self.name, exc) from None

    def read(self, timeout: float) -> bytes:
        try:
            return bytes(self.ep_in.read(_READ_SIZE, timeout=max(1, int(timeout * 1000))))
        except usb.core.USBTimeoutError:
            return b""
        except usb.core.USBError as exc:
            if exc.errno == errno.ETIMEDOUT:
                return b""
            raise wrap_errors(self.name, exc) from None

    def close(self) -> None:
        with contextlib.suppress(usb.core.USBError):  # the device is already gone
            usb.util.dispose_resources(self.dev)


def _find(vid: int, pid: int, serial: str | None, backend: Any, name: str) -> Any:
    found = list(usb.core.find(find_all=True, idVendor=vid, idProduct=pid, backend=backend))
    if serial is not None:
        found = [d for d in found if _serial_of(d) == serial]
    if not found:
        raise DeviceDisconnected(f"{name}: no such device on the bus")
    if len(found) > 1:
        raise DeviceUrlError(f"{name}: {len(found)} devices match; add ?serial=...")
    return found[0]


def _serial_of(dev: Any) -> str | None:
    try:
        return str(dev.serial_number)
    except (usb.core.USBError, ValueError):
        return None  # unreadable: cannot be the one asked for


def _endpoints(dev: Any, name: str) -> tuple[Any, Any]:
    dev.set_configuration()
    intf = dev.get_active_configuration()[(0, 0)]
    usb.util.claim_interface(dev, intf)

    def direction(d: int) -> Callable[[Any], bool]:
        return lambda ep: bool(usb.util.endpoint_direction(ep.bEndpointAddress) == d)

    ep_out = usb.util.find_descriptor(intf, custom_match=direction(usb.util.ENDPOINT_OUT))
    ep_in = usb.util.find_descriptor(intf, custom_match=direction(usb.util.ENDPOINT_IN))
    if ep_out is None or ep_in is None:
        raise DeviceDisconnected(f"{name}: interface 0 lacks bulk IN/OUT endpoints")
    return ep_out, ep_in


def connector(
    vid: int, pid: int, serial: str | None, backend: Any, name: str
) -> Callable[[], Transport]:
    """A function that finds and opens the device afresh (after each disconnection)."""

    def connect() -> Transport:
        try:
            dev = _find(vid, pid, serial, backend, name)
            ep_out, ep_in = _endpoints(dev, name)
        except usb.core.USBError as exc:
            raise wrap_errors(name, exc) from None
        return UsbTransport(dev, ep_out, ep_in, name)

    return connect


def _parse(url: DeviceUrl) -> tuple[Callable[[], Transport], ClientOptions, str]:
    match = _VID_PID.match(url.name)
    if not match or url.path not in ("", "/"):
        raise DeviceUrlError(f"{url.raw}: expected usb://VID:PID (4 hex digits each)")
    vid, pid = int(match[1], 16), int(match[2], 16)
    serial = url.take_optional("serial")
    backend_name = url.take_optional("backend")
    options = ClientOptions.from_url(url)
    url.finish()
    backend = None
    if backend_name is not None:
        with _BACKENDS_LOCK:
            backend = _BACKENDS.get(backend_name)
        if backend is None:
            raise DeviceUrlError(f"{url.raw}: no USB backend registered as {backend_name!r}")
    name = f"usb:{vid:04x}:{pid:04x}" + (f"/{serial}" if serial else "")
    return connector(vid, pid, serial, backend, name), options, name


def open_qkdm(url: DeviceUrl, clock: Clock | None = None) -> FramedQkdm:
    """Open a QKD module on USB (lazily: an absent device reports ``down``)."""
    connect, options, name = _parse(url)
    return FramedQkdm(name, connect, options)


def open_entropy_source(url: DeviceUrl, clock: Clock | None = None) -> FramedEntropySource:
    """Open a QRNG board on USB; raise DeviceDisconnected if it is absent."""
    connect, options, name = _parse(url)
    return FramedEntropySource(name, connect, options)
