"""The firmware's main loop: move bytes between a port and the :class:`Device`.

On a board the port is a ``machine.UART`` or a USB CDC/bulk endpoint wrapper; under
CPython it is the master side of a pty (:mod:`hal.emulated.firmware_host`). The loop
announces every (re)start with a BOOT frame and drops a torn frame once the line has
been quiet for ``idle_ms``. It must stay MicroPython-compatible.
"""

from .compat import ticks_diff, ticks_ms
from .device import Device


class Port:
    """What the loop needs from a port (``machine.UART`` has this shape)."""

    def read(self) -> bytes | None:
        """Bytes received so far, or None/empty after a short wait."""
        raise NotImplementedError

    def write(self, data: bytes) -> int | None:
        """Send bytes."""
        raise NotImplementedError


class Running:
    """A flag the host flips to stop the loop (a board loops forever)."""

    def __init__(self) -> None:
        self.on = True


def serve(port: Port, device: Device, running: Running, idle_ms: int = 200) -> None:
    """Answer frames until ``running.on`` is False."""
    port.write(device.boot())
    last = ticks_ms()
    while running.on:
        data = port.read()
        if data:
            last = ticks_ms()
            for reply in device.replies(data):  # each one out before the next is built
                port.write(reply)
        elif device.parser.pending() and ticks_diff(ticks_ms(), last) > idle_ms:
            out = device.idle()
            if out:
                port.write(out)
