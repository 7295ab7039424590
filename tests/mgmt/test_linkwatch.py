"""A link state change reaches the agent's detector: :class:`LinkWatch` wakes the agent
SETTLE_S after a QKD module's state changes (read every LINK_POLL_S, or reported by the
driver), and :meth:`Agent.look` makes the agent read the node without waiting for its
period (the period is set to an hour here, so only a look can cause a second reading)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import pytest

import hal
from appliance.mgmt import agent as agent_module
from appliance.mgmt import nodestate
from appliance.mgmt.agent import Agent, AgentConfig, AgentUser
from appliance.mgmt.nodestate import LinkWatch
from appliance.mgmt.nodeview import LinkReading, NodeReading


class Module(hal.Qkdm):
    """A QKD module whose link state the test sets (no keys)."""

    def __init__(self) -> None:
        self.state = hal.LinkState.UP
        self.reads = 0

    def get_key(self) -> hal.QkdKey:
        raise hal.NoKeyAvailable("none")

    def get_key_by_id(self, key_id: str) -> hal.QkdKey:
        raise hal.KeyNotFound(key_id)

    def key_count(self) -> int:
        return 0

    def status(self) -> hal.QkdmStatus:
        self.reads += 1
        return hal.QkdmStatus(
            link="link-8-9", state=self.state, skr_bps=0.0, qber=None, key_count=0,
            max_key_count=10, key_size=256, keys_produced=0,
        )  # fmt: skip


async def _watch_wakes_on_a_change() -> int:
    module, woken = Module(), threading.Event()
    watch = LinkWatch([module], woken.set)
    watch.start()
    try:
        for _ in range(3000):  # read again and again: no change, no wake
            if module.reads >= 3:
                break
            await asyncio.sleep(0.01)
        assert module.reads >= 3 and not woken.is_set()
        module.state = hal.LinkState.DOWN
        for _ in range(3000):
            if woken.is_set():
                break
            await asyncio.sleep(0.01)
        assert woken.is_set()
    finally:
        await watch.close()
    return len(module._watchers())  # unsubscribed on close


def test_a_link_state_change_wakes_the_agent(monkeypatch: pytest.MonkeyPatch):
    # this module reports nothing itself: the watch's periodic read finds the change
    monkeypatch.setattr(nodestate, "LINK_POLL_S", 0.01)
    assert asyncio.run(_watch_wakes_on_a_change()) == 0


def test_the_watch_wakes_the_agent_only_once_the_change_settled(monkeypatch: pytest.MonkeyPatch):
    # the look (and its INFORM) waits `settle` seconds: the relays switched over first
    monkeypatch.setattr(nodestate, "LINK_POLL_S", 0.01)

    async def run() -> tuple[int, bool, int]:
        module, woken = Module(), threading.Event()
        watch = LinkWatch([module], woken.set, settle=3600.0)
        watch.start()
        try:
            module.state = hal.LinkState.DOWN
            for _ in range(3000):  # bounded: the periodic read finds the change
                if watch.pending:
                    break
                await asyncio.sleep(0.01)
            pending, early = len(watch.pending), woken.is_set()
        finally:
            await watch.close()
        return pending, early, len(watch.pending)

    assert asyncio.run(run()) == (1, False, 0)  # due in an hour; cancelled on close


def test_a_look_reads_the_node_before_the_period_ends(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(agent_module, "POLL_S", 3600.0)
    reads: list[int] = []
    link = LinkReading(peer=9, name="link-8-9", state="up")

    def read() -> NodeReading:
        reads.append(1)
        state = "up" if len(reads) == 1 else "down"
        return NodeReading(
            id=8, name="ckms-minden", role="ckms", software="qkdn", links=(
                dataclasses.replace(link, state=state),
            ),
        )  # fmt: skip

    async def run() -> list[Any]:
        user = AgentUser(user="manager-8", auth="manager-auth-8", priv="manager-priv-8")
        agent = Agent("ckms-minden", read, AgentConfig(users=[user]))
        await agent.start()
        try:
            for _ in range(3000):
                if reads:
                    break
                await asyncio.sleep(0.01)
            agent.look()
            for _ in range(3000):
                if len(reads) >= 2:
                    break
                await asyncio.sleep(0.01)
            return [agent.detector.last.links[0].state if agent.detector.last else None]
        finally:
            await agent.close()

    assert asyncio.run(run()) == ["down"]
    assert len(reads) == 2
