"""The manager's link to the QKDN Controller: its sans-IO view, alarm correlation in the
store, the core's holds, and the real link (HTTP/2, mutual TLS, the test PKI) between a
:class:`ControllerLink` and a running :class:`Controller` fed telemetry documents."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from appliance.config.addresses import join_host_port
from appliance.control import model
from appliance.control.controller import Controller
from appliance.control.graph import Core
from appliance.mgmt.control import SILENT_POLLS, ControllerLink, ControlView
from appliance.mgmt.store import Store
from appliance.net.h2 import H2Client
from appliance.pki import client_context
from tests.control.agentfix import free_port
from tests.pki_fixture import Identity, pki  # noqa: F401 - the shared PKI fixture

NAMES = {frozenset((2, 8)): "link-2-8", frozenset((8, 3)): "link-8-3"}
IDS = {"akms-east": 2, "ckms-middle": 8, "akms-west": 3}


def view() -> ControlView:
    return ControlView(names=dict(NAMES), ids=dict(IDS))


def test_the_view_reports_links_an_answering_agent_finds_down_and_silent_nodes():
    v = view()
    assert v.report() == ([], [])
    assert v.end("akms-east", 8, "up") is False
    assert v.end("akms-east", 8, "down") is True
    assert v.end("ckms-middle", 2, "down") is False  # the same link: no new report
    assert v.report() == ([[2, 8]], [])
    assert v.node("ckms-middle", reachable=True) is False
    assert v.node("akms-east", reachable=True) is False
    assert v.node("ckms-middle", reachable=False) is False  # one missed poll: not yet
    assert v.node("ckms-middle", reachable=False) is True  # SILENT_POLLS in a row
    assert v.report() == ([[2, 8]], [8])  # akms-east still answers and reports it
    v.node("akms-east", reachable=False)
    v.node("akms-east", reachable=False)
    assert v.report() == ([], [2, 8])  # a silent agent's link reports no longer count
    v.node("akms-east", reachable=True)
    v.node("ckms-middle", reachable=True)
    v.end("akms-east", 8, "up")
    v.end("ckms-middle", 2, "up")
    assert v.report() == ([], [])
    v.end("stranger", 2, "down")  # not an agent of the configuration
    assert v.report() == ([], [])


def test_a_node_never_heard_is_not_reported_down_until_it_answered_once():
    """At a network's start the manager polls nodes still starting: not a fault."""
    v = view()
    for _ in range(5):
        assert v.node("ckms-middle", reachable=False) is False
    assert v.report() == ([], [])
    assert v.node("ckms-middle", reachable=True) is False  # heard: nothing to let go
    v.node("ckms-middle", reachable=False)
    assert v.node("ckms-middle", reachable=False) is True  # silent since it answered
    assert v.report() == ([], [8])


def test_a_node_that_answers_between_missed_polls_is_never_reported_down():
    v = view()
    for _ in range(5):
        assert v.node("ckms-middle", reachable=False) is False
        assert v.node("ckms-middle", reachable=True) is False
    assert v.report() == ([], [])
    assert SILENT_POLLS == 2
    v.node("ckms-middle", reachable=False)
    v.node("ckms-middle", reachable=False)
    v.node("ckms-middle", reachable=False)
    assert v.report() == ([], [8])
    assert v.node("ckms-middle", reachable=True) is True  # one answer lets go at once
    assert v.report() == ([], [])


def test_the_controllers_down_links_become_raises_and_clears_by_link_name():
    v = view()
    assert v.from_controller([[8, 2]]) == [("qkdnLinkDown", "link-2-8")]
    assert v.from_controller([[2, 8]]) == []  # either order, no new change
    assert v.from_controller([[3, 8], [9, 10], [4, 4]]) == [
        ("qkdnLinkDown", "link-8-3"),
        ("qkdnLinkUp", "link-2-8"),
    ]  # a link outside the topology and a loop are left out
    assert v.from_controller([]) == [("qkdnLinkUp", "link-8-3")]


def test_agents_and_controller_reports_of_one_link_are_one_alarm(tmp_path: Path):
    store = Store(tmp_path / "m.db")
    first = store.notify("qkdnLinkDown", "qkdn-controller", "major", "link-2-8", "controller")
    assert store.notify("qkdnLinkDown", "akms-east", "major", "link-2-8", "link down") == first
    assert store.notify("qkdnLinkDown", "ckms-middle", "major", "link-2-8", "link down") == first
    store.notify("qkdnLinkDown", "akms-east", "major", "link-2-8", "link down")
    [alarm] = store.alarms()
    assert alarm.reports == 4 and alarm.sources == "qkdn-controller,akms-east,ckms-middle"
    assert store.notify("qkdnLinkUp", "qkdn-controller", "cleared", "link-2-8", "up") == first
    assert store.alarms() == []  # the first clear from any reporter clears it
    assert store.notify("qkdnLinkUp", "akms-east", "cleared", "link-2-8", "up") is None


def test_a_database_of_before_the_sources_column_gains_it(tmp_path: Path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.execute(
        "CREATE TABLE alarms (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, resource TEXT NOT "
        "NULL, node TEXT NOT NULL, severity TEXT NOT NULL, text TEXT NOT NULL, raised REAL NOT "
        "NULL, updated REAL NOT NULL, cleared REAL, acked_by TEXT, acked REAL, reports INTEGER "
        "NOT NULL DEFAULT 1)"
    )
    db.commit()
    db.close()
    store = Store(tmp_path / "old.db")
    store.notify("qkdnLinkDown", "akms-east", "major", "link-2-8", "down")
    assert store.alarms()[0].sources == "akms-east"


def doc(node: int, peer: int, status: model.LinkStatus) -> dict:  # type: ignore[type-arg]
    link = model.PhysLink(
        link="L2-8", peer=peer, status=status, skr=10_000, eskr=10_000, qber=0.01,
        available_bits=1 << 20, rate_bps=0,
    )  # fmt: skip
    t = model.NodeTelemetry(node=node, links=(link,), routes=())
    return model.document(t)["etsi-qkd-sdn-node:qkd_node"]


def test_the_core_holds_what_the_manager_reports_until_its_time_to_live_ends():
    core = Core(hold_off=0.1)
    core.telemetry(0.0, doc(2, 8, model.LinkStatus.PENDING))
    core.telemetry(0.0, doc(8, 2, model.LinkStatus.ACTIVE))
    assert core.telemetry_down() == []  # never up yet: not a fault
    for now in (0.0, 0.2):
        core.telemetry(now, doc(2, 8, model.LinkStatus.ACTIVE))
        core.telemetry(now, doc(8, 2, model.LinkStatus.ACTIVE))
    assert core.usable(2, 8) and core.telemetry_down() == []
    core.report(0.3, [(8, 2)], [], ttl=5.0)
    core.tick(0.45)
    assert not core.usable(2, 8) and core.held(2, 8, 0.45)
    assert core.telemetry_down() == []  # the manager's hold is not telemetry's finding
    core.report(0.5, [], [8], ttl=5.0)  # node 8 silent: its links are held
    for now in (0.6, 0.8):
        core.telemetry(now, doc(2, 8, model.LinkStatus.ACTIVE))
        core.telemetry(now, doc(8, 2, model.LinkStatus.ACTIVE))
    assert not core.usable(2, 8)
    core.tick(5.6)  # the report's time to live ended: telemetry alone decides
    for now in (5.6, 5.8):
        core.telemetry(now, doc(2, 8, model.LinkStatus.ACTIVE))
        core.telemetry(now, doc(8, 2, model.LinkStatus.ACTIVE))
    assert core.usable(2, 8) and not core.held(2, 8, 5.8)
    assert core.telemetry_down() == []  # both nodes silent: no report of a fault
    core.telemetry(9.0, doc(2, 8, model.LinkStatus.OFF))
    assert core.telemetry_down() == [(2, 8)]


async def feed(controller: Controller, status: dict[str, model.LinkStatus]) -> None:
    """Both ends' telemetry every 0.1 s, as their agents' streams would bring it."""
    while True:
        now = time.monotonic()
        controller.core.telemetry(now, doc(2, 8, status["now"]))
        controller.core.telemetry(now, doc(8, 2, status["now"]))
        await asyncio.sleep(0.1)


async def until(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def test_the_manager_and_the_controller_tell_each_other_over_mutual_tls(
    pki: dict[str, Identity],  # noqa: F811
):
    asyncio.run(_exchange(pki))


async def _exchange(pki: dict[str, Identity]) -> None:  # noqa: F811
    ctl, mgr, sae = pki["node-a"], pki["node-b"], pki["sae-1"]
    controller = Controller(
        [], (ctl.cert, ctl.key, ctl.ca), allowed={"node-a"}, managers=frozenset({"node-b"})
    )
    api = join_host_port("127.0.0.1", free_port())
    await controller.start(api)
    status = {"now": model.LinkStatus.ACTIVE}
    feeder = asyncio.ensure_future(feed(controller, status))
    heard: list[tuple[str, str]] = []
    v = view()
    link = ControllerLink(
        v, api, "node-a", (mgr.cert, mgr.key, mgr.ca), ttl_s=30.0,
        on_change=lambda n, name: heard.append((n, name)),
    )  # fmt: skip
    link.start()
    try:
        await until(lambda: controller.core.usable(2, 8), "the link usable")
        # the manager learns over SNMP that the link is down: the controller holds it down
        v.end("akms-east", 8, "down")
        link.tell()
        await until(lambda: not controller.core.usable(2, 8), "held down by the manager")
        [row] = controller.routes()["links"]
        assert row["manager"] is True and row["usable"] is False
        assert heard == []  # a hold of the manager's is not sent back as telemetry's
        v.end("akms-east", 8, "up")
        link.tell()
        await until(lambda: controller.core.usable(2, 8), "released by the manager")
        # the telemetry finds the link down: the manager hears it as the link's alarm
        status["now"] = model.LinkStatus.OFF
        await until(lambda: heard == [("qkdnLinkDown", "link-2-8")], "the down event")
        status["now"] = model.LinkStatus.ACTIVE
        await until(lambda: heard[-1] == ("qkdnLinkUp", "link-2-8"), "the up event")
        # only a manager node of the network may report or follow
        client = H2Client(
            "127.0.0.1", int(api.rsplit(":", 1)[1]),
            client_context(sae.cert, sae.key, sae.ca, ("h2",)),
        )  # fmt: skip
        body = json.dumps({"links": [[2, 8]], "nodes": [], "ttl_s": 30}).encode()
        refused = await client.request("POST", "/v1/faults", body)
        assert refused.status == 403 and b"CTL-DENIED" in refused.body
        await client.close()
        manager = H2Client("127.0.0.1", int(api.rsplit(":", 1)[1]), client_context(
            mgr.cert, mgr.key, mgr.ca, ("h2",)
        ))  # fmt: skip
        for bad in (b"{", b'{"links": [[2, 8]], "nodes": [], "ttl_s": 0}', b"x" * 70_000):
            answer = await manager.request("POST", "/v1/faults", bad)
            assert answer.status == 400 and b"CTL-REQUEST" in answer.body
        for bad in (b"[]", b'{"after": "x"}', b'{"after": 1, "wait_s": 99}'):
            answer = await manager.request("POST", "/v1/events", bad)
            assert answer.status == 400 and b"CTL-REQUEST" in answer.body
        path = await manager.request("POST", "/v1/path", b'{"src": 2, "dst": 8}')
        assert path.status == 403  # a manager asks for no path
        await manager.close()
        assert controller.core.held_links == {}  # refused reports held nothing
        await until(lambda: controller.core.usable(2, 8), "usable again")
    finally:
        feeder.cancel()
        await link.close()
        await controller.close()
