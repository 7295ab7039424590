"""The manager's side of ``qkdn demo --fault``: the alarm of the cut link, raised and
cleared, read from the running manager's database.

:func:`link_name` maps the cut's node IDs to the topology's link name (the alarm's
resource, docs/mgmt.md); :func:`watch_alarm` waits, bounded, until the manager has the
``link`` alarm of that link raised at or after the fault and cleared, and returns its
times and reporters. It reads the database as ``qkdn manager alarms`` does (WAL: the
manager writes on).
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.mgmt.errors import MgmtError
from appliance.mgmt.store import Alarm, Store

SLACK_S = 1.0
"""An alarm raised this long before the fault's recorded time still counts as its alarm
(the fault file is written before the time is returned; clocks are the same host's)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultAlarm:
    """The manager's alarm of one cut link."""

    id: int
    link: str
    raised_at: float | None
    cleared_at: float | None
    raised_after_ms: float | None
    """From the fault's injection to the alarm's row in the manager."""
    cleared_after_ms: float | None
    """From ``restored_at`` (the caller's time of the link's restoration) to the clear."""
    reports: int
    sources: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def link_name(net_dir: Path, a: int, b: int) -> str:
    """The topology's name of the link between nodes ``a`` and ``b`` (MgmtError if the
    network runs no manager or has no such link)."""
    path = net_dir / "mgmt" / "manager.toml"
    try:
        links = tomllib.loads(path.read_text(encoding="utf-8")).get("links", [])
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MgmtError(f"{path}: no manager configuration ({exc})", code="MGMT-NONE") from exc
    for x in links:
        if {x.get("a"), x.get("b")} == {a, b}:
            return str(x["name"])
    raise MgmtError(f"no link {a}-{b} in the manager's topology", code="MGMT-LINK")


def find_alarm(store: Store, link: str, since: float) -> Alarm | None:
    """The first ``link`` alarm of ``link`` raised at or after ``since`` (less the slack)."""
    rows = [
        a
        for a in store.alarms(include_cleared=True, limit=2000)
        if a.kind == "link" and a.resource == link and a.raised >= since - SLACK_S
    ]
    return min(rows, key=lambda a: a.id) if rows else None


def watch_alarm(
    net_dir: Path, link: str, fault_at: float, restored_at: float, *, timeout: float = 30.0
) -> FaultAlarm:
    """Wait (at most ``timeout`` seconds) until the manager holds the cut's alarm cleared;
    what it holds then (``cleared_at`` None if it never cleared, ``id`` 0 if none)."""
    path = net_dir / "mgmt" / "manager.db"
    if not path.is_file():
        raise MgmtError(f"{path}: the network runs no manager", code="MGMT-DB")
    store = Store(path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            alarm = find_alarm(store, link, fault_at)
            if (alarm is not None and alarm.cleared is not None) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        store.close()
    if alarm is None:
        return FaultAlarm(
            id=0, link=link, raised_at=None, cleared_at=None,
            raised_after_ms=None, cleared_after_ms=None, reports=0, sources=[],
        )  # fmt: skip
    cleared = alarm.cleared
    return FaultAlarm(
        id=alarm.id,
        link=link,
        raised_at=alarm.raised,
        cleared_at=cleared,
        raised_after_ms=round((alarm.raised - fault_at) * 1000, 1),
        cleared_after_ms=round((cleared - restored_at) * 1000, 1) if cleared else None,
        reports=alarm.reports,
        sources=[s for s in alarm.sources.split(",") if s],
    )
