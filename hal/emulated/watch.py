"""Change notification for emulated QKD modules: a fault is seen when it happens.

A real QKD module raises a loss-of-signal alarm the moment its fibre is cut; an emulated
one learns of a cut from its faults file (:mod:`hal.emulated.faults`). A
:class:`FaultFollower` per subscribed module is served by one thread and one inotify
instance per process, which sleep until either

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

import contextlib
import ctypes
import functools
import os
import select
import struct
import threading
import time
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


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library's symbols, found once (the process's own: no search, no subprocess)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1  # noqa: B018 - present on Linux only
    except (OSError, AttributeError):
        return None
    return libc


def _events(fd: int) -> set[tuple[int, bytes]]:
    """The (watch, file name) of the events waiting on an inotify descriptor (drained)."""
    found: set[tuple[int, bytes]] = set()
    while True:
        try:
            data = os.read(fd, 64 * 1024)
        except BlockingIOError:
            return found
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, _, _, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            found.add((wd, data[start : start + length].rstrip(b"\0")))
            offset = start + length


class _Watcher:
    """The process's one inotify instance and one thread, shared by every follower (the
    kernel allows a user 128 instances: one per module would run out)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        libc = _libc()
        fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) if libc is not None else -1
        self.fd = fd if fd >= 0 else None
        self._dirs: dict[Path, int] = {}
        self._followers: set[FaultFollower] = set()
        self._poke_r, self._poke_w = os.pipe()
        self._thread: threading.Thread | None = None

    def watch(self, directory: Path) -> int | None:
        """The watch of ``directory`` (added once), or None if it cannot be watched."""
        libc = _libc()
        if self.fd is None or libc is None or not directory.is_dir():
            return None
        with self._lock:
            wd = self._dirs.get(directory)
            if wd is None:
                mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
                wd = int(libc.inotify_add_watch(self.fd, os.fsencode(directory), mask))
                if wd < 0:
                    return None
                self._dirs[directory] = wd
            return wd

    def add(self, follower: FaultFollower) -> None:
        with self._lock:
            self._followers.add(follower)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="faults")
                self._thread.start()
        os.write(self._poke_w, b"x")

    def remove(self, follower: FaultFollower) -> None:
        with self._lock:
            self._followers.discard(follower)

    def _run(self) -> None:
        waits = [self._poke_r] + ([self.fd] if self.fd is not None else [])
        while True:
            with self._lock:
                followers = list(self._followers)
            now = time.monotonic()
            dues = [f.due for f in followers if f.due is not None]
            limit = HORIZON_S if self.fd is not None else FALLBACK_S
            timeout = min([limit, *(d - now for d in dues)])
            ready, _, _ = select.select(waits, [], [], max(timeout, 0.0))
            if self._poke_r in ready:
                os.read(self._poke_r, 4096)
            hits = _events(self.fd) if self.fd is not None and self.fd in ready else set()
            now = time.monotonic()
            for f in followers:
                due = f.due is not None and f.due <= now
                if due or (f.wd, f.name) in hits or (self.fd is None and not ready):
                    f.fire()


_WATCHER: _Watcher | None = None
_WATCHER_LOCK = threading.Lock()


def _watcher() -> _Watcher:
    global _WATCHER  # one per process, made on first use
    with _WATCHER_LOCK:
        if _WATCHER is None:
            _WATCHER = _Watcher()
        return _WATCHER


class FaultFollower:
    """Calls ``wake()`` when the faults file changes or a fault boundary comes
    (``delay()``: wall seconds to the next boundary, None if none is known), from the
    process's watcher thread."""

    def __init__(
        self, path: Path, wake: Callable[[], None], delay: Callable[[], float | None]
    ) -> None:
        self._wake, self._delay = wake, delay
        self.name = os.fsencode(path.name)
        self._watcher = _watcher()
        self.wd = self._watcher.watch(path.parent)
        self.due: float | None = time.monotonic()  # a first reading at once, from the thread
        self._watcher.add(self)

    @property
    def inotify(self) -> bool:
        return self.wd is not None

    def _schedule(self) -> None:
        delay = self._delay()
        self.due = None if delay is None else time.monotonic() + min(delay, HORIZON_S)

    def fire(self) -> None:
        """Read the state again (the watcher's thread), then look at the next boundary."""
        with contextlib.suppress(HalError):  # a malformed file: read again on its next change
            self._wake()
        self._schedule()

    def close(self) -> None:
        self._watcher.remove(self)
