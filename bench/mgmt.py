"""Benchmark of the management plane (issue 17).

1. ``agent``: one node agent (QKDN-MIB over a CKMS-like reading with two links) beside
   its node, as the product runs it: a process (the node, here serving that reading)
   starts ``qkdn node agent`` with :class:`appliance.mgmt.feed.Feed`, and the agent reads
   it over the channel at every PDU; authPriv GETs per second from C client processes
   (pysnmp, W GETs in flight each, engine discovery done before the clock starts), and
   the time of a full walk of the node's MIB (a GETBULK walk of ``qkdnMIB`` from a warm
   pysnmp client; and net-snmp's ``snmpbulkwalk`` as a new process, discovery included).
2. ``informs``: a manager (SQLite store) in a process of its own, and 16 agents in another
   process, each sending its share of a burst of 1,000 INFORMs (distinct link alarms) at
   once; the time until every INFORM is acknowledged, and how many alarms the manager
   holds then (none may be lost).
3. ``tkey``: two demoquandt networks side by side in the same run, one with the manager and
   the agents (the default) and one with ``--no-mgmt``; T_key p50 (enc_keys + dec_keys,
   one key) in alternating rounds; the median difference. And, per round, the CPU time
   of the driven network's processes per request (from /proc/PID/task/*/schedstat:
   nanoseconds, every thread; far less sensitive to other load than T_key): the 16
   nodes together, each node, the nodes' SNMP agents (each a child process of its node)
   together, and the manager; and the nodes' and the agents' resident sets (MB).

4. ``latency``: a demoquandt network with its manager; link 8-9 cut and restored N times
   (``qkdn net fault``'s code); a client of the operator's page holds its server-sent
   events: from the injection (and from the emulated modules' state change) to the event
   that shows the alarm, and its clear.

5. ``week``: the manager's store after a simulated week of 30 s polls of 32 link ends:
   peak RSS (pysnmp imported), database size, a week's history query.

Usage: python bench/mgmt.py [agent|informs|tkey|latency|week|all] [--seconds 10] [--clients 2]
       [--rounds 5] [--requests 40] [--control] [--first with|without] [--faults 10]
       [--json PATH]

``tkey --control`` is the A/A run: both networks without management, measured exactly as
the A/B run; it shows the bench's own spread. ``tkey --first without`` starts the network
without management first (by default the "with" one is started first): the network started
first has looked slightly dearer even in A/A runs, so alternate it between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w
from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdgen
from pysnmp.hlapi.v3arch.asyncio import (
    ContextData,
    ObjectIdentity,
    ObjectType,
    UdpTransportTarget,
    UsmUserData,
    bulk_walk_cmd,
)
from pysnmp.proto import rfc1905

from appliance.kms import netproc
from appliance.kms.netproc import process_cpu_s
from appliance.mgmt import mib
from appliance.mgmt.agent import Agent, AgentConfig, AgentUser, Receiver
from appliance.mgmt.detect import Notice
from appliance.mgmt.feed import AGENT_SUFFIX
from appliance.mgmt.manager import AgentEntry, Manager, ManagerConfig
from appliance.mgmt.nodeview import LinkReading, NodeReading
from appliance.mgmt.store import LinkSample, Store
from appliance.snmp import smi
from appliance.snmp.usm import AUTH, PRIV, Credentials

USER = AgentUser(user="manager-8", auth="manager-auth-8", priv="manager-priv-8")
LINKS = tuple(
    LinkReading(
        peer=p,
        name=f"link-8-{p}",
        state="up",
        skr=22_700,
        qber_ppm=17_000,
        level=5000,
        capacity=100_000,
        key_size=256,
        produced=90_000,
        consumed=1_200,
    )
    for p in (7, 9)
)


def reading() -> NodeReading:
    return NodeReading(
        id=8,
        name="ckms-minden",
        role="ckms",
        software="qkdn 0.1.0",
        links=LINKS,
        requests=10,
        failures={"KMS-UNREACHABLE": 2},
    )


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# -- 1. one agent ---------------------------------------------------------------------------
def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def udp_bound(port: int) -> bool:
    """True once something listens on UDP ``port`` (``/proc/net/udp``)."""
    with open("/proc/net/udp") as fh:
        return any(f":{port:04X} " in line.split()[1] + " " for line in fh.readlines()[1:])


def run_node(config_file: str, out: Any, stop: Any, mark: Any) -> None:
    """A node as the product runs one: its agent beside it (``qkdn node agent``, started by
    :class:`appliance.mgmt.feed.Feed`), reading it over the channel at every PDU. The
    agent's pid first; then, when ``mark`` is set and cleared, the CPU seconds of the node
    and of its agent."""
    from appliance.mgmt.feed import Feed

    async def main() -> None:
        feed = Feed("ckms-minden", reading, Path(config_file))
        await feed.start()
        assert feed.process is not None
        agent = feed.process.pid
        out.put(agent)
        marks = 0
        while not stop.is_set():
            if (mark.is_set() and marks == 0) or (not mark.is_set() and marks == 1):
                t = os.times()
                out.put((t.user + t.system, process_cpu_s(agent)))
                marks += 1
            await asyncio.sleep(0.01)
        await feed.close()

    asyncio.run(main())


def client_engine(port: int) -> engine.SnmpEngine:
    eng = engine.SnmpEngine()
    config.add_v3_user(eng, USER.user, AUTH, USER.auth, PRIV, USER.priv)
    config.add_target_parameters(eng, "p", USER.user, "authPriv")
    config.add_transport(eng, config.SNMP_UDP_DOMAIN, udp.UdpAsyncioTransport().open_client_mode())
    config.add_target_address(
        eng, "a", config.SNMP_UDP_DOMAIN, ("127.0.0.1", port), "p", timeout=300, retryCount=2
    )
    return eng


def run_getters(port: int, seconds: float, window: int, out: Any) -> None:
    oid = (*mib.oid("qkdnLinkKeyLevel"), 9)

    async def main() -> tuple[int, int]:
        eng = client_engine(port)
        gen = cmdgen.GetCommandGenerator()
        done = errors = 0

        async def one() -> bool:
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

            def cb(_e: Any, _h: Any, err: Any, status: Any, _i: Any, vbs: Any, _c: Any) -> None:
                fut.set_result(not err and not status and vbs[0][1] is not rfc1905.noSuchInstance)

            gen.send_varbinds(eng, "a", None, "", [(oid, None)], cb)
            return await fut

        await one()  # engine discovery, before the clock
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < end:
                if await one():
                    done += 1
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(window)))
        eng.close_dispatcher()
        return done, errors

    out.put(asyncio.run(main()))


async def walk_once(eng: engine.SnmpEngine, port: int) -> tuple[float, int]:
    auth = UsmUserData(USER.user, USER.auth, USER.priv, authProtocol=AUTH, privProtocol=PRIV)
    target = await UdpTransportTarget.create(("127.0.0.1", port), timeout=2, retries=1)
    t0 = time.perf_counter()
    n = 0
    async for err, status, _i, binds in bulk_walk_cmd(
        eng,
        auth,
        target,
        ContextData(),
        0,
        50,
        ObjectType(ObjectIdentity(mib.QKDN_ARC)),
        lexicographicMode=False,
        lookupMib=False,
    ):
        if err or status:
            raise RuntimeError(f"walk failed: {err or status}")
        n += len(binds)
    return (time.perf_counter() - t0) * 1000, n


def bench_agent(seconds: float, clients: int, window: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    port_q, stop, mark = ctx.Queue(), ctx.Event(), ctx.Event()
    port = free_udp_port()
    folder = tempfile.TemporaryDirectory()
    config_file = Path(folder.name) / "agent.toml"
    users = [{"user": USER.user, "auth": USER.auth, "priv": USER.priv}]
    config_file.write_text(tomli_w.dumps({"listen": f"127.0.0.1:{port}", "users": users}))
    proc = ctx.Process(target=run_node, args=(str(config_file), port_q, stop, mark))
    proc.start()
    port_q.get(timeout=60)  # the agent's pid
    for _ in range(600):  # bounded: the agent imports pysnmp, then binds its port
        if udp_bound(port):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"the agent did not bind 127.0.0.1:{port} within 60 s")
    try:
        out = ctx.Queue()
        getters = [
            ctx.Process(target=run_getters, args=(port, seconds, window, out))
            for _ in range(clients)
        ]
        for g in getters:
            g.start()
        mark.set()
        node0, agent0 = port_q.get(timeout=60)
        results = [out.get(timeout=seconds + 120) for _ in getters]
        mark.clear()
        node1, agent1 = port_q.get(timeout=60)
        cpu, node_cpu = agent1 - agent0, node1 - node0
        for g in getters:
            g.join()
        gets = sum(r[0] for r in results)

        async def walks() -> list[tuple[float, int]]:
            eng = engine.SnmpEngine()
            await walk_once(eng, port)  # discovery
            got = [await walk_once(eng, port) for _ in range(20)]
            eng.close_dispatcher()
            return got

        walked = asyncio.run(walks())
        cli = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run(
                [
                    "snmpbulkwalk",
                    "-v3",
                    "-l",
                    "authPriv",
                    "-u",
                    USER.user,
                    "-a",
                    "SHA-256",
                    "-A",
                    USER.auth,
                    "-x",
                    "AES",
                    "-X",
                    USER.priv,
                    "-M",
                    f"+:{smi.MIB_DIR}",
                    "-m",
                    "QKDN-MIB",
                    f"127.0.0.1:{port}",
                    "QKDN-MIB::qkdnMIB",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            cli.append((time.perf_counter() - t0) * 1000)
    finally:
        stop.set()
        proc.join(30)
        folder.cleanup()
    return {
        "gets_per_s": round(gets / seconds, 1),
        "get_errors": sum(r[1] for r in results),
        "agent_cpu_ms_per_get": round(cpu * 1000 / max(gets, 1), 3),
        "node_cpu_ms_per_get": round(node_cpu * 1000 / max(gets, 1), 3),
        "gets_per_agent_cpu_second": round(gets / cpu, 1) if cpu else None,
        "clients": clients,
        "in_flight_per_client": window,
        "walk_varbinds": walked[0][1],
        "walk_ms_p50": round(statistics.median(w[0] for w in walked), 2),
        "walk_ms_max": round(max(w[0] for w in walked), 2),
        "snmpbulkwalk_process_ms_p50": round(statistics.median(cli), 1),
    }


# -- 2. a burst of INFORMs --------------------------------------------------------------
def notify_user(i: int) -> Credentials:
    return Credentials(user=f"notify-{i}", auth=f"notify-auth-{i:03d}", priv=f"notify-priv-{i:03d}")


def run_manager(db: str, agents: int, port_out: Any, stop: Any) -> None:
    entries = [
        AgentEntry(
            name=f"node-{i}",
            id=i,
            role="ckms",
            address="127.0.0.1:9",
            poll=notify_user(i),
            notify=notify_user(i),
        )
        for i in range(1, agents + 1)
    ]

    async def main() -> None:
        store = Store(Path(db))
        manager = Manager(ManagerConfig(poll_s=3600, agents=entries), store)
        port_out.put(await manager.start())
        while not stop.is_set():
            await asyncio.sleep(0.1)
        port_out.put(manager.received)
        await manager.close()
        store.close()

    asyncio.run(main())


def run_informers(port: int, agents: int, total: int, out: Any) -> None:
    async def main() -> dict[str, Any]:
        fleet = []
        for i in range(1, agents + 1):
            rx = Receiver(**notify_user(i).model_dump(), address=f"127.0.0.1:{port}")
            agent = Agent(f"node-{i}", reading, AgentConfig(users=[USER], inform=rx))
            await agent.start()
            fleet.append(agent)
        t0 = time.perf_counter()
        for n in range(total):
            agent = fleet[n % agents]
            agent.notify(
                Notice(
                    name="qkdnLinkDown",
                    severity="major",
                    resource=f"link-b-{n}",
                    text="burst",
                    peer=0,
                )
            )
        deadline = time.monotonic() + 300
        while any(a.pending for a in fleet) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        doc = {
            "acknowledged": sum(a.acked for a in fleet),
            "sent_attempts": sum(a.sent for a in fleet),
            "dropped": sum(a.dropped for a in fleet),
            "left_pending": sum(len(a.pending) for a in fleet),
            "seconds_to_all_acknowledged": round(elapsed, 2),
        }
        for a in fleet:
            await a.close()
        return doc

    out.put(asyncio.run(main()))


def bench_informs(total: int, agents: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "manager.db")
        port_q, stop, out = ctx.Queue(), ctx.Event(), ctx.Queue()
        mproc = ctx.Process(target=run_manager, args=(db, agents, port_q, stop))
        mproc.start()
        port = port_q.get(timeout=60)
        iproc = ctx.Process(target=run_informers, args=(port, agents, total, out))
        iproc.start()
        doc = out.get(timeout=600)
        iproc.join(60)
        stop.set()
        received = port_q.get(timeout=60)
        mproc.join(60)
        store = Store(Path(db))
        alarms = sum(a.resource.startswith("link-b-") for a in store.alarms(limit=100_000))
        store.close()
    return {
        **doc,
        "informs": total,
        "agents": agents,
        "manager_received": received,
        "manager_alarms": alarms,
        "lost": total - alarms,
    }


# -- 3. T_key with and without management -------------------------------------------------
def _children(parents: dict[int, str]) -> dict[int, str]:
    """Processes whose parent is among ``parents`` (pid -> the parent's name)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid in parents:
                    out[int(entry.name)] = parents[ppid]
    return out


def cpu_seconds(folder: Path) -> dict[str, float]:
    """CPU seconds each process of a network but its supervisor has used so far
    (:func:`appliance.kms.netproc.cpu_seconds`); a node's SNMP agent (``NODE/agent``, the
    node's child process) as ``agent:NODE``."""
    out = {}
    for name, seconds in netproc.cpu_seconds(folder).items():
        if name.endswith(AGENT_SUFFIX):
            out[f"agent:{name.removesuffix(AGENT_SUFFIX)}"] = seconds
        elif name != netproc.SUPERVISOR:
            out[name] = seconds
    return out


def rss_mb(folder: Path) -> dict[str, float]:
    """Each node's resident set (MB), its agent's apart."""
    state = json.loads((folder / "run" / "state.json").read_text())
    pids = {int(child["pid"]): name for name, child in state["nodes"].items()}
    named = {
        **{p: n for p, n in pids.items()},
        **{p: f"agent:{n}" for p, n in _children(pids).items()},
    }
    out = {}
    for pid, name in named.items():
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[name] = int(line.split()[1]) / 1024
    return out


def bench_tkey(
    rounds: int, requests: int, control: bool = False, first: str = "with"
) -> dict[str, Any]:
    """``control``: an A/A run, both networks without management (the bench's own spread);
    ``first``: which network is started first."""
    from appliance.cli import net
    from appliance.config.render import find_free_base_port
    from appliance.tkey import endpoints, measure

    with tempfile.TemporaryDirectory() as tmp:
        folders = {"with": Path(tmp) / "with", "without": Path(tmp) / "without"}
        order = ("with", "without") if first == "with" else ("without", "with")
        try:
            for name in order:
                folder = folders[name]
                args = argparse.Namespace(
                    topology="demoquandt",
                    dir=folder,
                    base_port=find_free_base_port(),
                    mode="gcm",
                    rate_limited=False,
                    stock=0,
                    timeout=300.0,
                    json=False,
                    aaa=False,
                    mgmt=name == "with" and not control,
                )
                net.bring_up(args)
            pairs = {
                n: endpoints(net.status_doc(f), "sae-berlin-1", "sae-bonn-1")
                for n, f in folders.items()
            }
            p50: dict[str, list[float]] = {"with": [], "without": []}
            per_request: dict[str, list[dict[str, float]]] = {"with": [], "without": []}
            failed = 0
            cpu0 = {n: cpu_seconds(f) for n, f in folders.items()}
            t0 = time.monotonic()
            for r in range(rounds):
                for name in ("without", "with") if r % 2 == 0 else ("with", "without"):
                    before = cpu_seconds(folders[name])
                    doc = measure(*pairs[name], requests)
                    after = cpu_seconds(folders[name])
                    n = requests + doc.get("warmup_keys", 0)
                    per_request[name].append(
                        {k: (after[k] - before.get(k, 0.0)) * 1000 / n for k in after}
                    )
                    p50[name].append(doc["t_key_ms"]["p50"])
                    failed += doc["failed_requests"]
            mgmt_running = (folders["with"] / "mgmt" / "manager.db").exists() and not control
            wall = time.monotonic() - t0
            cpu = {}
            for n, f in folders.items():
                now = cpu_seconds(f)
                cpu[n] = {k: now[k] - cpu0[n].get(k, 0.0) for k in now}
            rss = {n: rss_mb(f) for n, f in folders.items()}
        finally:
            for folder in folders.values():
                net.bring_down(folder)
    diffs = [w - b for w, b in zip(p50["with"], p50["without"], strict=True)]
    nodes = {
        n: [sum(v for k, v in rnd.items() if _is_node(k)) for rnd in rounds_]
        for n, rounds_ in per_request.items()
    }
    agents = [
        sum(v for k, v in rnd.items() if k.startswith("agent:")) for rnd in per_request["with"]
    ]
    cpu_diffs = [w - b for w, b in zip(nodes["with"], nodes["without"], strict=True)]
    each = sorted(k for k in per_request["with"][0] if _is_node(k))
    return {
        "p50_ms_with": p50["with"],
        "p50_ms_without": p50["without"],
        "median_p50_with": statistics.median(p50["with"]),
        "median_p50_without": statistics.median(p50["without"]),
        "median_difference_ms": round(statistics.median(diffs), 3),
        "failed_requests": failed,
        "manager_database_written": mgmt_running,
        "wall_s": round(wall, 1),
        "cpu_s_nodes_with": round(sum(v for k, v in cpu["with"].items() if _is_node(k)), 2),
        "cpu_s_nodes_without": round(sum(cpu["without"].values()), 2),
        "cpu_s_agents": round(sum(v for k, v in cpu["with"].items() if k.startswith("agent:")), 2),
        "cpu_s_manager": round(cpu["with"].get("manager", 0.0), 2),
        "nodes_cpu_ms_per_request_with": round(statistics.median(nodes["with"]), 3),
        "nodes_cpu_ms_per_request_without": round(statistics.median(nodes["without"]), 3),
        "nodes_cpu_ms_per_request_median_difference": round(statistics.median(cpu_diffs), 3),
        "nodes_cpu_ms_per_request_rounds_with": [round(v, 3) for v in nodes["with"]],
        "nodes_cpu_ms_per_request_rounds_without": [round(v, 3) for v in nodes["without"]],
        "agents_cpu_ms_per_request": round(statistics.median(agents), 3),
        "rss_mb_median_node_with": _median_rss(rss["with"], nodes=True),
        "rss_mb_median_node_without": _median_rss(rss["without"], nodes=True),
        "rss_mb_median_agent": _median_rss(rss["with"], nodes=False),
        "manager_cpu_ms_per_request": round(
            statistics.median(r.get("manager", 0.0) for r in per_request["with"]), 3
        ),
        "node_cpu_ms_per_request_with_minus_without": {
            k: round(
                statistics.median(r.get(k, 0.0) for r in per_request["with"])
                - statistics.median(r.get(k, 0.0) for r in per_request["without"]),
                3,
            )
            for k in each
        },
        "rounds": rounds,
        "requests_per_round": requests,
        "control": control,
        "started_first": first,
    }


def _is_node(name: str) -> bool:
    return name != "manager" and not name.startswith("agent:")


def _median_rss(rss: dict[str, float], *, nodes: bool) -> float:
    values = [v for k, v in rss.items() if _is_node(k) == nodes and k != "manager"]
    return round(statistics.median(values), 1) if values else 0.0


# -- 4. link fault to alarm on the page --------------------------------------------------
def bench_latency(faults: int, link: tuple[int, int] = (8, 9)) -> dict[str, Any]:
    """A demoquandt network with its manager; link 8-9 cut and restored ``faults`` times by
    ``qkdn net fault``'s code (:func:`appliance.control.linkfault.inject`). A client logged
    in to the operator's page holds its server-sent events stream, as the page does; for
    each cut and restore: the time from the injection (at a random point of the modules'
    1 s epoch) to the first ``state`` event that shows the link's alarm open (cleared), and
    from the moment the emulated modules' state changes (the first epoch start at or after
    the fault's start: the model's time resolution) to that event."""
    from appliance.cli import net
    from appliance.config.render import find_free_base_port
    from appliance.control.linkfault import inject

    name = f"link-{link[0]}-{link[1]}"
    phase = random.Random(17)  # when in the modules' epoch a fault starts (not a key)
    raised: list[tuple[float, float]] = []
    cleared: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "net"
        args = argparse.Namespace(
            topology="demoquandt",
            dir=folder,
            base_port=find_free_base_port(),
            mode="gcm",
            rate_limited=False,
            stock=0,
            timeout=300.0,
            json=False,
            aaa=False,
            mgmt=True,
        )
        try:
            net.bring_up(args)
            page = PageStream(folder)
            page.wait(lambda doc: _link_up(doc, name), 120)
            for _ in range(faults):
                for state, out in (("down", raised), ("up", cleared)):
                    time.sleep(phase.uniform(0.0, 1.0))  # a fault at any point of an epoch
                    mark = page.mark()  # the alarm may show before this thread waits for it
                    at = inject(folder, *link, state)
                    effective = module_change(folder, link, at)
                    seen = page.wait(
                        lambda doc, s=state: _alarm_open(doc, name) == (s == "down"), since=mark
                    )
                    out.append((seen - at, seen - effective))
                    if state == "up":  # the next cut starts from a link carrying keys
                        page.wait(lambda doc: _link_up(doc, name), 60)
            page.close()
        finally:
            net.bring_down(folder)
    return {
        "faults": faults,
        **_ms("raise_page_from_injection", [r[0] for r in raised]),
        **_ms("raise_page_from_module", [r[1] for r in raised]),
        **_ms("clear_page_from_injection", [c[0] for c in cleared]),
        **_ms("clear_page_from_module", [c[1] for c in cleared]),
    }


def _ms(name: str, values: list[float]) -> dict[str, float]:
    return {
        f"{name}_ms_p50": round(statistics.median(values) * 1000, 1),
        f"{name}_ms_p99": round(pct(values, 0.99) * 1000, 1),
        f"{name}_ms_max": round(max(values) * 1000, 1),
    }


def module_change(folder: Path, link: tuple[int, int], at: float) -> float:
    """Wall-clock time at which the link's emulated modules change state for a fault
    starting at ``at``: the first epoch start at or after it (speedup 1)."""
    from urllib.parse import parse_qs, urlsplit

    from appliance.kms.network import load_configs

    for cfg in load_configs(folder).values():
        for nb in cfg.neighbours:
            if cfg.node.id == link[0] and nb.node == link[1]:
                q = parse_qs(urlsplit(str(nb.qkdm)).query)
                start, epoch = float(q.get("start", ["0"])[0]), float(q.get("epoch", ["1"])[0])
                return start + math.ceil((at - start) / epoch) * epoch
    raise RuntimeError(f"no link {link}")


def _alarm_open(doc: dict[str, Any], name: str) -> bool:
    return any(a["kind"] == "link" and a["resource"] == name for a in doc.get("alarms", []))


def _link_up(doc: dict[str, Any], name: str) -> bool:
    ends = [x for x in doc.get("links", []) if x.get("link") == name]
    return bool(ends) and all(x.get("state") == "up" for x in ends) and not _alarm_open(doc, name)


class PageStream:
    """The operator page's view: logged in as ``viewer``, ``/api/events`` read in a thread;
    :meth:`wait` returns the wall-clock time at which the first event satisfying a
    condition arrived (events from before the call do not count)."""

    def __init__(self, folder: Path) -> None:
        import http.client
        import ssl
        import threading
        import tomllib
        from urllib.parse import urlencode

        cfg = tomllib.loads((folder / "mgmt" / "manager.toml").read_text())
        lines = (folder / "mgmt" / "operators.txt").read_text().splitlines()
        password = next(x.split()[1] for x in lines if x.startswith("viewer "))
        host, port = cfg["web"].rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=str(folder / "pki" / "ca.pem"))
        ctx.check_hostname = False
        login = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
        form = urlencode({"user": "viewer", "password": password})
        login.request("POST", "/login", form, {"content-type": "application/x-www-form-urlencoded"})
        answer = login.getresponse()
        cookie = answer.getheader("set-cookie", "").split(";")[0]
        answer.read()
        login.close()
        self.conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=300)
        self.conn.request("GET", "/api/events", headers={"cookie": cookie})
        self.stream = self.conn.getresponse()
        if self.stream.status != 200:
            raise RuntimeError(f"events: {self.stream.status}")
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            line = self.stream.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                doc = json.loads(line[6:])
                with self.cond:
                    self.events.append((time.time(), doc))
                    self.cond.notify_all()

    def mark(self) -> int:
        """Where the events received so far end (a :meth:`wait` from there counts what
        arrives between the mark and the call)."""
        with self.cond:
            return len(self.events)

    def wait(self, condition: Any, timeout: float = 60.0, since: int | None = None) -> float:
        with self.cond:
            seen = len(self.events) if since is None else since
            deadline = time.monotonic() + timeout
            while True:
                for at, doc in self.events[seen:]:
                    if condition(doc):
                        return at
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no such page event within {timeout} s")
                self.cond.wait(left)

    def close(self) -> None:
        self.conn.close()


# -- 5. a week of history -------------------------------------------------------------------
def bench_week(link_ends: int) -> dict[str, Any]:
    """The manager's store (and pysnmp, imported here) after a simulated week of polls
    every 30 s of ``link_ends`` link ends, folded as the manager folds them (every 100
    rounds); the process's peak RSS, the database's size, a week's history query."""
    import resource

    clock = [1_800_000_000.0]
    rounds = 7 * 86400 // 30
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        store = Store(Path(tmp) / "manager.db", clock=lambda: clock[0])
        t0 = time.perf_counter()
        for r in range(rounds):
            store.record(
                [
                    LinkSample(
                        node=f"node-{i // 2}",
                        link=f"link-{i // 2}-{i // 2 + 1}",
                        peer=i % 2 + 1,
                        state="up",
                        skr=10_000 + r % 7,
                        qber_ppm=10_000,
                        level=50_000 + r % 11,
                        capacity=100_000,
                        consumed=r,
                    )
                    for i in range(link_ends)
                ]
            )
            if r % 100 == 99:
                store.downsample()
            clock[0] += 30
        store.downsample()
        elapsed = time.perf_counter() - t0
        q0 = time.perf_counter()
        week = store.history("link-3-4")
        query_ms = (time.perf_counter() - q0) * 1000
        rows = store.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        size = (Path(tmp) / "manager.db").stat().st_size
        store.close()
    return {
        "rounds": rounds,
        "link_ends": link_ends,
        "samples_rows_left": rows,
        "db_mb": round(size / 1e6, 1),
        "seconds_to_write": round(elapsed, 1),
        "history_query_rows": len(week),
        "history_query_ms": round(query_ms, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["agent", "informs", "tkey", "latency", "week", "all"],
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--informs", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--faults", type=int, default=10)
    parser.add_argument("--link-ends", type=int, default=32)
    parser.add_argument(
        "--control", action="store_true", help="tkey: A/A, both networks without management"
    )
    parser.add_argument(
        "--first", choices=("with", "without"), default="with",
        help="tkey: the network started first (alternate it between runs)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    doc: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_before": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.what in ("agent", "all"):
        doc["agent"] = bench_agent(args.seconds, args.clients, args.window)
        print(json.dumps(doc["agent"]), flush=True)
    if args.what in ("informs", "all"):
        doc["informs"] = bench_informs(args.informs, args.agents)
        print(json.dumps(doc["informs"]), flush=True)
    if args.what in ("tkey", "all"):
        doc["tkey"] = bench_tkey(args.rounds, args.requests, args.control, args.first)
        print(json.dumps(doc["tkey"]), flush=True)
    if args.what in ("latency", "all"):
        doc["latency"] = bench_latency(args.faults)
        print(json.dumps(doc["latency"]), flush=True)
    if args.what in ("week", "all"):
        doc["week"] = bench_week(args.link_ends)
        print(json.dumps(doc["week"]), flush=True)
    doc["load_after"] = os.getloadavg()
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
