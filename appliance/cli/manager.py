"""``qkdn manager``: the QKDN Manager (FCAPS over SNMPv3) and its records.

``qkdn manager run --config NET/mgmt/manager.toml`` runs it (``qkdn net up`` does, in the
data centre); the other actions read and change its database (``NET/mgmt/manager.db``)
while it runs: ``alarms``, ``ack``, ``history``, ``inventory``, ``security``,
``accounting`` (the AAA device's, when the network runs AAA). Bad input is
one line with a code (``USAGE``, ``MGMT-*``), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

from appliance.cli import args as types
from appliance.cli.output import print_json
from appliance.mgmt.errors import MgmtError

DEFAULT_DIR = Path(".qkdn/net")
EPILOG = """\
examples:
  qkdn manager alarms                     open alarms (X.733 severity, acknowledged by)
  qkdn manager ack 12 --as alice          acknowledge alarm 12
  qkdn manager history link-8-9 --json    SKR, QBER and key level samples of a link
  qkdn manager history ukms-berlin --node T_key history of a node (enc_keys served)
  qkdn manager inventory                  nodes, roles, software, certificate expiry
  qkdn manager accounting                 keys and requests per user (net up --aaa)
The operator's page: https://<manager web address>/ (passwords in NET/mgmt/operators.txt).
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "manager",
        help="the QKDN Manager: alarms, history, inventory (SNMPv3, web page)",
        description="The QKDN Manager of the data centre: it receives the nodes' SNMPv3 "
        "INFORMs, polls their agents (QKDN-MIB) and keeps alarms, performance history, "
        "inventory and security events (docs/mgmt.md).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_subparsers(dest="manager_command", metavar="ACTION", parser_class=type(p))
    s.required = True
    run = s.add_parser("run", help="run the manager in the foreground")
    run.add_argument("--config", required=True, type=types.path, metavar="manager.toml")
    run.set_defaults(func=cmd_run)
    for name, text in (
        ("alarms", "open alarms (--all: cleared ones too)"),
        ("inventory", "the nodes: role, software, image slot, agent, certificate expiry"),
        ("security", "security events: refused logins and SNMP senders, auth failures"),
        ("accounting", "the AAA device's accounting per user (--by pair: per contract and pair)"),
    ):
        a = s.add_parser(name, help=text)
        _common(a)
        if name == "alarms":
            a.add_argument("--all", action="store_true", help="include cleared alarms")
        if name == "accounting":
            a.add_argument(
                "--by", choices=("user", "pair"), default="user", help="rows per user or pair"
            )
        a.set_defaults(func=cmd_show, what=name)
    ack = s.add_parser("ack", help="acknowledge an alarm")
    ack.add_argument("alarm", type=types.integer(1, 2**62), metavar="N")
    ack.add_argument("--as", dest="who", default="cli", type=_who, help="operator name")
    _common(ack)
    ack.set_defaults(func=cmd_ack)
    hist = s.add_parser(
        "history", help="a link's SKR, QBER and key level samples, or a node's T_key (--node)"
    )
    hist.add_argument("link", type=_link, metavar="LINK|NODE")
    hist.add_argument(
        "--node", action="store_true", help="LINK|NODE names a node: its T_key history"
    )
    hist.add_argument("--since", type=types.number(0, 1e11), default=0.0, metavar="UNIX_TIME")
    _common(hist)
    hist.set_defaults(func=cmd_history)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=types.path, default=DEFAULT_DIR, help="the network directory")
    p.add_argument("--json", action="store_true", help="print JSON")


def _who(text: str) -> str:
    if not text.isascii() or not text.isprintable() or not 1 <= len(text) <= 32:
        raise argparse.ArgumentTypeError("expected a name of 1..32 printable ASCII characters")
    return text


def _link(text: str) -> str:
    if not text.isascii() or not text.isprintable() or not 1 <= len(text) <= 32:
        raise argparse.ArgumentTypeError("expected a link name such as link-8-9")
    return text


def _store(net_dir: Path) -> Any:
    from appliance.mgmt.store import Store

    path = net_dir / "mgmt" / "manager.db"
    if not path.is_file():
        raise MgmtError(
            f"{path}: no manager database (is the network up with its manager?)", code="MGMT-DB"
        )
    return Store(path)


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.kms.netproc import die_with_supervisor
    from appliance.mgmt.manager import serve

    die_with_supervisor()  # started by a network's supervisor: never outlive it
    try:
        asyncio.run(serve(args.config))
    except KeyboardInterrupt:
        return 0
    return 0


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    cols: tuple[str, ...]
    try:
        if args.what == "alarms":
            rows = [a.to_json() for a in store.alarms(include_cleared=args.all)]
            cols = ("id", "severity", "kind", "resource", "node", "text", "raised", "acked_by")
        elif args.what == "accounting":
            from appliance.mgmt.accounting import per_user

            acct = store.accounting()
            if args.by == "user":
                rows = [{**t, "contracts": ",".join(t["contracts"])} for t in per_user(acct)]
                cols = ("user", "contracts", "allowed", "keys", "bits", "failed")
            else:
                rows = [r.to_json() for r in acct]
                cols = ("user", "contract", "master", "slave", "allowed", "keys", "bits")
            cols += ("refused_limits", "refused_unauthorised", "refused_quota")
        elif args.what == "inventory":
            rows = store.inventory()
            cols = ("node", "id", "role", "software", "slot", "reachable", "cert_expiry")
        else:
            rows = store.security_events()
            cols = ("id", "ts", "source", "kind", "text")
    finally:
        store.close()
    _print(rows, cols, args.json)
    return 0


def _print(rows: list[dict[str, Any]], cols: tuple[str, ...], as_json: bool) -> None:
    if as_json:
        print_json(rows)
        return
    for row in rows:
        shown = [
            _when(row[c]) if c in ("raised", "ts", "cert_expiry") else str(row[c] or "")
            for c in cols
        ]
        print("  ".join(shown))
    if not rows:
        print("(none)")


def cmd_ack(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    try:
        if not store.ack(args.alarm, args.who):
            raise MgmtError(f"alarm {args.alarm}: no such unacknowledged alarm", code="MGMT-ALARM")
    finally:
        store.close()
    print(f"manager: alarm {args.alarm} acknowledged by {args.who}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    store = _store(args.dir)
    try:
        if args.node:
            rows = store.tkey_history(args.link, args.since)
        else:
            rows = store.history(args.link, args.since)
    finally:
        store.close()
    cols = ("ts", "tkey_p50_us", "tkey_p99_us", "served", "n") if args.node else (
        "ts", "node", "skr", "qber_ppm", "level", "n"
    )  # fmt: skip
    _print(rows, cols, args.json)
    return 0
