"""1:1 protection in the controller, its agents replaced by route tables (no network): the
backup pre-installed at every hop in its standby slot (head end last), a link failure
switched by one Set at the head end before anything else is sent, a new backup afterwards,
and a restarted controller taking on both paths from the agents' documents."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from appliance.control import model
from appliance.control.agent import RouteTable
from appliance.control.controller import Agent, Controller
from tests.control.test_graph import Net

VIA9 = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14)
VIA16 = (2, 3, 4, 5, 6, 7, 8, 16, 10, 11, 12, 13, 14)


class Hop:
    """An agent's Set side over a real route table; every Set is logged in ``sent``."""

    def __init__(self, node: int, sent: list[tuple[Any, ...]]) -> None:
        self.table, self.sent = RouteTable(node), sent

    async def set_route(self, route: model.Route) -> None:
        self.sent.append(("route", self.table.node, route.slot, route.active))
        self.table.apply([route], [])

    async def set_use(self, src: int, dst: int, slots: dict[int, bool]) -> None:
        self.sent.append(("use", self.table.node, slots))
        self.table.apply([], [], {model.route_uuid(src, dst, s): a for s, a in slots.items()})

    async def delete_route(self, src: int, dst: int, slot: int = 0) -> None:
        self.sent.append(("delete", self.table.node, slot))
        self.table.apply([], [model.route_uuid(src, dst, slot)])


def controller(net: Net, hops: dict[int, Hop]) -> Controller:
    agents = [Agent(n, f"ckms-{n}", "127.0.0.1:1") for n in net.nodes()]
    ctl = Controller(agents, (Path("c"), Path("k"), Path("a")), allowed=set(), hold_off=0.0)
    ctl.core.dead_after = 3600.0  # no silence in this test, however slow the machine
    ctl._client = hops.__getitem__  # type: ignore[assignment,method-assign]
    return ctl


def feed(ctl: Controller, net: Net, hops: dict[int, Hop]) -> None:
    """Every node's document, with the routes its table holds, twice (links up)."""
    for _ in range(2):
        for node in net.nodes():
            net.routes[node] = list(hops[node].table.routes())
            ctl._document(json.dumps(net.doc(node)).encode())


def in_use(hops: dict[int, Hop]) -> dict[int, list[tuple[int, bool]]]:
    return {n: [(r.slot, r.active) for r in h.table.routes()] for n, h in hops.items()}


def test_a_backup_is_pre_installed_switched_at_the_head_end_and_rebuilt_after_a_restart():
    async def main() -> None:
        net, sent = Net(), []
        hops = {n: Hop(n, sent) for n in net.nodes()}
        ctl = controller(net, hops)
        feed(ctl, net, hops)
        assert await ctl.path(2, 14) == (VIA9, None)  # answered once in use at every hop
        assert {s[1] for s in sent} == set(VIA9) and all(s[2:] == (0, True) for s in sent)
        await ctl.settle()  # the backup, off the request's way
        standby = sent[len(VIA9) :]
        assert [s[1] for s in standby if s[0] == "route"][-1] == 2  # head end last
        assert {s[1] for s in standby} == set(VIA16)
        assert all(s[2:] == (1, False) for s in standby)
        assert ctl.standby[(2, 14)] == VIA16
        version = hops[2].table.version

        net.status[(8, 9)] = model.LinkStatus.OFF  # the fault: node 8 reports it first
        net.routes[8] = list(hops[8].table.routes())
        mark = len(sent)
        ctl._document(json.dumps(net.doc(8)).encode())
        await ctl.settle()
        assert sent[mark] == ("use", 2, {0: False, 1: True})  # one Set, at the head end
        assert ctl.confirmed[(2, 14)] == VIA16 and hops[2].table.version == version + 1
        # afterwards: the other hops show the use; no backup exists around 8-16 (8-9 down)
        assert ctl.standby[(2, 14)] is None
        assert all(u == [(1, True)] for n, u in in_use(hops).items() if n in VIA16)
        assert all(u == [] for n, u in in_use(hops).items() if n not in VIA16)

        net.status[(8, 9)] = model.LinkStatus.ACTIVE  # back: the next look pre-installs it
        feed(ctl, net, hops)
        ctl._balance()
        await ctl.settle()
        assert ctl.confirmed[(2, 14)] == VIA16 and ctl.standby[(2, 14)] == VIA9
        assert in_use(hops)[9] == [(0, False)] and in_use(hops)[16] == [(1, True)]

        again = controller(net, hops)  # restarted: rebuilt from the agents' documents
        feed(again, net, hops)
        assert again.confirmed == {(2, 14): VIA16} and again.standby == {(2, 14): VIA9}
        route = again.routes()["routes"][0]
        assert (route["path"], route["backup"]) == (list(VIA16), list(VIA9))
        net.status[(8, 16)] = model.LinkStatus.OFF  # a fault switches back, one Set again
        net.routes[8] = list(hops[8].table.routes())
        mark = len(sent)
        again._document(json.dumps(net.doc(8)).encode())
        await again.settle()
        assert sent[mark] == ("use", 2, {0: True, 1: False})
        assert again.confirmed[(2, 14)] == VIA9

    asyncio.run(main())
