"""Change notification for emulated QKD modules: a fault is seen when it happens.

A real QKD module raises a loss-of-signal alarm the moment its fibre is cut; an emulated
one learns of a cut from its faults file (:mod:`hal.emulated.faults`). :class:`FaultFollower`
runs one thread per subscribed module that sleeps until either

* the faults file changes (Linux inotify on the file's directory, so the thread wakes at
  once when ``qkdn net fault`` or a test rewrites the file; no polling), or
* the emulated clock reaches the next time a fault starts or ends
  (:meth:`hal.emulated.model.LinkModel.boundaries`, turned into wall seconds by the
  clock's rate),

and then calls its ``wake`` function (the driver's :meth:`hal.Qkdm.poll_state`, which
notifies the module's subscribers if the state changed). Without inotify (not Linux, or
the directory missing) it still wakes at fault boundaries it knows of, and every
:data:`FALLBACK_S` seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from hal.errors import HalError

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
FALLBACK_S = 1.0
"""The longest sleep without inotify and without a known fault boundary."""
HORIZON_S = 3600.0
"""Boundaries further away (wall seconds) are looked at again after this long."""


def _inotify(directory: Path) -> int | None:
    """An inotify descriptor watching ``directory`` for files written or replaced, or
    None where inotify is unavailable."""
    name = ctypes.util.find_library("c")
    if name is None or not directory.is_dir():
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
    if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        os.close(fd)
        return None
    return fd


def _names(fd: int) -> set[bytes]:
    """The file names of the events waiting on an inotify descriptor (drained)."""
    names: set[bytes] = set()
    while True:
        try:
            data = os.read(fd, 64 * 1024)
        except BlockingIOError:
            return names
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, _, _, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            names.add(data[start : start + length].rstrip(b"\0"))
            offset = start + length


class FaultFollower:
    """A thread that calls ``wake()`` when the faults file changes or a fault boundary
    comes (``delay()``: wall seconds to the next boundary, None if none is known)."""

    def __init__(
        self, path: Path, wake: Callable[[], None], delay: Callable[[], float | None]
    ) -> None:
        self._path, self._wake, self._delay = path, wake, delay
        self._fd = _inotify(path.parent)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"faults-{path.name}")
        self._thread.start()

    @property
    def inotify(self) -> bool:
        return self._fd is not None

    def _run(self) -> None:
        mine = os.fsencode(self._path.name)
        waits = [self._stop_r] + ([self._fd] if self._fd is not None else [])
        while True:
            delay = self._delay()
            if delay is None:
                delay = HORIZON_S if self._fd is not None else FALLBACK_S
            ready, _, _ = select.select(waits, [], [], min(max(delay, 0.0), HORIZON_S))
            if self._stop_r in ready:
                return
            if self._fd is not None and self._fd in ready and mine not in _names(self._fd):
                continue  # another file of the directory
            try:
                self._wake()
            except HalError:  # a malformed file: the next change is read again
                continue

    def close(self) -> None:
        """Stop the thread (and wait for it: a wake in progress ends first)."""
        if self._stop_w < 0:
            return
        os.write(self._stop_w, b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)
        for fd in (self._stop_r, self._stop_w, self._fd):
            if fd is not None:
                os.close(fd)
        self._stop_w = -1
