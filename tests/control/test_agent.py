"""The SDN agent's gNMI service over mutual TLS: Capabilities, Get, Subscribe modes, coded
errors, and every served document valid under the ETSI 015 model and our augment."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from dataclasses import replace

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pygnmi.spec.v080 import gnmi_pb2 as pb

from appliance.control import agent, model
from appliance.control.client import (
    AgentClient,
    AgentUnavailable,
    AsyncAgentSets,
    Event,
    parse_path,
)
from appliance.control.nodeagent import SWITCH_INTERVAL_S, NodeAgent
from tests.control.agentfix import Served, data_model, free_port, telemetry, validate
from tests.kms.conftest import poll

LINK = f"/qkd_node/qkd_links/qkd_link[qkdl_id={model.link_uuid('L3-4')}]"
ROUTE = model.Route(src=1, dst=5, prev_hop=3, next_hop=16)
WAIT = 30.0


@pytest.fixture
def fresh(pki):
    s = Served(pki, free_port())
    yield s
    s.client.close()
    s.server.stop(grace=None)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40)
    | st.sampled_from(["etsi-qkd-node-types:VIRT", model.node_uuid(1), model.node_uuid(5)]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["qkdl_type", "qkdl_local", "qkdl_remote", "qkdn_id",
                         "virt_prev_hop", "virt_next_hop"]), inner, max_size=5),
    max_leaves=12,
)  # fmt: skip


@pytest.fixture(scope="module")
def routed(pki):
    """An agent with a route table, for node 4, and a client."""
    table = agent.RouteTable(4)
    me, who = pki["node-a"], pki["node-b"]
    port = free_port()
    service = agent.GnmiAgent(agent.Telemetry(telemetry()), routes=table)
    server = agent.serve(service, f"127.0.0.1:{port}", cert=me.cert, key=me.key, ca=me.ca)
    client = AgentClient(f"127.0.0.1:{port}", cert=who.cert, key=who.key, ca=who.ca,
                         timeout=WAIT)  # fmt: skip
    yield client, table
    client.close()
    server.stop(grace=None)


def until(sub, want) -> Event:  # type: ignore[no-untyped-def]
    """The first event for which ``want`` holds (bounded reads; AgentUnavailable if none)."""
    for _ in range(200):
        event = sub.next(WAIT)
        if want(event):
            return event
    raise AssertionError("no such event in 200 messages")


def test_capabilities_name_the_015_models_and_the_augment(served):
    caps = served.client.capabilities()
    names = {(m.name, m.version) for m in caps.supported_models}
    assert ("etsi-qkd-sdn-node", "2022-01-30") in names
    assert ("etsi-qkd-node-types", "2022-01-30") in names
    assert ("qkdn-control", "2026-12-03") in names
    assert list(caps.supported_encodings) == [pb.Encoding.JSON_IETF]
    assert caps.gNMI_version == "0.8.0"


def test_get_serves_015_leaves_in_json_ietf(served):
    got = served.client.get(
        "/qkd_node/qkdn_id",
        f"{LINK}/qkdl_status",
        f"{LINK}/qkdl_remote/qkdn_id",
        f"{LINK}/qkdl_performance/skr",
        f"{LINK}/qkdl_performance/eskr",
        f"{LINK}/qkdl_performance/phys_perf[perf_type=QBER]/value",
        f"{LINK}/key_store/available_bits",
        "/qkd_node/node_health/status",
    )
    assert got == [
        model.node_uuid(4),
        "etsi-qkd-node-types:ACTIVE",
        model.node_uuid(3),
        1000,
        900,
        "0.031",
        "8192",
        "ok",
    ]


def test_a_module_qualified_path_names_the_same_node(served):
    got = served.client.get("/etsi-qkd-sdn-node:qkd_node/qkdn_id")
    assert got == [model.node_uuid(4)]


def test_the_whole_document_validates_against_the_models(served):
    dm = data_model()
    (whole,) = served.client.get("/qkd_node")
    validate(dm, {"etsi-qkd-sdn-node:qkd_node": whole})
    validate(dm, model.document(telemetry(routes=(ROUTE,), status=model.LinkStatus.OFF)))


def test_the_validator_rejects_a_bad_identity_and_a_bad_uuid():
    dm = data_model()
    doc = model.document(telemetry())
    doc["etsi-qkd-sdn-node:qkd_node"]["qkd_links"]["qkd_link"][0]["qkdl_status"] = "ACTIVE"
    with pytest.raises(Exception, match="invalid-type"):
        validate(dm, doc)
    doc = model.document(telemetry())
    doc["etsi-qkd-sdn-node:qkd_node"]["qkdn_id"] = "node-4"
    with pytest.raises(Exception, match="invalid-type"):
        validate(dm, doc)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/qkd_node/no_such_leaf", "CTL-PATH-NOT-FOUND"),
        (
            "/qkd_node/qkd_links/qkd_link[qkdl_id=00000000-0000-0000-0000-000000000000]",
            "CTL-PATH-NOT-FOUND",
        ),
        ("/qkd_node/qkdn_id[k=v]", "CTL-PATH-BAD"),
        ("/qkd_node/qkd_links/qkd_link/qkdl_status", "CTL-PATH-BAD"),
    ],
)
def test_bad_paths_get_coded_errors(served, path, code):
    with pytest.raises(AgentUnavailable) as caught:
        served.client.get(path)
    assert caught.value.code == code
    assert caught.value.message.split(":")[0] in ("NOT_FOUND", "INVALID_ARGUMENT")


def test_another_encoding_is_refused_with_a_code(served):
    request = pb.GetRequest(path=[parse_path("/qkd_node/qkdn_id")], encoding=pb.Encoding.PROTO)
    with pytest.raises(grpc.RpcError) as caught:
        served.client.stub.Get(request, timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("CTL-ENCODING: ")


def test_a_client_of_another_ca_is_refused(served, pki):
    who = pki["intruder"]
    intruder = AgentClient(
        served.address, cert=who.cert, key=who.key, ca=pki["node-a"].ca, timeout=5.0
    )
    try:
        with pytest.raises(AgentUnavailable) as caught:
            intruder.get("/qkd_node/qkdn_id")
        assert caught.value.message.startswith("UNAVAILABLE")
    finally:
        intruder.close()


def test_once_sends_every_path_then_sync_then_ends(served):
    sub = served.client.subscribe("/qkd_node/qkdn_id", f"{LINK}/qkdl_status", mode="once")
    try:
        events = [sub.next(WAIT), sub.next(WAIT), sub.next(WAIT)]
        assert [e.value for e in events[:2]] == [model.node_uuid(4), "etsi-qkd-node-types:ACTIVE"]
        assert events[0].path == "/qkd_node/qkdn_id"
        assert events[2].sync
        with pytest.raises(AgentUnavailable, match="ended"):
            sub.next(WAIT)
    finally:
        sub.close()


def test_poll_answers_each_poll_with_the_current_value(fresh):
    sub = fresh.client.subscribe(f"{LINK}/key_store/available_bits", mode="poll")
    try:
        assert sub.next(WAIT).value == "8192"
        assert sub.next(WAIT).sync
        fresh.telemetry.publish(telemetry(bits=4096))
        sub.poll()
        assert sub.next(WAIT).value == "4096"
        assert sub.next(WAIT).sync
    finally:
        sub.close()


def test_stream_on_change_sends_changes_and_deletes(fresh):
    fresh.telemetry.publish(telemetry(routes=(ROUTE,)))
    route = f"/qkd_node/qkd_links/qkd_link[qkdl_id={model.route_uuid(1, 5)}]"
    sub = fresh.client.subscribe(f"{LINK}/qkdl_status", f"{route}/virt_next_hop")
    try:
        first = [sub.next(WAIT), sub.next(WAIT), sub.next(WAIT)]
        assert [e.value for e in first[:2]] == ["etsi-qkd-node-types:ACTIVE", [model.node_uuid(16)]]
        assert first[2].sync
        assert fresh.telemetry.publish(telemetry(status=model.LinkStatus.OFF, routes=(ROUTE,)))
        event = sub.next(WAIT)
        assert (event.path, event.value) == (f"{LINK}/qkdl_status", "etsi-qkd-node-types:OFF")
        fresh.telemetry.publish(telemetry(status=model.LinkStatus.OFF))
        event = sub.next(WAIT)
        assert event.deleted and event.path == f"{route}/virt_next_hop"
    finally:
        sub.close()


def test_republishing_the_same_values_is_no_change(fresh):
    assert not fresh.telemetry.publish(telemetry())
    assert fresh.telemetry.publish(telemetry(bits=1))


def test_stream_sample_repeats_the_value_every_interval(fresh):
    sub = fresh.client.subscribe("/qkd_node/qkdn_id", on_change=False, sample_ms=20)
    try:
        assert sub.next(WAIT).value == model.node_uuid(4)
        assert sub.next(WAIT).sync
        repeats = [sub.next(WAIT) for _ in range(3)]
        assert all(e.value == model.node_uuid(4) for e in repeats)
    finally:
        sub.close()


def test_stream_on_change_with_heartbeat_repeats_an_unchanged_value(fresh):
    sub = fresh.client.subscribe(f"{LINK}/qkdl_status", heartbeat_ms=20)
    try:
        values = [until(sub, lambda e: not e.sync).value for _ in range(3)]
        assert values == ["etsi-qkd-node-types:ACTIVE"] * 3
    finally:
        sub.close()


def test_subscribe_to_a_bad_path_ends_with_a_code(served):
    sub = served.client.subscribe("/qkd_node/nothing")
    try:
        with pytest.raises(AgentUnavailable) as caught:
            sub.next(WAIT)
        assert caught.value.code == "CTL-PATH-NOT-FOUND"
    finally:
        sub.close()


def test_set_installs_and_deletes_a_route_and_refuses_bad_ones(pki):
    telemetry_ = agent.Telemetry(telemetry())
    table = agent.RouteTable(4)
    port = free_port()
    me = pki["node-a"]
    service = agent.GnmiAgent(telemetry_, routes=table)
    server = agent.serve(service, f"127.0.0.1:{port}", cert=me.cert, key=me.key, ca=me.ca)
    who = pki["node-b"]
    c = AgentClient(f"127.0.0.1:{port}", cert=who.cert, key=who.key, ca=who.ca, timeout=WAIT)
    try:
        route = model.Route(src=1, dst=5, prev_hop=3, next_hop=16)
        c.set_route(route)
        assert table.routes() == (route,)
        telemetry_.publish(telemetry(routes=table.routes()))
        got = c.get(f"/qkd_node/qkd_links/qkd_link[qkdl_id={model.route_uuid(1, 5)}]/virt_prev_hop")
        assert got == [model.node_uuid(3)]
        for bad in (
            model.Route(src=1, dst=5, prev_hop=None, next_hop=16),  # node 4 is not the source
            model.Route(src=4, dst=5, prev_hop=3, next_hop=16),  # the source has no previous
            model.Route(src=1, dst=5, prev_hop=4, next_hop=16),  # a hop to itself
        ):
            with pytest.raises(AgentUnavailable) as caught:
                c.set_route(bad)
            assert caught.value.code == "CTL-SET-BAD"
        assert table.routes() == (route,)
        c.delete_route(1, 5)
        assert table.routes() == ()
    finally:
        c.close()
        server.stop(grace=None)


def _use(src: int, dst: int, slot: int, raw: bytes) -> pb.Update:
    path = parse_path(
        f"/qkd_node/qkd_links/qkd_link[qkdl_id={model.route_uuid(src, dst, slot)}]/qkdl_status"
    )
    return pb.Update(path=path, val=pb.TypedValue(json_ietf_val=raw))


def test_a_backup_installs_standby_and_one_status_set_switches_it_in_use(routed):
    """1:1 protection at a node: a route's two slots, the backup PASSIVE; a Set of both
    slots' ``qkdl_status`` swaps their use, all or nothing; the route table's version
    (the head end's "path in use changed") moves only when the use does."""
    client, table = routed

    def mine() -> list[tuple[int, bool, int | None]]:
        return sorted((r.slot, r.active, r.next_hop) for r in table.routes() if r.src == 2)

    client.set_route(model.Route(src=2, dst=7, prev_hop=3, next_hop=5))
    before = table.version
    client.set_route(model.Route(src=2, dst=7, prev_hop=3, next_hop=16, slot=1, active=False))
    assert table.version == before  # a standby backup changes no path in use
    assert mine() == [(0, True, 5), (1, False, 16)]
    asyncio.run(client.set_use_started(2, 7, {1: True, 0: False}).confirmed())  # from a loop
    assert table.version == before + 1
    assert mine() == [(0, False, 5), (1, True, 16)]
    validate(data_model(), model.document(telemetry(routes=table.routes())))
    active = b'"etsi-qkd-node-types:ACTIVE"'
    refused = [
        [_use(2, 7, 0, active), _use(2, 9, 1, active)],  # 2->9 is not installed here
        [_use(2, 7, 0, b'"etsi-qkd-node-types:OFF"')],
        [_use(2, 7, 0, b"1")],
        [_use(2, 7, 0, b"{")],
    ]
    for updates in refused:
        with pytest.raises(grpc.RpcError) as bad:
            client.stub.Set(pb.SetRequest(update=updates), timeout=WAIT)
        assert bad.value.details().startswith("CTL-SET-BAD: ")
    assert mine() == [(0, False, 5), (1, True, 16)]  # nothing of the refused Sets applied
    assert table.version == before + 1
    client.delete_route(2, 7, 1)
    client.delete_route(2, 7)
    assert mine() == []


def test_a_head_end_holds_the_explicit_route_of_its_path_in_use(routed):
    client, table = routed
    head = model.Route(src=4, dst=7, prev_hop=None, next_hop=5, explicit=(4, 5, 6, 7))
    client.set_route(head)
    assert table.in_use(4, 7) == (4, 5, 6, 7)
    validate(data_model(), model.document(telemetry(routes=table.routes())))
    for explicit in ((4, 6, 7), (4, 5, 4, 7), (4, 5, 6), (4, 5, *range(100, 170), 7)):
        with pytest.raises(AgentUnavailable) as caught:
            client.set_route(replace(head, explicit=explicit))
        assert caught.value.code == "CTL-SET-BAD"
    with pytest.raises(AgentUnavailable):  # not the head end here
        client.set_route(
            model.Route(src=2, dst=7, prev_hop=3, next_hop=5, explicit=(2, 3, 4, 5, 7))
        )
    client.set_route(replace(head, next_hop=6, explicit=(4, 6, 7), slot=1, active=False))
    assert table.in_use(4, 7) == (4, 5, 6, 7)  # the standby is not in use
    client.set_use_started(4, 7, {0: False, 1: True}).wait()
    assert table.in_use(4, 7) == (4, 6, 7)
    client.delete_route(4, 7, 1)
    client.delete_route(4, 7)
    assert table.in_use(4, 7) is None


def test_each_route_a_set_installs_names_its_next_hop_to_the_node(routed):
    """The node readies the link to a route's next hop when the route is installed, in use
    or standby (NodeAgent hands it to the CKMS engine: LinkWanted), once the Set's call
    ended; a switch of use, a removal, a refused Set and the route's last hop name none."""
    client, table = routed
    heard: list[int] = []
    table.on_next_hop = heard.append
    try:
        client.set_route(model.Route(src=2, dst=9, prev_hop=3, next_hop=5))
        client.set_route(model.Route(src=2, dst=9, prev_hop=3, next_hop=16, slot=1, active=False))
        client.set_use_started(2, 9, {1: True, 0: False}).wait()
        client.set_route(model.Route(src=2, dst=4, prev_hop=3, next_hop=None))  # ends here
        with pytest.raises(AgentUnavailable):
            client.set_route(model.Route(src=2, dst=9, prev_hop=4, next_hop=6))
        client.delete_route(2, 9, 1)
        # named once each Set's call ended (after its answer left): bounded polling
        poll(lambda: len(heard) >= 2 or None, "the next hops named", timeout=WAIT)
        assert sorted(heard) == [5, 16]
    finally:
        table.on_next_hop = None
        for slot in (0, 1):
            client.delete_route(2, 9, slot)
        client.delete_route(2, 4)


def test_the_controllers_sets_on_the_event_loop_install_switch_and_remove(routed, pki):
    """AsyncAgentSets (the controller's Set side on grpc.aio): the same Sets as the
    blocking client, a refusal with its code, its channel opened ahead by connect()."""
    client, table = routed
    who = pki["node-b"]
    address = client.address

    async def run() -> None:
        sets = AsyncAgentSets(address, cert=who.cert, key=who.key, ca=who.ca, timeout=WAIT)
        try:
            assert await sets.connect(WAIT)
            await asyncio.gather(
                sets.set_route(model.Route(src=2, dst=8, prev_hop=3, next_hop=5)),
                sets.set_route(
                    model.Route(src=2, dst=8, prev_hop=3, next_hop=16, slot=1, active=False)
                ),
            )
            await sets.set_use(2, 8, {1: True, 0: False})
            assert sorted((r.slot, r.active) for r in table.routes() if r.dst == 8) == [
                (0, False),
                (1, True),
            ]
            with pytest.raises(AgentUnavailable) as caught:
                await sets.set_route(model.Route(src=2, dst=8, prev_hop=4, next_hop=6))
            assert caught.value.code == "CTL-SET-BAD"
            for slot in (0, 1):
                await sets.delete_route(2, 8, slot)
            assert [r for r in table.routes() if r.dst == 8] == []
        finally:
            await sets.close()

    asyncio.run(run())


def test_set_without_a_route_table_is_unimplemented(served):
    with pytest.raises(AgentUnavailable) as caught:
        served.client.set_route(model.Route(src=1, dst=5, prev_hop=3, next_hop=16))
    assert caught.value.message.startswith("UNIMPLEMENTED")


@given(st.binary(max_size=300) | st.builds(lambda d: json.dumps(d).encode(), JSONISH))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_set_value_installs_a_route_or_is_refused_with_a_code(routed, raw):
    client, table = routed
    path = parse_path(f"/qkd_node/qkd_links/qkd_link[qkdl_id={model.route_uuid(1, 5)}]")
    request = pb.SetRequest(update=[pb.Update(path=path, val=pb.TypedValue(json_ietf_val=raw))])
    try:
        client.stub.Set(request, timeout=WAIT)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.details().startswith("CTL-SET-BAD: ")
        return
    assert any((r.src, r.dst) == (1, 5) for r in table.routes())  # accepted: installed


def test_the_agent_knows_while_a_stream_is_subscribed(fresh):
    """The node publishes often only while someone streams (appliance/control/nodeagent)."""
    opened: list[bool] = []
    fresh.telemetry.on_stream = lambda: opened.append(True)
    assert not fresh.telemetry.streaming
    once = fresh.client.subscribe("/qkd_node/qkdn_id", mode="once")
    try:
        assert once.next(WAIT).value == model.node_uuid(4)
    finally:
        once.close()
    assert not fresh.telemetry.streaming and opened == []  # ONCE is no stream
    sub = fresh.client.subscribe(f"{LINK}/qkdl_status")
    try:
        assert sub.next(WAIT).value == "etsi-qkd-node-types:ACTIVE"
        assert fresh.telemetry.streaming and opened == [True]
    finally:
        sub.close()
    poll(lambda: not fresh.telemetry.streaming, "the stream's end seen by the agent")


class Stepped:
    """A gRPC context for a Subscribe called in-process: each look at ``is_active`` moves
    an injected clock 0.25 s on, and publishes a change every other look until
    ``changes_until``; inactive after ``end``."""

    def __init__(self, feed: agent.Telemetry, changes_until: float, end: float):
        self.now, self.feed, self.looks = 0.0, feed, 0
        self.changes_until, self.end = changes_until, end

    def is_active(self) -> bool:
        self.now += 0.25
        self.looks += 1
        if self.now <= self.changes_until and self.looks % 2 == 0:
            self.feed.publish(telemetry(bits=8 * self.looks))
        return self.now < self.end

    def abort(self, code, details):  # type: ignore[no-untyped-def]
        raise AssertionError(f"aborted: {details}")


def test_an_on_change_update_is_the_heartbeat_and_silence_still_beats_once_per_interval(
    monkeypatch,
):
    """Changes every 0.5 s until 3 s, then none until 4.5 s; heartbeat 0.75 s: no repeat
    while changes flow, and no gap between updates longer than the interval after."""
    monkeypatch.setattr(agent, "WAKE_S", 0.005)  # a look without a change waits this long
    feed = agent.Telemetry(telemetry())
    ctx = Stepped(feed, changes_until=3.0, end=4.5)
    service = agent.GnmiAgent(feed, clock=lambda: ctx.now)
    sub = pb.Subscription(path=parse_path("/qkd_node"), heartbeat_interval=750_000_000)
    request = pb.SubscribeRequest(
        subscribe=pb.SubscriptionList(subscription=[sub], mode=0, encoding=pb.JSON_IETF)
    )
    sent = []
    for answer in service.Subscribe(iter([request]), ctx):
        if answer.HasField("update"):
            sent.append((ctx.now, answer.update.update[0].val.json_ietf_val))
    times = [t for t, _ in sent]
    assert len([t for t in times if t <= 3.0]) == 7  # the first document and 6 changes
    repeats = [t for (_, w), (t, v) in itertools.pairwise(sent) if v == w]
    assert repeats and min(repeats) > 3.0  # heartbeats only once the changes stop
    assert max(b - a for a, b in itertools.pairwise(times)) <= 0.75 + 0.25


def test_a_started_node_agent_lets_its_grpc_threads_have_the_gil_within_a_millisecond(pki):
    """A node's agent shortens the interpreter's switch interval (its gRPC threads wait for
    the GIL while the node's loop relays: a fault's publication, a head end's switch)."""
    me = pki["node-a"]
    before = sys.getswitchinterval()

    async def run() -> float:
        node = NodeAgent(4, [], {}, lambda: (0, 0))
        node.start(f"127.0.0.1:{free_port()}", (me.cert, me.key, me.ca))
        try:
            return sys.getswitchinterval()
        finally:
            node.close()

    try:
        assert asyncio.run(run()) == pytest.approx(SWITCH_INTERVAL_S)
    finally:
        sys.setswitchinterval(before)
