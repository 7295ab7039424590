"""The QKDN Controller process (``qkdn controller run``): telemetry in, paths out.

* **Telemetry.** One task of the event loop per SDN agent holds a gNMI STREAM
  subscription to ``/qkd_node`` (grpc.aio; ON_CHANGE, heartbeat every
  :data:`HEARTBEAT_MS`; every read bounded). A document that repeats the agent's last,
  byte for byte, is a heartbeat: it only marks the node alive, undecoded. Any other
  document is decoded and fed to the sans-IO core (:mod:`graph`) at once; the core is
  ticked every :data:`TICK_S` while a hold-off runs (the hold-off and the heartbeat
  deadline need time to pass). A lost subscription is opened again after
  :data:`RETRY_S`. The first document
  of each agent carries the routes installed there: a restarted controller knows them
  without anyone telling it (and never removes one it did not replace).
* **Path requests** arrive over HTTP/2 with mutual TLS on the controller's ``api``
  address, from the CKMS of a source access node only (the peer's certificate must name
  a CKMS node of the network, or the controller itself for ``qkdn controller routes``;
  anyone else gets 403). ``POST /v1/path`` with ``{"src": N, "dst": M}`` and optionally
  ``"route_policy"``, a policy class of :data:`graph.POLICIES` (``balanced`` if absent;
  anything else is a 400 ``CTL-REQUEST``): the core's path for that class (cached; a
  backup kept), installed at every hop by a gNMI Set to each hop's
  agent, all hops at once (a route a link failure broke is installed again on its
  backup at once, without waiting for the next request: the hold-off rule of
  :mod:`graph`, protection does not wait); the answer ``{"path": [...],
  "backup": [...]}`` leaves only after every hop confirmed. A path already installed is
  answered at once. No path, or a hop that refused: 503 with the code.
  ``POST /v1/routes``: the installed routes (those this
  controller installed, and those every hop's agent reports), the links with their
  weights, and the protection switches so far.
* **The QKDN Manager** (a peer whose certificate names a manager node of the network;
  only it may use these two): ``POST /v1/faults`` with ``{"links": [[a, b], ...],
  "nodes": [n, ...], "ttl_s": T}`` is the manager's whole view of the links and nodes it
  learnt are down over SNMP; the core holds them down for ``T`` seconds unless the next
  report renews or drops them (:meth:`graph.Core.report`). ``POST /v1/events`` with
  ``{"after": S, "wait_s": W}`` answers ``{"seq": S', "down": [[a, b], ...]}``: the links
  the telemetry finds down, at once if anything changed since ``S``, else when something
  does or after ``W`` seconds (a long poll: the manager's alarms from the controller's
  telemetry, docs/mgmt.md).

Logs carry node IDs, link IDs and codes; there is no key material here to log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config.addresses import split_host_port
from appliance.control import model
from appliance.control.client import AsyncAgentSets, StreamSubscription
from appliance.control.errors import ControlError
from appliance.control.graph import BALANCED, CLASSES, POLICIES, Change, Core, Weights
from appliance.net.h2 import H2Server, Request, Response
from appliance.pki import server_context

log = logging.getLogger("qkdn.controller")
HEARTBEAT_MS = 1000
"""An agent repeats its document this often when nothing changed (the core's dead_after
is three of these). A CKMS that stops is seen sooner: its stream breaks at once."""
TICK_S = 0.02
IDLE_TICK_S = 0.25
BALANCE_S = 1.0
"""Installed routes are looked at again for key availability this often (the agents
refresh stored bits and rates once a second)."""
RETRY_S = 0.5
CONNECT_S = 10.0
"""How long the Set channels to the agents may take to open at the controller's start."""
PROTECT_AFTER_S = 0.25
"""A path put in use gets its backup pre-installed this much later, so that the first
relays on it (a cold path's, or the first after a switch) do not wait for a core behind
the backup's Sets at every hop."""
READ_S = 2.5
"""Longest wait for one gNMI message (heartbeats come every HEARTBEAT_MS)."""
MAX_BODY = 1024
MAX_FAULTS_BODY = 64 * 1024
MAX_WAIT_S = 30.0
JSON = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class Agent:
    node: int
    name: str
    address: str


class Controller:
    def __init__(
        self,
        agents: list[Agent],
        tls: tuple[Path, Path, Path],
        *,
        allowed: set[str],
        weights: Weights | None = None,
        hold_off: float = 0.1,
        managers: frozenset[str] = frozenset(),
        policies: dict[str, Weights] | None = None,
    ) -> None:
        self.agents = {a.node: a for a in agents}
        self.tls, self.allowed, self.managers = tls, allowed, managers
        policies = policies or dict(CLASSES)
        self.core = Core(weights=weights or policies[BALANCED], hold_off=hold_off)
        self.core.policies = policies
        self.confirmed: dict[tuple[int, int], tuple[int, ...]] = {}
        """Each route's path in use, confirmed by every hop."""
        self.standby: dict[tuple[int, int], tuple[int, ...] | None] = {}
        """Each route's backup, pre-installed at every hop in its other slot (None: none)."""
        self.slots: dict[tuple[int, int], int] = {}
        """The slot of each route's path in use (the backup is in the other one)."""
        self._marks: dict[tuple[int, int], tuple[int, ...]] = {}
        """Routes switched at their head end whose other hops still show the old use: the
        path switched from."""
        self.policy_of: dict[tuple[int, int], str] = {}
        """The policy class of the request that installed each route (one route per pair:
        the last request's class sets it)."""
        self._locks: dict[tuple[int, int], asyncio.Lock] = {}
        self._clients: dict[int, AsyncAgentSets] = {}
        self._followers: list[asyncio.Task[None]] = []
        self._connecting: list[asyncio.Task[bool]] = []
        self._server: H2Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.seq = 0
        """Counts changes of the telemetry's down links (the manager's long poll)."""
        self._down: list[tuple[int, int]] = []
        self._moved = asyncio.Event()

    async def start(self, api: str) -> None:
        self._followers = [asyncio.create_task(self._follow(a)) for a in self.agents.values()]
        self._connecting = [  # the Set channels open now, not at the first path's Sets
            asyncio.create_task(self._client(node).connect(CONNECT_S)) for node in self.agents
        ]
        self._ticker = asyncio.create_task(self._tick())
        self._server = H2Server(self._handle, server_context(*self.tls, ("h2",)))
        await self._server.start(*split_host_port(api))
        log.info("controller listening", extra={"address": api, "agents": len(self.agents)})

    async def close(self) -> None:
        for task in [*self._followers, *self._connecting]:
            task.cancel()
        with contextlib.suppress(TimeoutError):  # each closes its channel within 2 s
            await asyncio.wait_for(asyncio.gather(*self._followers, return_exceptions=True), 5)
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            await self._server.close()
        for client in self._clients.values():
            await client.close()

    # -- telemetry ------------------------------------------------------------------------
    def _client(self, node: int) -> AsyncAgentSets:
        """The Set side of the agent of ``node`` (its channel kept; made in the loop)."""
        client = self._clients.get(node)
        if client is None:
            cert, key, ca = self.tls
            address = self.agents[node].address
            client = self._clients[node] = AsyncAgentSets(address, cert=cert, key=key, ca=ca)
        return client

    async def _follow(self, agent: Agent) -> None:
        """The agent's telemetry, for as long as the controller runs (a task of its own)."""
        while True:
            try:
                await self._stream(agent)
            except (ControlError, OSError) as exc:
                code = exc.code if isinstance(exc, ControlError) else "CTL-AGENT"
                log.warning("agent lost", extra={"node": agent.node, "code": code})
                self._lost(agent.node)
            await asyncio.sleep(RETRY_S)

    async def _stream(self, agent: Agent) -> None:
        """One subscription, until it breaks (ControlError) or the task is cancelled."""
        cert, key, ca = self.tls
        sub = StreamSubscription(
            agent.address, "/qkd_node", cert=cert, key=key, ca=ca, heartbeat_ms=HEARTBEAT_MS
        )
        last = b""
        try:
            while True:
                event = await sub.next(READ_S)
                if event.sync or event.deleted:
                    continue
                if event.raw == last:  # a heartbeat: the node is alive, no news
                    self._heard(agent.node)
                else:
                    last = event.raw
                    self._document(event.raw)
        finally:
            await sub.close()

    def _lost(self, node: int) -> None:
        self._report(self.core.lost(time.monotonic(), node))

    def _heard(self, node: int) -> None:
        self.core.heard_from(time.monotonic(), node)

    def _document(self, raw: bytes) -> None:
        try:
            try:
                doc = json.loads(raw)
            except ValueError as exc:
                raise ControlError("node document: not JSON", code="CTL-DOC") from exc
            changes = self.core.telemetry(time.monotonic(), doc)
        except ControlError as exc:
            log.warning("bad agent document", extra={"code": exc.code})
            return
        if self.core.in_use.keys() - self.confirmed.keys():
            self._adopt()
        self._report(changes)

    def _adopt(self) -> None:
        """Take on the routes the agents report installed that this controller did not
        install (it restarted): the path in use at the head end, and the backup in the other
        slot, so that a fault switches them as any route."""
        for key in self.core.in_use.keys() - self.confirmed.keys():
            lock = self._locks.get(key)
            primary = self.core.installed(*key)
            if primary is None or (lock is not None and lock.locked()):
                continue
            slot = self.core.in_use[key]
            self.confirmed[key], self.slots[key] = primary, slot
            self.standby[key] = self.core.installed(*key, 1 - slot)
            self.core.keep(*key, primary, self.standby[key], self.policy_of.get(key, BALANCED))

    async def _tick(self) -> None:
        """Let time pass in the core: every TICK_S while a hold-off runs, else every
        IDLE_TICK_S (a silent node's deadline is seconds away); load balancing every
        BALANCE_S."""
        balance_at = time.monotonic() + BALANCE_S
        while True:
            due = self.core.next_due()
            now = time.monotonic()
            wait = TICK_S if due is not None and due - now < IDLE_TICK_S else IDLE_TICK_S
            await asyncio.sleep(wait)
            now = time.monotonic()
            self._report(self.core.tick(now))
            if now >= balance_at:
                balance_at = now + BALANCE_S
                self._balance()

    def _balance(self) -> None:
        """Move installed routes to the path with more key available (graph: load
        balancing), one install at a time per route."""
        for (src, dst), path in list(self.confirmed.items()):
            lock = self._locks.get((src, dst))
            if lock is not None and lock.locked():
                continue
            moved = self.core.better(src, dst, path, self.policy_of.get((src, dst), BALANCED))
            if moved is not None:
                extra = {"code": "CTL-BALANCE", "src": src, "dst": dst, "hops": len(moved)}
                log.info("route moved for key availability", extra=extra)
                self._reinstall(src, dst)
                continue
            cached = self.core.cache.get((src, dst, self.policy_of.get((src, dst), BALANCED)))
            if cached is not None and cached.backup != self.standby.get((src, dst)):
                self._later(self._protect(src, dst))  # a new backup (a link came back)

    def _report(self, changes: list[Change]) -> None:
        """Tell the manager's long poll when the links the telemetry finds down change;
        log each change (the hold-off rule of :mod:`graph`): an alarm raised or cleared
        is a warning (``link down``, ``link up``); a link taken out of use switches the
        routes over it to their backups at once (``protection switch``)."""
        down = self.core.telemetry_down()
        if down is not self._down and down != self._down:
            self._down, self.seq = down, self.seq + 1
            self._moved.set()
            self._moved = asyncio.Event()
        for change in changes:
            link = self.core.links[change.link]
            where = {"a": link.a, "b": link.b}
            if change.alarm:
                what = "link up" if change.up else "link down"
                code = "CTL-LINK-UP" if change.up else "CTL-LINK-DOWN"
                log.warning(what, extra={"code": code, **where})
            elif change.up:
                log.info("link in use again", extra={"code": "CTL-LINK-RESTORED", **where})
            else:
                hit = [key for key, path in self.confirmed.items() if _uses(path, link.a, link.b)]
                extra = {"code": "CTL-SWITCH", "routes": len(hit), **where}
                log.info("protection switch", extra=extra)
                for key in hit:
                    self._reinstall(*key)
                for key, path in self.standby.items():  # a backup broken: protect anew
                    if key not in hit and path is not None and _uses(path, link.a, link.b):
                        self.standby[key] = None
                        self._later(self._protect(*key))

    def _reinstall(self, src: int, dst: int) -> None:
        """Put the new path of a route a failure broke in use now (the core switched it to
        its backup: pre-installed, one Set at the head end), not when the next request for
        it comes."""

        async def run() -> None:
            try:
                await self.path(src, dst, self.policy_of.get((src, dst), BALANCED))
            except ControlError as exc:
                log.warning("no new path yet", extra={"src": src, "dst": dst, "code": exc.code})

        self._later(run())

    async def settle(self) -> None:
        """Until no background install or switch of this controller runs (tests, benches)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _later(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests -------------------------------------------------------------------------
    async def _handle(self, request: Request) -> Response:
        if request.path in ("/v1/faults", "/v1/events") and request.method == "POST":
            if request.peer not in self.managers:
                return _error(403, ControlError("not a manager of this network", code="CTL-DENIED"))
            try:
                if request.path == "/v1/faults":
                    return self._faults(request.body)
                return await self._events(request.body)
            except ControlError as exc:
                return _error(400, exc)
        if request.peer not in self.allowed:
            return _error(403, ControlError("not a CKMS of this network", code="CTL-DENIED"))
        if request.method != "POST" or request.path not in ("/v1/path", "/v1/routes"):
            return _error(404, ControlError("no such endpoint", code="CTL-ENDPOINT"))
        if request.path == "/v1/routes":
            return Response(200, json.dumps(self.routes()).encode(), JSON)
        try:
            src, dst, policy = path_request(request.body)
            path, backup = await self.path(src, dst, policy)
        except ControlError as exc:
            return _error(503 if exc.code != "CTL-REQUEST" else 400, exc)
        body = {"path": list(path), "backup": list(backup or ())}
        return Response(200, json.dumps(body).encode(), JSON)

    def _faults(self, body: bytes) -> Response:
        links, nodes, ttl = _faults(body)
        self._report(self.core.report(time.monotonic(), links, nodes, ttl))
        log.info("manager report", extra={"links": len(links), "nodes": len(nodes)})
        return Response(200, json.dumps({"links": len(links), "nodes": len(nodes)}).encode(), JSON)

    async def _events(self, body: bytes) -> Response:
        after, wait_s = _after(body)
        if after == self.seq:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), wait_s)
        doc = {"seq": self.seq, "down": [list(pair) for pair in self._down]}
        return Response(200, json.dumps(doc).encode(), JSON)

    async def path(
        self, src: int, dst: int, policy: str = BALANCED
    ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """The path from ``src`` to ``dst`` under the ``policy`` class, in use at every hop
        before it is returned (and its backup, pre-installed at every hop, if it is yet)."""
        key = (src, dst)
        self.policy_of[key] = policy  # one route per pair: the last request's class
        if self.confirmed.get(key) == self.core.path(src, dst, backup=False, policy=policy).primary:
            return self.confirmed[key], self.standby.get(key)  # a backup's install may run
        async with self._locks.setdefault(key, asyncio.Lock()):
            route = self.core.path(src, dst, backup=False, policy=policy)
            if self.confirmed.get(key) != route.primary:
                await self._use(src, dst, route.primary)
        self._later(self._protect(src, dst, PROTECT_AFTER_S))
        return route.primary, self.standby.get(key)

    async def _use(self, src: int, dst: int, path: tuple[int, ...]) -> None:
        """Put ``path`` in use (the pair's lock held): switched to at the head end if it is
        the pre-installed backup, else installed at every hop."""
        key = (src, dst)
        slot = self.slots.get(key, self.core.in_use.get(key, 0))
        old = self.confirmed.get(key) or self.core.installed(src, dst, slot)
        if path == self.standby.get(key):
            try:
                await self._switch(src, dst, 1 - slot, slot)
                self.slots[key], self.standby[key] = 1 - slot, old
                self._marks[key] = old or ()
                self.confirmed[key] = path
                return
            except ControlError as exc:
                log.warning("switch refused: installing", extra={"src": src, "code": exc.code})
                self.standby[key] = None
        if old != path:  # what it confirmed, not the hops' telemetry (a route's change
            await self._install(src, dst, path, old or (), slot, True)  # is published late)
        self.slots[key] = slot
        self.confirmed[key] = path

    async def _switch(self, src: int, dst: int, to: int, off: int) -> None:
        """The protection switch: one Set at the head end puts the backup's slot in use and
        the other out (the backup is installed at every hop already); sent from the event
        loop at once."""
        try:
            await self._client(src).set_use(src, dst, {to: True, off: False})
        except ControlError as exc:
            raise ControlError(
                f"head end {src} did not switch: {exc.code}", code="CTL-INSTALL"
            ) from exc
        log.info("route switched to its backup", extra={"src": src, "dst": dst, "slot": to})

    async def _protect(self, src: int, dst: int, after: float = 0.0) -> None:
        """Pre-install the backup of a route's path in use at every hop, in its other slot
        (a new backup after a switch, or once a path is first installed), ``after``
        seconds; after a switch at the head end, first show the new use at the other
        hops. Off the requests' way: the head end is told nothing (its path in use does
        not change)."""
        key = (src, dst)
        await asyncio.sleep(after)
        async with self._locks.setdefault(key, asyncio.Lock()):
            primary, slot = self.confirmed.get(key), self.slots.get(key, 0)
            try:
                route = (
                    self.core.path(src, dst, policy=self.policy_of.get(key, BALANCED))
                    if primary is not None
                    else None
                )
            except ControlError:
                route = None
            if primary is None or route is None or route.primary != primary:
                return  # no route, or the load balancing decides
            try:
                if key in self._marks:
                    await self._mark(src, dst, primary, slot)
                if route.backup != self.standby.get(key):
                    old = self.standby.get(key) or self.core.installed(src, dst, 1 - slot) or ()
                    self.standby[key] = None
                    if route.backup is None:
                        await self._drop(src, dst, old, 1 - slot)
                    else:
                        await self._install(src, dst, route.backup, old, 1 - slot, False)
                        self.standby[key] = route.backup
            except ControlError as exc:
                log.warning("no backup installed", extra={"src": src, "dst": dst, "code": exc.code})

    async def _mark(self, src: int, dst: int, path: tuple[int, ...], slot: int) -> None:
        """After a switch at the head end, the other hops of the path in use and of the one
        switched from show which is in use (best effort)."""
        old = self._marks.pop((src, dst), ())
        sets = []
        for node in (set(path) | set(old)) - {src}:
            use = {slot: True} if node in path else {}
            if node in old:
                use[1 - slot] = False
            sets.append((node, self._client(node).set_use(src, dst, use)))
        for node, exc in await _each(sets):
            log.warning("route use not shown", extra={"node": node, "code": exc.code})

    async def _drop(self, src: int, dst: int, old: tuple[int, ...], slot: int) -> None:
        """Remove a route's slot at every node of ``old`` (best effort)."""
        sets = [(n, self._client(n).delete_route(src, dst, slot)) for n in old]
        for node, exc in await _each(sets):
            log.warning("stale route left", extra={"node": node, "code": exc.code})

    async def _install(
        self, src: int, dst: int, path: tuple[int, ...], old: tuple[int, ...], slot: int,
        active: bool,
    ) -> None:  # fmt: skip
        """A gNMI Set at every hop in the route's ``slot``, all in flight at once from the
        event loop (a path over 13 hops costs one round trip, not 13, and no thread),
        returning once every hop confirmed; then the old path's other nodes forget the slot
        (best effort). A backup (``active`` False) is written at its head end last, once
        every other hop holds it, so that a head end never holds half a backup.
        ControlError if a hop refused or did not answer; the hops that took the slot then
        forget it (best effort), so that no head end uses a route the controller does not
        hold."""
        missing = [node for node in path if node not in self.agents]
        if missing:
            raise ControlError(f"node {missing[0]} has no agent", code="CTL-INSTALL")
        hops = [
            (node, model.Route(
                src=src, dst=dst, prev_hop=path[i - 1] if i else None,
                next_hop=path[i + 1] if i + 1 < len(path) else None, slot=slot, active=active,
                explicit=path if i == 0 else (),
            ))
            for i, node in enumerate(path)
        ]  # fmt: skip
        waves = [hops] if active else [hops[1:], hops[:1]]
        began = time.monotonic()
        holding: list[int] = []
        for wave in waves:
            sets = [(node, self._client(node).set_route(route)) for node, route in wave]
            failed = await _each(sets)
            refused = {node for node, _ in failed}
            holding += [node for node, _ in wave if node not in refused]
            if failed:  # no half route left: the hops that took it forget it again, so
                await self._drop(src, dst, tuple(holding), slot)  # the head end asks anew
                node, exc = failed[0]
                raise ControlError(
                    f"hop {node} did not confirm: {exc.code}", code="CTL-INSTALL"
                ) from exc
        ms = round((time.monotonic() - began) * 1000, 2)
        await self._drop(src, dst, tuple(set(old) - set(path)), slot)
        what = "route installed" if active else "backup installed"
        log.info(what, extra={"src": src, "dst": dst, "hops": len(path), "slot": slot, "ms": ms})

    def routes(self) -> dict[str, Any]:
        now = time.monotonic()
        links = [
            {
                "a": x.a, "b": x.b, "usable": x.usable, "weight": round(x.weight, 4),
                "manager": self.core.held(x.a, x.b, now),
            }
            for x in sorted(self.core.links.values(), key=lambda x: (x.a, x.b))
        ]  # fmt: skip
        routes = []
        for s, d in sorted(set(self.confirmed) | {k[:2] for k in self.core.hops}):
            p = self.confirmed.get((s, d)) or self.core.installed(s, d)
            if p is None:
                continue
            slot = self.slots.get((s, d), self.core.in_use.get((s, d), 0))
            standby = self.standby.get((s, d)) if (s, d) in self.standby else (
                self.core.installed(s, d, 1 - slot))  # fmt: skip
            routes.append({
                "src": s, "dst": d, "path": list(p), "backup": list(standby or ()),
                "slot": slot, "route_policy": self.policy_of.get((s, d), BALANCED),
            })  # fmt: skip
        return {"routes": routes, "links": links, "switches": self.core.switches}


async def _each(
    sets: list[tuple[int, Coroutine[Any, Any, None]]],
) -> list[tuple[int, ControlError]]:
    """Run the Sets at once; the nodes that refused or did not answer, with their errors,
    once every Set has ended."""
    results = await asyncio.gather(*(one for _, one in sets), return_exceptions=True)
    failed = []
    for (node, _), result in zip(sets, results, strict=True):
        if isinstance(result, ControlError):
            failed.append((node, result))
        elif isinstance(result, BaseException):
            raise result
    return failed


def _uses(path: tuple[int, ...], a: int, b: int) -> bool:
    return any({x, y} == {a, b} for x, y in itertools.pairwise(path))


def path_request(body: bytes) -> tuple[int, int, str]:
    """(src, dst, policy class) of a path request (ControlError ``CTL-REQUEST``): no
    other member, the class one of :data:`graph.POLICIES` (``balanced`` if absent)."""
    if len(body) > MAX_BODY:
        raise ControlError("request body too long", code="CTL-REQUEST")
    try:
        doc = json.loads(body)
        src, dst = doc["src"], doc["dst"]
        policy = doc.get("route_policy", BALANCED)
        extra = set(doc) - {"src", "dst", "route_policy"}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ControlError('expected {"src": N, "dst": M}', code="CTL-REQUEST") from exc
    if extra:
        raise ControlError(f"unknown member {sorted(extra)[0][:40]!r}", code="CTL-REQUEST")
    if not all(type(n) is int and 0 < n < 1000 for n in (src, dst)) or src == dst:
        raise ControlError("src and dst: two different node IDs", code="CTL-REQUEST")
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ControlError(f"route_policy: one of {', '.join(POLICIES)}", code="CTL-REQUEST")
    return src, dst, policy


def _faults(body: bytes) -> tuple[list[tuple[int, int]], list[int], float]:
    """The manager's report: links as node ID pairs, node IDs, time to live."""
    if len(body) > MAX_FAULTS_BODY:
        raise ControlError("report too long", code="CTL-REQUEST")
    try:
        doc = json.loads(body)
        links = [(int(a), int(b)) for a, b in doc["links"]]
        nodes = [int(n) for n in doc["nodes"]]
        ttl = float(doc["ttl_s"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError(
            'expected {"links": [[a, b], ...], "nodes": [...], "ttl_s": T}', code="CTL-REQUEST"
        ) from exc
    ids = [n for pair in links for n in pair] + nodes
    if not all(0 < n < 1000 for n in ids) or not 0 < ttl <= 3600 or len(ids) > 4000:
        raise ControlError("node IDs 1..999, ttl_s 0..3600", code="CTL-REQUEST")
    return links, nodes, ttl


def _after(body: bytes) -> tuple[int, float]:
    if len(body) > MAX_BODY:
        raise ControlError("request body too long", code="CTL-REQUEST")
    try:
        doc = json.loads(body)
        after, wait_s = int(doc["after"]), float(doc.get("wait_s", 0))
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError('expected {"after": S, "wait_s": W}', code="CTL-REQUEST") from exc
    if not 0 <= wait_s <= MAX_WAIT_S:
        raise ControlError(f"wait_s: 0..{MAX_WAIT_S:g}", code="CTL-REQUEST")
    return after, wait_s


def _error(status: int, exc: ControlError) -> Response:
    body = {"code": exc.code, "message": exc.message}
    return Response(status, json.dumps(body).encode(), JSON)
