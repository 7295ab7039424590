"""The manager's link to the QKDN Controller: what it tells the controller, and the alarms
it takes from the controller's telemetry.

Transport: HTTP/2 over mutual TLS with the network's PKI (the manager node's certificate;
the controller's must carry the name configured in ``[controller]``; the controller
admits only manager nodes of its network to these two endpoints):

* ``POST /v1/faults``: the manager's whole view of what is down, after every change and
  after every poll round, with a time to live of :func:`ttl` (a manager that stops
  reporting lets go): the links some reachable agent reports not up (from its INFORMs
  between polls, from its link table at each poll), and the nodes whose agent answered
  once and then missed :data:`SILENT_POLLS` polls in a row. The controller holds them
  down (no new path uses them; paths on them switch). A node never heard since the
  manager started is alarmed but not reported: it is still starting, or dead, and the
  controller uses no link of a node whose own telemetry it has not heard anyway.
* ``POST /v1/events``: a long poll; the answer lists the links the controller's
  telemetry finds down. A link entering that list raises ``qkdnLinkDown`` in the manager
  with reporter ``controller``; leaving it, ``qkdnLinkUp``.

Correlation (docs/mgmt.md): an alarm's key is (kind, resource); for link problems the
resource is the topology's link name (the ``links`` of the manager's configuration map the
controller's node ID pair to it, the agents name it in ``qkdnLinkName``). So a link cut
reported by either end's agent and by the controller is one ``link`` alarm, whose
``reports`` counts the reports and ``sources`` names the reporters. The first clear from
any reporter clears it.

:class:`ControlView` is the sans-IO part; :class:`ControllerLink` the asyncio adapter.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config.addresses import split_host_port
from appliance.net.h2 import H2Client, TransportError
from appliance.pki import client_context

log = logging.getLogger("qkdn.mgmt")
WAIT_S = 20.0
"""The long poll's wait at the controller (its answer comes at once on a change)."""
RETRY_S = 1.0
SILENT_POLLS = 2
"""Polls in a row an agent must miss before its node is reported down to the controller."""


def ttl(poll_s: float) -> float:
    """How long the controller holds the manager's report: three poll rounds, at least 10 s."""
    return max(10.0, 3 * poll_s)


@dataclass
class ControlView:
    """What the manager knows of link ends and silent nodes, and the controller's down
    links; sans-IO."""

    names: dict[frozenset[int], str]
    """The topology's links: node ID pair -> link name."""
    ids: dict[str, int]
    """Agent name -> node ID."""
    ends: dict[tuple[str, int], str] = field(default_factory=dict)
    """(agent name, peer ID) -> the link end's state as the agent last reported it."""
    misses: dict[str, int] = field(default_factory=dict)
    """Agent name -> polls in a row it did not answer (0 or absent: it answered the last)."""
    heard: set[str] = field(default_factory=set)
    """Agents that answered a poll at least once: only they can fall silent."""
    controller_down: set[frozenset[int]] = field(default_factory=set)

    def end(self, node: str, peer: int, state: str) -> bool:
        """One link end's state; whether the report to the controller changes."""
        before = self.report()
        self.ends[(node, peer)] = state
        return self.report() != before

    @property
    def silent(self) -> set[str]:
        """Agents silent for :data:`SILENT_POLLS` polls in a row since they last answered:
        the nodes reported down. One unanswered poll is not enough (a loaded node's agent
        may miss one: the controller would hold every link of a live node down), and an
        agent never heard is not silent but not there yet (a network's nodes start while
        the manager polls: reported down, they held links of a network that had just
        come up, BENCHMARKS.md 2026-12-04); the controller's own telemetry finds a dead
        node's links within seconds anyway."""
        return {n for n, count in self.misses.items() if count >= SILENT_POLLS}

    def node(self, node: str, *, reachable: bool) -> bool:
        """One poll of ``node``'s agent, answered or not; whether the report changes."""
        before = self.report()
        if reachable:
            self.heard.add(node)
            self.misses.pop(node, None)
        elif node in self.heard:
            self.misses[node] = min(self.misses.get(node, 0) + 1, SILENT_POLLS)
        return self.report() != before

    def report(self) -> tuple[list[list[int]], list[int]]:
        """(links some answering agent reports not up, nodes whose agent is silent)."""
        links = {
            (min(self.ids[n], peer), max(self.ids[n], peer))
            for (n, peer), state in self.ends.items()
            if state != "up" and n not in self.silent and n in self.ids
        }
        nodes = sorted(self.ids[n] for n in self.silent if n in self.ids)
        return [list(pair) for pair in sorted(links)], nodes

    def from_controller(self, down: list[list[int]]) -> list[tuple[str, str]]:
        """The controller's down links now; (notification, link name) for each change
        (links outside the topology are left out)."""
        now = {frozenset(pair) for pair in down if len(pair) == 2 and pair[0] != pair[1]}
        now = {pair for pair in now if pair in self.names}
        out = [
            ("qkdnLinkDown", self.names[p]) for p in sorted(now - self.controller_down, key=sorted)
        ]
        out += [
            ("qkdnLinkUp", self.names[p]) for p in sorted(self.controller_down - now, key=sorted)
        ]
        self.controller_down = now
        return out


class ControllerLink:
    """The HTTP/2 client of the manager at the controller."""

    def __init__(
        self,
        view: ControlView,
        address: str,
        name: str,
        tls: tuple[Path, Path, Path],
        *,
        ttl_s: float,
        on_change: Callable[[str, str], None],
    ) -> None:
        host, port = split_host_port(address)
        ctx = client_context(*tls, ("h2",))
        self.view, self.ttl_s, self.on_change = view, ttl_s, on_change
        self.events = H2Client(host, port, ctx, expect_peer=name, timeout=WAIT_S + 10)
        self.faults = H2Client(host, port, ctx, expect_peer=name, timeout=10.0)
        self.reports = 0
        """Reports the controller accepted."""
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lost: set[str] = set()
        """The directions that failed last time (each outage is logged once)."""

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._follow()),
            asyncio.ensure_future(self._tell_loop()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.events.close()
        await self.faults.close()

    def tell(self) -> None:
        """Send the manager's view soon (coalesced: the latest view goes)."""
        self._dirty.set()

    async def _tell_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            links, nodes = self.view.report()
            body = json.dumps({"links": links, "nodes": nodes, "ttl_s": self.ttl_s}).encode()
            try:
                answer = await self.faults.request("POST", "/v1/faults", body)
            except TransportError as exc:
                self._failed("faults", f"the controller does not take the report: {exc}")
                self._dirty.set()
                await asyncio.sleep(RETRY_S)
                continue
            if answer.status == 200:
                self.reports += 1
                self._lost.discard("faults")
            else:
                self._failed("faults", f"the controller refused the report ({answer.status})")

    def _failed(self, direction: str, why: str) -> None:
        if direction not in self._lost:
            self._lost.add(direction)
            log.warning("mgmt: %s (retrying every %g s)", why, RETRY_S)

    async def _follow(self) -> None:
        seq = -1
        while True:
            body = json.dumps({"after": seq, "wait_s": WAIT_S}).encode()
            try:
                answer = await self.events.request("POST", "/v1/events", body)
                if answer.status != 200:
                    raise TransportError(f"status {answer.status}")
                doc = json.loads(answer.body)
                seq, changes = int(doc["seq"]), self.view.from_controller(list(doc["down"]))
            except (TransportError, ValueError, KeyError, TypeError) as exc:
                self._failed("events", f"no events from the controller: {exc}")
                await asyncio.sleep(RETRY_S)
                continue
            if "events" in self._lost:
                self._lost.discard("events")
                log.info("mgmt: events from the controller again")
            for notification, link in changes:
                self.on_change(notification, link)
