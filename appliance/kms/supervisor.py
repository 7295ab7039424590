"""Runs every KMS node of a rendered network as its own OS process, and restarts crashed ones.

Started by ``qkdn net up`` as a detached process, with the network directory's lock
(:mod:`netproc`), which it holds for its whole life. With ``--aaa`` it also runs the data
centre's AAA device (``qkdn aaa run``, ``<dir>/aaa``) and starts each AKMS with its link to
it; with ``--mgmt``, the QKDN Manager (``qkdn manager run``, ``<dir>/mgmt``) and each node
with its SNMP agent. It restarts a node (or AAA) that exits, with
a back-off (1 s doubling to 10 s, reset once a node has run for a minute). Every node it
starts carries the network's marker in its environment and dies with the supervisor, even
when the supervisor is killed with SIGKILL (:func:`netproc.die_with_supervisor`).

Its state (its own pid; each node's pid, restarts and log file) is written atomically to
``run/state.json`` after every change, and served live on the control socket, which
``qkdn net status`` asks first. A failed write (ENOSPC, EIO: a full or failing disk) does
not stop the network: the supervisor logs it once with the code NET-STATE-WRITE, reports
it as an alarm in its live state, retries every second, and logs when a write succeeds
again. It stops its nodes (SIGTERM, then SIGKILL after 5 s) and exits on SIGTERM or
SIGINT, and when its network directory is really gone (removed, or replaced by another).

What it must never do: stop its nodes because a write failed, or keep them running once
its directory is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.kms import netproc
from appliance.kms.network import is_kms, load_configs

POLL_S = 0.2
"""Longest wait between two looks at the nodes (control requests are answered at once)."""
RETRY_S = 1.0
"""Seconds between two attempts to write a state file that could not be written."""
STOP_S = 5.0
"""Seconds a node has to exit after SIGTERM before it gets SIGKILL."""

log = logging.getLogger("qkdn.supervisor")


_CLI = (sys.executable, "-m", "appliance.cli", "--log-level", "info", "--log-format", "json")
"""How the supervisor runs ``qkdn``: its own interpreter, JSON logs at level info."""


@dataclass
class Child:
    name: str
    config: str
    log: str
    only: str | None = None
    """``akms`` or ``ckms`` when an access node runs as two processes."""
    aaa: str | None = None
    """An AKMS's link file to the AAA device (``node run --aaa``); for the AAA device
    itself (``kind == "aaa"``), its folder."""
    kind: str = "node"
    terms: bool = False
    """A UKMS under AAA: it asks its AKMS for the contracts' terms (``--terms-from-akms``)."""
    mgmt: str | None = None
    """The node's SNMP agent file (``node run --mgmt``); for the manager, its config."""
    controller: bool = False
    """An access node that asks the QKDN Controller for paths (``node run --controller``);
    ``kind == "controller"`` is the controller itself (``qkdn controller run``)."""
    gnmi: bool = False
    """A CKMS that serves its SDN agent to the controller (``node run --gnmi``)."""
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
        lock_fd: int | None = None,
        aaa: bool = False,
        mgmt: bool = False,
        controller: bool = False,
    ) -> None:
        self.dir, self.mode, self.stock, self.patience = net_dir.resolve(), mode, stock, patience
        if lock_fd is None:
            lock_fd = netproc.lock_dir(self.dir)
        netproc.confirm_lock(lock_fd)
        self.lock_fd = lock_fd
        self.identity = _identity(self.dir)
        (self.dir / "logs").mkdir(exist_ok=True)
        (self.dir / "run").mkdir(exist_ok=True)
        self.children: dict[str, Child] = {}
        aaa_dir = self.dir / "aaa"
        if aaa:  # the data centre's AAA device, before the nodes that ask it
            log_file = str(self.dir / "logs" / "aaa.log")
            config = str(aaa_dir / "aaa.toml")
            self.children["aaa"] = Child("aaa", config, log_file, aaa=str(aaa_dir), kind="aaa")
        if mgmt:  # the data centre's QKDN Manager, before the agents that inform it
            config = str(self.dir / "mgmt" / "manager.toml")
            log_file = str(self.dir / "logs" / "manager.log")
            self.children["manager"] = Child("manager", config, log_file, kind="manager")
        for name, cfg in load_configs(self.dir).items():
            if not is_kms(cfg):
                continue
            agent = self.dir / "mgmt" / f"node-{name}.toml"
            agent_file = str(agent) if mgmt and agent.exists() else None
            config = str(self.dir / "nodes" / f"{name}.toml")
            link = aaa_dir / f"akms-{cfg.node.id}.toml"
            link_file = str(link) if aaa and "akms" in cfg.node.role.split("+") else None
            if split_access and cfg.node.role == "akms+ckms":
                for only in ("akms", "ckms"):
                    log_file = str(self.dir / "logs" / f"{name}.{only}.log")
                    own = link_file if only == "akms" else None
                    child = Child(f"{name}/{only}", config, log_file, only, aaa=own)
                    child.mgmt = agent_file if only == "akms" else None
                    child.gnmi = controller and only == "ckms"
                    self.children[child.name] = child
            else:
                log_file = str(self.dir / "logs" / f"{name}.log")
                terms = aaa and "ukms" in cfg.node.role.split("+")
                asks = controller and "akms" in cfg.node.role.split("+")
                self.children[name] = Child(
                    name,
                    config,
                    log_file,
                    aaa=link_file,
                    terms=terms,
                    mgmt=agent_file,
                    controller=asks,
                    gnmi=controller and "ckms" in cfg.node.role.split("+"),
                )
        if controller:  # the QKDN Controller (appliance/control), in the data centre
            log_file = str(self.dir / "logs" / "controller.log")
            self.children["controller"] = Child(
                "controller", str(self.dir), log_file, kind="controller"
            )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.alarm: dict[str, Any] | None = None
        """The state-file alarm while writes fail (code, message, since)."""
        self.unsaved = False
        self.retry_at = 0.0
        self.control: socket.socket | None = None

    # -- nodes -------------------------------------------------------------------------
    def command(self, child: Child) -> list[str]:
        if child.kind == "manager":
            return [*_CLI, "manager", "run", "--config", child.config]
        if child.kind == "controller":
            return [*_CLI, "controller", "run", "--dir", child.config]
        if child.kind == "aaa":
            assert child.aaa is not None
            return [*_CLI, "aaa", "--dir", child.aaa, "run", "--config", child.config]
        return [
            *_CLI,
            *("node", "run", "--config", child.config, "--mode", self.mode),
            *("--stock", str(self.stock), "--patience", str(self.patience)),
            *(["--only", child.only] if child.only else []),
            *(["--aaa", child.aaa] if child.aaa else []),
            *(["--terms-from-akms"] if child.terms else []),
            *(["--mgmt", child.mgmt] if child.mgmt else []),
            *(["--controller"] if child.controller else []),
            *(["--gnmi"] if child.gnmi else []),
        ]

    def spawn(self, child: Child) -> None:
        env = {
            **os.environ,
            netproc.ENV_NET: netproc.marker(self.dir),
            netproc.ENV_NODE: child.name,
            netproc.ENV_SUPERVISOR: str(os.getpid()),
        }
        with open(child.log, "ab") as out:
            proc = subprocess.Popen(
                self.command(child),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.procs[child.name] = proc
        child.pid, child.started = proc.pid, time.monotonic()

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
                self.save()
            elif now >= child.due:
                self.spawn(child)
                self.save()
        if self.unsaved and now >= self.retry_at:
            self.save()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        deadline = time.monotonic() + STOP_S
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- state -------------------------------------------------------------------------
    def snapshot(self, *, live: bool = True) -> dict[str, Any]:
        """The state document; ``live`` adds the alarms (a file written has none to tell)."""
        doc: dict[str, Any] = {
            "supervisor_pid": os.getpid(),
            "mode": self.mode,
            "nodes": {n: asdict(c) for n, c in self.children.items()},
        }
        if live:
            doc["alarms"] = [self.alarm] if self.alarm else []
        return doc

    def save(self) -> None:
        """Write ``run/state.json``; if that fails, report it and retry later."""
        self.unsaved = True
        path = self.dir / "run" / "state.json"
        tmp = path.with_name("state.json.tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot(live=False), indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            self._save_failed(path, exc)
            return
        self.unsaved = False
        if self.alarm is not None:
            log.info("state written again", extra={"code": self.alarm["code"], "file": str(path)})
            self.alarm = None

    def _save_failed(self, path: Path, exc: OSError) -> None:
        self.retry_at = time.monotonic() + RETRY_S
        if self.gone():
            self.stopping = True
            return
        if self.alarm is None:
            reason = exc.strerror or str(exc)
            self.alarm = {
                "code": "NET-STATE-WRITE",
                "message": f"cannot write {path}: {reason}; the nodes keep running and the "
                f"supervisor retries every {RETRY_S:g} s",
                "since": time.time(),
            }
            log.error(self.alarm["message"], extra={"code": "NET-STATE-WRITE"})

    def gone(self) -> bool:
        """True once the network directory (or its ``run/``) is removed or replaced; an
        error that does not say so (EIO) is not taken for it."""
        try:
            st = os.stat(self.dir)
            os.stat(self.dir / "run")
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self.identity

    # -- control socket ----------------------------------------------------------------
    def listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(netproc.control_address(self.dir))
        except OSError as exc:
            sock.close()
            raise netproc.NetError(
                f"another supervisor answers for {self.dir}", code="NET-BUSY"
            ) from exc
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def serve(self, timeout: float) -> None:
        """Answer the control requests that arrive within ``timeout`` seconds."""
        assert self.control is not None
        ready, _, _ = select.select([self.control], [], [], timeout)
        while ready:
            try:
                conn, _ = self.control.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(1.0)
                if netproc.peer_uid(conn) not in (os.getuid(), 0):
                    continue
                with contextlib.suppress(OSError):  # the asker went away
                    conn.sendall(json.dumps(self.snapshot()).encode())

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        self.control = self.listen()
        for child in self.children.values():
            self.spawn(child)
        self.save()
        while not self.stopping and not self.gone():
            self.tick()
            self.serve(POLL_S)
        self.stop()
        self.control.close()
        with contextlib.suppress(OSError):
            (self.dir / "run" / "state.json").unlink(missing_ok=True)
        return 0


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def main() -> None:
    parser = argparse.ArgumentParser(description="Supervise the KMS nodes of a rendered network")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--mode", default="gcm", choices=["gcm", "otp"])
    parser.add_argument("--stock", type=int, default=0)
    parser.add_argument("--patience", type=float, default=10.0)
    parser.add_argument("--split-access", action="store_true")
    parser.add_argument("--aaa", action="store_true", help="run the AAA device (<dir>/aaa)")
    parser.add_argument("--controller", action="store_true", help="run the QKDN Controller")
    parser.add_argument(
        "--mgmt",
        action="store_true",
        help="run the QKDN Manager and the nodes' agents (<dir>/mgmt)",
    )
    parser.add_argument(
        "--lock-fd", type=int, help="an open file holding the directory's lock (net up's)"
    )
    args = parser.parse_args()
    mark = netproc.marker(args.dir)
    if os.environ.get(netproc.ENV_NET) != mark:  # be findable: run again with the marker
        argv = [sys.executable, "-m", "appliance.kms.supervisor", *sys.argv[1:]]
        os.execve(sys.executable, argv, {**os.environ, netproc.ENV_NET: mark})
    from appliance import logs

    logs.configure("info", "json", sys.stdout)
    logging.raiseExceptions = False  # a log line lost to a full disk is not an error
    try:
        supervisor = Supervisor(
            args.dir,
            args.mode,
            args.stock,
            args.patience,
            args.split_access,
            args.lock_fd,
            aaa=args.aaa,
            mgmt=args.mgmt,
            controller=args.controller,
        )
        raise SystemExit(supervisor.run())
    except ApplianceError as exc:
        log.error(str(exc), extra={"code": exc.code})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
