"""``qkdn node run`` and ``qkdn net up|status|down``: nodes as processes on this machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from appliance.cli import args as types
from appliance.cli.output import console, print_json
from appliance.config.addresses import split_host_port
from appliance.errors import ApplianceError, UsageError
from appliance.files import MiB, read_bounded

DEFAULT_DIR = Path(".qkdn/net")
FULL_STORE_S = 3600.0
"""``net up`` starts the emulated links this long in the past: their key buffers are full."""
MAX_STOCK = 100_000
STOCK = types.integer(0, MAX_STOCK)
PATIENCE = types.number(0, 3600, lo_open=True)
MAX_STATE = MiB


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
    run.set_defaults(func=cmd_node_run)

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
    up = n.add_parser("up", help="render, issue certificates, start every KMS node")
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
        default=256,
        metavar="N",
        help="KSA keys each UKMS keeps ready per SAE pair (default: %(default)s; "
        "0 makes every enc_keys cross the network)",
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
    down = n.add_parser("down", help="stop every node and the supervisor")
    down.add_argument("--dir", type=types.path, default=DEFAULT_DIR)
    down.set_defaults(func=cmd_net_down)


def cmd_node_run(args: argparse.Namespace) -> int:
    import qrng
    from appliance.config.node import load_node_config
    from appliance.config.topology import load_topology
    from appliance.kms.network import build_node
    from appliance.kms.node import Policy
    from appliance.kms.relay import Mode

    cfg = load_node_config(args.config)
    topo = load_topology(cfg.node.topology)
    generator = qrng.node_generator(cfg.devices.qrng)

    async def main() -> None:
        node = build_node(
            cfg,
            topo,
            generator.random_bytes,
            policy=Policy(mode=Mode[args.mode.upper()], stock=args.stock, patience=args.patience),
            only=args.only,
        )
        await node.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await node.close()

    import uvloop  # libuv's loop and its Cython TLS: ~25 % less CPU per relay hop than asyncio's

    uvloop.run(main())
    return 0


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


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a child of ours that exited is reaped (not a zombie)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: init reaps it
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


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
    """Render, issue certificates, start the supervisor, wait until every node listens."""
    import qrng
    from appliance.config.render import RenderPlan, render
    from appliance.config.topology import load_topology
    from appliance.kms.network import is_kms, load_configs, make_pki, provision_psks

    patience = _patience(args)
    state = _state(args.dir)
    if state and _alive(int(state["supervisor_pid"])):
        raise UsageError(f"a network is already running from {args.dir} (qkdn net down first)")
    topo = load_topology(args.topology)
    start = time.time() - (0.0 if args.rate_limited else FULL_STORE_S)
    speedup = float(getattr(args, "speedup", 1.0))
    if not 0 < speedup <= 1000:
        raise UsageError(f"--speedup: expected 0 < X <= 1000, got {speedup:g}")
    plan = RenderPlan(out=args.dir, base_port=args.base_port, start=start, speedup=speedup)
    render(topo, plan)
    configs = load_configs(args.dir)
    provisioning = qrng.node_generator("emulated-qrng://provisioning?bits=16").random_bytes
    if not (args.dir / "pki" / "ca.pem").exists():
        make_pki(topo, configs, provisioning)
    provision_psks(configs, provisioning)
    (args.dir / "logs").mkdir(exist_ok=True)
    with open(args.dir / "logs" / "supervisor.log", "ab") as log:
        subprocess.Popen(
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
                *(["--split-access"] if getattr(args, "split_access", False) else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    kms_addresses = [
        a for c in configs.values() if is_kms(c) for s, a in c.listen.items() if s != "snmp"
    ]
    deadline = time.monotonic() + args.timeout
    ca = Path(next(iter(configs.values())).paths.ca_cert)
    while not _ports_open(kms_addresses, ca):
        if time.monotonic() > deadline:
            bring_down(args.dir)  # leave nothing running behind a failed start
            raise ApplianceError(
                f"the network did not come up within {args.timeout:g} s (see {args.dir / 'logs'})",
                code="NET-TIMEOUT",
            )
        time.sleep(0.2)


def _report(net_dir: Path, as_json: bool) -> int:
    doc = status_doc(net_dir)
    if as_json:
        print_json(doc)
        return 0
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
    for sae in doc["saes"]:
        console().print(f"SAE {sae['id']}: {sae['etsi014_base_url']} cert {sae['cert']}")
    return 0


def status_doc(net_dir: Path) -> dict[str, Any]:
    """Every KMS node (process, endpoints) and every SAE (014 URL, credentials) of a network."""
    from appliance.kms.network import is_kms, load_configs

    configs = load_configs(net_dir)
    state = _state(net_dir) or {"nodes": {}}
    doc: dict[str, Any] = {
        "dir": str(net_dir),
        "running": bool(state["nodes"]),
        "nodes": [],
        "saes": [],
    }
    for name, cfg in configs.items():
        if not is_kms(cfg):
            continue
        procs = [
            state["nodes"][k] for k in (name, f"{name}/akms", f"{name}/ckms") if k in state["nodes"]
        ]
        pids = [int(p.get("pid", 0)) for p in procs] or [0]
        entry = {
            "name": name,
            "id": cfg.node.id,
            "role": cfg.node.role,
            "pid": pids[0],
            "pids": pids,
            "alive": all(pid and _alive(pid) for pid in pids),
            "restarts": sum(p.get("restarts", 0) for p in procs),
            "endpoints": {s: a for s, a in cfg.listen.items() if s != "snmp"},
        }
        if "etsi014" in cfg.listen:
            entry["etsi014_base_url"] = f"https://{cfg.listen['etsi014']}/api/v1/keys"
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
                }
            )
    return doc


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
    """Stop the supervisor and its nodes; False if none was running."""
    state = _state(net_dir)
    if not state or not _alive(int(state["supervisor_pid"])):
        return False
    pid = int(state["supervisor_pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        raise ApplianceError(f"supervisor {pid} did not stop", code="NET-STOP")
    return True
