"""The SDN agent inside a CKMS node process: what the node reads, turned into telemetry.

:class:`NodeAgent` runs the gNMI server (:mod:`agent`) next to the node's KMS services and
publishes the node's telemetry every :data:`PUBLISH_S` seconds from the node's event loop
while a gNMI STREAM is subscribed (the controller's), and every :data:`IDLE_PUBLISH_S`
seconds while none is (a Get, ONCE or POLL then reads a document at most that old; a
stream opening publishes at once) (link status at once; rates, stored bits and counters
refreshed every :data:`FIGURES_S`):
each link's QKD module status (one driver call per link, answered from the driver's own
buffers), the relay counters, and the routes the controller installed
(:attr:`NodeAgent.routes`, refreshed with the figures; the next hop of each route
installed is handed to the node once the Set's call ended, and the node readies that
link's key: :class:`appliance.kms.events.LinkWanted`).
ON_CHANGE subscribers hear a change within one period, and a module's state change at
once: the agent subscribes to each QKD module (:meth:`hal.Qkdm.subscribe`; an emulated
module follows its faults file, so a cut is heard within milliseconds) and publishes
from the event loop as soon as one reports.

Per link (:func:`link_of`):

* ``qkdl_status``: ACTIVE while the module distils; PASSIVE when it does not (down, or
  aborted for its QBER) but keys are left; OFF with no keys or no answer;
* ``skr``: the module's secret key rate; ``available_bits``: keys waiting x key size;
  ``rate_bps``: the change of ``available_bits`` per second since the last reading;
  ``eskr``: the rate left after relays consumed theirs, ``max(0, min(skr, rate_bps))``;
* QBER: the module's, 0.5 when it has no signal.

A module that does not answer counts in ``modules_down`` and makes the node DEGRADED.

The agent's gRPC threads (a STREAM's sends, a Set's handler) wait for the GIL while the
node's event loop relays; CPython makes a running thread give it up only after the switch
interval, 5 ms by default, and a Set takes two hand-offs (grpc's poller, then a worker).
:meth:`NodeAgent.start` sets it to :data:`SWITCH_INTERVAL_S`: a fault's publication and
the protection switch at a head end wait at most that long per hand-off. Few other threads
in a node's process want the GIL while the loop is busy (the watches of the QKD modules
wake on a change only); the network's CPU per request did not move beyond the runs' own
spread with it (BENCHMARKS.md, issue 15, 2026-12-03 17:14).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

import hal
from appliance.control import agent, model

log = logging.getLogger("qkdn.agent")
PUBLISH_S = 0.05
IDLE_PUBLISH_S = 1.0
FIGURES_S = 1.0
SWITCH_INTERVAL_S = 0.001
NO_SIGNAL_QBER = 0.5


@dataclass(frozen=True, slots=True)
class Reading:
    """One link's QKD module status (None: the module did not answer)."""

    link: str
    peer: int
    status: hal.QkdmStatus | None


def link_of(reading: Reading, previous_bits: int | None, dt: float) -> model.PhysLink:
    """A link's 015 telemetry from its reading and its stored bits ``dt`` seconds ago."""
    s = reading.status
    if s is None:
        return model.PhysLink(
            link=reading.link, peer=reading.peer, status=model.LinkStatus.OFF, skr=0,
            eskr=0, qber=NO_SIGNAL_QBER, available_bits=0, rate_bps=0,
        )  # fmt: skip
    bits = max(s.key_count, 0) * max(s.key_size, 0)
    rate = int((bits - previous_bits) / dt) if previous_bits is not None and dt > 0 else 0
    if s.state is hal.LinkState.UP:
        status = model.LinkStatus.ACTIVE
    else:
        status = model.LinkStatus.PASSIVE if bits else model.LinkStatus.OFF
    skr = int(s.skr_bps)
    return model.PhysLink(
        link=reading.link, peer=reading.peer, status=status, skr=skr,
        eskr=max(0, min(skr, rate)), qber=NO_SIGNAL_QBER if s.qber is None else s.qber,
        available_bits=bits, rate_bps=rate,
    )  # fmt: skip


class NodeAgent:
    """The gNMI agent of one CKMS node, fed from the node's event loop."""

    def __init__(
        self,
        node: int,
        links: list[tuple[str, int]],
        qkdms: dict[str, hal.Qkdm],
        counters: Callable[[], tuple[int, int]],
        next_hop: Callable[[int], None] | None = None,
    ) -> None:
        self.node, self.links, self.qkdms, self.counters = node, links, qkdms, counters
        self.routes = agent.RouteTable(node)
        """Routes the controller installed through this node (gNMI Set)."""
        self.next_hop = next_hop
        """Called on the node's event loop with the next hop of every route installed here
        (the node readies the link's key before the first relay over it)."""
        self.started = time.monotonic()
        self._bits: dict[str, int] = {}
        self._last: dict[str, model.PhysLink] = {}
        self._counters = (0, 0)
        self._routes: tuple[model.Route, ...] = ()
        self._at = self.started
        self.telemetry = agent.Telemetry(self.reading())
        self._server: grpc.Server | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._unsubscribe: list[Callable[[], None]] = []

    def start(self, address: str, tls: tuple[Path, Path, Path]) -> None:
        cert, key, ca = tls
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        service = agent.GnmiAgent(self.telemetry, routes=self.routes)
        self._server = agent.serve(service, address, cert=cert, key=key, ca=ca)
        loop = asyncio.get_running_loop()
        for link, qkdm in self.qkdms.items():
            self._unsubscribe.append(qkdm.subscribe(functools.partial(self._heard, loop, link)))
        self.telemetry.on_stream = lambda: self._soon(loop, self._rearm)
        if self.next_hop is not None:
            wanted = self.next_hop
            self.routes.on_next_hop = lambda hop: self._soon(loop, functools.partial(wanted, hop))
        self._tick()

    def _soon(
        self, loop: asyncio.AbstractEventLoop, then: Callable[[], None] | None = None
    ) -> None:
        """A module's state changed, or a stream opened (any thread): publish from the
        loop now."""
        try:
            loop.call_soon_threadsafe(then or self._changed)
        except RuntimeError:  # the node is stopping: its loop is closed
            return

    def _heard(self, loop: asyncio.AbstractEventLoop, link: str, _event: object) -> None:
        """A module reported a state change (its thread): logged (when the node learnt of a
        fault: the first step of a protection switch), published from the loop now."""
        log.info("link state change heard", extra={"link": link})
        self._soon(loop)

    def _changed(self) -> None:
        self.telemetry.publish(self.reading())

    def _rearm(self) -> None:
        """A stream opened: publish now and from now on at the streaming period."""
        if self._timer is not None:
            self._timer.cancel()
        self._tick()

    def _tick(self) -> None:
        self.telemetry.publish(self.reading())
        self._timer = asyncio.get_running_loop().call_later(self.period(), self._tick)

    def period(self) -> float:
        """Seconds to the next publication: short only while someone streams."""
        return PUBLISH_S if self.telemetry.streaming else IDLE_PUBLISH_S

    def reading(self) -> model.NodeTelemetry:
        """The node's telemetry now: link status and health as read; the figures (rates,
        stored bits, QBER, counters) and the installed routes as of the last full reading,
        at most :data:`FIGURES_S` old (so that ON_CHANGE streams carry a status change at
        once but not a counter's every tick, nor a route the controller just installed:
        the controller holds what it confirmed, and the document a new route would make
        every hop publish would cost it and the hops CPU while the route's first request
        is under way)."""
        now = time.monotonic()
        full = now - self._at >= FIGURES_S or not self._last
        dt = now - self._at
        links, down = [], 0
        for link, peer in self.links:
            try:
                status: hal.QkdmStatus | None = self.qkdms[link].status()
            except hal.HalError:
                status, down = None, down + 1
            phys = link_of(Reading(link, peer, status), self._bits.get(link), dt)
            if full:
                self._bits[link] = phys.available_bits
                self._last[link] = phys
            else:
                phys = dataclasses.replace(self._last.get(link, phys), status=phys.status)
            links.append(phys)
        if full:
            self._at, self._counters = now, self.counters()
            self._routes = self.routes.routes()
        relayed, batches = self._counters
        return model.NodeTelemetry(
            node=self.node, links=tuple(links), routes=self._routes,
            relayed=relayed, batches=batches, uptime_s=int(self._at - self.started),
            modules_down=down, health=model.Health.DEGRADED if down else model.Health.OK,
        )  # fmt: skip

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.stop(grace=None)
