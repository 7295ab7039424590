"""The QKDN Controller's sans-IO core: the live graph, link weights, paths and protection.

No I/O and no clock of its own: every call takes ``now`` (seconds, monotonic), so tests
drive it with an injected clock.

**Telemetry in.** :meth:`Core.telemetry` takes a node's 015 document (as its agent serves
``/qkd_node``), :meth:`Core.tick` lets time pass. A link is *usable* when both of its ends
report it ACTIVE (a PASSIVE link, down with keys left, carries the relays already on it
but no new path), its QBER is at most ``qber_max``, and both
nodes were heard within ``dead_after`` seconds (telemetry is the heartbeat), and the QKDN
Manager does not hold it down (*the manager's holds*, below).

**The hold-off rule (as SDH protection).** Protection does not wait; everything else does:

* the first report that makes a usable link bad takes it out of use *at once*
  (``Change(up=False, alarm=False)``): routes over it switch to their backups. A node
  that falls silent (no telemetry within ``dead_after``, 3 s, the heartbeat deadline; or
  its stream broke: :meth:`Core.lost`) is no
  report: its links go out of use, alarmed, only once the silence held for ``hold_off``
  more, so that a stalled controller does not switch every route at once;
* the **alarm** (``Change(up=False, alarm=True)``, the controller's ``link down``) is
  raised only once the link has stayed bad for ``hold_off`` seconds (0.1 by default), so
  a flap shorter than that switches routes but raises nothing;
* a link is **used again** (``Change(up=True)``; the alarm, if raised, clears: ``alarm``
  True) only once its reports have stayed good for ``hold_off`` seconds (wait to
  restore): a link that flaps never carries a new path between its flaps.

**Weights.** A usable link's weight is (:meth:`Weights.of`)::

    w = hop + availability * B / (B + bits) + rate * R / (R + eskr)

with ``bits`` the key bits stored at the poorer end, ``eskr`` the poorer end's effective
key rate (bit/s), ``B`` = ``reference_bits`` and ``R`` = ``reference_bps``. Every term is
positive and falls as keys pile up or flow faster, so a path's weight is at least its hop
count x ``hop``; with ``availability = rate = 0`` routing is by hop count. All five numbers
are configurable (``qkdn controller run --weights``).

**The contract's policy.** A path request names a routing policy class
(:data:`POLICIES`; a contract's ``route_policy``, passed down by the access node without
the contract or its user); each class has its own five numbers (:data:`CLASSES`, the
defaults, overridden with ``class.name=value`` in ``--weights``): ``balanced`` is the
formula above with the configured numbers; ``fewest-hops`` weighs hops almost alone (key
terms 0.05: they only break ties); ``most-key`` weighs key availability four times a hop
and the rate as much as a hop, so a longer path with full stores wins over a short one
running dry. Paths are cached per (source, destination, class).

**Paths.** :meth:`Core.path` answers from the cache or computes a primary path
(Dijkstra, ties towards lower node IDs) and a backup that avoids the primary's links
(each shared link costs :data:`SHARE_PENALTY` more, so the backup shares a link only
where no disjoint way exists; ``shared`` counts them). When a link of a cached primary
goes down, the backup becomes the primary at once (protection switching: no computation
on the fault's path) and a new backup is computed when next asked for, around that
primary, which stays (:meth:`Core.keep` caches a route found installed the same way). A
link coming up, or a weight moving by more than ``reweigh`` of itself, empties the cache.

**Installed routes** come from the agents' VIRT links, two slots per route (the path in
use and its pre-installed backup): :attr:`Core.hops` per slot, :attr:`Core.in_use` the
slot the route's head end reports ACTIVE, :meth:`Core.installed` a slot's whole path.

**Load balancing by key availability.** :meth:`Core.better` looks at an installed route
again: if its alternative (the cached primary or backup) is now lighter than the
installed path by more than ``rebalance`` (weight units, 0.2 by default), the route
moves there. As relays drain the stores of the path in use, its availability terms
grow while the idle path's stores fill and its terms fall, so routes alternate between
the paths and both paths' key rates are used; the margin keeps a route from moving for
every few bits. Otherwise the cache keeps the installed path as primary, so that a
recomputed shortest path slightly lighter than it does not move it either.

**The manager's holds.** :meth:`Core.report` takes the QKDN Manager's whole view of the
links and nodes it learnt are down over SNMP; a held link (or a link of a held node) is
not usable whatever its telemetry says, until the report's time to live ends or the next
report drops it. :meth:`Core.telemetry_down` lists the links an end reports bad (the
holds, silent nodes and links that never came up left out), which the controller tells
the manager.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from appliance.control import model
from appliance.control.errors import ControlError, NoPath

SHARE_PENALTY = 1e6
MAX_LINKS_PER_NODE = 256
BALANCED = "balanced"
POLICIES = (BALANCED, "fewest-hops", "most-key")
"""The routing policy classes a path request may name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Weights:
    hop: float = 1.0
    availability: float = 1.0
    rate: float = 1.0
    reference_bits: int = 1 << 20
    reference_bps: int = 10_000

    def of(self, bits: int, eskr: int) -> float:
        b, r = self.reference_bits, self.reference_bps
        return self.hop + self.availability * b / (b + bits) + self.rate * r / (r + eskr)

    @classmethod
    def parse(cls, text: str, base: Weights | None = None) -> Weights:
        """``hop=1,availability=2,...`` over ``base`` (default: the defaults above);
        ControlError on an unknown name or a bad value."""
        values: dict[str, float] = {}
        for item in filter(None, text.split(",")):
            name, _, raw = item.partition("=")
            if name not in cls.__dataclass_fields__:
                raise ControlError(f"unknown weight {name[:40]!r}", code="CTL-WEIGHTS")
            try:
                value = float(raw)
            except ValueError:
                raise ControlError(f"weight {name}: not a number", code="CTL-WEIGHTS") from None
            if not 0 <= value <= 1e12:
                raise ControlError(f"weight {name}: expected 0..1e12", code="CTL-WEIGHTS")
            values[name] = value
        base = base or cls()
        w = cls(
            hop=values.get("hop", base.hop),
            availability=values.get("availability", base.availability),
            rate=values.get("rate", base.rate),
            reference_bits=int(values.get("reference_bits", base.reference_bits)),
            reference_bps=int(values.get("reference_bps", base.reference_bps)),
        )
        if w.hop <= 0 or w.reference_bits <= 0 or w.reference_bps <= 0:
            raise ControlError("hop and the references must be positive", code="CTL-WEIGHTS")
        return w


CLASSES = {
    BALANCED: Weights(),
    "fewest-hops": Weights(hop=1.0, availability=0.05, rate=0.05),
    "most-key": Weights(hop=0.25, availability=4.0, rate=1.0),
}
"""Each policy class's numbers by default (module docstring)."""


def parse_policies(text: str) -> dict[str, Weights]:
    """``--weights``: ``name=value`` items set the ``balanced`` class, ``class.name=value``
    items that class; the rest keep :data:`CLASSES` (ControlError ``CTL-WEIGHTS``)."""
    items: dict[str, list[str]] = {}
    for item in filter(None, text.split(",")):
        cls, dot, rest = item.partition(".")
        if dot and "=" not in cls:
            if cls not in CLASSES:
                raise ControlError(f"unknown policy class {cls[:40]!r}", code="CTL-WEIGHTS")
            items.setdefault(cls, []).append(rest)
        else:
            items.setdefault(BALANCED, []).append(item)
    return {c: Weights.parse(",".join(items.get(c, [])), base) for c, base in CLASSES.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class EndReport:
    """One end's view of a physical link, from its node's document."""

    link: str
    """The link's 015 UUID."""
    node: int
    peer: int
    good: bool
    """Status ACTIVE (a PASSIVE link takes no new path)."""
    bits: int
    eskr: int
    qber: float


@dataclass(frozen=True, slots=True)
class Change:
    """A link became usable (``up``) or unusable, effective at ``at``; with ``alarm``, the
    link's alarm is raised (down) or cleared (up) rather than its use switched."""

    link: str
    up: bool
    at: float
    alarm: bool = False


class _State(Enum):
    GOOD = "good"
    FAULT = "fault"
    """An end reports the link bad (status, QBER), or has never reported it."""
    SILENT = "silent"
    """Good as last reported, but an end's node was not heard within ``dead_after``."""


@dataclass(slots=True)
class _Link:
    a: int
    b: int
    ends: dict[int, EndReport] = field(default_factory=dict)
    usable: bool = False
    pending_since: float | None = None
    """When the reports of an unusable link turned good (the wait to restore's start)."""
    down_since: float | None = None
    """When the link was taken out of use (the alarm's hold-off start); None once the
    alarm is raised or the link is back."""
    alarmed: bool = False
    weight: float = 0.0
    """Under the ``balanced`` class."""
    bits: int = 0
    eskr: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    """A cached path pair between two nodes."""

    primary: tuple[int, ...]
    backup: tuple[int, ...] | None
    shared: int
    """Links the backup shares with the primary."""
    weight: float


@dataclass(slots=True)
class Core:
    weights: Weights = field(default_factory=Weights)
    hold_off: float = 0.1
    dead_after: float = 3.0
    qber_max: float = 0.11
    reweigh: float = 0.5
    rebalance: float = 0.2
    policies: dict[str, Weights] = field(default_factory=lambda: dict(CLASSES))
    """The numbers of the other classes (``weights`` is the ``balanced`` class's)."""
    links: dict[str, _Link] = field(default_factory=dict)
    heard: dict[int, float] = field(default_factory=dict)
    cache: dict[tuple[int, int, str], Route] = field(default_factory=dict)
    """Routes by (source, destination, policy class)."""
    hops: dict[tuple[int, int, int], dict[int, tuple[int | None, int | None]]] = field(
        default_factory=dict
    )
    """Installed routes as the agents report them: (src, dst, slot) -> node -> (prev, next)."""
    in_use: dict[tuple[int, int], int] = field(default_factory=dict)
    """The slot each route's head end (its source) reports in use (ACTIVE)."""
    switches: int = 0
    held_links: dict[tuple[int, int], float] = field(default_factory=dict)
    """Links the manager reports down: (lower ID, higher ID) -> held until (``now``'s clock)."""
    held_nodes: dict[int, float] = field(default_factory=dict)
    """Nodes the manager reports down (every link of theirs is held down)."""
    been_up: set[str] = field(default_factory=set)
    """Links seen usable (:meth:`telemetry_down` reports only those)."""
    _bad: dict[str, tuple[int, int]] = field(default_factory=dict, init=False, repr=False)
    """The links :meth:`telemetry_down` lists, kept where an end's report or a link's use
    changes (not recomputed over every link at each document)."""
    _down: list[tuple[int, int]] = field(default_factory=list, init=False, repr=False)

    # -- the manager's reports ---------------------------------------------------------
    def report(
        self, now: float, links: list[tuple[int, int]], nodes: list[int], ttl: float
    ) -> list[Change]:
        """The manager's whole view of what is down, replacing the last one; held for
        ``ttl`` seconds unless renewed (a manager that stops reporting lets go)."""
        until = now + ttl
        self.held_links = {(min(a, b), max(a, b)): until for a, b in links}
        self.held_nodes = dict.fromkeys(nodes, until)
        return self.tick(now)

    def held(self, a: int, b: int, now: float) -> bool:
        """Whether the manager holds the link between ``a`` and ``b`` down."""
        if self.held_links.get((min(a, b), max(a, b)), -1e18) > now:
            return True
        return any(self.held_nodes.get(n, -1e18) > now for n in (a, b))

    def telemetry_down(self) -> list[tuple[int, int]]:
        """Links that were usable once and that an end now reports bad (status not ACTIVE,
        QBER above ``qber_max``), as (lower ID, higher ID). Not the manager's holds, not a
        node's silence (the manager learns that over SNMP), not a link that never came up.
        Kept as reports arrive (:meth:`_mark`): a new list only when it changed."""
        return self._down

    def _mark(self, lid: str, link: _Link) -> None:
        """Whether ``link`` belongs in :meth:`telemetry_down`, after its ends' reports or
        its use changed."""
        bad = lid in self.been_up and any(
            not e.good or e.qber > self.qber_max for e in link.ends.values()
        )
        if bad == (lid in self._bad):
            return
        if bad:
            self._bad[lid] = (min(link.a, link.b), max(link.a, link.b))
        else:
            del self._bad[lid]
        self._down = sorted(self._bad.values())

    # -- telemetry --------------------------------------------------------------------
    def telemetry(self, now: float, doc: dict[str, Any]) -> list[Change]:
        """Take one node's ``/qkd_node`` document (ControlError if malformed)."""
        node, reports, routes = parse(doc)
        self.heard[node] = now
        for report in reports:
            link = self.links.setdefault(report.link, _Link(report.node, report.peer))
            link.ends[node] = report
            self._mark(report.link, link)
        for entries in self.hops.values():
            entries.pop(node, None)
        for key in [k for k in self.in_use if k[0] == node]:
            del self.in_use[key]
        for hop in routes:
            self.hops.setdefault((hop.src, hop.dst, hop.slot), {})[node] = (hop.prev, hop.next)
            if hop.active and node == hop.src:
                self.in_use[(hop.src, hop.dst)] = hop.slot
        return self.tick(now, only={r.link for r in reports})

    def lost(self, now: float, node: int) -> list[Change]:
        """The node's telemetry stream broke (its CKMS stopped, or the network between):
        silent from now on, until it is heard again."""
        self.heard[node] = now - self.dead_after - 1.0
        return self.tick(now)

    def heard_from(self, now: float, node: int) -> None:
        """A heartbeat that repeats the node's last document: it is alive, nothing else."""
        self.heard[node] = now

    def installed(self, src: int, dst: int, slot: int | None = None) -> tuple[int, ...] | None:
        """The installed path from ``src`` to ``dst`` in ``slot`` (default: the slot its
        head end uses) if every hop reports it, else None."""
        if slot is None:
            slot = self.in_use.get((src, dst), 0)
        entries = self.hops.get((src, dst, slot), {})
        path, node = [src], src
        while node != dst and len(path) <= len(entries):
            nxt = entries.get(node, (None, None))[1]
            if nxt is None or entries.get(nxt, (None, None))[0] != node:
                return None
            path.append(node := nxt)
        return tuple(path) if node == dst and dst in entries else None

    def tick(self, now: float, only: set[str] | None = None) -> list[Change]:
        """Apply the hold-off rule (module docstring); the changes, in link order
        (``only``: look at these links alone, those a document just reported)."""
        changes = []
        for lid in sorted(self.links if only is None else only & self.links.keys()):
            link = self.links[lid]
            changes += self._step(lid, link, self._good(link, now), now)
            if only is not None:  # a weight moves with its ends' reports, not with time
                self._reweigh(link)
        for change in changes:
            if not change.alarm:
                self._apply(change)
        return changes

    def _step(self, lid: str, link: _Link, state: _State, now: float) -> list[Change]:
        good = state is _State.GOOD
        if link.usable:
            if good:
                link.down_since = None
                return []
            if state is _State.SILENT:  # no report is no proof: the hold-off applies
                link.down_since = now if link.down_since is None else link.down_since
                if now - link.down_since < self.hold_off:
                    return []
                link.usable, link.alarmed, link.down_since = False, True, None
                return [Change(lid, False, now), Change(lid, False, now, alarm=True)]
            link.usable, link.down_since = False, now  # a report of a fault: at once
            return [Change(lid, False, now)]
        out = []
        if good:
            link.pending_since = now if link.pending_since is None else link.pending_since
            if now - link.pending_since >= self.hold_off:  # wait to restore: held
                out.append(Change(lid, True, now))
                if link.alarmed:
                    out.append(Change(lid, True, now, alarm=True))
                link.usable, link.alarmed = True, False
                link.pending_since = link.down_since = None
                self.been_up.add(lid)  # all its ends report good: not in the down list
            return out
        link.pending_since = None
        if link.down_since is not None and now - link.down_since >= self.hold_off:
            link.alarmed, link.down_since = True, None
            out.append(Change(lid, False, now, alarm=True))
        return out

    def next_due(self) -> float | None:
        """When :meth:`tick` may next change something (None: only on telemetry)."""
        starts = [
            t for x in self.links.values() for t in (x.pending_since, x.down_since) if t is not None
        ]
        return min(starts) + self.hold_off if starts else None

    def _good(self, link: _Link, now: float) -> _State:
        if self.held(link.a, link.b, now):  # the manager's hold: a fault, at once
            return _State.FAULT
        ends = [link.ends.get(link.a), link.ends.get(link.b)]
        if any(e is None or not e.good or e.qber > self.qber_max for e in ends):
            return _State.FAULT
        alive = all(now - self.heard.get(n, -1e18) <= self.dead_after for n in (link.a, link.b))
        return _State.GOOD if alive else _State.SILENT

    def _reweigh(self, link: _Link) -> None:
        ends = list(link.ends.values())
        bits = min((e.bits for e in ends), default=0)
        eskr = min((e.eskr for e in ends), default=0)
        weight = self.weights.of(bits, eskr)
        if link.usable and abs(weight - link.weight) > self.reweigh * link.weight:
            self.cache.clear()
        link.weight, link.bits, link.eskr = weight, bits, eskr

    def _apply(self, change: Change) -> None:
        if change.up:
            self.cache.clear()
            return
        link = self.links[change.link]
        for key, route in list(self.cache.items()):
            if _uses(route.primary, link.a, link.b):
                if route.backup is not None and not _uses(route.backup, link.a, link.b):
                    self.cache[key] = Route(route.backup, None, 0, route.weight)
                    self.switches += 1
                else:
                    del self.cache[key]
            elif route.backup is not None and _uses(route.backup, link.a, link.b):
                self.cache[key] = Route(route.primary, None, 0, route.weight)

    # -- paths ------------------------------------------------------------------------
    def path(self, src: int, dst: int, *, backup: bool = True, policy: str = BALANCED) -> Route:
        """The route from ``src`` to ``dst`` under ``policy``'s weights (cached); NoPath if
        there is none."""
        cached = self.cache.get((src, dst, policy))
        if cached is not None and (cached.backup is not None or not backup):
            return cached
        adj = self.adjacency(policy)
        if cached is not None:  # a primary without backup (switched to): protect it as is
            primary, weight = cached.primary, cached.weight
        else:
            primary, weight = shortest(adj, src, dst)
        second: tuple[int, ...] | None = None
        shared = 0
        if backup:
            used = set(itertools.pairwise(primary))
            used |= {(b, a) for a, b in used}
            penalised = {
                a: [(b, w + SHARE_PENALTY if (a, b) in used else w) for b, w in nbs]
                for a, nbs in adj.items()
            }
            try:
                second, cost = shortest(penalised, src, dst)
                shared = int(cost // SHARE_PENALTY)
                if second == primary:
                    second = None
            except NoPath:
                second = None
        route = Route(primary, second, shared, weight)
        self.cache[(src, dst, policy)] = route
        return route

    def path_weight(self, path: tuple[int, ...], policy: str = BALANCED) -> float:
        """The weight of ``path`` now (infinite if one of its links is not usable)."""
        best: dict[tuple[int, int], float] = {}
        for link in self.links.values():
            if link.usable:
                w = self.weight(link, policy)
                for key in ((link.a, link.b), (link.b, link.a)):
                    best[key] = min(best.get(key, float("inf")), w)
        return float(sum(best.get(hop, float("inf")) for hop in itertools.pairwise(path)))

    def better(
        self, src: int, dst: int, installed: tuple[int, ...], policy: str = BALANCED
    ) -> tuple[int, ...] | None:
        """The path an installed route should move to for key availability, or None
        (module docstring: load balancing). Either way the cache then holds the route's
        path to use as primary and the other as backup."""
        try:
            route = self.path(src, dst, policy=policy)
        except NoPath:
            return None
        other = route.backup if route.primary == installed else route.primary
        if other is None or other == installed:
            return None
        now, alt = self.path_weight(installed, policy), self.path_weight(other, policy)
        if alt < now - self.rebalance:
            self.cache[(src, dst, policy)] = Route(other, installed, route.shared, alt)
            return other
        if now < float("inf"):
            self.cache[(src, dst, policy)] = Route(installed, other, route.shared, now)
        return None

    def keep(
        self,
        src: int,
        dst: int,
        primary: tuple[int, ...],
        backup: tuple[int, ...] | None,
        policy: str = BALANCED,
    ) -> None:
        """Cache a route found installed (a restarted controller, from the agents): its path
        in use stays primary and its installed backup the backup, where usable."""
        weight = self.path_weight(primary, policy)
        if weight == float("inf") or (src, dst, policy) in self.cache:
            return
        if backup is not None and self.path_weight(backup, policy) == float("inf"):
            backup = None
        self.cache[(src, dst, policy)] = Route(primary, backup, 0, weight)

    def weight(self, link: _Link, policy: str = BALANCED) -> float:
        """``link``'s weight under ``policy`` (the balanced one is kept on the link)."""
        if policy == BALANCED:
            return link.weight
        return self.policies[policy].of(link.bits, link.eskr)

    def adjacency(self, policy: str = BALANCED) -> dict[int, list[tuple[int, float]]]:
        """Usable links as neighbour lists, sorted by neighbour ID."""
        adj: dict[int, list[tuple[int, float]]] = {}
        for link in self.links.values():
            if link.usable:
                w = self.weight(link, policy)
                adj.setdefault(link.a, []).append((link.b, w))
                adj.setdefault(link.b, []).append((link.a, w))
        for nbs in adj.values():
            nbs.sort()
        return adj

    def set_link(self, link: str, a: int, b: int, weight: float) -> None:
        """A usable link of the given weight, without telemetry (benches, offline graphs)."""
        self.links[link] = _Link(a, b, usable=True, weight=weight)
        self.been_up.add(link)
        self._mark(link, self.links[link])
        self.cache.clear()

    def usable(self, a: int, b: int) -> bool:
        return any(x.usable and {x.a, x.b} == {a, b} for x in self.links.values())


def shortest(
    adj: dict[int, list[tuple[int, float]]], src: int, dst: int
) -> tuple[tuple[int, ...], float]:
    """Dijkstra from ``src`` to ``dst``: the node IDs and the weight (NoPath if none)."""
    best = {src: 0.0}
    previous: dict[int, int] = {}
    queue = [(0.0, src)]
    done: set[int] = set()
    while queue:
        dist, node = heapq.heappop(queue)
        if node == dst:
            break
        if node in done:
            continue
        done.add(node)
        for peer, w in adj.get(node, ()):
            cand = dist + w
            if cand < best.get(peer, float("inf")):
                best[peer], previous[peer] = cand, node
                heapq.heappush(queue, (cand, peer))
    if dst not in best:
        raise NoPath(f"no usable path from node {src} to node {dst}")
    path = [dst]
    while path[-1] != src:
        path.append(previous[path[-1]])
    return tuple(reversed(path)), best[dst]


def _uses(path: tuple[int, ...], a: int, b: int) -> bool:
    return any({x, y} == {a, b} for x, y in itertools.pairwise(path))


# -- documents --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hop:
    """An installed route at one node (a VIRT link): previous and next hop, None where the
    node is the route's end; its slot and whether it is in use (ACTIVE) or standby."""

    src: int
    dst: int
    prev: int | None
    next: int | None
    slot: int = 0
    active: bool = True


def parse(doc: dict[str, Any]) -> tuple[int, list[EndReport], list[Hop]]:
    """(node, physical link reports, installed route hops) of a ``/qkd_node`` document."""
    try:
        node = model.node_of(doc["qkdn_id"])
        entries = doc["qkd_links"]["qkd_link"]
        if not isinstance(entries, list) or len(entries) > MAX_LINKS_PER_NODE:
            raise ControlError("qkd_link: expected a list", code="CTL-DOC")
        reports, routes = [], []
        for e in entries:
            if e["qkdl_type"].endswith(":VIRT"):
                prev = e.get("virt_prev_hop")
                nxt = e.get("virt_next_hop", [])[:1]
                src = model.node_of(e["qkdl_local"]["qkdn_id"])
                dst = model.node_of(e["qkdl_remote"]["qkdn_id"])
                routes.append(Hop(
                    src, dst, None if prev is None else model.node_of(prev),
                    model.node_of(nxt[0]) if nxt else None,
                    model.slot_of(src, dst, str(e["qkdl_id"])) or 0,
                    str(e.get("qkdl_status", "")).endswith(":ACTIVE"),
                ))  # fmt: skip
                continue
            reports.append(_report(node, e))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ControlError(
            f"malformed node document ({type(exc).__name__})", code="CTL-DOC"
        ) from exc
    return node, reports, routes


def _report(node: int, e: dict[str, Any]) -> EndReport:
    status = e["qkdl_status"].rpartition(":")[2]
    store = e.get(f"{model.AUGMENT}:key_store", {})
    bits = int(store.get("available_bits", "0"))
    perf = e.get("qkdl_performance", {})
    qber = next(
        (float(p["value"]) for p in perf.get("phys_perf", []) if p["perf_type"].endswith("QBER")),
        0.5,
    )
    good = status == "ACTIVE"  # PASSIVE: not distilling; its keys serve relays in flight
    return EndReport(
        link=str(e["qkdl_id"]), node=node, peer=model.node_of(e["qkdl_remote"]["qkdn_id"]),
        good=good, bits=bits, eskr=int(perf.get("eskr", 0)), qber=qber,
    )  # fmt: skip
