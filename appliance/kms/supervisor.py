"""Runs every KMS node of a rendered network as its own OS process, and restarts crashed ones.

Started by ``qkdn net up`` as a detached process. It writes ``run/state.json`` (its own pid
and each node's pid, restarts and log file) atomically after every change, restarts a node
that exits with a back-off (1 s doubling to 10 s, reset once a node has run for a minute),
and on SIGTERM stops every node (SIGTERM, then SIGKILL after 5 s) and exits. It does the
same when its network directory disappears (a removed test directory must not leave node
processes behind).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.kms.network import is_kms, load_configs

POLL_S = 0.2


@dataclass
class Child:
    name: str
    config: str
    log: str
    only: str | None = None
    """``akms`` or ``ckms`` when an access node runs as two processes."""
    pid: int = 0
    restarts: int = 0
    started: float = 0.0
    backoff: float = 1.0
    due: float = 0.0


class Supervisor:
    def __init__(
        self,
        net_dir: Path,
        mode: str,
        stock: int = 0,
        patience: float = 10.0,
        split_access: bool = False,
    ) -> None:
        self.dir, self.mode, self.stock, self.patience = net_dir, mode, stock, patience
        (net_dir / "logs").mkdir(exist_ok=True)
        (net_dir / "run").mkdir(exist_ok=True)
        self.children: dict[str, Child] = {}
        for name, cfg in load_configs(net_dir).items():
            if not is_kms(cfg):
                continue
            config = str(net_dir / "nodes" / f"{name}.toml")
            if split_access and cfg.node.role == "akms+ckms":
                for only in ("akms", "ckms"):
                    log = str(net_dir / "logs" / f"{name}.{only}.log")
                    self.children[f"{name}/{only}"] = Child(f"{name}/{only}", config, log, only)
            else:
                self.children[name] = Child(name, config, str(net_dir / "logs" / f"{name}.log"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def spawn(self, child: Child) -> None:
        with open(child.log, "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "appliance.cli",
                    "--log-level",
                    "info",
                    "--log-format",
                    "json",
                    "node",
                    "run",
                    "--config",
                    child.config,
                    "--mode",
                    self.mode,
                    "--stock",
                    str(self.stock),
                    "--patience",
                    str(self.patience),
                    *(["--only", child.only] if child.only else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs[child.name] = proc
        child.pid, child.started = proc.pid, time.monotonic()

    def write_state(self) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "mode": self.mode,
            "nodes": {n: asdict(c) for n, c in self.children.items()},
        }
        tmp = self.dir / "run" / "state.json.tmp"
        try:
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, self.dir / "run" / "state.json")
        except OSError:  # the directory went away: stop rather than run unseen
            self.stopping = True

    def tick(self) -> None:
        now = time.monotonic()
        for name, child in self.children.items():
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                if now - child.started > 60:
                    child.backoff = 1.0
                continue
            if proc is not None:  # it exited: schedule a restart
                del self.procs[name]
                child.due = now + child.backoff
                child.backoff = min(10.0, child.backoff * 2)
                child.restarts += 1
                child.pid = 0
                self.write_state()
            elif now >= child.due:
                self.spawn(child)
                self.write_state()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        for child in self.children.values():
            self.spawn(child)
        self.write_state()
        while not self.stopping:
            if not (self.dir / "run").is_dir():  # the network directory was removed
                break
            self.tick()
            time.sleep(POLL_S)
        self.stop()
        (self.dir / "run" / "state.json").unlink(missing_ok=True)
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="Supervise the KMS nodes of a rendered network")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--mode", default="gcm", choices=["gcm", "otp"])
    parser.add_argument("--stock", type=int, default=0)
    parser.add_argument("--patience", type=float, default=10.0)
    parser.add_argument("--split-access", action="store_true")
    args = parser.parse_args()
    supervisor = Supervisor(args.dir, args.mode, args.stock, args.patience, args.split_access)
    raise SystemExit(supervisor.run())


if __name__ == "__main__":
    main()
