"""``qkdn topology``: show, validate and render network topology files."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from rich.markup import escape
from rich.table import Table

from appliance.cli import args as types
from appliance.cli.output import console, print_json
from appliance.config.render import MAX_BASE_PORT, MIN_BASE_PORT, RenderPlan, render
from appliance.config.topology import Topology, load_topology, shipped_topologies

HELP = """\
A topology file (TOML) describes a QKD network: its nodes and their roles, the QKD links
with their length, key rate and QBER, and the customers (users, contracts, SAEs).
TOPOLOGY is a file path or the name of a shipped topology ({shipped}).
"""


def register(sub: Any) -> None:
    shipped = ", ".join(shipped_topologies())
    p = sub.add_parser(
        "topology",
        help="show, validate and render network topologies",
        description=HELP.format(shipped=shipped),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="topology_command", metavar="ACTION", parser_class=type(p))
    tsub.required = True

    show = tsub.add_parser(
        "show",
        help="print the node and link tables",
        description="Print the nodes and QKD links of a topology.",
    )
    show.add_argument("topology", type=types.topology, metavar="TOPOLOGY")
    show.add_argument("--json", action="store_true", help="print JSON for scripts instead")
    show.set_defaults(func=cmd_show)

    check = tsub.add_parser(
        "validate",
        help="check a topology file and report the first error",
        description="Validate a topology file: syntax, keys, values, "
        "references. Exit status 0 when valid.",
    )
    check.add_argument("topology", type=types.topology, metavar="TOPOLOGY")
    check.set_defaults(func=cmd_validate)

    rend = tsub.add_parser(
        "render",
        help="write one configuration file per node",
        description="Write DIR/nodes/NAME.toml for every node (identity, role, listen "
        "addresses, neighbours with QKDM URLs, certificate paths, data directory), a secret "
        "per emulated link in DIR/secrets (kept across renders) and DIR/network.toml.",
        epilog="example: qkdn topology render demoquandt --out /srv/qkdn --base-port 20000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rend.add_argument("topology", type=types.topology, metavar="TOPOLOGY")
    rend.add_argument(
        "--out", required=True, type=types.path, metavar="DIR", help="output directory"
    )
    rend.add_argument(
        "--host",
        type=types.host,
        default="127.0.0.1",
        help="address nodes listen on: an IPv4 or IPv6 address or a DNS name "
        "(default: %(default)s)",
    )
    rend.add_argument(
        "--base-port",
        type=types.base_port,
        default=20000,
        help=f"port = base + service offset + node id; {MIN_BASE_PORT}..{MAX_BASE_PORT} "
        "(default: %(default)s)",
    )
    rend.add_argument(
        "--data-root", type=types.path, help="parent of node data dirs (default: DIR/data)"
    )
    rend.add_argument("--pki-dir", type=types.path, help="certificate directory (default: DIR/pki)")
    rend.add_argument(
        "--start",
        type=types.number(0, types.UNIX_TIME_MAX),
        help="emulated links' start time, Unix seconds (default: kept from an "
        "earlier render, else now)",
    )
    rend.add_argument("--json", action="store_true", help="print the written files as JSON")
    rend.set_defaults(func=cmd_render)


def topology_doc(topo: Topology) -> dict[str, Any]:
    """The topology as plain data (resolved link values)."""
    return {
        "network": topo.name,
        "source": topo.source,
        "nodes": [n.model_dump() for n in topo.spec.nodes],
        "links": [link.model_dump() for link in topo.links],
        "saes": [dataclasses.asdict(s) for s in topo.spec.saes],
    }


def cmd_show(args: argparse.Namespace) -> int:
    topo = load_topology(args.topology)
    if args.json:
        print_json(topology_doc(topo))
        return 0
    out = console()
    nodes = Table(title=f"{topo.name}: nodes")
    for col in ("id", "name", "site", "role", "links"):
        nodes.add_column(col, justify="right" if col == "id" else "left")
    for n in topo.spec.nodes:
        links = ", ".join(peer.name for _, peer in topo.neighbours(n.id)) or "-"
        nodes.add_row(
            str(n.id), n.name + (" (virtual)" if n.virtual else ""), n.site, n.role, links
        )
    virtual = {n.id for n in topo.spec.nodes if n.virtual}
    main_km = sum(k.length_km for k in topo.links if not {k.a, k.b} & virtual)
    bypass_km = sum(k.length_km for k in topo.links if {k.a, k.b} & virtual)
    title = f"{topo.name}: QKD links ({main_km:.1f} km" + (
        f", plus {bypass_km:.1f} km via virtual nodes)" if bypass_km else ")"
    )
    table = Table(title=title)
    for col in ("link", "km", "SKR [kb/s]", "QBER [%]", "QKDM"):
        table.add_column(escape(col), justify="left" if col in ("link", "QKDM") else "right")
    for k in topo.links:
        std = k.emulator
        table.add_row(
            f"{k.a}-{k.b}",
            f"{k.length_km:.1f}",
            f"{k.skr_kbps:g} ± {std.skr_std_kbps:g}",
            f"{k.qber_pct:g} ± {std.qber_std_pct:g}",
            k.kind,
        )
    out.print(nodes)
    out.print(table)
    out.print(
        f"{len(topo.spec.saes)} SAEs: "
        + ", ".join(f"{s.id}@{topo.node(s.node).name}" for s in topo.spec.saes)
    )
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    topo = load_topology(args.topology)
    console().print(
        f"{topo.source}: valid ({len(topo.nodes)} nodes, {len(topo.links)} links, "
        f"{len(topo.spec.saes)} SAEs)"
    )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    topo = load_topology(args.topology)
    plan = RenderPlan(
        out=args.out,
        host=args.host,
        base_port=args.base_port,
        data_root=args.data_root,
        pki_dir=args.pki_dir,
        start=args.start,
    )
    files = render(topo, plan)
    if args.json:
        print_json({"network": topo.name, "out": str(args.out), "nodes": [str(f) for f in files]})
    else:
        console().print(f"rendered {len(files)} node configurations into {args.out / 'nodes'}")
    return 0
