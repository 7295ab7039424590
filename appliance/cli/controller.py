"""``qkdn controller``: the QKDN Controller of a network (appliance/control).

``qkdn controller run --dir NET`` runs it in the foreground (``qkdn net up --controller``
starts it under the network's supervisor, and it dies with it); ``qkdn controller routes``
asks the running controller for its installed routes and the graph's link weights.
Bad input is one line with a code (``USAGE``, ``CTL-...``), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from appliance.cli import args as types
from appliance.cli.output import print_json
from appliance.errors import ApplianceError, UsageError

DEFAULT_DIR = Path(".qkdn/net")
EPILOG = """\
examples:
  qkdn net up demoquandt --controller            the network, its agents and the controller
  qkdn controller routes                         installed paths and link weights
  qkdn controller routes --json                  the same, for scripts
  qkdn controller run --dir NET --weights availability=4,rate=0   by hand, other weights
  qkdn controller run --dir NET --weights most-key.availability=8   one policy class's

The link weight is  hop + availability * B/(B + bits) + rate * R/(R + eskr)  (docs/control.md),
with numbers per routing policy class (balanced, fewest-hops, most-key: a contract's
route_policy, which the access node passes with its path request).
"""


def register(sub: Any) -> None:
    ctl = sub.add_parser(
        "controller",
        help="the QKDN Controller: paths from telemetry, installed hop by hop",
        description="The QKDN Controller subscribes to the SDN agent (gNMI) of every CKMS "
        "node, keeps a live graph, and installs paths hop by hop for the CKMS of source "
        "access nodes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c = ctl.add_subparsers(dest="controller_command", metavar="ACTION", parser_class=type(ctl))
    c.required = True
    run = c.add_parser("run", help="run the controller of a network in the foreground")
    run.add_argument("--dir", type=types.path, default=DEFAULT_DIR, help="the network directory")
    run.add_argument(
        "--weights",
        default="",
        metavar="[CLASS.]NAME=X,...",
        help="link weight terms: hop, availability, rate, reference_bits, reference_bps, "
        "of the balanced class, or of CLASS (fewest-hops, most-key) when prefixed "
        "(balanced default: hop=1,availability=1,rate=1,reference_bits=1048576,"
        "reference_bps=10000)",
    )
    run.add_argument(
        "--hold-off-ms",
        type=types.number(0, 10_000),
        default=100.0,
        metavar="MS",
        help="how long a link's state must hold before the controller acts on it "
        "(default: %(default)s)",
    )
    run.set_defaults(func=cmd_run)
    routes = c.add_parser("routes", help="installed paths and the graph's link weights")
    routes.add_argument("--dir", type=types.path, default=DEFAULT_DIR)
    routes.add_argument("--json", action="store_true", help="print the document as JSON")
    routes.set_defaults(func=cmd_routes)


def _network(net_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The controller's configuration and every node's, from a rendered network."""
    from appliance.kms.network import load_configs

    if not (net_dir / "nodes").is_dir():
        raise UsageError(f"--dir: {net_dir} holds no rendered network (see 'qkdn net up')")
    configs = load_configs(net_dir)
    mine = [c for c in configs.values() if "controller" in c.node.role.split("+")]
    if not mine or "api" not in mine[0].listen:
        raise ApplianceError("the topology has no controller node", code="CTL-NONE")
    return mine[0], configs


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.kms.netproc import die_with_supervisor

    die_with_supervisor()  # started by a network's supervisor: never outlive it
    from appliance.control.controller import Agent, Controller
    from appliance.control.graph import BALANCED, parse_policies

    policies = parse_policies(args.weights)
    cfg, configs = _network(args.dir)
    agents = [
        Agent(c.node.id, name, c.listen["gnmi"])
        for name, c in configs.items()
        if "ckms" in c.node.role.split("+") and "gnmi" in c.listen
    ]
    allowed = {name for name, c in configs.items() if "ckms" in c.node.role.split("+")}
    allowed.add(cfg.node.name)
    managers = frozenset(n for n, c in configs.items() if "manager" in c.node.role.split("+"))
    tls = (Path(cfg.paths.cert), Path(cfg.paths.key), Path(cfg.paths.ca_cert))

    async def main() -> None:
        controller = Controller(
            agents,
            tls,
            allowed=allowed,
            weights=policies[BALANCED],
            hold_off=args.hold_off_ms / 1000,
            managers=managers,
            policies=policies,
        )
        await controller.start(cfg.listen["api"])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await controller.close()

    asyncio.run(main())
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    doc = asyncio.run(ask_routes(args.dir))
    if args.json:
        print_json(doc)
        return 0
    print("routes (src -> dst [policy class]: path | backup)")
    for r in doc["routes"]:
        backup = "-".join(map(str, r["backup"])) or "none"
        where = f"{r['src']} -> {r['dst']} [{r.get('route_policy', 'balanced')}]"
        print(f"  {where}: {'-'.join(map(str, r['path']))} | {backup}")
    print("links (a-b: usable, weight)")
    for x in doc["links"]:
        held = " (the manager reports it down)" if x.get("manager") else ""
        print(f"  {x['a']}-{x['b']}: {'up' if x['usable'] else 'DOWN'}, {x['weight']}{held}")
    print(f"protection switches: {doc['switches']}")
    return 0


async def ask_routes(net_dir: Path) -> dict[str, Any]:
    from appliance.config.addresses import split_host_port
    from appliance.net.h2 import H2Client, TransportError
    from appliance.pki import client_context

    cfg, _ = _network(net_dir)
    ctx = client_context(
        Path(cfg.paths.cert), Path(cfg.paths.key), Path(cfg.paths.ca_cert), ("h2",)
    )
    host, port = split_host_port(cfg.listen["api"])
    client = H2Client(host, port, ctx, timeout=10.0)
    try:
        answer = await client.request("POST", "/v1/routes", b"{}")
    except TransportError as exc:
        raise ApplianceError(f"the controller does not answer ({exc})", code="CTL-DOWN") from None
    finally:
        await client.close()
    if answer.status != 200:
        raise ApplianceError(f"the controller refused ({answer.status})", code="CTL-REFUSED")
    doc: dict[str, Any] = json.loads(answer.body)
    return doc
