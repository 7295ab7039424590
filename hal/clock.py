"""Injectable clocks, so key rates, lifetimes and demos are testable without sleeping.

Emulated devices read time only through a :class:`Clock`. Two processes that must agree
on emulated time (the two ends of an emulated link) use wall-clock based clocks with the
same origin; tests use :class:`ManualClock` and advance it by hand.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """A source of time in seconds; only differences and shared origins matter."""

    def now(self) -> float:
        """Current time in seconds."""
        ...


class SystemClock:
    """Wall-clock time (``time.time()``), shared by independent processes on one machine."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to: for tests and accelerated runs."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward; time never runs backwards."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._now += seconds

    def set(self, when: float) -> None:
        """Jump to an absolute time, which must not be in the past."""
        with self._lock:
            if when < self._now:
                raise ValueError("a clock cannot go backwards")
            self._now = float(when)


class ScaledClock:
    """Emulated time that runs ``speedup`` times faster than the wall clock from ``origin``."""

    def __init__(self, speedup: float, origin: float = 0.0, base: Clock | None = None) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        self._base = base or SystemClock()
        self._start = self._base.now()
        self._speedup = speedup
        self._origin = origin

    def now(self) -> float:
        return self._origin + (self._base.now() - self._start) * self._speedup


class SharedScaledClock:
    """Emulated time ``origin + (time.time() - origin) * speedup``: like
    :class:`ScaledClock`, but every process computes the same time from the same two
    numbers (the origin is a wall-clock instant, e.g. when an emulated link started)."""

    def __init__(self, origin: float, speedup: float) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        self._origin, self._speedup = origin, speedup

    def now(self) -> float:
        return self._origin + (time.time() - self._origin) * self._speedup
