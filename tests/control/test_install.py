"""A route's install that a hop refuses leaves no half route behind: the hops that took
the slot forget it again, so that no head end relays over a route the controller does not
hold (it asks again instead). The controller's Sets go to fakes here; the real Set side is
tests/control/test_agent.py's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.control import model
from appliance.control.client import AgentUnavailable
from appliance.control.controller import Agent, Controller
from appliance.control.errors import ControlError


class FakeSets:
    """One agent's Set side: what it holds, and whether it refuses."""

    def __init__(self, node: int, refuses: bool) -> None:
        self.node, self.refuses = node, refuses
        self.held: dict[tuple[int, int, int], model.Route] = {}

    async def set_route(self, route: model.Route) -> None:
        if self.refuses:
            raise AgentUnavailable(f"node {self.node}: UNAVAILABLE", code="CTL-AGENT")
        self.held[(route.src, route.dst, route.slot)] = route

    async def delete_route(self, src: int, dst: int, slot: int) -> None:
        self.held.pop((src, dst, slot), None)


@pytest.mark.parametrize("active", [True, False])
def test_a_refused_hop_leaves_no_route_at_the_others(active: bool):
    path = (2, 3, 4, 14)
    agents = [Agent(n, f"n{n}", f"127.0.0.1:{9000 + n}") for n in path]
    controller = Controller(agents, (Path("c"), Path("k"), Path("a")), allowed=set())
    fakes = {n: FakeSets(n, refuses=n == 4) for n in path}
    controller._clients.update(fakes)  # type: ignore[arg-type]

    async def install() -> None:
        await controller._install(2, 14, path, (), 0, active)

    with pytest.raises(ControlError) as caught:
        asyncio.run(install())
    assert caught.value.code == "CTL-INSTALL"
    assert {n: f.held for n, f in fakes.items()} == {n: {} for n in path}
