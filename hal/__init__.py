"""Device access for the appliance: every device is opened by URL.

``hal.open_qkdm("emulated://link-8-9?skr=1200&seed=demo")`` returns a :class:`Qkdm`
whatever the transport; the URL scheme picks the driver module, whose header documents
its URL format. Nothing above ``hal`` knows which driver it talks to.
"""

from __future__ import annotations

import importlib
from typing import Any

from hal.clock import Clock, ManualClock, ScaledClock, SystemClock
from hal.entropy import EntropySource, SourceStatus
from hal.errors import (
    DeviceError,
    DeviceUrlError,
    HalError,
    KeyNotFound,
    KeyNotYetAvailable,
    LinkDownError,
    NoKeyAvailable,
)
from hal.qkdm import LinkState, QkdKey, Qkdm, QkdmStatus
from hal.url import DeviceUrl

QKDM_DRIVERS: dict[str, str] = {
    "emulated": "hal.emulated.driver",
    "serial": "hal.serial_driver",
    "usb": "hal.usb_driver",
    "etsi014+https": "hal.etsi014_driver",
    "spy": "hal.spy",
}
"""URL scheme -> module with an ``open_qkdm(url, clock)`` function."""

ENTROPY_DRIVERS: dict[str, str] = {
    "emulated-qrng": "hal.emulated.qrng",
    "serial": "hal.serial_driver",
    "usb": "hal.usb_driver",
    "spy": "hal.spy",
}
"""URL scheme -> module with an ``open_entropy_source(url, clock)`` function."""


def _driver(kind: str, drivers: dict[str, str], url: str) -> tuple[Any, DeviceUrl]:
    """The driver module for ``url``'s scheme, and the parsed URL."""
    parsed = DeviceUrl.parse(url)
    module_name = drivers.get(parsed.scheme)
    if module_name is None:
        known = ", ".join(sorted(drivers))
        raise DeviceUrlError(f"no {kind} driver for scheme {parsed.scheme!r} (known: {known})")
    return importlib.import_module(module_name), parsed


def open_qkdm(url: str, *, clock: Clock | None = None) -> Qkdm:
    """Open a QKD module by URL; raise DeviceUrlError for an unknown scheme or bad URL."""
    module, parsed = _driver("QKDM", QKDM_DRIVERS, url)
    qkdm: Qkdm = module.open_qkdm(parsed, clock)
    return qkdm


def open_entropy_source(url: str, *, clock: Clock | None = None) -> EntropySource:
    """Open a raw noise source (QRNG) by URL; raise DeviceUrlError for a bad URL."""
    module, parsed = _driver("entropy source", ENTROPY_DRIVERS, url)
    source: EntropySource = module.open_entropy_source(parsed, clock)
    return source


__all__ = [
    "Clock",
    "DeviceError",
    "DeviceUrl",
    "DeviceUrlError",
    "EntropySource",
    "HalError",
    "KeyNotFound",
    "KeyNotYetAvailable",
    "LinkDownError",
    "LinkState",
    "ManualClock",
    "NoKeyAvailable",
    "QkdKey",
    "Qkdm",
    "QkdmStatus",
    "ScaledClock",
    "SourceStatus",
    "SystemClock",
    "open_entropy_source",
    "open_qkdm",
]
