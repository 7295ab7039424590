"""A node's SNMPv3 agent and the manager's receiver against real net-snmp peers: snmpget,
snmpwalk and snmpbulkwalk per role, refusals counted, traps and INFORMs to snmptrapd and
to the manager, and the manager accepting net-snmp's senders only when authorised.

One agent (over a reading the test changes) and one manager run in a thread of their own
(their own event loop), shared by the tests of this module."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.mgmt import mib
from appliance.mgmt.agent import Agent, AgentConfig, AgentUser, Receiver, engine_id
from appliance.mgmt.manager import AgentEntry, Manager, ManagerConfig, Sender
from appliance.mgmt.nodeview import LinkReading, NodeReading
from appliance.mgmt.store import Store
from appliance.snmp.usm import Credentials
from tests.kms.conftest import poll
from tests.mgmt.snmp_fixture import TrapDaemon, free_udp_port, snmp, snmptrapd

T = TypeVar("T")
MANAGER = AgentUser(user="manager-8", auth="manager-auth-8", priv="manager-priv-8")
MONITOR = AgentUser(user="monitor-8", auth="monitor-auth-8", priv="monitor-priv-8", role="monitor")
NOTIFY = Credentials(user="notify-8", auth="notify-auth-8", priv="notify-priv-8")
TRAPS = Credentials(user="traps-8", auth="traps-auth-88", priv="traps-priv-88")
SENDER = Credentials(user="noc-tool", auth="noc-tool-auth", priv="noc-tool-priv")
STRANGER = Credentials(user="stranger", auth="stranger-auth", priv="stranger-priv")
SENDER_ENGINE = bytes.fromhex("80007ed9046e6f632d746f6f6c")
LINK = LinkReading(
    peer=9,
    name="link-8-9",
    state="up",
    skr=22_700,
    qber_ppm=17_000,
    level=500,
    capacity=100_000,
    key_size=256,
    produced=9_000,
    consumed=12,
)


@dataclasses.dataclass
class Peers:
    loop: asyncio.AbstractEventLoop
    agent: Agent
    manager: Manager
    store: Store
    address: str
    manager_address: str
    traps: TrapDaemon
    state: dict[str, Any]

    def call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)


def _reading(state: dict[str, Any]) -> Callable[[], NodeReading]:
    def read() -> NodeReading:
        state["reads"] += 1
        link = dataclasses.replace(LINK, state=state["link"], level=500 + state["reads"])
        return NodeReading(
            id=8,
            name="ckms-minden",
            role="ckms",
            software="qkdn 0.1.0",
            links=(link,),
            requests=state["reads"],
            failures={"KMS-UNREACHABLE": 2},
        )

    return read


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    tmp = tmp_path_factory.mktemp("mgmt-agent")
    notifier = engine_id("ckms-minden", "n")
    with snmptrapd(tmp, informs=[NOTIFY], traps=[(TRAPS, notifier)]) as traps:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        state = {"reads": 0, "link": "up"}
        store = Store(tmp / "manager.db")
        mport = free_udp_port()
        entry = AgentEntry(
            name="ckms-minden",
            id=8,
            role="ckms",
            address="127.0.0.1:9",
            poll=MANAGER,
            notify=NOTIFY,
        )
        mcfg = ManagerConfig(
            traps=f"127.0.0.1:{mport}",
            poll_s=3600,
            agents=[entry],
            senders=[Sender(**SENDER.model_dump(), engine=SENDER_ENGINE.hex())],
        )
        acfg = AgentConfig(
            users=[MANAGER, MONITOR],
            inform=Receiver(**NOTIFY.model_dump(), address=f"127.0.0.1:{mport}"),
            traps=[Receiver(**TRAPS.model_dump(), address=traps.address)],
        )

        async def boot() -> tuple[Agent, Manager]:
            manager = Manager(mcfg, store)
            await manager.start()
            agent = Agent("ckms-minden", _reading(state), acfg)
            await agent.start()
            return agent, manager

        agent, manager = asyncio.run_coroutine_threadsafe(boot(), loop).result(30)
        yield Peers(
            loop,
            agent,
            manager,
            store,
            f"127.0.0.1:{agent.port}",
            f"127.0.0.1:{mport}",
            traps,
            state,
        )

        async def stop() -> None:
            await agent.close()
            await manager.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        store.close()


def _ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0 and "Timeout" not in out.stderr, out.stderr
    return out.stdout


def _fast(peers: Peers) -> int:
    """GETs and GETBULKs the agent answered on its fast path (appliance.snmp.fastpath)."""
    served = peers.agent.served
    assert served is not None
    return served.fast.answered


def test_manager_role_gets_live_values_and_walks_the_whole_mib(peers: Peers):
    fast = peers.call(lambda: _fast(peers))
    first = _ok(snmp("snmpget", peers.address, "QKDN-MIB::qkdnLinkKeyLevel.9", user=MANAGER))
    second = _ok(snmp("snmpget", peers.address, "QKDN-MIB::qkdnLinkKeyLevel.9", user=MANAGER))
    assert first != second  # every GET reads the node again
    assert peers.call(lambda: _fast(peers)) >= fast + 2  # net-snmp's GETs took the fast path
    walk = _ok(snmp("snmpwalk", peers.address, "QKDN-MIB::qkdnMIB", user=MANAGER))
    bulk = _ok(snmp("snmpbulkwalk", peers.address, "QKDN-MIB::qkdnMIB", user=MANAGER))
    for text in (walk, bulk):
        assert 'qkdnNodeName.0 = STRING: "ckms-minden"' in text
        assert "qkdnLinkState.9 = INTEGER: up(1)" in text
        assert 'qkdnFailureCount."KMS-UNREACHABLE" = Counter64: 2' in text
        assert "qkdnKeystoreState.0" in text
    names = {line.split(" = ")[0].split("::")[1].split(".")[0] for line in walk.splitlines()}
    readable = {o.name for o in mib.load().values() if o.access == "read-only"}
    assert names == readable


def test_a_bulk_walk_reads_the_node_once_per_request_not_per_repetition(peers: Peers):
    before, fast = peers.state["reads"], peers.call(lambda: _fast(peers))
    bulk = _ok(
        snmp("snmpbulkwalk", peers.address, "QKDN-MIB::qkdnMIB", user=MANAGER, options=("-Cr10",))
    )
    instances, reads = len(bulk.splitlines()), peers.state["reads"] - before
    # ~4 GETBULKs of 10 repetitions, each read once: not once per repetition
    assert instances >= 30 and 1 <= reads <= instances // 2, (instances, reads)
    # ... and answered on the fast path, the last one past QKDN-MIB into pysnmp's tree too
    assert peers.call(lambda: _fast(peers)) - fast >= instances // 10, bulk


def test_monitor_role_sees_identity_and_links_only(peers: Peers):
    walk = _ok(snmp("snmpbulkwalk", peers.address, "QKDN-MIB::qkdnMIB", user=MONITOR))
    assert "qkdnLinkSkr.9" in walk and "qkdnNodeRole.0" in walk
    assert "qkdnKms" not in walk and "qkdnRng" not in walk and "qkdnFailure" not in walk
    fast = peers.call(lambda: _fast(peers))
    got = _ok(snmp("snmpget", peers.address, "QKDN-MIB::qkdnKmsRequests.0", user=MONITOR))
    assert "No Such Object" in got  # VACM on the fast path: not in the monitor's view
    assert peers.call(lambda: _fast(peers)) > fast


def _counters(peers: Peers) -> list[int]:
    oids = [
        ".1.3.6.1.6.3.15.1.1.1.0",
        ".1.3.6.1.6.3.15.1.1.3.0",
        ".1.3.6.1.6.3.15.1.1.5.0",
        ".1.3.6.1.2.1.11.4.0",
    ]
    out = _ok(snmp("snmpget", peers.address, "-On", *oids, user=MANAGER))
    return [int(line.split()[-1]) for line in out.splitlines()]


def test_v2c_noauth_and_wrong_keys_are_refused_and_counted(peers: Peers):
    before = _counters(peers)
    oid = ".1.3.6.1.4.1.32473.1.1.1.1.0"
    cmd = ["snmpget", "-m", "", "-t", "0.5", "-r", "0"]
    v2c = subprocess.run(
        [*cmd, "-v2c", "-c", "public", peers.address, oid],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert v2c.returncode != 0 and "Timeout" in v2c.stderr
    no_auth = snmp("snmpget", peers.address, oid, user=MANAGER, level="noAuthNoPriv")
    assert no_auth.returncode != 0
    wrong = AgentUser(user=MANAGER.user, auth="not-the-key-1", priv=MANAGER.priv)
    assert snmp("snmpget", peers.address, oid, user=wrong).returncode != 0
    stranger = snmp("snmpget", peers.address, oid, user=STRANGER)
    assert stranger.returncode != 0
    after = _counters(peers)
    assert [a > b for a, b in zip(after, before, strict=True)] == [True, True, True, True]

    def refused_told() -> bool:  # the agent looked at once: qkdnAuthFailure to the manager
        events = peers.call(peers.store.security_events)
        return any(e["kind"] == "snmp-refused" and e["source"] == "ckms-minden" for e in events)

    _wait(refused_told)


def _wait(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    poll(condition, "the awaited condition", timeout)


def test_a_link_fault_informs_the_manager_and_traps_snmptrapd_then_clears(peers: Peers):
    peers.state["link"] = "down"
    peers.agent.look()  # as the link watch does when a module's state changes
    _wait(lambda: any(a.resource == "link-8-9" for a in peers.call(peers.store.alarms)))
    [alarm] = [a for a in peers.call(peers.store.alarms) if a.resource == "link-8-9"]
    assert (alarm.kind, alarm.severity, alarm.node) == ("link", "major", "ckms-minden")
    log = peers.traps.wait_for("qkdnLinkDown")
    assert 'qkdnNotifyResource.0 = STRING: "link-8-9"' in log and "major(4)" in log
    peers.state["link"] = "up"
    peers.agent.look()
    _wait(lambda: not any(a.resource == "link-8-9" for a in peers.call(peers.store.alarms)))
    peers.traps.wait_for("qkdnLinkUp")
    # the manager stores a notification before its acknowledgement reaches the agent
    _wait(lambda: peers.agent.acked >= 2 and not peers.agent.pending)


def _send(tool: str, peers: Peers, user: Credentials, name: str, *extra: str) -> Any:
    binds = [
        "QKDN-MIB::qkdnNotifySeverity.0",
        "i",
        "3",
        "QKDN-MIB::qkdnNotifyResource.0",
        "s",
        "rng",
        "QKDN-MIB::qkdnNotifyText.0",
        "s",
        name,
    ]
    address = peers.manager_address
    return snmp(tool, address, "", f"QKDN-MIB::{name}", *binds, user=user, options=extra)


def test_the_manager_takes_net_snmp_notifications_from_authorised_senders_only(peers: Peers):
    def rng_alarms() -> list[Any]:
        return [a for a in peers.call(peers.store.alarms) if a.kind == "rng"]

    assert _send("snmpinform", peers, STRANGER, "qkdnRngHealthFailure").returncode != 0
    assert _send("snmpinform", peers, SENDER, "qkdnRngHealthFailure").returncode == 0
    _wait(lambda: len(rng_alarms()) == 1)
    assert rng_alarms()[0].node == "sender:noc-tool"
    engine = ["-e", "0x" + SENDER_ENGINE.hex()]
    sent = _send("snmptrap", peers, SENDER, "qkdnCardRemoved", *engine)
    assert sent.returncode == 0, sent.stderr
    _wait(lambda: any(a.kind == "card" for a in peers.call(peers.store.alarms)))
    # a stranger's trap is dropped: of it and an authorised trap sent after it, one arrives
    received = peers.call(lambda: peers.manager.received)
    assert _send("snmptrap", peers, STRANGER, "qkdnCardRemoved", *engine).returncode == 0
    assert _send("snmptrap", peers, SENDER, "qkdnSlotRollback", *engine).returncode == 0
    _wait(lambda: any(a.kind == "rollback" for a in peers.call(peers.store.alarms)))
    assert peers.call(lambda: peers.manager.received) == received + 1


def test_an_inform_is_retried_until_a_manager_acknowledges_it(peers: Peers, tmp_path: Path):
    """The manager is not there when the fault happens; it starts later, on the address
    the agent informs, and still gets the alarm."""
    port = free_udp_port()
    store = Store(tmp_path / "late.db")
    user = Credentials(user="notify-late", auth="notify-late-1", priv="notify-late-2")
    acfg = AgentConfig(
        users=[MANAGER], inform=Receiver(**user.model_dump(), address=f"127.0.0.1:{port}")
    )
    state = {"reads": 0, "link": "down"}

    async def boot() -> Agent:
        agent = Agent("ckms-late", _reading(state), acfg)
        await agent.start()
        return agent

    agent = asyncio.run_coroutine_threadsafe(boot(), peers.loop).result(30)
    _wait(lambda: peers.call(lambda: agent.sent) >= 2)  # tried, unanswered, tried again
    assert peers.call(lambda: agent.acked) == 0 and peers.call(lambda: len(agent.pending)) == 1
    entry = AgentEntry(
        name="ckms-late", id=3, role="ckms", address="127.0.0.1:9", poll=MANAGER, notify=user
    )
    manager = Manager(ManagerConfig(traps=f"127.0.0.1:{port}", poll_s=3600, agents=[entry]), store)

    async def start() -> None:
        await manager.start()

    asyncio.run_coroutine_threadsafe(start(), peers.loop).result(30)
    _wait(lambda: any(a.resource == "link-8-9" for a in peers.call(store.alarms)))
    assert peers.call(lambda: agent.acked) == 1 and not peers.call(lambda: agent.pending)

    async def stop() -> None:
        await agent.close()
        await manager.close()

    asyncio.run_coroutine_threadsafe(stop(), peers.loop).result(30)
    store.close()


def test_a_silent_agent_is_an_alarm_until_its_restarted_node_answers(peers: Peers, tmp_path: Path):
    """The node's agent stops (its node died) and comes back on the same address with the
    same engine ID and a fresh engine clock: the manager raises a node alarm, then clears
    it once it polls the new agent."""
    store = Store(tmp_path / "restart.db")
    state = {"reads": 0, "link": "up"}
    acfg = AgentConfig(listen="127.0.0.1:0", users=[MANAGER])

    async def start_agent(listen: str) -> Agent:
        agent = Agent("ckms-again", _reading(state), acfg.model_copy(update={"listen": listen}))
        await agent.start()
        return agent

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, peers.loop).result(30)

    agent = run(start_agent("127.0.0.1:0"))
    address = f"127.0.0.1:{agent.port}"
    entry = AgentEntry(
        name="ckms-again", id=4, role="ckms", address=address, poll=MANAGER, notify=NOTIFY
    )
    manager = Manager(ManagerConfig(traps="127.0.0.1:0", poll_s=0.2, agents=[entry]), store)
    run(manager.start())

    def node_alarms(cleared: bool) -> list[Any]:
        rows = peers.call(lambda: store.alarms(include_cleared=True))
        return [a for a in rows if a.kind == "node" and (a.cleared is not None) == cleared]

    _wait(lambda: bool(peers.call(store.inventory)) and peers.call(store.inventory)[0]["reachable"])
    run(agent.close())
    _wait(lambda: len(node_alarms(cleared=False)) == 1)
    agent = run(start_agent(address))
    _wait(lambda: len(node_alarms(cleared=True)) == 1)
    assert node_alarms(cleared=False) == [] and peers.call(store.inventory)[0]["reachable"] == 1
    run(agent.close())
    run(manager.close())
    store.close()


def test_the_manager_walks_through_pysnmp_first_then_on_the_fast_path(peers: Peers):
    """pysnmp discovers the agent's engine on the first walk and the manager learns it from
    the accepted response; the next walk is GETBULKs sealed and opened without pyasn1 and
    answered on the agent's fast path, with the same instances."""
    root = mib.oid("qkdnObjects")

    def walk() -> list[Any]:
        coro = peers.manager.walk_at(peers.address, MANAGER, root, 10)
        return asyncio.run_coroutine_threadsafe(coro, peers.loop).result(30)

    slow = walk()
    where = ("127.0.0.1", peers.agent.port)
    requester = peers.call(lambda: peers.manager.fast[where])
    assert requester.known is not None and requester.answered == 0
    fast_before = peers.call(lambda: _fast(peers))
    quick = walk()
    assert requester.answered >= 3  # 10 repetitions each: 3 GETBULKs at least
    assert peers.call(lambda: _fast(peers)) - fast_before == requester.answered
    assert [oid for oid, _ in quick] == [oid for oid, _ in slow] and len(slow) >= 30
    name = (*mib.oid("qkdnNodeName"), 0)
    assert bytes(dict(quick)[name]) == bytes(dict(slow)[name]) == b"ckms-minden"
    level = (*mib.oid("qkdnLinkKeyLevel"), 9)
    assert int(dict(quick)[level]) > int(dict(slow)[level])  # read anew
