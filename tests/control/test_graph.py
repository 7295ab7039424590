"""The controller's sans-IO core with an injected clock: graph from agent documents,
weights, primary and backup paths, hold-off, protection switching, cache invalidation,
and installed routes rebuilt from the agents' VIRT links."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import topology
from appliance.control import model
from appliance.control.controller import path_request
from appliance.control.errors import ControlError, NoPath
from appliance.control.graph import (
    CLASSES,
    POLICIES,
    Core,
    Route,
    Weights,
    parse,
    parse_policies,
    shortest,
)
from appliance.kms import messages

# The carrier part of DemoQuanDT: a chain 2..14 with the bypass 8-16-10 beside 8-9-10.
CHAIN = [(n, n + 1) for n in range(2, 14)]
LINKS = [*CHAIN, (8, 16), (16, 10)]


class Net:
    """Documents of every node, as their agents would serve them, built from link states."""

    def __init__(self) -> None:
        self.status = {link: model.LinkStatus.ACTIVE for link in LINKS}
        self.bits = dict.fromkeys(LINKS, 1 << 20)
        self.qber = dict.fromkeys(LINKS, 0.02)
        self.routes: dict[int, list[model.Route]] = {}

    def doc(self, node: int) -> dict:  # type: ignore[type-arg]
        links = tuple(
            model.PhysLink(
                link=f"L{a}-{b}", peer=b if a == node else a, status=self.status[(a, b)],
                skr=10_000, eskr=10_000, qber=self.qber[(a, b)],
                available_bits=self.bits[(a, b)], rate_bps=0,
            )
            for a, b in LINKS
            if node in (a, b)
        )  # fmt: skip
        t = model.NodeTelemetry(node=node, links=links, routes=tuple(self.routes.get(node, [])))
        return model.document(t)["etsi-qkd-sdn-node:qkd_node"]

    def nodes(self) -> list[int]:
        return sorted({n for link in LINKS for n in link})

    def feed(self, core: Core, now: float) -> list:  # type: ignore[type-arg]
        changes = []
        for node in self.nodes():
            changes += core.telemetry(now, self.doc(node))
        return changes


def started(net: Net, **kw) -> Core:  # type: ignore[no-untyped-def]
    core = Core(**kw)
    net.feed(core, 0.0)
    net.feed(core, 0.1)  # the hold-off applies to coming up too
    return core


def test_links_come_up_only_after_the_hold_off():
    net, core = Net(), Core()
    assert net.feed(core, 0.0) == []
    assert core.next_due() == pytest.approx(0.1)
    assert core.tick(0.05) == []
    changes = core.tick(0.1)
    assert len(changes) == len(LINKS) and all(c.up for c in changes)


def test_the_primary_goes_through_9_and_the_backup_through_16():
    core = started(Net())
    route = core.path(3, 13)
    assert route.primary == (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
    assert route.backup == (3, 4, 5, 6, 7, 8, 16, 10, 11, 12, 13)
    assert route.shared == 8  # the chain has no way around its other links


def test_a_failed_link_switches_to_the_backup_at_once_and_alarms_after_the_hold_off():
    net = Net()
    core = started(net)
    before = core.path(3, 13)
    net.status[(8, 9)] = model.LinkStatus.OFF
    net.bits[(8, 9)] = 0
    lid = model.link_uuid("L8-9")
    changes = net.feed(core, 1.0)  # the first report: protection does not wait
    assert [(c.link, c.up, c.alarm) for c in changes] == [(lid, False, False)]
    assert core.switches == 1
    assert core.cache[(3, 13, "balanced")].primary == before.backup
    assert core.path(3, 13).primary == before.backup
    assert core.next_due() == pytest.approx(1.1)
    assert core.tick(1.05) == []
    assert [(c.link, c.up, c.alarm) for c in core.tick(1.1)] == [(lid, False, True)]
    assert core.tick(1.5) == [] and core.switches == 1


def test_a_flap_shorter_than_the_hold_off_switches_but_raises_no_alarm():
    net = Net()
    core = started(net)
    net.status[(8, 9)] = model.LinkStatus.OFF
    net.bits[(8, 9)] = 0
    assert [c.alarm for c in net.feed(core, 1.0)] == [False]
    net.status[(8, 9)] = model.LinkStatus.ACTIVE
    net.bits[(8, 9)] = 1 << 20
    assert net.feed(core, 1.05) == []
    assert not core.usable(8, 9)  # wait to restore: not used again yet
    assert 9 not in core.path(8, 10).primary
    assert core.tick(1.1) == []
    changes = core.tick(1.16)
    assert [(c.up, c.alarm) for c in changes] == [(True, False)]  # no alarm to clear
    assert core.usable(8, 9) and core.path(8, 10).primary == (8, 9, 10)


def test_a_link_that_flaps_is_not_used_between_its_flaps():
    net = Net()
    core = started(net)
    for t in (1.0, 1.06, 1.12, 1.18):  # bad and good by turns, each for less than 0.1 s
        net.status[(8, 9)] = model.LinkStatus.OFF if t in (1.0, 1.12) else model.LinkStatus.ACTIVE
        net.feed(core, t)
        assert not core.usable(8, 9)
    alarms = core.tick(1.19)
    assert [c.up for c in alarms if c.alarm] == []  # never bad for 0.1 s at a stretch


def test_an_alarm_clears_when_the_link_is_used_again():
    net = Net()
    core = started(net)
    net.status[(8, 9)] = model.LinkStatus.OFF
    net.feed(core, 1.0)
    assert [c.alarm for c in core.tick(1.2)] == [True]
    net.status[(8, 9)] = model.LinkStatus.ACTIVE
    net.feed(core, 2.0)
    got = [(c.up, c.alarm) for c in core.tick(2.1)]
    assert got == [(True, False), (True, True)]


def test_a_qber_above_threshold_takes_the_link_down():
    net = Net()
    core = started(net)
    net.qber[(9, 10)] = 0.2
    net.feed(core, 1.0)
    assert [c.up for c in core.tick(1.1)] == [False]
    assert 9 not in core.path(8, 10).primary


def test_a_silent_node_takes_its_links_down():
    net = Net()
    core = started(net, dead_after=0.5)
    for node in net.nodes():
        if node != 9:
            core.telemetry(1.0, net.doc(node))
    changes = core.tick(1.1)
    assert {c.link for c in changes} == {model.link_uuid("L8-9"), model.link_uuid("L9-10")}
    assert core.path(8, 10).primary == (8, 16, 10)


def test_a_passive_link_takes_no_new_path_even_with_keys_left():
    net = Net()
    core = started(net)
    net.status[(4, 5)] = model.LinkStatus.PASSIVE
    net.feed(core, 1.0)
    assert [c.up for c in core.tick(1.1)] == [False]
    with pytest.raises(NoPath):
        core.path(3, 13)


def test_key_availability_steers_the_path_when_weighted():
    net = Net()
    net.bits[(8, 9)] = 0  # still ACTIVE, but its store is empty
    core = started(net, weights=Weights(availability=10.0, rate=0.0))
    assert core.path(8, 10).primary == (8, 16, 10)
    core = started(net, weights=Weights(availability=0.0, rate=0.0))
    assert core.path(8, 10).primary == (8, 9, 10)


def test_a_link_coming_back_empties_the_cache():
    net = Net()
    core = started(net)
    net.status[(8, 9)] = model.LinkStatus.OFF
    net.bits[(8, 9)] = 0
    net.feed(core, 1.0)
    core.tick(1.1)
    assert core.path(3, 13).primary[6] == 16
    net.status[(8, 9)] = model.LinkStatus.ACTIVE
    net.bits[(8, 9)] = 1 << 20
    net.feed(core, 2.0)
    net.feed(core, 2.1)
    assert (3, 13, "balanced") not in core.cache
    assert core.path(3, 13).primary[6] == 9


def test_installed_routes_are_rebuilt_from_the_agents():
    net = Net()
    path = (7, 8, 16, 10, 11)
    for i, node in enumerate(path):
        prev = path[i - 1] if i else None
        nxt = path[i + 1] if i + 1 < len(path) else None
        net.routes[node] = [model.Route(src=7, dst=11, prev_hop=prev, next_hop=nxt)]
    core = started(net)
    assert core.installed(7, 11) == path
    del net.routes[16]
    net.feed(core, 1.0)
    assert core.installed(7, 11) is None  # a hop that does not confirm is no route


def install(net: Net, path: tuple[int, ...], slot: int, active: bool) -> None:
    """The VIRT links of ``path`` at its nodes, as the controller's Sets leave them."""
    for i, node in enumerate(path):
        prev = path[i - 1] if i else None
        nxt = path[i + 1] if i + 1 < len(path) else None
        route = model.Route(src=path[0], dst=path[-1], prev_hop=prev, next_hop=nxt, slot=slot,
                            active=active)  # fmt: skip
        net.routes.setdefault(node, []).append(route)


def test_both_slots_are_rebuilt_and_the_head_end_says_which_is_in_use():
    net = Net()
    via9, via16 = (7, 8, 9, 10, 11), (7, 8, 16, 10, 11)
    install(net, via9, 0, False)  # switched: the other hops still show the old use
    install(net, via16, 1, False)
    head = model.Route(src=7, dst=11, prev_hop=None, next_hop=8)
    net.routes[7] = [replace(head, active=False), replace(head, slot=1)]
    core = started(net)
    assert core.in_use[(7, 11)] == 1
    assert core.installed(7, 11) == via16
    assert core.installed(7, 11, 0) == via9
    core.keep(7, 11, via16, via9)  # a restarted controller takes them on as they are
    assert core.path(7, 11) == core.cache[(7, 11, "balanced")]
    assert (core.path(7, 11).primary, core.path(7, 11).backup) == (via16, via9)


def test_a_switched_route_gets_a_backup_around_its_path_without_moving_it():
    """After a switch the cached primary is the old backup, without a backup; asking for
    one computes only the backup, around that path, even where a new shortest path would
    differ (the switched path stays in use: its backup is what is pre-installed next)."""
    core = Core()
    for a, b, w in ((1, 2, 1.0), (2, 4, 1.0), (1, 3, 1.5), (3, 4, 1.5)):
        core.set_link(f"L{a}-{b}", a, b, w)
    assert core.path(1, 4).primary == (1, 2, 4)
    core.cache[(1, 4, "balanced")] = Route((1, 3, 4), None, 0, 3.0)  # as a switch leaves it
    assert core.path(1, 4, backup=False).primary == (1, 3, 4)
    route = core.path(1, 4)
    assert (route.primary, route.backup, route.shared) == ((1, 3, 4), (1, 2, 4), 0)


def test_weights_parse_and_refuse_bad_input():
    assert Weights.parse("hop=2,availability=0.5") == Weights(hop=2.0, availability=0.5)
    for bad in ("speed=1", "hop=x", "hop=-1", "hop=0", "reference_bits=0"):
        with pytest.raises(ControlError):
            Weights.parse(bad)


def test_weights_fall_with_more_keys_and_more_rate():
    w = Weights()
    assert w.of(0, 0) > w.of(1 << 20, 0) > w.of(1 << 20, 10_000) > w.hop


def test_a_malformed_document_is_a_coded_error():
    for doc in ({}, {"qkdn_id": "x"}, {"qkdn_id": model.node_uuid(3), "qkd_links": 5}):
        with pytest.raises(ControlError) as caught:
            parse(doc)
        assert caught.value.code in ("CTL-DOC", "CTL-BAD-UUID")


EDGES = st.lists(st.tuples(st.integers(0, 30), st.floats(0.1, 10)), max_size=4)


@settings(deadline=None)  # a loaded CI machine: no per-example deadline
@given(
    st.dictionaries(st.integers(0, 30), EDGES, max_size=30), st.integers(0, 30), st.integers(0, 30)
)
def test_dijkstra_finds_a_connected_minimal_path(adj, src, dst):
    both: dict[int, list[tuple[int, float]]] = {}
    for a, nbs in adj.items():
        for b, w in nbs:
            if a != b:
                both.setdefault(a, []).append((b, w))
                both.setdefault(b, []).append((a, w))
    try:
        path, cost = shortest(both, src, dst)
    except NoPath:
        return
    assert path[0] == src and path[-1] == dst
    total = sum(min(w for n, w in both[a] if n == b) for a, b in itertools.pairwise(path))
    assert total == pytest.approx(cost)


LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=30)
    | st.sampled_from(
        [model.node_uuid(3), "etsi-qkd-node-types:ACTIVE", "etsi-qkd-node-types:VIRT", "0.1"]
    )
)
DOCS = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["qkdn_id", "qkd_links", "qkd_link", "qkdl_id", "qkdl_type", "qkdl_status",
                     "qkdl_local", "qkdl_remote", "virt_next_hop", "qkdl_performance"]),
    inner, max_size=6), max_leaves=20)  # fmt: skip


@given(DOCS)
def test_any_document_is_taken_or_refused_with_a_code(doc):
    core = Core()
    try:
        core.telemetry(0.0, doc)
    except ControlError as exc:
        assert exc.code in ("CTL-DOC", "CTL-BAD-UUID")


def test_an_installed_route_moves_to_the_path_with_more_key_available():
    """Load balancing: 8-9-10 drained, 8-16-10 full: the route moves; back when the roles
    turn; a small difference (within the margin) moves nothing."""
    net = Net()
    weights = Weights(availability=1.0, rate=0.0, reference_bits=100_000)
    core = started(net, weights=weights)
    via9, via16 = (8, 9, 10), (8, 16, 10)
    assert core.path(8, 10).primary == via9
    assert core.better(8, 10, via9) is None  # both full: stay
    for link in ((8, 9), (9, 10)):
        net.bits[link] = 0
    net.feed(core, 1.0)
    assert core.path_weight(via9) > core.path_weight(via16) + core.rebalance
    assert core.better(8, 10, via9) == via16
    assert core.path(8, 10).primary == via16 and core.path(8, 10).backup == via9
    for link in ((8, 9), (9, 10)):
        net.bits[link] = 1 << 20
    for link in ((8, 16), (16, 10)):
        net.bits[link] = 600_000  # a little poorer than 8-9-10 now: within the margin
    net.feed(core, 2.0)
    assert core.path_weight(via16) > core.path_weight(via9)
    assert core.better(8, 10, via16) is None
    assert core.path(8, 10).primary == via16  # the cache keeps the installed path
    for link in ((8, 16), (16, 10)):
        net.bits[link] = 0
    net.feed(core, 3.0)
    assert core.better(8, 10, via16) == via9


def test_a_route_never_moves_onto_a_link_out_of_use():
    net = Net()
    core = started(net, weights=Weights(availability=1.0, rate=0.0, reference_bits=100_000))
    for link in ((8, 9), (9, 10)):
        net.bits[link] = 0
    net.status[(8, 16)] = model.LinkStatus.OFF
    net.feed(core, 1.0)
    assert core.path_weight((8, 16, 10)) == float("inf")
    assert core.better(8, 10, (8, 9, 10)) is None


def test_a_broken_stream_is_silence_at_once_and_heartbeats_keep_a_node_alive():
    net = Net()
    core = started(net)
    core.heard_from(2.5, 9)  # heartbeats only: node 9 repeats its document
    assert core.tick(2.6) == []  # the others were heard at 0.1: not yet 3 s
    assert core.lost(2.6, 9) == []  # silence waits for the hold-off...
    changes = core.tick(2.7)
    assert {c.link for c in changes} == {model.link_uuid("L8-9"), model.link_uuid("L9-10")}
    assert all(not c.up for c in changes)


# -- the links the telemetry finds down (the manager's long poll) ------------------------
SQUARE = [(1, 2), (2, 3), (3, 4), (1, 4), (2, 4)]


def end_doc(node: int, views: dict[tuple[int, int, int], tuple[model.LinkStatus, float]]) -> dict:  # type: ignore[type-arg]
    """``node``'s document, each link's status and QBER as this end reports them."""
    links = tuple(
        model.PhysLink(
            link=f"L{a}-{b}", peer=b if a == node else a, status=views[(a, b, node)][0],
            skr=1000, eskr=1000, qber=views[(a, b, node)][1], available_bits=1 << 20, rate_bps=0,
        )
        for a, b in SQUARE
        if node in (a, b)
    )  # fmt: skip
    return model.document(model.NodeTelemetry(node=node, links=links))["etsi-qkd-sdn-node:qkd_node"]


def full_down(core: Core, been_up: set[str]) -> list[tuple[int, int]]:
    """The down list recomputed over every link, as the controller did at each document."""
    return sorted(
        (min(x.a, x.b), max(x.a, x.b))
        for lid, x in core.links.items()
        if lid in been_up and any(not e.good or e.qber > core.qber_max for e in x.ends.values())
    )


def test_an_end_good_again_during_its_hold_off_leaves_the_down_list_before_the_link_is_used():
    views = {(a, b, n): (model.LinkStatus.ACTIVE, 0.02) for a, b in SQUARE for n in (a, b)}
    core = Core()
    for t in (0.0, 0.1):
        for n in (1, 2, 3, 4):
            core.telemetry(t, end_doc(n, views))
    assert core.telemetry_down() == [] and core.usable(1, 2)
    views[(1, 2, 2)] = (model.LinkStatus.OFF, 0.02)
    core.telemetry(1.0, end_doc(2, views))
    assert core.telemetry_down() == [(1, 2)] and not core.usable(1, 2)
    views[(1, 2, 2)] = (model.LinkStatus.ACTIVE, 0.02)
    core.telemetry(1.05, end_doc(2, views))  # good again, within its wait to restore
    assert core.telemetry_down() == [] and not core.usable(1, 2)
    core.tick(1.2)
    assert core.telemetry_down() == [] and core.usable(1, 2)


STEPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("doc"),
            st.sampled_from([1, 2, 3, 4]),
            st.dictionaries(
                st.sampled_from([(a, b) for a, b in SQUARE]),
                st.tuples(st.sampled_from(list(model.LinkStatus)), st.sampled_from([0.02, 0.3])),
                max_size=3,
            ),
        ),
        st.tuples(st.just("tick"), st.sampled_from([0.01, 0.05, 0.1, 0.5, 4.0])),
        st.tuples(st.just("lost"), st.sampled_from([1, 2, 3, 4])),
        st.tuples(st.just("hold"), st.lists(st.sampled_from(SQUARE), max_size=2)),
    ),
    max_size=40,
)


@settings(deadline=None, max_examples=150)  # a loaded CI machine: no per-example deadline
@given(STEPS)
def test_the_kept_down_list_equals_the_full_recomputation_after_every_step(steps):
    views = {(a, b, n): (model.LinkStatus.ACTIVE, 0.02) for a, b in SQUARE for n in (a, b)}
    core, been_up, now = Core(), set[str](), 0.1
    for t in (0.0, 0.1):  # every link in use, then whatever the steps do
        for n in (1, 2, 3, 4):
            core.telemetry(t, end_doc(n, views))
            been_up |= {lid for lid, x in core.links.items() if x.usable}
    for step in steps:
        if step[0] == "doc":
            _, node, changed = step
            for (a, b), view in changed.items():
                if node in (a, b):
                    views[(a, b, node)] = view
            core.telemetry(now, end_doc(node, views))
        elif step[0] == "tick":
            now += step[1]
            core.tick(now)
        elif step[0] == "lost":
            core.lost(now, step[1])
        else:
            core.report(now, step[1], [], 1.0)
        been_up |= {lid for lid, x in core.links.items() if x.usable}
        assert core.telemetry_down() == full_down(core, been_up)


# -- the contract's policy class ----------------------------------------------------------
B, R = 1 << 20, 10_000
# three ways from 1 to 5: direct over a dry link, two hops of well-stocked links, three
# hops of full links
CLASS_LINKS = {
    (1, 5): (0, 0),
    (1, 2): (7 * B, 7 * R),
    (2, 5): (7 * B, 7 * R),
    (1, 3): (63 * B, 63 * R),
    (3, 4): (63 * B, 63 * R),
    (4, 5): (63 * B, 63 * R),
}


def class_doc(node: int) -> dict:  # type: ignore[type-arg]
    links = tuple(
        model.PhysLink(
            link=f"L{a}-{b}", peer=b if a == node else a, status=model.LinkStatus.ACTIVE,
            skr=eskr, eskr=eskr, qber=0.02, available_bits=bits, rate_bps=0,
        )
        for (a, b), (bits, eskr) in CLASS_LINKS.items()
        if node in (a, b)
    )  # fmt: skip
    return model.document(model.NodeTelemetry(node=node, links=links))["etsi-qkd-sdn-node:qkd_node"]


def test_each_policy_class_chooses_its_own_path_and_is_cached_apart():
    core = Core()
    for t in (0.0, 0.1):
        for n in range(1, 6):
            core.telemetry(t, class_doc(n))
    chosen = {p: core.path(1, 5, policy=p).primary for p in POLICIES}
    assert chosen == {
        "fewest-hops": (1, 5),  # one hop, though its store is empty
        "balanced": (1, 2, 5),
        "most-key": (1, 3, 4, 5),  # three hops of full stores
    }
    assert {k for k in core.cache} == {(1, 5, p) for p in POLICIES}
    # the weights are the documented formula with each class's numbers
    w = CLASSES["most-key"]
    assert core.path(1, 5, policy="most-key").weight == pytest.approx(3 * w.of(63 * B, 63 * R))


def test_policy_classes_are_configured_per_class_and_refused_with_a_code():
    policies = parse_policies("hop=2,most-key.availability=8,fewest-hops.rate=0")
    assert policies["balanced"] == Weights(hop=2.0)
    assert policies["most-key"] == Weights(hop=0.25, availability=8.0, rate=1.0)
    assert policies["fewest-hops"] == Weights(hop=1.0, availability=0.05, rate=0.0)
    assert parse_policies("") == CLASSES
    for bad in ("cheapest.hop=1", "most-key.speed=1", "most-key.hop=-1", "most-key.hop=x"):
        with pytest.raises(ControlError) as info:
            parse_policies(bad)
        assert info.value.code == "CTL-WEIGHTS" and "\n" not in str(info.value)


def test_the_classes_are_one_list_in_the_topology_the_messages_and_the_controller():
    assert get_args(topology.RoutePolicy) == get_args(messages.RoutePolicy) == POLICIES


def test_a_path_request_is_decoded_strictly():
    assert path_request(b'{"src": 2, "dst": 14}') == (2, 14, "balanced")
    assert path_request(b'{"src": 2, "dst": 14, "route_policy": "most-key"}') == (2, 14, "most-key")
    for bad in (
        {"src": 2, "dst": 14, "route_policy": "cheapest"},
        {"src": 2, "dst": 14, "route_policy": None},
        {"src": 2, "dst": 14, "user": "alice"},  # nothing of the contract travels
        {"src": True, "dst": 14},
        {"src": 2, "dst": 2},
        [2, 14],
    ):
        with pytest.raises(ControlError) as info:
            path_request(json.dumps(bad).encode())
        assert info.value.code == "CTL-REQUEST"


JSONS = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1200) | st.sampled_from([*POLICIES, "x"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["src", "dst", "route_policy", "x"]), inner, max_size=4)
    ),
    max_leaves=8,
)


@settings(deadline=None)  # a loaded CI machine: no per-example deadline
@given(st.one_of(JSONS.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)))
def test_any_path_request_body_is_taken_or_refused_with_a_code(body):
    try:
        src, dst, policy = path_request(body)
    except ControlError as exc:
        assert exc.code == "CTL-REQUEST" and "\n" not in str(exc)
    else:
        assert 0 < src < 1000 and 0 < dst < 1000 and src != dst and policy in POLICIES
