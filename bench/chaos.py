"""Reliability benchmark (issue 13): key requests through ETSI 014 while nodes are killed.

Starts DemoQuanDT with ``qkdn net up --stock 0`` (every enc_keys crosses the network) and
runs ``--requests`` key requests from 4 requester threads, each with its own SAE
connections (:mod:`appliance.sae_http`): enc_keys at the master SAE's UKMS, then dec_keys
of the same key ID at the slave SAE's UKMS, each call retried after a failure as an SAE
would (a pause of 0.25 s, for ``--retry-window`` seconds). Meanwhile it kills ``--kills``
processes with SIGKILL, one kind after another in a seeded random order (the supervisor,
a UKMS, an access node, a core CKMS; the member at random), each once the previous kill
has resumed and the requests have reached a point spread evenly over the run. When the supervisor is
killed, its nodes must die with it; the bench then starts the network again on the same
directory (``qkdn net up``) and goes on.

It reports:
  * keys delivered to the master and obtained by the slave, lost (delivered to the master,
    not obtainable by the slave within ``--retry-window`` seconds of retries), duplicated
    (a key ID issued twice, or a delivered key given out again: every ``--replay-every``-th
    delivered ID is asked for once more) and mismatched (other bits at the two ends);
  * failed requests (no key from the master within the window), failed calls by kind
    (``503-json``, other statuses, ``refused``: no process listened, ``connection``: reset,
    ``bad-http``: the answer was cut, ``timeout``), and whether every failure, and every
    failure the KME answered, was a 503 with a JSON body;
  * per kill: the victim, the time until an enc_keys sent after the kill succeeded end to
    end (resumed), and until the node ran again (restarted: for the supervisor, until
    ``net up`` had started the network again);
  * processes left after ``qkdn net down`` (found by command line and by pid).

If ``net up`` fails after a supervisor kill (on a shared machine another program may take
the network's ports while they are free), it is tried again on a fresh port range (the
requesters follow), up to 3 times; then the run is aborted and says so.

Keys are compared by SHA-256 digest; no key is printed or kept. Exit status 1 when a key
was lost, duplicated or mismatched, a process was left behind, or the run was aborted.
Usage: python bench/chaos.py [--requests N] [--kills K] [--seed S] [--max-seconds T]
                             [--retry-window S] [--replay-every N] [--speedup X]
                             [--dir DIR] [--json]

The emulated links run ``--speedup`` times faster than real time (default 10): at real
time the slowest link of the Berlin-Bonn path (Bielefeld-Hamm, 300 bit/s) holds ~4,200
link keys after ``net up``'s hour of back-dated distillation and makes 1.2 a second, so a
long run would mostly measure that link running dry (clean 503s, no key lost), not the
kills.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.cli.net import status_doc
from appliance.config.render import find_free_base_port
from appliance.kms import netproc
from appliance.sae_http import HttpResponseError, HttpsConnection, Response
from appliance.tkey import SaeEndpoint, endpoints

Seen = dict[int, int | None]
"""Pids of the network seen during the run, each with its start time (None: gone already)."""

MASTER, SLAVE = "sae-berlin-1", "sae-bonn-1"
REQUESTERS = 4
KINDS = ("supervisor", "ukms", "akms", "ckms")
RESUME_TIMEOUT_S = 120.0
"""A kill not followed by a successful request within this long counts as not resumed."""
BACKOFF_S = 0.25
"""A requester's pause after a failed call (an SAE does not hammer a KME that fails)."""
RESTARTS = 3
"""Attempts to start the network again after its supervisor was killed."""
QKDN = [sys.executable, "-m", "appliance.cli"]


@dataclass
class Kill:
    at_request: int
    kind: str
    victim: str = ""
    pid: int = 0
    t: float = 0.0
    resumed_s: float | None = None
    restarted_s: float | None = None
    note: str = ""


@dataclass
class Ledger:
    """Everything the requesters and the killer share, under one lock."""

    requests: int
    deadline: float
    start: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0
    finished: int = 0
    issued: dict[str, bytes] = field(default_factory=dict)
    obtained: set[str] = field(default_factory=set)
    delivered: int = 0
    lost: list[dict[str, Any]] = field(default_factory=list)
    """Each lost key: its ID, when the master got it and how its first dec_keys failed."""
    duplicated_ids: list[str] = field(default_factory=list)
    redelivered: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    failed_requests: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    successes: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of every request that succeeded end to end."""
    kills: list[Kill] = field(default_factory=list)
    endpoints: tuple[SaeEndpoint, SaeEndpoint] | None = None
    base_port: int = 0
    speedup: float = 1.0
    """The emulated links' speed-up (``net up --speedup``), again at every restart."""
    generation: int = 0
    """Bumped when the network comes back on other ports (its old ones were taken)."""
    aborted: str = ""
    """Why the run stopped early (the network could not be started again)."""
    unresolved: list[str] = field(default_factory=list)
    """Keys at the master whose fetch an abort cut short (neither obtained nor lost)."""
    next_kill: int = 0
    resumed_upto: int = 0
    """Kills [0, resumed_upto) have resumed or timed out."""

    def abort(self, reason: str) -> None:
        with self.lock:
            self.aborted, self.deadline = reason, time.monotonic()

    def take(self) -> int | None:
        """The next request number, or None when done; waits while a kill is due."""
        while time.monotonic() < self.deadline:
            with self.lock:
                due = self.next_kill < len(self.kills) and self.resumed_upto == self.next_kill
                gated = due and self.started >= self.kills[self.next_kill].at_request
                if not gated:
                    if self.started >= self.requests:
                        return None
                    self.started += 1
                    return self.started
            time.sleep(0.001)
        return None


# -- one key request ---------------------------------------------------------------------
def classify(outcome: Response | BaseException) -> str:
    """A failed call's kind: ``503-json`` is the clean one."""
    if isinstance(outcome, BaseException):
        if isinstance(outcome, ConnectionRefusedError):
            return "refused"
        if isinstance(outcome, TimeoutError):
            return "timeout"
        if isinstance(outcome, HttpResponseError):
            return "bad-http"
        return "connection"
    try:
        doc = json.loads(outcome.body)
        is_json = isinstance(doc, dict) and "message" in doc
    except ValueError:
        is_json = False
    return f"{outcome.status}-{'json' if is_json else 'no-json'}"


def call(
    conn: HttpsConnection, method: str, path: str, body: Any = None
) -> Response | OSError | HttpResponseError:
    try:
        raw = None if body is None else json.dumps(body).encode()
        return conn.request(method, path, raw)
    except (OSError, HttpResponseError) as exc:
        conn.close()
        return exc


class Client:
    """One requester's connections to the two KMEs, opened again on the network's new
    ports when it had to come back on others."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger, self.generation = ledger, -1
        self.conns: tuple[HttpsConnection, HttpsConnection] | None = None

    def enc(self) -> HttpsConnection:
        return self._current()[0]

    def dec(self) -> HttpsConnection:
        return self._current()[1]

    def _current(self) -> tuple[HttpsConnection, HttpsConnection]:
        with self.ledger.lock:
            generation, ends = self.ledger.generation, self.ledger.endpoints
        if self.conns is None or generation != self.generation:
            assert ends is not None
            self.close()
            self.conns, self.generation = (ends[0].connect(), ends[1].connect()), generation
        return self.conns

    def close(self) -> None:
        for conn in self.conns or ():
            conn.close()


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def request_once(ledger: Ledger, client: Client, n: int, args: Any) -> None:
    try:
        request_keys(ledger, client, n, args)
    finally:
        with ledger.lock:
            ledger.finished += 1


def request_keys(ledger: Ledger, client: Client, n: int, args: Any) -> None:
    """enc_keys at the master's KME, then dec_keys at the slave's, each retried as an SAE
    would (after a pause, for ``--retry-window`` seconds); the ledger kept."""
    until = min(time.monotonic() + args.retry_window, ledger.deadline)
    while True:
        t0 = time.monotonic()
        got = call(client.enc(), "GET", f"/api/v1/keys/{SLAVE}/enc_keys?number=1")
        if isinstance(got, Response) and got.status == 200:
            break
        with ledger.lock:
            ledger.failures[f"enc {classify(got)}"] += 1
        if time.monotonic() >= until:
            with ledger.lock:
                ledger.failed_requests += 1
            return
        time.sleep(BACKOFF_S)
    key = json.loads(got.body)["keys"][0]
    key_id, want = key["key_ID"], digest(key["key"])
    del key, got
    with ledger.lock:
        if key_id in ledger.issued:
            ledger.duplicated_ids.append(key_id)
        ledger.issued[key_id] = want
        ledger.delivered += 1
    if not fetch(ledger, client, key_id, want, args.retry_window):
        return
    with ledger.lock:
        ledger.successes.append((t0, time.monotonic()))
    if n % args.replay_every == 0:
        again = call(client.dec(), "POST", f"/api/v1/keys/{MASTER}/dec_keys", ids(key_id))
        if isinstance(again, Response) and again.status == 200:
            with ledger.lock:
                ledger.redelivered.append(key_id)


def ids(key_id: str) -> dict[str, Any]:
    return {"key_IDs": [{"key_ID": key_id}]}


def fetch(ledger: Ledger, client: Client, key_id: str, want: bytes, window: float) -> bool:
    """dec_keys until the slave holds the key or ``window`` seconds pass (or the run is
    aborted); True if it got the same bits."""
    issued, until, first = time.monotonic(), time.monotonic() + window, ""
    while True:
        got = call(client.dec(), "POST", f"/api/v1/keys/{MASTER}/dec_keys", ids(key_id))
        if isinstance(got, Response) and got.status == 200:
            keys = json.loads(got.body)["keys"]
            same = [k["key_ID"] for k in keys] == [key_id] and digest(keys[0]["key"]) == want
            del keys, got
            with ledger.lock:
                if same:
                    ledger.obtained.add(key_id)
                else:
                    ledger.mismatched.append(key_id)
            return same
        kind = classify(got)
        first = first or kind
        with ledger.lock:
            ledger.failures[f"dec {kind}"] += 1
        if ledger.aborted:
            with ledger.lock:
                ledger.unresolved.append(key_id)
            return False
        if time.monotonic() >= until:
            lost = {"key_ID": key_id, "issued_s": round(issued - ledger.start, 2)}
            with ledger.lock:
                ledger.lost.append({**lost, "first_dec_failure": first})
            return False
        time.sleep(BACKOFF_S)


def requester(ledger: Ledger, args: Any) -> None:
    client = Client(ledger)
    try:
        while (n := ledger.take()) is not None:
            request_once(ledger, client, n, args)
    finally:
        client.close()


# -- the killer --------------------------------------------------------------------------
def plan_kills(requests: int, kills: int, rng: random.Random) -> list[Kill]:
    kinds = list(KINDS)
    rng.shuffle(kinds)
    step = requests / (kills + 1)
    points = [int(step * (i + 1) + rng.uniform(-step / 4, step / 4)) for i in range(kills)]
    return [Kill(max(1, p), kinds[i % len(kinds)]) for i, p in enumerate(points)]


def victims(status: dict[str, Any], kind: str) -> list[tuple[str, int]]:
    if kind == "supervisor":
        return [("supervisor", int(status["supervisor_pid"]))]
    return [(n["name"], n["pid"]) for n in status["nodes"] if _is(kind, n["role"]) and n["alive"]]


def _is(kind: str, role: str) -> bool:
    """UKMSs, access nodes (``akms+ckms``) and core CKMSs are the node kinds killed."""
    return "akms" in role if kind == "akms" else role == kind


def killer(ledger: Ledger, net: Path, rng: random.Random, seen: Seen) -> None:
    for i, kill in enumerate(ledger.kills):
        while time.monotonic() < ledger.deadline:
            with ledger.lock:
                if ledger.started >= kill.at_request:
                    break
            time.sleep(0.001)
        else:
            return
        try:
            strike(ledger, kill, net, rng, seen)
        finally:
            with ledger.lock:
                ledger.next_kill = ledger.resumed_upto = i + 1


def strike(ledger: Ledger, kill: Kill, net: Path, rng: random.Random, seen: Seen) -> None:
    """One kill, into the requests in flight; then until the network has resumed."""
    time.sleep(rng.uniform(0.0, 0.03))
    status = status_doc(net)
    remember(seen, (pid for n in status["nodes"] for pid in n["pids"]))
    candidates = victims(status, kill.kind)
    if not candidates:
        kill.note = f"no live {kill.kind} to kill"
        return
    kill.victim, kill.pid = rng.choice(candidates)
    kill.t = time.monotonic()
    os.kill(kill.pid, signal.SIGKILL)
    with ledger.lock:
        ledger.next_kill += 1  # the requesters go on while the network recovers
    if kill.kind == "supervisor":
        restart_network(ledger, kill, status, net)
    else:
        wait_restarted(kill, net)
    wait_resumed(ledger, kill)


def net_up(net: Path, base_port: int, speedup: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QKDN, "net", "up", "demoquandt", "--dir", str(net), "--base-port", str(base_port),
         "--stock", "0", "--timeout", "120", "--speedup", f"{speedup:g}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def restart_network(ledger: Ledger, kill: Kill, before: dict[str, Any], net: Path) -> None:
    """The nodes must die with their supervisor; then ``net up`` on the same directory. If
    that fails (on a shared machine another program may take the ports while they are
    free), on a fresh port range, up to :data:`RESTARTS` times; then the run is aborted."""
    pids = {pid for n in before["nodes"] for pid in n["pids"] if pid}
    left = netproc.wait_gone(pids, net, 15.0)
    if left:
        kill.note = f"{len(left)} nodes outlived their supervisor: {sorted(left)}."
    for _ in range(RESTARTS):
        up = net_up(net, ledger.base_port, ledger.speedup)
        if up.returncode == 0:
            break
        kill.note += f" net up on base port {ledger.base_port} failed: {up.stderr.strip()}."
        ledger.base_port = find_free_base_port()
    else:
        ledger.abort(f"the network could not be started again after kill {kill.victim}")
        return
    kill.restarted_s = time.monotonic() - kill.t
    ends = endpoints(status_doc(net), MASTER, SLAVE)
    with ledger.lock:
        if ends != ledger.endpoints:
            ledger.endpoints, ledger.generation = ends, ledger.generation + 1


def wait_restarted(kill: Kill, net: Path) -> None:
    while time.monotonic() < kill.t + RESUME_TIMEOUT_S:
        node = next(n for n in status_doc(net)["nodes"] if n["name"] == kill.victim)
        if node["alive"] and kill.pid not in node["pids"]:
            kill.restarted_s = time.monotonic() - kill.t
            return
        time.sleep(0.05)


def wait_resumed(ledger: Ledger, kill: Kill) -> None:
    while time.monotonic() < kill.t + RESUME_TIMEOUT_S:
        with ledger.lock:
            after = [end for start, end in ledger.successes if start > kill.t]
            if after:
                kill.resumed_s = min(after) - kill.t
                return
            if ledger.finished >= ledger.requests:
                return
        time.sleep(0.02)


# -- the run -----------------------------------------------------------------------------
def left_behind(net: Path, seen: Seen) -> list[int]:
    """Processes still running after net down: by marker, command line or known pid (the
    same process: its start time as when it was seen; pids are recycled)."""
    found = set(netproc.find_processes(net))
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            mark = str(net).encode()
            if any(a == mark or a.startswith(mark + b"/") for a in argv):
                found.add(int(entry.name))
    found |= {pid for pid, start in seen.items() if start is not None and _started(pid) == start}
    return sorted(found)


def remember(seen: Seen, pids: Iterable[int]) -> None:
    for pid in pids:
        if pid and pid not in seen:
            seen[pid] = _started(pid)


def _started(pid: int) -> int | None:
    """When a live (not zombie) process started, in clock ticks since boot; None if none."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def run(args: argparse.Namespace, net: Path) -> dict[str, Any]:
    base_port = find_free_base_port()
    up = net_up(net, base_port, args.speedup)
    if up.returncode != 0:
        raise SystemExit(f"chaos: the network did not start: {up.stderr.strip()}")
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    ledger = Ledger(args.requests, t0 + args.max_seconds)
    ledger.kills = plan_kills(args.requests, args.kills, rng)
    ledger.endpoints, ledger.base_port = endpoints(status_doc(net), MASTER, SLAVE), base_port
    ledger.speedup = args.speedup
    seen: Seen = {}
    threads = [threading.Thread(target=requester, args=(ledger, args)) for _ in range(REQUESTERS)]
    threads.append(threading.Thread(target=killer, args=(ledger, net, rng, seen)))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        status = status_doc(net)
        remember(seen, (pid for n in status["nodes"] for pid in n["pids"]))
        remember(seen, [int(status.get("supervisor_pid") or 0)])
        down = subprocess.run(
            [*QKDN, "net", "down", "--dir", str(net)], capture_output=True, text=True
        )
    return report(ledger, args, time.monotonic() - t0, left_behind(net, seen), down.returncode)


def report(
    ledger: Ledger, args: argparse.Namespace, elapsed: float, left: list[int], down: int
) -> dict[str, Any]:
    unclean = [k for k in ledger.failures if not k.endswith(" 503-json")]
    answered = [k for k in unclean if k.split()[1][:1].isdigit()]
    return {
        "requests": ledger.started,
        "requested": args.requests,
        "seed": args.seed,
        "speedup": args.speedup,
        "seconds": round(elapsed, 1),
        "aborted": ledger.aborted,
        "keys": {
            "delivered_to_master": ledger.delivered,
            "obtained_by_slave": len(ledger.obtained),
            "lost": len(ledger.lost),
            "duplicated": len(ledger.duplicated_ids) + len(ledger.redelivered),
            "mismatched": len(ledger.mismatched),
            "unresolved_by_the_abort": len(ledger.unresolved),
        },
        "lost_keys": ledger.lost,
        "failed_requests": ledger.failed_requests,
        "failed_calls": dict(sorted(ledger.failures.items())),
        "every_failure_a_clean_503": not unclean,
        "every_answered_failure_a_clean_503": not answered,
        "kills": [
            {
                "victim": k.victim,
                "kind": k.kind,
                "at_request": k.at_request,
                "t_s": round(k.t - ledger.start, 2),
                "resumed_s": None if k.resumed_s is None else round(k.resumed_s, 2),
                "restarted_s": None if k.restarted_s is None else round(k.restarted_s, 2),
                **({"note": k.note.strip()} if k.note else {}),
            }
            for k in ledger.kills
            if k.victim
        ],
        "kills_planned": len(ledger.kills),
        "net_down_status": down,
        "left_after_net_down": left,
    }


def show(doc: dict[str, Any]) -> None:
    keys = doc["keys"]
    print(f"chaos: {doc['requests']} of {doc['requested']} requests, {len(doc['kills'])} of "
          f"{doc['kills_planned']} kills, seed {doc['seed']}, {doc['seconds']} s")  # fmt: skip
    if doc["aborted"]:
        print(f"ABORTED: {doc['aborted']} ({keys['unresolved_by_the_abort']} keys unresolved)")
    print(
        f"keys: {keys['delivered_to_master']} delivered to the master, "
        f"{keys['obtained_by_slave']} obtained by the slave; lost {keys['lost']}, "
        f"duplicated {keys['duplicated']}, mismatched {keys['mismatched']}"
    )
    for lost in doc["lost_keys"]:
        print(
            f"  lost: {lost['key_ID']}, at the master at {lost['issued_s']} s, "
            f"first dec_keys failure: {lost['first_dec_failure']}"
        )
    print(f"failed requests (no key from the master within the window): {doc['failed_requests']}")
    calls = ", ".join(f"{k} x{v}" for k, v in doc["failed_calls"].items()) or "none"
    print(f"failed calls: {calls}")
    yes = {True: "yes", False: "no"}
    print(
        f"every failure a 503 with a JSON body: {yes[doc['every_failure_a_clean_503']]}; "
        f"every failure the KME answered: {yes[doc['every_answered_failure_a_clean_503']]}"
    )
    print(f"{'#':>2}  {'t (s)':>7}  {'victim':<18} {'kind':<10} {'resumed':>9} {'restarted':>10}")
    for i, k in enumerate(doc["kills"], 1):
        resumed = "never" if k["resumed_s"] is None else f"{k['resumed_s']:.2f} s"
        restarted = "-" if k["restarted_s"] is None else f"{k['restarted_s']:.2f} s"
        row = f"{i:>2}  {k['t_s']:>7.2f}  {k['victim']:<18} {k['kind']:<10} {resumed:>9}"
        print(f"{row} {restarted:>10}" + (f"  {k['note']}" if "note" in k else ""))
    left = doc["left_after_net_down"]
    print(f"left after net down (exit {doc['net_down_status']}): {left if left else 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument(
        "--retry-window",
        type=float,
        default=120.0,
        help="seconds a requester retries a failed enc_keys or dec_keys (default: %(default)s)",
    )
    parser.add_argument("--replay-every", type=int, default=10)
    parser.add_argument(
        "--speedup",
        type=float,
        default=10.0,
        help="emulated links run X times faster (default: %(default)s; at 1, the slowest "
        "link of the path, Bielefeld-Hamm at 300 bit/s, holds ~4,200 keys and runs dry "
        "after a few thousand requests: a capacity limit, not a fault)",
    )
    parser.add_argument(
        "--dir", type=Path, help="network directory (default: a fresh temporary one)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    if not (args.requests > 0 and 0 <= args.kills < args.requests and args.replay_every > 0):
        parser.error("expected 0 <= --kills < --requests and --replay-every > 0")
    if not (0 < args.max_seconds < 86400 and 0 < args.retry_window < 3600):
        parser.error("expected 0 < --max-seconds < 86400 and 0 < --retry-window < 3600")
    if not 0 < args.speedup <= 1000:
        parser.error("expected 0 < --speedup <= 1000")
    with tempfile.TemporaryDirectory(prefix="qkdn-chaos-") as tmp:
        doc = run(args, (args.dir or Path(tmp) / "net").resolve())
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        show(doc)
    keys = doc["keys"]
    bad = keys["lost"] or keys["duplicated"] or keys["mismatched"] or doc["left_after_net_down"]
    bad = bad or doc["aborted"]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
