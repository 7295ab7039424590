"""Key requests across a network with a link failure halfway (``qkdn demo --fault``, the
switching bench).

:func:`measure_with_fault` runs ``requests`` enc_keys from the master SAE, each followed by
the slave's dec_keys of the same keys, as :func:`appliance.tkey.measure` does; before
request ``requests // 2`` it takes down the link next to node ``pivot`` on the installed
path (:func:`appliance.control.linkfault.inject`, from a thread of its own, so that the
requests go on while the fault is written, as they would while a fibre is cut). The
report adds:

* ``keys_lost`` (the master got them, the slave could not), ``keys_duplicated`` (a key ID
  handed out twice), ``keys_mismatched`` (the slave got other bits);
* ``failed``: each failed request with its index, HTTP status and error message;
* ``timeline``: each request's start (seconds after ``began_at``), T_key (ms, to the
  slave's answer; lost keys count as failed) and whether it succeeded (for the plot);
* ``switch_ms``: from the fault's injection to the first relay that succeeded on the new
  path: the CN key at the path's end, which logs the first of a pair's keys to arrive
  over another path than the last (``relays arrive over a new path``,
  :class:`appliance.kms.engines.ckms.Arrivals`; once per change, not per relay); None if
  none did;
* ``switch_request_ms``, the conservative figure: to the end of the first request
  (enc_keys, then the slave's dec_keys) that *started* after the controller put the new
  path in use (the controller's log gives when: ``route switched to its backup`` at the
  head end, or ``route installed`` at every hop where there was no backup), i.e. the
  wait for the request in flight at the switch, then a whole T_key on the new path;
  ``first_on_new_ms`` that request's T_key, ``t_key_before_ms`` the median T_key of the
  requests that ended before the fault.

Afterwards the link is brought up again. Nothing here logs or keeps key material beyond
the comparison of the two ends' answers.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.control.linkfault import inject
from appliance.sae_http import HttpResponseError
from appliance.tkey import SaeEndpoint, call

MAX_LOG = 16 << 20
ARRIVED = "relays arrive over a new path"
INSTALLED = ("route installed", "route switched to its backup")
"""The controller's log lines of a new path in use (installed, or a pre-installed backup
switched to at the head end)."""


def measure_with_fault(
    master: SaeEndpoint,
    slave: SaeEndpoint,
    requests: int,
    net_dir: Path,
    cut: tuple[int, int] | Callable[[], tuple[int, int]],
) -> dict[str, Any]:
    """The run (module docstring); ``cut`` may be a function, called at the fault's time
    (the controller may have moved the route for key availability since it was learnt)."""
    a, b = master.connect(), slave.connect()
    issued_ids: set[str] = set()
    failed: list[dict[str, Any]] = []
    done: list[tuple[float, float]] = []  # (start, end) of each successful request
    timeline: list[tuple[float, float, bool]] = []  # every request: start, T_key ms, success
    lost = duplicated = mismatched = matched = 0
    fault_at = 0.0
    injector: _Injector | None = None
    began = time.time()
    try:
        for i in range(requests):
            if i == requests // 2:
                cut = cut() if callable(cut) else cut
                injector = _Injector(net_dir, cut)  # the fault does not pause the requests
            t0 = time.time()
            try:
                status, issued = call(a, f"/api/v1/keys/{slave.sae}/enc_keys")
            except (OSError, HttpResponseError, ValueError):
                a.close()
                failed.append({"request": i, "status": 0, "message": "connection failed"})
                timeline.append((t0 - began, (time.time() - t0) * 1000, False))
                continue
            if status != 200:
                failed.append({"request": i, "status": status, "message": _message(issued)})
                timeline.append((t0 - began, (time.time() - t0) * 1000, False))
                continue
            keys = issued["keys"]
            duplicated += sum(1 for k in keys if k["key_ID"] in issued_ids)
            issued_ids.update(k["key_ID"] for k in keys)
            ids = [{"key_ID": k["key_ID"]} for k in keys]
            try:
                status, got = call(b, f"/api/v1/keys/{master.sae}/dec_keys", {"key_IDs": ids})
            except (OSError, HttpResponseError, ValueError):
                b.close()
                status, got = 0, {}
            if status != 200:
                lost += len(keys)
                timeline.append((t0 - began, (time.time() - t0) * 1000, False))
                continue
            same = got.get("keys") == keys
            matched += len(keys) if same else 0
            mismatched += 0 if same else len(keys)
            done.append((t0, time.time()))
            timeline.append((t0 - began, (done[-1][1] - t0) * 1000, same))
    finally:
        a.close()
        b.close()
        if injector is not None:
            fault_at = injector.join()
        if not callable(cut):
            inject(net_dir, *cut, "up")
    logs = net_dir / "logs"
    installed = _logged_after(logs / "controller.log", fault_at, INSTALLED)
    arrivals = [_logged_after(log, fault_at, (ARRIVED,)) for log in logs.glob("*.log")]
    arrived = min((t for t in arrivals if t is not None), default=None)
    first = next(((s, e) for s, e in done if installed and s >= installed), None)
    switch = first[1] if first else None
    before = [(e - s) * 1000 for s, e in done if e <= fault_at]
    return {
        "requests": requests,
        "cut": "-".join(map(str, cut)) if not callable(cut) else None,
        "keys_matched": matched,
        "keys_lost": lost,
        "keys_duplicated": duplicated,
        "keys_mismatched": mismatched,
        "failed": failed,
        "failed_requests": len(failed),
        "switch_ms": round((arrived - fault_at) * 1000, 1) if arrived else None,
        "switch_request_ms": round((switch - fault_at) * 1000, 1) if switch else None,
        "first_on_new_ms": round((first[1] - first[0]) * 1000, 1) if first else None,
        "t_key_before_ms": round(statistics.median(before), 1) if before else None,
        "fault_at": fault_at,
        "new_path_installed_at": installed,
        "began_at": began,
        "timeline": timeline,
    }


class _Injector:
    """The link's fault, written by a thread of its own while the requests go on (as a
    fibre is cut whatever an SAE is doing): the run's requests never wait for the
    injector's file writes."""

    def __init__(self, net_dir: Path, cut: tuple[int, int]) -> None:
        self.at = 0.0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(net_dir, cut), daemon=True)
        self._thread.start()

    def _run(self, net_dir: Path, cut: tuple[int, int]) -> None:
        try:
            self.at = inject(net_dir, *cut, "down")
        except BaseException as exc:  # handed to the caller by join()
            self.error = exc

    def join(self) -> float:
        """When the fault took effect (wall clock); the injector's error if it failed."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.at


def _message(answer: Any) -> str:
    return str(answer.get("message", ""))[:200] if isinstance(answer, dict) else ""


def _logged_after(log: Path, since: float, messages: tuple[str, ...]) -> float | None:
    """When one of ``messages`` was first logged after ``since`` (a JSON log)."""
    try:
        with open(log, "rb") as fh:
            lines = fh.read(MAX_LOG).splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("msg") in messages and float(entry.get("ts", 0)) >= since:
            return float(entry["ts"])
    return None


def cut_of(path: list[int], pivot: int = 8, around: tuple[int, ...] = (9, 16)) -> tuple[int, int]:
    """The link of ``path`` between ``pivot`` and the one of ``around`` it goes through
    (DemoQuanDT: 8-9 or 8-16, the two ways from node 8 to node 10)."""
    i = path.index(pivot)
    nbs = [path[j] for j in (i - 1, i + 1) if 0 <= j < len(path) and path[j] in around]
    if not nbs:
        raise ValueError(f"the path does not go from {pivot} through any of {around}")
    return pivot, nbs[0]


def current_cut(net_dir: Path, ends: tuple[int, int] = (2, 14)) -> tuple[int, int]:
    """:func:`cut_of` the route the controller has installed between ``ends`` now."""
    import asyncio

    from appliance.cli.controller import ask_routes

    routes = asyncio.run(ask_routes(net_dir))["routes"]
    path = next(r["path"] for r in routes if {r["src"], r["dst"]} == set(ends))
    return cut_of(list(path))


def installed_path(net_dir: Path, master: SaeEndpoint, slave: SaeEndpoint) -> list[int]:
    """The path the controller installs between the two SAEs' access nodes: one key
    request makes it, then the controller names it (ControlError if it never does)."""
    import asyncio

    from appliance.cli.controller import ask_routes
    from appliance.control.errors import ControlError

    a, b = master.connect(), slave.connect()
    try:
        for _ in range(50):
            status, issued = call(a, f"/api/v1/keys/{slave.sae}/enc_keys")
            if status == 200:
                ids = [{"key_ID": k["key_ID"]} for k in issued["keys"]]
                call(b, f"/api/v1/keys/{master.sae}/dec_keys", {"key_IDs": ids})
                routes = asyncio.run(ask_routes(net_dir))["routes"]
                if routes:
                    return list(routes[0]["path"])
            time.sleep(0.2)
    finally:
        a.close()
        b.close()
    raise ControlError("the controller installed no path", code="CTL-NO-PATH")
