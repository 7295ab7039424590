"""Device access for the appliance: every device is opened by URL.

``hal.open_qkdm("emulated://link-8-9?skr=1200&seed=demo")`` returns a :class:`Qkdm`
whatever the transport; the URL scheme picks the driver module, whose header documents
its URL format. Nothing above ``hal`` knows which driver it talks to.
"""

from __future__ import annotations

import importlib
from typing import Any

from hal.clock import Clock, ManualClock, ScaledClock, SystemClock
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
}
"""URL scheme -> module with an ``open_qkdm(url, clock)`` function."""


def open_qkdm(url: str, *, clock: Clock | None = None) -> Qkdm:
    """Open a QKD module by URL; raise DeviceUrlError for an unknown scheme or bad URL."""
    parsed = DeviceUrl.parse(url)
    module_name = QKDM_DRIVERS.get(parsed.scheme)
    if module_name is None:
        known = ", ".join(sorted(QKDM_DRIVERS))
        raise DeviceUrlError(f"no QKDM driver for scheme {parsed.scheme!r} (known: {known})")
    module: Any = importlib.import_module(module_name)
    qkdm: Qkdm = module.open_qkdm(parsed, clock)
    return qkdm


__all__ = [
    "Clock",
    "DeviceError",
    "DeviceUrl",
    "DeviceUrlError",
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
    "SystemClock",
    "open_qkdm",
]
