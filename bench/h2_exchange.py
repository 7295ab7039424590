"""Benchmark of the inter-node HTTP/2 transport (appliance/net/h2.py): cost of one exchange.

A server (H2Server answering every request with a ~400-byte JSON body) runs in one OS process
and a client (H2Client posting a ~400-byte JSON body, as a relay hop does) in another. For
sequential requests and for 16 concurrent requesters on one connection it reports the wall
time per exchange and the CPU time per exchange of each process (client: its own
``time.process_time``; server: utime + stime from ``/proc/PID/stat``, read around each phase).

Several implementations can be compared in one run: each is the ``appliance`` package of a git
revision (``git archive``), or the work tree; its processes get that package first on
PYTHONPATH. Runs of the implementations are interleaved, so noise from other work on the
machine hits them alike; the figures are medians over the runs, ratios against the first
implementation named.

Usage: python bench/h2_exchange.py [--impl NAME=REV|worktree ...] [--runs 5]
       [--requests 2000] [--concurrency 16] [--json PATH]
Default: ``--impl before=HEAD --impl after=worktree``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps(
    {
        "path": [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        "key_id": "0f6c7a34-2b7e-4c0e-9d8e-55b0d6f0a1b2",
        "sealed": "A" * 256,
        "hop": 5,
    }
).encode()
"""A relay-sized request and answer body (~400 bytes of JSON)."""


# -- processes ----------------------------------------------------------------------------
def _contexts(pki: Path, name: str, server: bool) -> Any:
    from appliance.pki import client_context, server_context

    make = server_context if server else client_context
    return make(pki / f"{name}.pem", pki / f"{name}.key", pki / "ca.pem", ("h2",))


async def _serve(pki: Path) -> None:
    from appliance.net.h2 import H2Server, Request, Response

    async def answer(request: Request) -> Response:
        return Response(200, BODY, {"content-type": "application/json"})

    server = H2Server(answer, _contexts(pki, "server", server=True))
    await server.start("127.0.0.1", 0)
    print(server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await server.close()


async def _client(pki: Path, port: int) -> None:
    """Answer commands on stdin (``N CONCURRENCY``) with a JSON line of wall and CPU time."""
    from appliance.net.h2 import H2Client

    client = H2Client("127.0.0.1", port, _contexts(pki, "client", False), expect_peer="server")
    loop = asyncio.get_running_loop()

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await client.request("POST", "/v1/relay", BODY)
            assert response.status == 200 and response.body == BODY

    await worker(100)  # connection set up, code warm
    print("ready", flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        total, concurrency = map(int, line.split())
        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
        done = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        print(json.dumps(done), flush=True)
    await client.close()


# -- orchestration ------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far. Its own reader, not
    ``netproc.cpu_ns``: this file runs against older revisions' packages too."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _make_pki(out: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    from appliance.pki import CertificateAuthority, write_pair

    ca = CertificateAuthority.create("bench", os.urandom)
    (out / "ca.pem").write_bytes(ca.cert.public_bytes(Encoding.PEM))
    for name in ("server", "client"):
        cert, key = ca.issue(name, os.urandom, server=True, hosts=("127.0.0.1", name))
        write_pair(cert, key, out / f"{name}.pem", out / f"{name}.key")


def _package_root(rev: str, scratch: Path) -> Path:
    """A directory holding the ``appliance`` package of ``rev`` (the work tree: ROOT)."""
    if rev == "worktree":
        return ROOT
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "appliance"], check=True, capture_output=True
    ).stdout
    out = scratch / rev
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out


class Pair:
    """One implementation's server and client processes."""

    def __init__(self, root: Path, pki: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(root)}
        me = [sys.executable, str(Path(__file__).resolve())]
        self.server = self._spawn([*me, "--role", "server", "--pki", str(pki)], env)
        port = self.server.stdout.readline().strip()  # type: ignore[union-attr]
        self.client = self._spawn([*me, "--role", "client", "--pki", str(pki), "--port", port], env)
        assert self.client.stdout is not None and self.client.stdout.readline().strip() == "ready"

    @staticmethod
    def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def measure(self, total: int, concurrency: int) -> dict[str, float]:
        """Per exchange: wall ms, client CPU ms, server CPU ms."""
        assert self.client.stdin is not None and self.client.stdout is not None
        server_cpu = _cpu_s(self.server.pid)
        self.client.stdin.write(f"{total} {concurrency}\n")
        self.client.stdin.flush()
        done = json.loads(self.client.stdout.readline())
        server_cpu = _cpu_s(self.server.pid) - server_cpu
        n = total // concurrency * concurrency
        return {
            "wall_ms": done["wall_s"] / n * 1e3,
            "client_cpu_ms": done["cpu_s"] / n * 1e3,
            "server_cpu_ms": server_cpu / n * 1e3,
        }

    def close(self) -> None:
        for proc in (self.client, self.server):
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def pairs(impls: dict[str, str]) -> Iterator[dict[str, Pair]]:
    with tempfile.TemporaryDirectory(prefix="h2bench-") as tmp:
        scratch = Path(tmp)
        _make_pki(scratch)
        started: dict[str, Pair] = {}
        try:
            for name, rev in impls.items():
                started[name] = Pair(_package_root(rev, scratch), scratch)
            yield started
        finally:
            for pair in started.values():
                pair.close()


def run(impls: dict[str, str], runs: int, total: int, concurrency: int) -> dict[str, Any]:
    modes = {"sequential": 1, f"concurrent-{concurrency}": concurrency}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        name: {mode: [] for mode in modes} for name in impls
    }
    with pairs(impls) as started:
        for i in range(runs):
            for mode, conc in modes.items():
                for name, pair in started.items():
                    samples[name][mode].append(pair.measure(total, conc))
            print(f"run {i + 1}/{runs} done", file=sys.stderr)
    medians = {
        name: {
            mode: {k: statistics.median(s[k] for s in runs_) for k in runs_[0]}
            for mode, runs_ in by_mode.items()
        }
        for name, by_mode in samples.items()
    }
    return {"impls": impls, "requests": total, "body_bytes": len(BODY), "medians": medians}


def report(result: dict[str, Any]) -> None:
    names = list(result["medians"])
    base = result["medians"][names[0]]
    print(f"body {result['body_bytes']} B, {result['requests']} exchanges per run")
    print(f"{'impl':<10} {'mode':<14} {'wall ms':>8} {'client ms':>10} {'server ms':>10}  ratio")
    for name in names:
        for mode, m in result["medians"][name].items():
            b = base[mode]
            ratios = "/".join(f"{b[k] / m[k]:.2f}" for k in m)
            print(
                f"{name:<10} {mode:<14} {m['wall_ms']:8.3f} {m['client_cpu_ms']:10.3f} "
                f"{m['server_cpu_ms']:10.3f}  {ratios}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("server", "client"))
    parser.add_argument("--pki", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--impl", action="append", help="NAME=REV or NAME=worktree")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.role == "server":
        return asyncio.run(_serve(args.pki))
    if args.role == "client":
        return asyncio.run(_client(args.pki, args.port))
    impls = dict(i.split("=", 1) for i in args.impl or ["before=HEAD", "after=worktree"])
    result = run(impls, args.runs, args.requests, args.concurrency)
    result["machine"] = (
        f"{platform.node()} {os.cpu_count()} CPU, Python {platform.python_version()}"
    )
    result["load_average"] = os.getloadavg()
    report(result)
    print(f"load average at the end: {result['load_average'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
