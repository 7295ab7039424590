"""Benchmark of the AAA device (appliance/aaa): credit requests per second over SNMPv3,
suspension -> INFORM latency, and what validation costs an AKMS when quota is held.

The agent runs as its own process (``qkdn aaa run``), as in a data centre; the bench
process plays the AKMSs (AaaClient, pysnmp, authPriv SHA-256/AES-128).

1. ``--asks`` quota asks (one SNMPv3 GET each: aaaQuotaTable row), ``--concurrency``
   in flight, spread over the two AKMS users: asks per second, latency p50/p99.
2. ``--suspensions`` times: an AKMS holds a grant, the operator suspends the user
   (a registry commit, as ``qkdn aaa user suspend`` does; the agent polls every 0.1 s),
   the AKMS's listener receives the aaaQuotaRevoked INFORM: latency p50/p99 from the
   commit to the INFORM's arrival; then the user is resumed.
3. ``--validations`` AaaValidator.validate calls answered from held quota (the wallet):
   microseconds per call: what credit control adds to a request on the key path when
   the AKMS does not wait on AAA.

Usage: python bench/aaa.py [--asks 2000] [--concurrency 16] [--suspensions 40]
       [--validations 100000] [--agent-loop uvloop|asyncio] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.aaa.agent import AkmsUser, Credentials
from appliance.aaa.client import AaaClient, AaaValidator
from appliance.aaa.registry import Contract, Registry, Sae, User
from appliance.aaa.wallet import Terms
from appliance.kms.netproc import process_cpu_s
from appliance.kms.seams import ValidationQuery, Verdict

OPERATOR = Credentials(user="operator", auth="operator-auth-1", priv="operator-priv-1")
AKMS = [
    AkmsUser(id=2, user="akms-2", auth="akms-2-auth-key", priv="akms-2-priv-key"),
    AkmsUser(id=14, user="akms-14", auth="akms-14-auth-key", priv="akms-14-priv-key"),
]
BIG = 2**50


def populate(reg: Registry) -> None:
    reg.attach(1, 2)
    reg.attach(15, 14)
    for user in ("alice", "bob", "carol"):
        reg.add_user(User(id=user, customer=user))
        reg.add_sae(Sae(id=f"{user}-a", user=user, ukms=1))
        reg.add_sae(Sae(id=f"{user}-b", user=user, ukms=15))
        reg.add_contract(
            Contract(
                id=f"{user}-c",
                user=user,
                keys_per_day=BIG,
                bits_per_day=BIG,
                keys_per_month=BIG,
                bits_per_month=BIG,
                max_rate=1_000_000,
                pairs=((f"{user}-a", f"{user}-b"), (f"{user}-b", f"{user}-a")),
            )
        )


def config_text(informs: dict[int, int]) -> str:
    lines = [
        'listen = "127.0.0.1:0"',
        "[operator]",
        f'user = "{OPERATOR.user}"',
        f'auth = "{OPERATOR.auth}"',
        f'priv = "{OPERATOR.priv}"',
    ]
    for a in AKMS:
        lines += [
            "[[akms]]",
            f"id = {a.id}",
            f'user = "{a.user}"',
            f'auth = "{a.auth}"',
            f'priv = "{a.priv}"',
            f'inform = "127.0.0.1:{informs[a.id]}"',
        ]
    return "\n".join(lines) + "\n"


def start_agent(folder: Path, loop: str) -> tuple[subprocess.Popen[str], int]:
    profile = (
        ["-m", "cProfile", "-o", os.environ["AAA_PROFILE"]] if "AAA_PROFILE" in os.environ else []
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            *profile,
            "-m",
            "appliance.cli",
            "aaa",
            "--dir",
            str(folder),
            "run",
            "--config",
            str(folder / "aaa.toml"),
            "--loop",
            loop,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "port" not in line:
        proc.kill()
        raise SystemExit(f"bench: the agent did not start: {line!r}")
    return proc, int(line.split()[-1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def asks(clients: list[AaaClient], n: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    queue = list(range(n))

    async def worker(w: int) -> None:
        client = clients[(w % 2) * 2 + (w // 2) % 2]  # even: AKMS 2, odd: AKMS 14
        ukms, master, slave = (1, "alice-a", "alice-b") if w % 2 == 0 else (15, "bob-b", "bob-a")
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            answer = await client.ask(ukms, master, slave, 100, 25_600)
            latencies.append(time.perf_counter() - t0)
            assert isinstance(answer, Terms), answer

    for c in clients:  # engine discovery before timing
        await c.ask(
            1 if c.creds.user == "akms-2" else 15,
            *(("alice-a", "alice-b") if c.creds.user == "akms-2" else ("bob-b", "bob-a")),
            1,
            256,
        )
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    took = time.perf_counter() - t0
    return {
        "asks": n,
        "concurrency": concurrency,
        "per_s": n / took,
        "p50_ms": pct(latencies, 0.5) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
    }


async def baseline(port: int, n: int, concurrency: int) -> dict[str, float]:
    """The floor: plain authPriv GETs of one scalar (aaaGrantsIssued.0) as the operator,
    same agent, same concurrency: what pysnmp costs without any AAA decision."""
    from appliance.aaa import mib

    client = AaaClient(f"127.0.0.1:{port}", OPERATOR)
    oid = (*mib.oid("aaaGrantsIssued"), 0)
    await client.get([oid])
    remaining = [n]

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await client.get([oid])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    took = time.perf_counter() - t0
    client.close()
    return {"gets": n, "per_s": n / took}


async def suspensions(
    db: Path, client: AaaClient, got: asyncio.Queue[float], n: int
) -> dict[str, float]:
    """Carol's grants only: each suspension revokes exactly one grant."""
    reg = Registry(db)
    latencies = []
    try:
        for _ in range(n):
            terms = await client.ask(1, "carol-a", "carol-b", 10, 2560)
            for _poll in range(50):  # the agent takes a resumption in within one poll
                if isinstance(terms, Terms):
                    break
                await asyncio.sleep(0.02)
                terms = await client.ask(1, "carol-a", "carol-b", 10, 2560)
            assert isinstance(terms, Terms), terms
            while not got.empty():
                got.get_nowait()
            t0 = time.perf_counter()
            reg.set_user("carol", suspended=True)
            arrived = await asyncio.wait_for(got.get(), 5.0)
            latencies.append(arrived - t0)
            reg.set_user("carol", suspended=False)
    finally:
        reg.close()
    return {
        "suspensions": n,
        "p50_ms": pct(latencies, 0.5) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
        "max_ms": max(latencies) * 1e3,
    }


async def validations(client: AaaClient, n: int) -> dict[str, float]:
    validator = AaaValidator(client)
    q = ValidationQuery(master="bob-a", slave="bob-b", number=1, size=256, ukms=1)
    first = validator.validate(q)  # the first one waits for a grant
    assert not isinstance(first, Verdict)
    first = await first
    assert first.denied is None, first.denied
    waited, t0 = 0, time.perf_counter()
    for _ in range(n):
        v = validator.validate(q)
        if not isinstance(v, Verdict):  # the wallet ran dry: AAA is asked
            v = await v
        waited += v.denied is not None
    took = time.perf_counter() - t0
    return {"validations": n, "us_per_call": took / n * 1e6, "denied": waited}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="qkdn-aaa-bench-"))
    reg = Registry(folder / "registry.db")
    populate(reg)
    reg.close()
    got: asyncio.Queue[float] = asyncio.Queue()
    listeners = {a.id: AaaClient("127.0.0.1:9", a) for a in AKMS}
    ports = {
        i: c.listen("127.0.0.1:0", lambda _c, _g: got.put_nowait(time.perf_counter()))
        for i, c in listeners.items()
    }
    (folder / "aaa.toml").write_text(config_text(ports))
    proc, port = start_agent(folder, args.agent_loop)
    try:
        clients = [AaaClient(f"127.0.0.1:{port}", a) for a in AKMS for _ in range(2)]
        result: dict[str, Any] = {"baseline": await baseline(port, args.asks, args.concurrency)}
        cpu0 = process_cpu_s(proc.pid)
        result["asks"] = await asks(clients, args.asks, args.concurrency)
        cpu = process_cpu_s(proc.pid) - cpu0
        result["asks"]["agent_cpu_ms_per_ask"] = cpu / args.asks * 1e3
        result["asks"]["agent_capacity_per_core_s"] = args.asks / cpu if cpu else 0.0
        akms2 = AaaClient(f"127.0.0.1:{port}", AKMS[0])
        result["suspension"] = await suspensions(
            folder / "registry.db", akms2, got, args.suspensions
        )
        result["validation"] = await validations(akms2, args.validations)
        for c in [*clients, akms2, *listeners.values()]:
            c.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    return result


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--asks", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--suspensions", type=int, default=40)
    p.add_argument("--validations", type=int, default=100_000)
    p.add_argument("--agent-loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (
        0 < args.asks <= 100_000
        and 0 < args.concurrency <= 256
        and 0 < args.suspensions <= 1000
        and 0 < args.validations <= 10**7
    ):
        p.error("a count out of range")
    result = asyncio.run(main(args))
    result["machine"] = (
        f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} after the run"
    )
    print(result["machine"])
    a, s, v = result["asks"], result["suspension"], result["validation"]
    b = result["baseline"]
    print(
        f"baseline: {b['per_s']:.0f} plain authPriv GETs/s; asks are "
        f"{a['per_s'] / b['per_s']:.2f}x that"
    )
    print(
        f"asks: {a['per_s']:.0f}/s at {a['concurrency']} in flight, "
        f"p50 {a['p50_ms']:.1f} ms, p99 {a['p99_ms']:.1f} ms; agent CPU "
        f"{a['agent_cpu_ms_per_ask']:.2f} ms per ask (= {a['agent_capacity_per_core_s']:.0f}/s "
        "per core)"
    )
    print(
        f"suspension -> INFORM: p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, "
        f"max {s['max_ms']:.0f} ms over {s['suspensions']}"
    )
    print(
        f"validation from held quota: {v['us_per_call']:.1f} us per call "
        f"({v['denied']} denied of {v['validations']})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli()
