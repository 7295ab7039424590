"""A load generator for the project's SNMPv3 agents that is cheaper than the agent.

A pysnmp client costs more CPU per authPriv GET than the agent answering it, so a load of
pysnmp clients measures the clients on a 2-core machine, not the agent. Here pysnmp builds
every request *before* the clock starts and checks answers *after* it stops:

1. Build: a pysnmp client engine (authPriv, HMAC-SHA-256 + AES-128) discovers the agent
   (engine ID, boots, time: one real round trip), then its UDP transport is replaced by a
   list: ``N`` GETs are encoded, authenticated and encrypted by pysnmp as usual, each with
   its own request-id and msgID, inside the agent's USM time window (150 s), and kept as
   bytes. The engine keeps each request pending (no timeout, no retry).
2. Send: a plain UDP socket keeps ``W`` requests in flight: one new request per answer,
   no pysnmp in the loop. An answer is matched to its request by the msgID in the v3
   header (not encrypted); send -> answer time per request gives p50/p99. A request not
   answered within ``--timeout`` counts as lost.
3. Check: a sample of the answers (``--check``) goes back into the pysnmp engine that
   built the requests: USM verifies the agent's HMAC and decrypts it, and the varbind must
   be a value (not an error, not noSuchObject/noSuchInstance). All answers are counted.

The agent runs as its own process, from this tree or from another one (``--source DIR``:
the agent as of another commit, e.g. ``git archive REV appliance | tar -x -C DIR``), so
that a baseline runs in the same hour with the same client. Agent CPU per request is
utime + stime from ``/proc/PID/stat`` over the timed phase.

Targets:
* ``node``: a node's QKDN-MIB agent (appliance.mgmt.agent, a reading with two links);
  GETs of qkdnLinkKeyLevel.9 (a checked answer must be the reading's 5000).
* ``reports``: the AAA agent; SETs of ``--rows`` usage reports each (an AKMS's
  accounting, as its outbox sends it), every report a new request ID; CPU per SET.
* ``aaa``: the AAA agent (``qkdn aaa run``); quota asks, one GET of an aaaQuotaAnswer row
  each (every ask a distinct request number, so a grant is decided and committed; a
  checked answer must be a grant, not a refusal).

Usage: python bench/snmp_load.py node|aaa|reports [--requests 6000] [--window 32] [--rounds 1]
       [--rows 16]
       [--source DIR] [--loop asyncio|uvloop] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdgen
from pysnmp.proto import rfc1902, rfc1905

from appliance.kms.netproc import process_cpu_s
from appliance.snmp.usm import AUTH, PRIV, Credentials

NODE_USER = Credentials(user="manager-8", auth="manager-auth-8", priv="manager-priv-8")
OPERATOR = Credentials(user="operator", auth="operator-auth-1", priv="operator-priv-1")
AKMS = Credentials(user="akms-2", auth="akms-2-auth-key", priv="akms-2-priv-key")
MISSING = (rfc1905.noSuchObject, rfc1905.noSuchInstance, rfc1905.endOfMibView)


# -- BER: the msgID of an SNMPv3 message (its header is not encrypted) --------------------
def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the TLV at ``pos``."""
    tag, n = data[pos], data[pos + 1]
    pos += 2
    if n & 0x80:
        width = n & 0x7F
        n = int.from_bytes(data[pos : pos + width], "big")
        pos += width
    return tag, pos, pos + n


def msg_id(data: bytes) -> int:
    """msgID of an SNMPv3Message: SEQUENCE { msgVersion, msgGlobalData SEQUENCE
    { msgID, ... } ... }; -1 if the datagram is not one."""
    try:
        tag, pos, _end = _tlv(data, 0)
        _tag, _start, end = _tlv(data, pos)  # msgVersion
        tag2, pos, _end = _tlv(data, end)  # msgGlobalData
        tag3, start, end = _tlv(data, pos)  # msgID
    except IndexError:
        return -1
    if (tag, tag2, tag3) != (0x30, 0x30, 0x02):
        return -1
    return int.from_bytes(data[start:end], "big", signed=True)


# -- 1. build ---------------------------------------------------------------------------------
class Prebuilt:
    """Requests built by a pysnmp engine ahead of time; answers checked by it afterwards."""

    def __init__(self, port: int, creds: Credentials) -> None:
        self.port, self.creds = port, creds
        self.eng = engine.SnmpEngine()
        config.add_v3_user(self.eng, creds.user, AUTH, creds.auth, PRIV, creds.priv)
        config.add_target_parameters(self.eng, "p", creds.user, "authPriv")
        self.transport = udp.UdpAsyncioTransport().open_client_mode()
        config.add_transport(self.eng, config.SNMP_UDP_DOMAIN, self.transport)
        config.add_target_address(
            self.eng,
            "a",
            config.SNMP_UDP_DOMAIN,
            ("127.0.0.1", port),
            "p",
            timeout=60000,
            retryCount=0,
        )
        self.gen = cmdgen.GetCommandGenerator()
        self.setter = cmdgen.SetCommandGenerator()
        self.answers: dict[int, Any] = {}

    def _cb(self, _e: Any, _h: Any, err: Any, status: Any, _i: Any, vbs: Any, key: Any) -> None:
        self.answers[key] = (err, status, vbs)

    async def discover(self, oid: tuple[int, ...]) -> None:
        """One real GET: USM discovery of the agent's engine ID, boots and time."""
        self.gen.send_varbinds(self.eng, "a", None, "", [(oid, None)], self._cb, -1)
        for _ in range(500):
            if -1 in self.answers:
                break
            await asyncio.sleep(0.01)
        err, status, _vbs = self.answers.pop(-1, ("no answer", 0, ()))
        if err or status:
            raise SystemExit(f"bench: discovery failed: {err or status}")

    def build(self, requests: list[list[Any]], write: bool) -> list[tuple[int, bytes]]:
        """One authPriv GET (or SET) per list of variable bindings, encoded and encrypted:
        (msgID, datagram)."""
        captured: list[bytes] = []
        real = self.transport.send_message
        self.transport.send_message = lambda msg, _addr: captured.append(bytes(msg))
        gen = self.setter if write else self.gen
        try:
            for i, binds in enumerate(requests):
                gen.send_varbinds(self.eng, "a", None, "", binds, self._cb, i)
        finally:
            self.transport.send_message = real
        if len(captured) != len(requests):
            raise SystemExit(f"bench: built {len(captured)} messages for {len(requests)}")
        return [(msg_id(m), m) for m in captured]

    def check(self, answers: list[bytes], valid: Any = lambda _value: True) -> tuple[int, int]:
        """Feed answers to the engine (HMAC check, decryption, PDU): (good, bad); a good
        one holds a value (not an error, not noSuch*) that ``valid`` accepts."""
        self.answers.clear()
        receive = self.eng.transport_dispatcher._callback_function  # what the socket calls
        for data in answers:
            receive(self.transport, ("127.0.0.1", self.port), data)
        good = sum(
            1
            for err, status, vbs in self.answers.values()
            if not err and not status and vbs and vbs[0][1] not in MISSING and valid(vbs[0][1])
        )
        return good, len(answers) - good

    def close(self) -> None:
        self.eng.close_dispatcher()


# -- 2. send ---------------------------------------------------------------------------------
def blast(
    messages: list[tuple[int, bytes]], port: int, window: int, timeout: float
) -> dict[str, Any]:
    """Send with ``window`` in flight; latencies, answers by msgID, lost requests."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect(("127.0.0.1", port))
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    answers: dict[int, bytes] = {}
    lost = 0
    it = iter(messages)
    clock = time.perf_counter

    def send_one() -> bool:
        item = next(it, None)
        if item is None:
            return False
        sent_at[item[0]] = clock()
        sock.send(item[1])
        return True

    t0 = clock()
    for _ in range(window):
        send_one()
    while sent_at:
        ready, _w, _x = select.select([sock], [], [], timeout)
        if not ready:
            lost += len(sent_at)  # every request in flight waited a whole timeout
            sent_at.clear()
            for _ in range(window):
                send_one()
            continue
        data = sock.recv(65536)
        now = clock()
        mid = msg_id(data)
        start = sent_at.pop(mid, None)
        if start is None:
            continue
        latencies.append(now - start)
        answers[mid] = data
        send_one()
    took = clock() - t0
    sock.close()
    latencies.sort()
    return {
        "answered": len(answers),
        "lost": lost,
        "wall_s": took,
        "per_s": len(answers) / took,
        "p50_ms": latencies[len(latencies) // 2] * 1e3 if latencies else None,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3
        if latencies
        else None,
        "answers": answers,
    }


# -- the agents ------------------------------------------------------------------------------
NODE_AGENT = """
import asyncio, sys
from appliance.mgmt.agent import Agent, AgentConfig, AgentUser
from appliance.mgmt.nodeview import LinkReading, NodeReading
links = tuple(LinkReading(peer=p, name=f"link-8-{p}", state="up", skr=22_700,
    qber_ppm=17_000, level=5000, capacity=100_000, key_size=256, produced=90_000,
    consumed=1_200) for p in (7, 9))
def reading():
    return NodeReading(id=8, name="ckms-minden", role="ckms", software="qkdn 0.1.0",
        links=links, requests=10, failures={"KMS-UNREACHABLE": 2})
async def main():
    user = AgentUser(user=sys.argv[1], auth=sys.argv[2], priv=sys.argv[3])
    agent = Agent("ckms-minden", reading, AgentConfig(users=[user]))
    print(f"agent: listening on udp port {await agent.start()}", flush=True)
    await asyncio.Event().wait()
if sys.argv[4] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def _env(source: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    return env


def _started(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "port" not in line:
        proc.kill()
        raise SystemExit(f"bench: the agent did not start: {line!r}")
    return int(line.split()[-1])


def start_node(source: Path | None, loop: str) -> tuple[subprocess.Popen[str], int]:
    c = NODE_USER
    proc = subprocess.Popen(
        [sys.executable, "-c", NODE_AGENT, c.user, c.auth, c.priv, loop],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(source),
        cwd=tempfile.gettempdir(),
    )
    return proc, _started(proc)


def start_aaa(source: Path | None, loop: str, folder: Path) -> tuple[subprocess.Popen[str], int]:
    from appliance.aaa.registry import Contract, Registry, Sae, User

    reg = Registry(folder / "registry.db")
    reg.attach(1, 2)
    reg.attach(15, 2)
    reg.add_user(User(id="alice", customer="alice"))
    reg.add_sae(Sae(id="alice-a", user="alice", ukms=1))
    reg.add_sae(Sae(id="alice-b", user="alice", ukms=15))
    big = 2**50
    reg.add_contract(
        Contract(
            id="alice-c",
            user="alice",
            keys_per_day=big,
            bits_per_day=big,
            keys_per_month=big,
            bits_per_month=big,
            max_rate=1_000_000,
            pairs=(("alice-a", "alice-b"),),
        )
    )
    reg.close()
    lines = ['listen = "127.0.0.1:0"', "[operator]"]
    lines += [f'{k} = "{v}"' for k, v in OPERATOR.model_dump().items()]
    lines += ["[[akms]]", "id = 2"] + [f'{k} = "{v}"' for k, v in AKMS.model_dump().items()]
    (folder / "aaa.toml").write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "appliance.cli", "aaa", "--dir", str(folder), "run"),
            *("--config", str(folder / "aaa.toml"), "--loop", loop),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(source),
        cwd=tempfile.gettempdir(),
    )
    return proc, _started(proc)


@dataclass(frozen=True)
class Workload:
    creds: Credentials
    requests: list[list[Any]]
    """Variable bindings of each request."""
    write: bool
    valid: Callable[[Any], bool]
    """What a checked answer's first value must satisfy."""
    discover: tuple[int, ...]


def node_work(n: int, _rows: int) -> Workload:
    from appliance.mgmt import mib

    oid = (*mib.oid("qkdnLinkKeyLevel"), 9)
    return Workload(NODE_USER, [[(oid, None)]] * n, False, lambda v: int(v) == 5000, oid)


def _ask_oid(rid: int) -> tuple[int, ...]:
    from appliance.aaa import mib

    m = mib.load()
    kinds = [m[name] for name in m["aaaQuotaEntry"].index]
    index = mib.encode_index(kinds, [1, rid, b"alice-a", b"alice-b", 1, 256])
    return (*m["aaaQuotaAnswer"].oid, *index)


def _granted(value: Any) -> bool:
    """An aaaQuotaAnswer that grants quota (not a refusal)."""
    from appliance.aaa.client import parse_answer
    from appliance.aaa.wallet import Terms

    return isinstance(parse_answer(1, bytes(value)), Terms)


def aaa_work(n: int, _rows: int) -> Workload:
    asks = [[(_ask_oid(1000 + i), None)] for i in range(n)]
    return Workload(AKMS, asks, False, _granted, _ask_oid(999))


def reports_work(n: int, rows: int) -> Workload:
    """SETs of ``rows`` usage reports each (as an AKMS's outbox sends them): master,
    slave, outcome delivered, keys, bits; every report a new request ID."""
    from appliance.aaa import mib

    m = mib.load()
    out = []
    for i in range(n):
        binds: list[Any] = []
        for j in range(rows):
            rid = f"{i:08x}{j:08x}".encode()
            suffix = (1, len(rid), *rid)
            binds += [
                ((*m["aaaUsageMaster"].oid, *suffix), rfc1902.OctetString(b"alice-a")),
                ((*m["aaaUsageSlave"].oid, *suffix), rfc1902.OctetString(b"alice-b")),
                ((*m["aaaUsageOutcome"].oid, *suffix), rfc1902.Integer32(1)),
                ((*m["aaaUsageKeys"].oid, *suffix), rfc1902.Unsigned32(1)),
                ((*m["aaaUsageBits"].oid, *suffix), rfc1902.Unsigned32(256)),
            ]
        out.append(binds)
    return Workload(AKMS, out, True, lambda _v: True, _ask_oid(999))


WORKLOADS: dict[str, Callable[[int, int], Workload]] = {
    "node": node_work,
    "aaa": aaa_work,
    "reports": reports_work,
}


async def one_round(port: int, pid: int, target: str, args: argparse.Namespace) -> dict[str, Any]:
    work = WORKLOADS[target](args.requests, args.rows)
    client = Prebuilt(port, work.creds)
    await client.discover(work.discover)
    t0 = time.perf_counter()
    messages = client.build(work.requests, work.write)
    built = time.perf_counter() - t0
    load0 = os.getloadavg()[0]
    cpu0 = process_cpu_s(pid)
    sent = blast(messages, port, args.window, args.timeout)
    cpu = process_cpu_s(pid) - cpu0
    answers = list(sent.pop("answers").values())
    step = max(1, len(answers) // max(1, args.check))
    good, bad = client.check(answers[::step][: args.check], work.valid)
    client.close()
    return {
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in sent.items()},
        "agent_cpu_ms_per_request": round(cpu * 1e3 / max(1, sent["answered"]), 3),
        "agent_requests_per_cpu_s": round(sent["answered"] / cpu, 1) if cpu else None,
        "build_ms_per_request": round(built * 1e3 / args.requests, 3),
        "checked_good": good,
        "checked_bad": bad,
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="qkdn-snmp-load-"))
    if args.target == "node":
        proc, port = start_node(args.source, args.loop)
    else:
        proc, port = start_aaa(args.source, args.loop, folder)
    try:
        rounds = [await one_round(port, proc.pid, args.target, args) for _ in range(args.rounds)]
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "target": args.target,
        "source": str(args.source or "this tree"),
        "window": args.window,
        "requests": args.requests,
        "rounds": rounds,
        "per_s_median": statistics.median(r["per_s"] for r in rounds),
        "cpu_ms_median": statistics.median(r["agent_cpu_ms_per_request"] for r in rounds),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
    }


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=tuple(WORKLOADS))
    p.add_argument("--rows", type=int, default=16, help="reports per SET (reports)")
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--check", type=int, default=200, help="answers decrypted and checked")
    p.add_argument("--source", type=Path, help="import the agent from this tree")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (
        0 < args.requests <= 100_000
        and 0 < args.window <= 512
        and 0 < args.rounds <= 20
        and 0 < args.rows <= 64
    ):
        p.error("a count out of range")
    result = asyncio.run(main(args))
    for r in result["rounds"]:
        print(
            f"{args.target}: {r['per_s']:.0f}/s wall ({r['answered']} answered, {r['lost']} lost, "
            f"window {args.window}), p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; agent "
            f"CPU {r['agent_cpu_ms_per_request']:.3f} ms per request "
            f"(= {r['agent_requests_per_cpu_s']}/s per core); checked {r['checked_good']} good, "
            f"{r['checked_bad']} bad; build {r['build_ms_per_request']:.2f} ms per request; "
            f"load {r['load_before']:.1f}-{r['load_after']:.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli()
