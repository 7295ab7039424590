"""``qkdn node run`` and ``qkdn net up|status|down``: nodes as processes on this machine.

A network directory runs one network at a time, of one topology. ``net up`` takes the
directory's lock (held by the supervisor afterwards: two starts cannot both succeed) and
refuses at once, with a code, a directory that runs a network (NET-BUSY), processes left
by an earlier run (NET-ORPHANS), a directory that holds a network of another topology
(NET-DIR-TOPOLOGY: its stores and certificates belong to other nodes) and ports in use
(NET-PORTS). A start that fails (timeout, the supervisor exits, a node keeps exiting)
stops everything it started before it reports the error. Nodes die with their supervisor,
even by ``kill -9``. ``net down`` finds every process of the network by the marker in its
environment, with or without ``run/state.json``. ``net status`` asks the running
supervisor first, and shows its alarms (a state file it cannot write, NET-STATE-WRITE).

``node run`` is the node runtime: it must work on a base install (no extras), so nothing
here imports rich or another extra at module level.

What it must never do: leave a process running behind a failed start, or signal a
process that is not of the network it was asked about (:mod:`appliance.kms.netproc`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.cli import args as types
from appliance.cli.output import console, print_json
from appliance.config.addresses import split_host_port
from appliance.errors import ApplianceError, UsageError
from appliance.files import MiB, read_bounded

DEFAULT_DIR = Path(".qkdn/net")
FULL_STORE_S = 3600.0
"""``net up`` starts the emulated links this long in the past: their key buffers are full."""
MAX_STATE = MiB
"""Longest ``run/state.json`` read."""
CRASH_LOOP = 3
"""A node that exits this many times while its network starts fails the start (NET-NODE)."""
ORPHAN_WAIT_S = 5.0
"""How long ``net up`` waits for nodes still dying with a supervisor that was just killed."""
SUPERVISOR_STOP_S = 15.0
"""How long a supervisor has to stop its nodes (it gives them 5 s) before it gets SIGKILL."""
NODE_STOP_S = 5.0
"""How long a process left without its supervisor has after SIGTERM before SIGKILL."""
KILL_WAIT_S = 5.0
"""How long a process has to vanish after SIGKILL."""
MAX_STOCK = 100_000
DEFAULT_STOCK = 256
STOCK = types.integer(0, MAX_STOCK)
FD = types.integer(3, 1 << 20)
AGENT_NAME = types.matching(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII), "a node name")
PATIENCE = types.number(0, 3600, lo_open=True)
GC_YOUNG = 20_000
"""Allocations between two collections of the youngest generation in a node process
(Python's default: 700)."""


def register(sub: Any) -> None:

    node = sub.add_parser(
        "node",
        help="run one KMS node",
        description="Run the KMS services of one node from its rendered "
        "configuration, until SIGTERM.",
    )
    nsub = node.add_subparsers(dest="node_command", metavar="ACTION", parser_class=type(node))
    nsub.required = True
    run = nsub.add_parser("run", help="run one node in the foreground")
    run.add_argument("--config", required=True, type=types.path, metavar="NODE.toml")
    run.add_argument(
        "--mode",
        default="gcm",
        choices=["gcm", "otp"],
        help="how CN and KSA keys are protected on links (default: gcm)",
    )
    run.add_argument(
        "--stock",
        type=STOCK,
        default=0,
        metavar="N",
        help=f"KSA keys a UKMS keeps ready per SAE pair, 0..{MAX_STOCK} (default: 0)",
    )
    run.add_argument(
        "--patience",
        type=PATIENCE,
        default=10.0,
        metavar="S",
        help="seconds a hop waits for link keys still being distilled; requests wait 2x this "
        "for their CN key (default: %(default)s)",
    )
    run.add_argument(
        "--only",
        choices=["akms", "ckms"],
        help="run one service of an access node (its other service runs in another process)",
    )
    run.add_argument(
        "--aaa",
        type=types.path,
        metavar="AKMS.toml",
        help="an access node's link to the AAA device (address, SNMPv3 user, INFORM "
        "address): requests are validated and accounted by AAA, not the topology's contracts",
    )
    run.add_argument(
        "--terms-from-akms",
        action="store_true",
        help="a UKMS under AAA: ETSI 014 Status and request limits follow each pair's "
        "contract, as the node's AKMS answers it",
    )
    run.add_argument(
        "--mgmt",
        type=types.path,
        metavar="AGENT.toml",
        help="run the node's SNMPv3 agent (QKDN-MIB) with this configuration: its address, "
        "users and the manager it informs (docs/mgmt.md)",
    )
    run.add_argument(
        "--controller",
        action="store_true",
        help="an access node's CKMS asks the QKDN Controller for every relay path "
        "(services.controller of its configuration; docs/control.md)",
    )
    run.add_argument(
        "--gnmi",
        action="store_true",
        help="serve the CKMS's SDN agent (gNMI, listen.gnmi of its configuration) to the "
        "QKDN Controller; `net up --controller` gives it to every CKMS (docs/control.md)",
    )
    run.set_defaults(func=cmd_node_run)
    agent = nsub.add_parser(
        "agent",
        help="a node's SNMPv3 agent, beside the node (started by `node run --mgmt`)",
        description="Serve QKDN-MIB for the node that started this process, reading it "
        "over the two sockets it passed (docs/mgmt.md). Not for use by hand: `qkdn node "
        "run --mgmt FILE` starts it, and it dies with that node.",
    )
    agent.add_argument("--mgmt", required=True, type=types.path, metavar="AGENT.toml")
    agent.add_argument("--name", required=True, type=AGENT_NAME, help="the node's name")
    agent.add_argument(
        "--query-fd", required=True, type=FD, metavar="FD", help="the node's socket for reads"
    )
    agent.add_argument(
        "--notice-fd", required=True, type=FD, metavar="FD", help="the node's socket for notices"
    )
    agent.set_defaults(func=cmd_node_agent)

    net = sub.add_parser(
        "net",
        help="start, inspect and stop a whole network on this machine",
        description="A whole network as separate OS processes on loopback: "
        "a private CA, one certificate per node and SAE, supervised nodes.",
        epilog="example: qkdn net up demoquandt && qkdn net status --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    n = net.add_subparsers(dest="net_command", metavar="ACTION", parser_class=type(net))
    n.required = True
    up = n.add_parser(
        "up",
        help="render, issue certificates, start every KMS node",
        description="Render the topology into the network directory, issue its certificates "
        "(once), start a supervisor that runs every KMS node as a process, and wait until "
        "every node answers.",
        epilog="""\
One network per directory, of one topology:
  NET-BUSY          the directory runs a network already, or one is starting there
  NET-ORPHANS       processes of an earlier run still live (qkdn net down stops them)
  NET-DIR-TOPOLOGY  the directory holds a network of another topology (other nodes,
                    links or SAEs; rates may change): use another --dir or remove it
  NET-PORTS         a port of the plan is in use: choose another --base-port
A start that fails stops everything it started, then reports one of:
  NET-TIMEOUT       not every node answered within --timeout seconds
  NET-NODE          a node exited 3 times while starting (its last log error is shown)
  NET-SUPERVISOR    the supervisor exited
The supervisor holds the directory's lock for its whole life; its nodes die with it,
even by kill -9. A state file it cannot write (full disk) is an alarm in
'qkdn net status' (NET-STATE-WRITE), never a reason to stop the nodes.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument(
        "topology",
        type=types.topology,
        nargs="?",
        default="demoquandt",
        metavar="TOPOLOGY",
        help="a shipped topology name or a topology file (default: demoquandt)",
    )
    up.add_argument(
        "--dir",
        type=types.path,
        default=DEFAULT_DIR,
        help="network directory (default: %(default)s)",
    )
    up.add_argument(
        "--base-port",
        type=types.base_port,
        default=20000,
        help="port of service S of node N = base + offset(S) + N (default: %(default)s)",
    )
    up.add_argument(
        "--mode",
        default="gcm",
        choices=["gcm", "otp"],
        help="how CN keys cross each link: AES-256-GCM or one-time pad (default: gcm; "
        "a contract's relay_mode overrides it for its users)",
    )
    up.add_argument(
        "--rate-limited",
        action="store_true",
        help="start with empty link key stores (keys arrive at the links' SKR); "
        "hops then wait up to --patience for keys",
    )
    up.add_argument(
        "--speedup",
        type=types.number(0, 1000, lo_open=True),
        default=1.0,
        metavar="X",
        help="emulated links run X times faster than real time (benches of key rates)",
    )
    up.add_argument(
        "--patience",
        type=PATIENCE,
        metavar="S",
        help="seconds a hop waits for link keys still being distilled; requests wait 2x this "
        "for their CN key (default: 10, 120 with --rate-limited)",
    )
    up.add_argument(
        "--timeout",
        type=types.number(0, 86400),
        default=60.0,
        help="seconds to wait for readiness, 0..86400 (default: %(default)s)",
    )
    up.add_argument(
        "--stock",
        type=STOCK,
        default=None,
        metavar="N",
        help=f"KSA keys each UKMS keeps ready per SAE pair (default: {DEFAULT_STOCK}; 0 makes "
        "every enc_keys cross the network; under AAA a request served from the stock is "
        "validated and accounted like any other)",
    )
    aaa = up.add_mutually_exclusive_group()
    aaa.add_argument(
        "--aaa",
        dest="aaa",
        action="store_true",
        default=None,
        help="start the data centre's AAA device (<dir>/aaa, seeded from the topology's "
        "contracts): every request is validated and accounted by it (docs/aaa.md); the "
        "default when the topology has an AAA node",
    )
    aaa.add_argument(
        "--no-aaa",
        dest="aaa",
        action="store_false",
        help="no AAA device: requests are checked against the topology's contracts only, "
        "and nothing is accounted",
    )
    up.add_argument(
        "--no-mgmt",
        dest="mgmt",
        action="store_false",
        help="start neither the QKDN Manager nor the nodes' SNMP agents (default: both run "
        "when the topology has a manager node; docs/mgmt.md)",
    )
    up.add_argument(
        "--mgmt-poll",
        type=types.number(1, 3600),
        metavar="S",
        help="seconds between two polls of every agent by the QKDN Manager (default 30; "
        "link faults reach it at once by INFORM whatever this is)",
    )
    up.add_argument(
        "--controller",
        action="store_true",
        help="start the QKDN Controller: access nodes ask it for every relay path, it "
        "installs them hop by hop from the SDN agents' telemetry (docs/control.md)",
    )
    up.add_argument(
        "--split-access",
        action="store_true",
        help="run each access node's AKMS and CKMS as two processes (default: one)",
    )
    up.add_argument("--json", action="store_true", help="print the status document as JSON")
    up.set_defaults(func=cmd_net_up)
    status = n.add_parser("status", help="nodes, processes and endpoints")
    status.add_argument("--dir", type=types.path, default=DEFAULT_DIR)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_net_status)
    fault = n.add_parser(
        "fault",
        help="inject an emulated QKD link fault into a running network",
        description="Take an emulated QKD link down (no signal, no keys) or bring it back "
        "up, at both ends, now.",
        epilog="example: qkdn net fault link 8-9 down",
    )
    fault.add_argument("what", choices=["link"], help="what fails (a QKD link)")
    fault.add_argument("pair", metavar="A-B", help="the link, by its two node IDs")
    fault.add_argument("state", choices=["down", "up"])
    fault.add_argument("--dir", type=types.path, default=DEFAULT_DIR)
    fault.set_defaults(func=cmd_net_fault)
    down = n.add_parser("down", help="stop every node and the supervisor")
    down.add_argument("--dir", type=types.path, default=DEFAULT_DIR)
    down.set_defaults(func=cmd_net_down)


def cmd_net_fault(args: argparse.Namespace) -> int:
    from appliance.control.linkfault import inject, parse_pair

    a, b = parse_pair(args.pair)
    inject(args.dir, a, b, args.state)
    print(f"link {a}-{b} {args.state}")
    return 0


def cmd_node_run(args: argparse.Namespace) -> int:
    from appliance.kms.netproc import die_with_supervisor

    die_with_supervisor()  # first of all: a node never outlives the supervisor that started it

    import qrng
    from appliance.config.node import load_node_config
    from appliance.config.topology import load_topology
    from appliance.kms.network import build_node
    from appliance.kms.node import Policy
    from appliance.kms.relay import Mode

    cfg = load_node_config(args.config, keep_saes=False)  # the topology lists the SAEs
    topo = load_topology(cfg.node.topology)
    generator = qrng.node_generator(cfg.devices.qrng)

    async def main() -> None:
        aaa = _aaa_validator(args, cfg) if args.aaa is not None else None
        paths = _controller_paths(cfg) if getattr(args, "controller", False) else None
        node = build_node(
            cfg,
            topo,
            generator.random_bytes,
            policy=Policy(
                mode=Mode[args.mode.upper()],
                stock=args.stock,
                patience=args.patience,
                terms_from_akms=args.terms_from_akms,
            ),
            only=args.only,
            validator=aaa[0] if aaa else None,
            paths=paths,
            sdn=bool(getattr(args, "gnmi", False)),
        )
        if paths is not None:  # a path learnt stays good while the node's routes stand
            paths.table = lambda: node.agent.routes if node.agent else None
        await node.start()
        if paths is not None:  # the connection to the controller, before the first ask
            paths.start()
        if aaa is not None:  # quota ahead of need: a pair's first request does not wait
            from appliance.aaa.client import served_pairs

            aaa[0].ask_ahead(served_pairs(topo, cfg.node.id))
        agent = await _mgmt_agent(args, node, generator) if args.mgmt is not None else None
        # What start-up built (the topology, the SAE directory, the engines) lives as long
        # as the process: out of the collector's sight, a full collection does not walk
        # it again and again (idle CPU and RSS independent of the number of SAEs).
        gc.collect()
        gc.freeze()
        # A request makes many short-lived container objects (messages, events, futures)
        # that live across a few rounds of the loop: a young generation of 700 caught them
        # alive and walked them again in the older ones. Collected every GC_YOUNG
        # allocations, most are gone by then (BENCHMARKS.md, issue 12, kms7).
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        if agent is not None:
            await agent[1].close()
            await agent[0].close()
        await node.close()
        if paths is not None:
            await paths.close()
        if aaa is not None:
            await aaa[0].close()
            aaa[1].close()

    import uvloop  # libuv's loop and its Cython TLS: ~25 % less CPU per relay hop than asyncio's

    uvloop.run(main())
    return 0


async def _mgmt_agent(args: argparse.Namespace, node: Any, generator: Any) -> Any:
    """The node's SNMPv3 agent in a process beside it, reading the node live
    (:mod:`appliance.mgmt.feed`: the node never loads pysnmp), and the watch of its QKD
    modules that makes it look at once when a link changes state."""
    from appliance.mgmt.agentconfig import load_config
    from appliance.mgmt.feed import Feed
    from appliance.mgmt.nodestate import LinkWatch, NodeReader

    cfg = load_config(args.mgmt)
    reader = NodeReader(node, generator, image=Path(cfg.image) if cfg.image else None)
    name = f"{node.name}-{args.only}" if args.only else node.name
    cli = (sys.executable, "-m", "appliance.cli", "--log-level", args.log_level)
    feed = Feed(name, reader.read, args.mgmt, (*cli, "--log-format", args.log_format))
    await feed.start()
    watch = LinkWatch(list(node.qkdms.values()), feed.look)
    watch.start()
    node.counters.alarm_hooks.append(lambda _code, _reason: feed.look())
    return feed, watch


def cmd_node_agent(args: argparse.Namespace) -> int:
    from appliance.kms.netproc import die_with_supervisor

    die_with_supervisor()  # first of all: the agent never outlives the node that started it

    import uvloop

    from appliance.mgmt import sidecar
    from appliance.mgmt.agentconfig import load_config

    cfg = load_config(args.mgmt)
    uvloop.run(sidecar.run(cfg, args.name, args.query_fd, args.notice_fd))
    return 0


def _controller_paths(cfg: Any) -> Any:
    """The path provider that asks the QKDN Controller (an access node's CKMS only)."""
    from appliance.control.paths import ControllerPaths
    from appliance.pki import client_context

    if cfg.node.role != "akms+ckms" or "controller" not in cfg.services:
        raise UsageError("--controller: only an access node's CKMS asks the controller")
    tls = (Path(cfg.paths.cert), Path(cfg.paths.key), Path(cfg.paths.ca_cert))
    return ControllerPaths(
        cfg.services["controller"], client_context(*tls, ("h2",)), expect_peer=None
    )


def _aaa_validator(args: argparse.Namespace, cfg: Any) -> tuple[Any, Any]:
    """The AAA validator of an access node, its client listening for revocations, and
    its accounting outbox (in the node's data directory), replaying what is left there."""
    from appliance.aaa.client import AaaClient, AaaValidator, load_akms_config
    from appliance.aaa.outbox import Outbox
    from appliance.snmp.usm import Credentials

    if "akms" not in cfg.node.role.split("+") or args.only == "ckms":
        raise UsageError("--aaa: only a process running an AKMS talks to the AAA device")
    link = load_akms_config(args.aaa)
    creds = Credentials(user=link.user, auth=link.auth, priv=link.priv)
    client = AaaClient(link.aaa, creds)
    from appliance.kms.store import private_dir

    data = Path(cfg.paths.data_dir)
    private_dir(data)
    outbox = Outbox(data / "aaa-outbox.db")
    validator = AaaValidator(client, outbox=outbox)
    client.listen(link.inform, validator.revoked)
    validator.start()
    return validator, client


def _ports_open(addresses: list[str], ca: Path) -> bool:
    """True when every address completes a TLS handshake with a certificate of *our* CA
    (a bare TCP connect would also succeed against another network on the same ports)."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    for address in addresses:
        host, port = split_host_port(address)
        try:
            with (
                socket.create_connection((host, port), timeout=0.5) as raw,
                ctx.wrap_socket(raw),
            ):
                pass
        except (OSError, ssl.SSLError):
            return False
    return True


def _state(net_dir: Path) -> dict[str, Any] | None:
    """The supervisor's state file; None when it is missing, unreadable or not its shape."""
    try:
        doc = json.loads(read_bounded(net_dir / "run" / "state.json", MAX_STATE))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return doc if _state_shape(doc) else None


def _state_shape(doc: Any) -> bool:
    """A supervisor pid above 1 (never 0, -1 or 1, which ``kill`` takes as our process
    group, every process, or init); node records whose pid is 0 (not started) or above 1
    and whose restarts is a count."""
    if not isinstance(doc, dict) or not _pid(doc.get("supervisor_pid")):
        return False
    nodes = doc.get("nodes")
    return isinstance(nodes, dict) and all(
        isinstance(r, dict)
        and (r.get("pid", 0) == 0 or _pid(r.get("pid")))
        and type(r.get("restarts", 0)) is int
        for r in nodes.values()
    )


def _pid(value: Any) -> bool:
    return type(value) is int and value > 1


def _patience(args: argparse.Namespace) -> float:
    value = getattr(args, "patience", None)
    if value is None:
        return 120.0 if args.rate_limited else 10.0
    if not 0 < value <= 3600:
        raise UsageError(f"--patience: expected 0 < seconds <= 3600, got {value:g}")
    return float(value)


def cmd_net_up(args: argparse.Namespace) -> int:
    bring_up(args)
    return _report(args.dir, args.json)


def bring_up(args: argparse.Namespace) -> None:
    """Render, issue certificates, start the supervisor, wait until every node listens.

    Holds the directory's lock throughout and hands it to the supervisor. Refuses, before
    it starts anything, a directory that runs a network (NET-BUSY) or holds another one
    (NET-DIR-TOPOLOGY), processes left by an earlier run (NET-ORPHANS) and ports in use
    (NET-PORTS). If the network does not come up (NET-TIMEOUT, NET-NODE, NET-SUPERVISOR,
    or an interruption) it stops everything it started before it raises."""
    from appliance.config.topology import load_topology
    from appliance.kms import netproc

    patience = _patience(args)
    speedup = float(getattr(args, "speedup", 1.0))
    if not 0 < speedup <= 1000:
        raise UsageError(f"--speedup: expected 0 < X <= 1000, got {speedup:g}")
    topo = load_topology(args.topology)
    args.aaa = _wants_aaa(args, topo)
    args.stock = getattr(args, "stock", 0)  # callers that name none mean 0, as before
    if args.stock is None:  # `net up` without --stock
        args.stock = DEFAULT_STOCK
    import tomli_w  # noqa: F401 - rendering needs the provisioning extra: refused before any write

    lock = netproc.lock_dir(args.dir)
    try:
        _refuse_leftovers(args.dir)
        _refuse_other_topology(args.dir, topo)
        configs = _prepare(args, topo, speedup)
        sdn = bool(getattr(args, "controller", False))
        addresses = _kms_addresses(configs, sdn) + _controller_addresses(args, configs)
        _refuse_busy_ports(addresses)
        aaa_log = _prepare_aaa(args.dir, topo, configs) if args.aaa else None
        args.mgmt = _prepare_mgmt(args, topo, configs)
        supervisor = _start_supervisor(args, patience, lock)
        try:
            ca = Path(next(iter(configs.values())).paths.ca_cert)
            _wait_ready(
                supervisor, args.dir, float(args.timeout), addresses, ca, aaa_log, args.mgmt
            )
        except BaseException:
            _stop_started(supervisor, args.dir)
            raise
    finally:
        os.close(lock)


def _prepare(args: argparse.Namespace, topo: Any, speedup: float) -> dict[str, Any]:
    """Render the node configurations; issue the PKI and PSKs a new directory lacks."""
    import qrng
    from appliance.config.render import RenderPlan, render
    from appliance.kms.network import load_configs, make_pki, provision_psks

    start = time.time() - (0.0 if args.rate_limited else FULL_STORE_S)
    plan = RenderPlan(out=args.dir, base_port=args.base_port, start=start, speedup=speedup)
    render(topo, plan)
    configs = load_configs(args.dir)
    provisioning = qrng.node_generator("emulated-qrng://provisioning?bits=16").random_bytes
    if not (args.dir / "pki" / "ca.pem").exists():
        make_pki(topo, configs, provisioning)
    provision_psks(configs, provisioning)
    return configs


def _wants_aaa(args: argparse.Namespace, topo: Any) -> bool:
    """Whether the network runs its AAA device: ``net up`` does by default when the
    topology has an AAA node (``--no-aaa``: no; ``--aaa`` without one: an error, later,
    AAA-TOPOLOGY). Callers whose arguments name nothing (``bring_up`` from code) get none."""
    wanted = getattr(args, "aaa", False)
    if wanted is None:  # `net up` without --aaa or --no-aaa
        return bool(topo.nodes_with("aaa"))
    return bool(wanted)


def _prepare_aaa(net_dir: Path, topo: Any, configs: dict[str, Any]) -> tuple[Path, int]:
    """Make ``<dir>/aaa`` ready (:mod:`appliance.aaa.netsetup`); the AAA log and where it
    ends now (readiness is its "listening" line after that point)."""
    from appliance.aaa.netsetup import prepare

    prepare(net_dir, topo, configs)
    log = net_dir / "logs" / "aaa.log"
    return log, log.stat().st_size if log.exists() else 0


def _prepare_mgmt(args: argparse.Namespace, topo: Any, configs: dict[str, Any]) -> bool:
    """``<dir>/mgmt`` (:mod:`appliance.mgmt.netsetup`) unless ``--no-mgmt`` or the topology
    has no manager node; whether the manager and the agents run."""
    if not getattr(args, "mgmt", True) or not topo.nodes_with("manager"):
        return False
    from appliance.mgmt.netsetup import prepare

    prepare(
        args.dir,
        topo,
        configs,
        controller=bool(getattr(args, "controller", False)),
        aaa=bool(getattr(args, "aaa", False)),
        **({"poll_s": args.mgmt_poll} if getattr(args, "mgmt_poll", None) else {}),
    )
    return True


def _aaa_listening(mark: tuple[Path, int]) -> bool:
    try:
        with open(mark[0], "rb") as fh:
            fh.seek(mark[1])
            return b"aaa: listening on udp port" in fh.read(1 << 20)
    except OSError:
        return False


def _controller_addresses(args: argparse.Namespace, configs: dict[str, Any]) -> list[str]:
    """The controller's API address under ``--controller`` (waited for like a node's)."""
    if not getattr(args, "controller", False):
        return []
    if getattr(args, "split_access", False):
        raise UsageError("--controller with --split-access: not supported yet")
    found = [c.listen["api"] for c in configs.values() if "controller" in c.node.role.split("+")]
    if not found:
        raise UsageError("--controller: the topology has no controller node")
    return found[:1]


def _kms_addresses(configs: dict[str, Any], sdn: bool) -> list[str]:
    """The nodes' addresses waited for; their SDN agents' (gNMI) only with a controller."""
    from appliance.kms.network import is_kms

    served = [(s, a) for c in configs.values() if is_kms(c) for s, a in c.listen.items()]
    return [a for s, a in served if s != "snmp" and (sdn or s != "gnmi")]


def _refuse_leftovers(net_dir: Path) -> None:
    """Processes of this network with the lock free: a supervisor started by other means
    (NET-BUSY), or nodes still dying with a supervisor just killed (waited for, a few
    seconds), or nodes that outlived theirs (NET-ORPHANS)."""
    from appliance.kms import netproc

    found = netproc.find_processes(net_dir)
    if netproc.SUPERVISOR in found.values():
        raise ApplianceError(
            f"a network is already running from {net_dir} (qkdn net down --dir {net_dir} first)",
            code="NET-BUSY",
        )
    left = netproc.wait_gone(set(found), net_dir, ORPHAN_WAIT_S)
    if left:
        pids = " ".join(str(p) for p in sorted(left)[:8])
        raise ApplianceError(
            f"{len(left)} node processes of an earlier network still run from {net_dir} "
            f"(pids {pids}); qkdn net down --dir {net_dir} stops them",
            code="NET-ORPHANS",
        )


def _shape(topo: Any) -> dict[str, set[str]]:
    """What a network directory is bound to: its name, nodes, links and SAEs (rates,
    lengths and descriptions may change between two runs on one directory)."""
    return {
        "network": {topo.name},
        "nodes": {f"{n.name} (id {n.id}, {n.role})" for n in topo.spec.nodes},
        "links": {f"{x.a}-{x.b}" for x in topo.links},
        "SAEs": {f"{s.id} at node {s.node}" for s in topo.spec.saes},
    }


def _refuse_other_topology(net_dir: Path, topo: Any) -> None:
    """A directory holds one network: its stores, certificates and node files are bound
    to the nodes of that network's topology. Another topology is refused (NET-DIR-TOPOLOGY)
    before anything is written or started."""
    from appliance.config.topology import load_topology

    held = net_dir / "topology.toml"
    advice = f"use another --dir, or remove {net_dir} (its key stores and certificates with it)"
    if not held.is_file():
        if any((net_dir / "nodes").glob("*.toml")):
            raise ApplianceError(
                f"{net_dir} holds node configurations but no topology.toml; {advice}",
                code="NET-DIR-TOPOLOGY",
            )
        return
    try:
        old = load_topology(str(held))
    except ApplianceError as exc:
        raise ApplianceError(
            f"{net_dir} holds a topology that cannot be read ({exc}); {advice}",
            code="NET-DIR-TOPOLOGY",
        ) from exc
    before, after = _shape(old), _shape(topo)
    diffs = []
    for part in before:
        gone, new = sorted(before[part] - after[part]), sorted(after[part] - before[part])
        if gone or new:
            listed = [f"-{x}" for x in gone[:3]] + [f"+{x}" for x in new[:3]]
            diffs.append(f"{part} " + ", ".join(listed))
    if diffs:
        raise ApplianceError(
            f"{net_dir} holds network '{old.name}', not the one {topo.source} describes "
            f"({'; '.join(diffs)}): {advice}",
            code="NET-DIR-TOPOLOGY",
        )


def _refuse_busy_ports(addresses: list[str]) -> None:
    """Every port of the plan must be free before a node is started (NET-PORTS)."""
    busy = []
    for address in addresses:
        host, port = address.rsplit(":", 1)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, int(port)))
            except OSError:
                busy.append(address)
    if busy:
        shown = ", ".join(busy[:4]) + (f" and {len(busy) - 4} more" if len(busy) > 4 else "")
        raise ApplianceError(
            f"ports of the network are in use: {shown} (another network or program listens "
            "there; choose another --base-port)",
            code="NET-PORTS",
        )


def _start_supervisor(args: argparse.Namespace, patience: float, lock: int) -> Any:
    """The supervisor, detached, with the network's marker and our open lock file."""
    from appliance.kms import netproc

    (args.dir / "logs").mkdir(exist_ok=True)
    env = {**os.environ, netproc.ENV_NET: netproc.marker(args.dir)}
    env.pop(netproc.ENV_NODE, None)
    env.pop(netproc.ENV_SUPERVISOR, None)
    with open(args.dir / "logs" / "supervisor.log", "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance.kms.supervisor",
                str(args.dir),
                "--mode",
                args.mode,
                "--stock",
                str(getattr(args, "stock", 0)),
                "--patience",
                str(patience),
                "--lock-fd",
                str(lock),
                *(["--split-access"] if getattr(args, "split_access", False) else []),
                *(["--aaa"] if getattr(args, "aaa", False) else []),
                *(["--mgmt"] if getattr(args, "mgmt", False) else []),
                *(["--controller"] if getattr(args, "controller", False) else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(lock,),
            env=env,
        )


def _wait_ready(
    supervisor: Any,
    net_dir: Path,
    timeout: float,
    addresses: list[str],
    ca: Path,
    aaa_log: tuple[Path, int] | None = None,
    mgmt: bool = False,
) -> None:
    """Until the supervisor reports every node started, every KMS endpoint completes a
    TLS handshake with this network's CA and (``mgmt``) every node's SNMP agent answers
    engine discovery with its own engine ID. Fails fast when the supervisor exits or a
    node keeps exiting, naming the last error in its log."""
    from appliance.kms import netproc

    agents: dict[str, str] = {}
    if mgmt:
        from appliance.mgmt.netsetup import agent_addresses

        agents = agent_addresses(net_dir)
    deadline = time.monotonic() + timeout
    while True:
        status = supervisor.poll()
        if status is not None:
            log = net_dir / "logs" / "supervisor.log"
            raise ApplianceError(
                f"the supervisor exited (status {status}) while the network started: "
                f"{_last_error(log)}",
                code="NET-SUPERVISOR",
            )
        live = netproc.ask_supervisor(net_dir)
        children = live.get("nodes") if live else None
        if isinstance(children, dict):
            _refuse_crash_loops(children)
            started = all(isinstance(c, dict) and c.get("pid") for c in children.values())
            aaa_ready = aaa_log is None or _aaa_listening(aaa_log)
            if started and aaa_ready and _ports_open(addresses, ca):
                agents = _silent_agents(agents)
                if not agents:
                    return
        if time.monotonic() >= deadline:
            silent = f"; SNMP agents not answering: {', '.join(sorted(agents))}" if agents else ""
            raise ApplianceError(
                f"the network did not come up within {timeout:g} s (see {net_dir / 'logs'})"
                + silent[:400],
                code="NET-TIMEOUT",
            )
        time.sleep(0.2)


def _silent_agents(agents: dict[str, str]) -> dict[str, str]:
    """The agents among ``agents`` not ready yet (:func:`appliance.mgmt.netsetup.silent_agents`)."""
    if not agents:
        return agents
    from appliance.mgmt.netsetup import silent_agents

    return {name: agents[name] for name in silent_agents(agents)}


def _refuse_crash_loops(children: dict[str, Any]) -> None:
    for name, child in children.items():
        restarts = child.get("restarts") if isinstance(child, dict) else None
        if isinstance(restarts, int) and restarts >= CRASH_LOOP:
            log = Path(str(child.get("log", "")))
            raise ApplianceError(
                f"node {name} exited {restarts} times while the network started: "
                f"{_last_error(log)}",
                code="NET-NODE",
            )


def _last_error(log: Path) -> str:
    """The last ``qkdn: error`` line of a log (else its last line), and where it is."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 16384))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError as exc:
        return f"its log {log} cannot be read ({exc.strerror})"
    errors = [x for x in lines if x.startswith("qkdn: error")] or [x for x in lines if x.strip()]
    last = errors[-1].strip()[:400] if errors else "nothing logged"
    return f"{last} (in {log})"


def _stop_started(supervisor: Any, net_dir: Path) -> None:
    """Stop a supervisor this process started, then whatever of its network is left."""
    if supervisor.poll() is None:
        supervisor.terminate()
        try:
            supervisor.wait(SUPERVISOR_STOP_S)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()
    bring_down(net_dir)


def _report(net_dir: Path, as_json: bool) -> int:
    doc = status_doc(net_dir)
    if as_json:
        print_json(doc)
        return 0
    from rich.table import Table  # the provisioning extra; a node never reports this way

    table = Table(title=f"network in {net_dir}")
    for col in ("node", "role", "pid", "restarts", "endpoints"):
        table.add_column(col)
    for e in doc["nodes"]:
        shown = str(e["pid"]) if e["alive"] else "[red]down[/]"
        table.add_row(
            e["name"],
            e["role"],
            shown,
            str(e["restarts"]),
            " ".join(f"{k}={v}" for k, v in e["endpoints"].items()),
        )
    console().print(table)
    if not doc["running"]:
        console().print("[red]no supervisor runs for this network[/]")
    for alarm in doc["alarms"]:
        console().print(f"[red]alarm [{alarm.get('code')}][/]: {alarm.get('message')}")
    aaa = doc["aaa"]
    if aaa is not None:
        state = f"pid {aaa['pid']}" if aaa["alive"] else "[red]down[/]"
        console().print(
            f"AAA: {state}, restarts {aaa['restarts']}, snmp={aaa['snmp']} "
            f"(operator credentials in {aaa['config']}; qkdn aaa --dir {aaa['dir']} ...)"
        )
    for sae in doc["saes"]:
        console().print(f"SAE {sae['id']}: {sae['etsi014_base_url']} cert {sae['cert']}")
    return 0


def status_doc(net_dir: Path) -> dict[str, Any]:
    """Every KMS node (process, endpoints) and every SAE (014 URL, credentials) of a network.

    The running supervisor's live state comes first (it holds what a full disk kept out of
    ``run/state.json``, and its alarms); without one, the state file. A process counts as
    alive only if it carries this network's marker (a recycled pid does not)."""
    from appliance.kms import netproc
    from appliance.kms.network import is_kms, load_configs

    configs = load_configs(net_dir)
    live = netproc.ask_supervisor(net_dir)
    state = live or _state(net_dir) or {}
    children = state.get("nodes") if isinstance(state.get("nodes"), dict) else {}
    assert isinstance(children, dict)
    procs = netproc.find_processes(net_dir)
    alarms = live.get("alarms") if live else None
    sdn = "controller" in children  # the nodes serve their SDN agents to a controller
    doc: dict[str, Any] = {
        "dir": str(net_dir),
        "running": live is not None,
        "supervisor_pid": int(state.get("supervisor_pid", 0) or 0) if live else 0,
        "alarms": [a for a in alarms if isinstance(a, dict)] if isinstance(alarms, list) else [],
        "nodes": [],
        "saes": [],
        "aaa": _aaa_status(net_dir, configs, children.get("aaa"), procs),
    }
    for name, cfg in configs.items():
        if not is_kms(cfg):
            continue
        own = (name, f"{name}/akms", f"{name}/ckms")
        keys = [k for k in own if isinstance(children.get(k), dict)]
        pids = [int(children[k].get("pid", 0) or 0) for k in keys] or [0]
        entry = {
            "name": name,
            "id": cfg.node.id,
            "role": cfg.node.role,
            "pid": pids[0],
            "pids": pids,
            "alive": bool(keys) and all(procs.get(p) == k for p, k in zip(pids, keys, strict=True)),
            "restarts": sum(int(children[k].get("restarts", 0) or 0) for k in keys),
            "endpoints": {
                s: a for s, a in cfg.listen.items() if s != "snmp" and (sdn or s != "gnmi")
            },
        }
        if "etsi014" in cfg.listen:
            entry["etsi014_base_url"] = f"https://{cfg.listen['etsi014']}/api/v1/keys"
        if "etsi004" in cfg.listen:
            entry["etsi004"] = cfg.listen["etsi004"]  # host:port of the 004 key streams
        doc["nodes"].append(entry)
        for sae in cfg.saes:
            doc["saes"].append(
                {
                    "id": sae.id,
                    "ukms": name,
                    "cert": sae.cert,
                    "key": str(Path(sae.cert).with_suffix(".key")),
                    "ca_cert": cfg.paths.ca_cert,
                    "etsi014_base_url": entry.get("etsi014_base_url"),
                    "etsi004": entry.get("etsi004"),
                }
            )
    return doc


def _aaa_status(
    net_dir: Path, configs: dict[str, Any], child: Any, procs: dict[int, str]
) -> dict[str, Any] | None:
    """The AAA device's process and SNMP address (None: the network runs without it)."""
    if not isinstance(child, dict):
        return None
    pid = int(child.get("pid", 0) or 0)
    snmp = next((c.listen.get("snmp") for c in configs.values() if c.node.role == "aaa"), None)
    return {
        "pid": pid,
        "alive": pid > 0 and procs.get(pid) == "aaa",
        "restarts": int(child.get("restarts", 0) or 0),
        "snmp": snmp,
        "dir": str(net_dir / "aaa"),
        "config": str(net_dir / "aaa" / "aaa.toml"),
    }


def cmd_net_status(args: argparse.Namespace) -> int:
    if not (args.dir / "nodes").is_dir():
        raise UsageError(f"no network in {args.dir} (qkdn net up first)")
    return _report(args.dir, args.json)


def cmd_net_down(args: argparse.Namespace) -> int:
    console().print(
        "network stopped" if bring_down(args.dir) else f"no network running from {args.dir}"
    )
    return 0


def bring_down(net_dir: Path) -> bool:
    """Stop every process of the network in ``net_dir``, found by its marker (the state
    file may be missing or damaged): the supervisor first (it stops its nodes), then any
    process left (SIGTERM, then SIGKILL). False if none was running; NET-STOP if one
    survives SIGKILL."""
    from appliance.kms import netproc

    found = netproc.find_processes(net_dir)
    if not found:
        return False
    supervisors = {pid for pid, name in found.items() if name == netproc.SUPERVISOR}
    left = _stop(supervisors, net_dir, SUPERVISOR_STOP_S)
    left |= _stop(set(netproc.find_processes(net_dir)), net_dir, NODE_STOP_S)
    if left:
        pids = " ".join(str(p) for p in sorted(left))
        raise ApplianceError(f"processes {pids} of {net_dir} did not stop", code="NET-STOP")
    with contextlib.suppress(OSError):
        (net_dir / "run" / "state.json").unlink(missing_ok=True)  # it names dead pids
    return True


def _stop(pids: set[int], net_dir: Path, grace: float) -> set[int]:
    """SIGTERM, ``grace`` seconds, SIGKILL; the pids still running after that."""
    from appliance.kms import netproc

    for pid in pids:
        netproc.signal_marked(pid, net_dir, signal.SIGTERM)
    left = netproc.wait_gone(pids, net_dir, grace)
    for pid in left:
        netproc.signal_marked(pid, net_dir, signal.SIGKILL)
    return netproc.wait_gone(left, net_dir, KILL_WAIT_S)
