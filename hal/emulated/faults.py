"""Fault schedules for emulated QKD links, shared by both ends through a file.

A fibre cut or a QBER excursion hits *both* ends of a link, so faults are not injected
into one driver object: they are written to a small JSON file named by the ``faults=``
URL parameter, which both ends (in one process or in two) re-read when it changes::

    {"faults": [{"kind": "down", "start": 1200.0, "end": 1500.0},
                {"kind": "qber", "start": 2000.0, "end": null, "qber": 0.15}]}

Times are in the clock's seconds (emulated time for a manual clock, Unix time for the
system clock); ``end: null`` means until further notice. A fault must start at a time
neither end has reached yet: keys already distilled cannot be taken back.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hal.errors import DeviceError

KINDS = ("down", "qber")


@dataclass(frozen=True, kw_only=True, slots=True)
class Fault:
    """One fault window on a link."""

    kind: str
    """``down`` (no signal, no key) or ``qber`` (QBER forced to ``qber``)."""
    start: float
    """First affected time, in clock seconds."""
    end: float | None = None
    """First unaffected time, or None for an open-ended fault."""
    qber: float | None = None
    """The forced QBER, for ``kind == "qber"``."""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "start": self.start, "end": self.end, "qber": self.qber}


def _parse_fault(path: Path, i: int, item: Any) -> Fault:
    where = f"faults file {path}: faults[{i}]"
    if not isinstance(item, dict) or set(item) - {"kind", "start", "end", "qber"}:
        raise DeviceError(f"{where}: expected an object with kind, start, end, qber")
    kind, end, qber = item.get("kind"), item.get("end"), item.get("qber")
    start: Any = item.get("start")
    if kind not in KINDS:
        raise DeviceError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if (
        not _is_time(start)
        or not (end is None or _is_time(end))
        or (end is not None and end < start)
    ):
        raise DeviceError(f"{where}: expected numbers with start <= end (or end null)")
    if kind == "qber" and not (isinstance(qber, int | float) and 0 <= qber <= 0.5):
        raise DeviceError(f"{where}.qber: expected a number in [0, 0.5], got {qber!r}")
    return Fault(
        kind=str(kind),
        start=float(start),
        end=None if end is None else float(end),
        qber=None if qber is None else float(qber),
    )


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_faults(path: Path) -> list[Fault]:
    """Parse a faults file; a missing file means no faults, a malformed one is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DeviceError(f"faults file {path}: cannot read: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeviceError(
            f"faults file {path}: invalid JSON at line {exc.lineno}: {exc.msg}"
        ) from None
    if not isinstance(doc, dict) or set(doc) != {"faults"} or not isinstance(doc["faults"], list):
        raise DeviceError(f'faults file {path}: expected {{"faults": [...]}}')
    return [_parse_fault(path, i, item) for i, item in enumerate(doc["faults"])]


def write_faults(path: Path, faults: list[Fault]) -> None:
    """Replace the schedule atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"faults": [f.to_json() for f in faults]}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".faults-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(body)
    os.replace(tmp, path)


def add_fault(path: Path, fault: Fault) -> None:
    """Append one fault to the schedule in ``path``."""
    write_faults(path, [*read_faults(path), fault])


class FaultWatcher:
    """Re-reads a faults file when it changes; reports a version that bumps on each change."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self.faults: list[Fault] = []
        self.version = 0

    def poll(self) -> bool:
        """Reload if the file changed; return True if the schedule may be different."""
        if self._path is None:
            return False
        try:
            st = self._path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, -1)
        if stamp == self._stamp:
            return False
        self.faults = read_faults(self._path)
        self._stamp = stamp
        self.version += 1
        return True
