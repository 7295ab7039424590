"""CPython host for the device firmware: the emulated modules behind a pty or loop://.

The firmware (:mod:`hal.firmware`) runs unchanged; what a board would provide is
supplied here: its key store is an emulated QKDM end (:class:`QkdmAdapter`), its ADC an
emulated QRNG (:class:`QrngAdapter`), and its UART the master side of a pseudo-terminal
(:class:`PtyDevice`) or pyserial's ``loop://`` (:class:`LoopDevicePort`). The pty device
can be unplugged, reset, muted, fed garbage and plugged back, for the fault tests.

This module is test and bench equipment: never used by a node in production.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import select
import threading
import tty
import uuid
from collections.abc import Callable
from pathlib import Path

import serial

from hal.entropy import EntropySource
from hal.errors import (
    HalError,
    KeyNotFound,
    KeyNotYetAvailable,
    LinkDownError,
    NoKeyAvailable,
)
from hal.firmware import protocol as wire
from hal.firmware.device import Device, DeviceFault, QkdmBackend, QrngBackend
from hal.firmware.loop import Port, Running, serve
from hal.qkdm import LinkState, QkdKey, Qkdm

_CODES: list[tuple[type[HalError], int]] = [
    (NoKeyAvailable, wire.E_NO_KEY),
    (LinkDownError, wire.E_LINK_DOWN),
    (KeyNotFound, wire.E_KEY_NOT_FOUND),
    (KeyNotYetAvailable, wire.E_KEY_PENDING),
]
_STATE_CODES = {LinkState.UP: wire.STATE_UP, LinkState.DOWN: wire.STATE_DOWN}
_STATE_CODES[LinkState.ABORT] = wire.STATE_ABORT


def _fault(exc: HalError) -> DeviceFault:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return DeviceFault(code, exc.message)
    return DeviceFault(wire.E_DEVICE_FAULT, exc.message)


class QkdmAdapter(QkdmBackend):
    """An emulated QKDM end as the firmware's key store."""

    def __init__(self, qkdm: Qkdm) -> None:
        self.qkdm = qkdm

    def status(self) -> tuple[int, float, float, int, int, int, int, str]:
        s = self.qkdm.status()
        qber = math.nan if s.qber is None else s.qber
        return (
            _STATE_CODES[s.state],
            s.skr_bps,
            qber,
            s.key_count,
            s.max_key_count,
            s.key_size,
            s.keys_produced,
            s.link,
        )

    def take_key(self) -> tuple[bytes, bytearray]:
        try:
            return _raw(self.qkdm.get_key())
        except HalError as exc:
            raise _fault(exc) from None

    def take_key_by_id(self, key_id: bytes) -> tuple[bytes, bytearray]:
        try:
            return _raw(self.qkdm.get_key_by_id(str(uuid.UUID(bytes=key_id))))
        except HalError as exc:
            raise _fault(exc) from None

    def key_count(self) -> int:
        return self.qkdm.key_count()


def _raw(key: QkdKey) -> tuple[bytes, bytearray]:
    return uuid.UUID(key.key_id).bytes, key.material


class QrngAdapter(QrngBackend):
    """An emulated QRNG as the firmware's ADC."""

    def __init__(self, source: EntropySource) -> None:
        self.source = source
        self.bits = source.bits_per_sample

    def read(self, n: int) -> bytes:
        samples = self.source.read(n)
        return samples.astype("<u2" if self.bits > 8 else "u1", copy=False).tobytes()

    def status(self) -> tuple[float, float, float, float, float, int, str]:
        s = self.source.status()
        return (
            s.sample_rate,
            s.model_min_entropy,
            s.expected_mean,
            s.expected_std,
            s.expected_rho,
            s.samples_read,
            s.fault or "",
        )


def make_device(name: str, qkdm: Qkdm | None = None, qrng: EntropySource | None = None) -> Device:
    """Firmware serving an emulated QKDM end and/or an emulated QRNG."""
    return Device(
        name,
        qkdm=QkdmAdapter(qkdm) if qkdm is not None else None,
        qrng=QrngAdapter(qrng) if qrng is not None else None,
    )


class _FdPort(Port):
    """The master side of a pty as the firmware loop's port; can be muted or fed garbage."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.muted = False
        self.lose_replies = 0  # answers computed, then lost on the wire

    def read(self) -> bytes | None:
        ready, _, _ = select.select([self.fd], [], [], 0.01)
        if not ready:
            return None
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            return None  # no slave open right now (between driver reconnections)
        return None if self.muted else data

    def write(self, data: bytes) -> int | None:
        if self.muted:
            return len(data)
        if self.lose_replies and not data.startswith(wire.SYNC + b"\x01\x7e"):
            self.lose_replies -= 1
            return len(data)
        view = memoryview(data)
        while view:
            try:
                sent = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 0.05)
                continue
            except OSError:
                return None  # the driver closed its end; the answer is lost, as on a wire
            view = view[sent:]
        return len(data)


class PtyDevice:
    """Firmware behind a pseudo-terminal pair, in a thread; ``path`` is what the driver opens.

    With ``link`` the driver opens a stable symlink, re-pointed by :meth:`replug`, as
    ``/dev/serial/by-id/...`` survives re-plugging a USB-serial adapter.
    """

    def __init__(self, device: Device, link: Path | None = None) -> None:
        self.device, self.link = device, link
        self._thread: threading.Thread | None = None
        self._running = Running()
        self._plug()

    @property
    def path(self) -> str:
        """The port name the driver should open."""
        return str(self.link) if self.link is not None else self.tty

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        tty.setraw(master)
        self.master, self.slave, self.tty = master, slave, os.ttyname(slave)
        if self.link is not None:
            tmp = self.link.with_name(self.link.name + ".new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.tty)
            os.replace(tmp, self.link)
        self.port = _FdPort(master)
        self._running = Running()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"pty:{self.tty}")
        self._thread.start()

    def _serve(self) -> None:
        serve(self.port, self.device, self._running)

    def _stop(self) -> None:
        self._running.on = False
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def unplug(self) -> None:
        """The cable is pulled: the pty disappears under the driver."""
        self._stop()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def replug(self) -> None:
        """The device is back, on a new pty (same symlink)."""
        self._plug()

    def reset(self) -> None:
        """The microcontroller reboots: the firmware loses its parser and reply cache."""
        self._stop()
        d = self.device
        self.device = Device(d.name, qkdm=d.qkdm, qrng=d.qrng, max_payload=d.max_payload)
        self._running = Running()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def mute(self, muted: bool = True) -> None:
        """The firmware hangs: it stops answering (and reading) until unmuted."""
        self.port.muted = muted

    def inject(self, data: bytes) -> None:
        """Put raw bytes on the line towards the driver (garbage, torn frames)."""
        os.write(self.master, data)

    def close(self) -> None:
        """Stop the firmware and release the pty."""
        self.unplug()

    def __enter__(self) -> PtyDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve_in_child(fd: int, make: Callable[[], Device]) -> None:
    serve(_FdPort(fd), make(), Running())


class PtyDeviceProcess:
    """Firmware behind a pseudo-terminal pair, in a forked child process.

    For benches: the device's work (noise generation, frame encoding, pty writes) runs in
    its own interpreter, as it runs on its own microcontroller, instead of competing with
    the driver for one GIL. ``make`` builds the :class:`Device` in the child. No fault
    injection here (use :class:`PtyDevice`); :meth:`close` stops the child.
    """

    def __init__(self, make: Callable[[], Device]) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        tty.setraw(self.master)
        self.path = os.ttyname(self.slave)
        context = multiprocessing.get_context("fork")
        self._process = context.Process(
            target=_serve_in_child, args=(self.master, make), daemon=True
        )
        self._process.start()

    def close(self) -> None:
        """Stop the child and release the pty."""
        self._process.terminate()
        self._process.join(5)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PtyDeviceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoopDevicePort:
    """pyserial's ``loop://`` with the firmware in the loop.

    Every byte written goes through a real ``loop://`` port and back out of it into the
    firmware; the firmware's answer goes through the same port to the reader. Test code
    can put garbage into the loop with :meth:`inject`. Quacks like the pyserial port
    :class:`~hal.serial_driver.SerialTransport` needs.
    """

    def __init__(self, device: Device) -> None:
        self.device = device
        self.loop = serial.serial_for_url("loop://", timeout=0.02)
        self._garbage = b""

    @property
    def in_waiting(self) -> int:
        return int(self.loop.in_waiting)

    def write(self, data: bytes) -> int:
        self.loop.write(data)
        request = self.loop.read(len(data))
        answer = self._garbage + self.device.receive(bytes(request))
        self._garbage = b""
        if answer:
            self.loop.write(answer)
        return len(data)

    def inject(self, data: bytes) -> None:
        """Bytes that reach the driver just before the next answer."""
        self._garbage += data

    def read(self, n: int) -> bytes:
        return bytes(self.loop.read(n))

    def close(self) -> None:
        self.loop.close()
