"""``qkdn aaa``: the AAA device's registry, its SNMPv3 agent and its accounting.

The registry and the accounting live in ``--dir`` (``registry.db``, ``accounting.db``);
``qkdn aaa run --config DIR/aaa.toml`` serves them over SNMPv3 (appliance/aaa/agent.py).
A change made here while the agent runs is taken in by it within 0.1 s, and revokes the
quota granted under what changed. Bad input is one line with a code (``AAA-VALUE``,
``AAA-UNKNOWN``, ``AAA-EXISTS``, ``USAGE``), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.aaa.errors import AaaError
from appliance.aaa.registry import LIMITS, NAME, POLICIES, Contract, Registry, Sae, User
from appliance.cli import args as types
from appliance.cli.output import print_json
from appliance.errors import UsageError

DEFAULT_DIR = Path(".qkdn/aaa")
HELP = """\
The AAA device of the data centre: users, the SAE directory (SAE -> UKMS -> AKMS),
contracts and accounting. 'qkdn aaa run' is its SNMPv3 agent (QKDN-AAA-MIB,
appliance/aaa/mib/). 'qkdn net up --aaa' runs it on the key path (docs/aaa.md).
"""
EPILOG = """\
examples:
  qkdn aaa init --topology demoquandt              registry seeded from a topology
  qkdn aaa contract add acme-2027 --user acme --pair acme-a:acme-b --keys-per-day 50000
  qkdn aaa user suspend acme                        refused at once, quota revoked
  qkdn aaa accounting --from 2026-06-01 --to 2026-06-30 --format csv > june.csv
  qkdn aaa accounting verify --public-key dc.pub.pem
"""
PAIR = re.compile(rf"({NAME.pattern}):({NAME.pattern})", re.ASCII)
FINGERPRINT = re.compile(r"[0-9a-f]{64}", re.ASCII)
CONTRACT_OPTIONS = {
    "max_key_size": "largest key in bits (a multiple of 8)",
    "keys_per_request": "most keys per request",
    "keys_per_day": "keys per UTC day",
    "bits_per_day": "key bits per UTC day",
    "keys_per_month": "keys per calendar month",
    "bits_per_month": "key bits per calendar month",
    "max_rate": "keys per second at most",
    "priority": "priority, 0..255 (higher first)",
}


def date(text: str) -> dt.date:
    """A calendar date, YYYY-MM-DD."""
    try:
        if len(text) != 10:
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text[:40]!r}") from None


def pair(text: str) -> tuple[str, str]:
    m = PAIR.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected MASTER:SLAVE SAE names, got {text[:70]!r}")
    return m.group(1), m.group(2)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "aaa",
        help="the AAA device: users, SAEs, contracts, its SNMPv3 agent, accounting",
        description=HELP,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dir", type=types.path, default=DEFAULT_DIR, help="default: %(default)s")
    a = p.add_subparsers(dest="aaa_command", metavar="ACTION", parser_class=type(p))
    a.required = True
    init = a.add_parser("init", help="create the registry; seed it from a topology")
    init.add_argument("--topology", type=types.topology, help="file or shipped name")
    init.set_defaults(func=cmd_init)
    _user(a)
    _sae(a)
    _contract(a)
    ukms = a.add_parser("ukms", help="attach a UKMS to its AKMS")
    ukms.add_argument("ukms", type=types.integer(1, 999), metavar="UKMS")
    ukms.add_argument("--akms", type=types.integer(1, 999), required=True)
    ukms.set_defaults(func=cmd_attach)
    run = a.add_parser("run", help="the SNMPv3 agent (until interrupted)")
    run.add_argument("--config", type=types.path, required=True, help="the agent's TOML file")
    run.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="default: %(default)s"
    )
    run.set_defaults(func=cmd_run)
    _accounting(a)


def _common(parser: Any, kind: str, with_id: bool = True) -> None:
    if with_id:
        parser.add_argument("id", metavar=kind.upper())
    parser.add_argument("--json", action="store_true", help="print JSON")


def _user(a: Any) -> None:
    u = a.add_parser("user", help="users: add, set, suspend, resume, show")
    s = u.add_subparsers(dest="user_command", metavar="ACTION", parser_class=type(u))
    s.required = True
    for name in ("add", "set"):
        c = s.add_parser(name, help=f"{name} a user")
        _common(c, "user")
        c.add_argument("--customer", required=name == "add", help="the customer's name")
        c.add_argument("--billing", help="billing reference")
        c.set_defaults(func=cmd_user_add if name == "add" else cmd_user_set)
    _switches(s, "user")


def _sae(a: Any) -> None:
    u = a.add_parser("sae", help="SAEs: add, set, suspend, resume, show")
    s = u.add_subparsers(dest="sae_command", metavar="ACTION", parser_class=type(u))
    s.required = True
    for name in ("add", "set"):
        c = s.add_parser(name, help=f"{name} an SAE")
        _common(c, "sae")
        c.add_argument("--user", required=name == "add")
        c.add_argument("--ukms", type=types.integer(1, 999), required=name == "add")
        c.add_argument(
            "--fingerprint",
            type=types.matching(FINGERPRINT, "SHA-256 of the certificate, 64 hex digits"),
        )
        c.set_defaults(func=cmd_sae_add if name == "add" else cmd_sae_set)
    _switches(s, "sae")


def _contract(a: Any) -> None:
    u = a.add_parser("contract", help="contracts: add, set, suspend, resume, show")
    s = u.add_subparsers(dest="contract_command", metavar="ACTION", parser_class=type(u))
    s.required = True
    for name in ("add", "set"):
        c = s.add_parser(name, help=f"{name} a contract")
        _common(c, "contract")
        c.add_argument("--user", required=name == "add")
        c.add_argument(
            "--pair", type=pair, action="append", metavar="MASTER:SLAVE", help="repeatable"
        )
        for option, text in CONTRACT_OPTIONS.items():
            lo, hi = LIMITS[option]
            c.add_argument("--" + option.replace("_", "-"), type=types.integer(lo, hi), help=text)
        c.add_argument("--valid-from", type=date, help="first day, YYYY-MM-DD")
        c.add_argument("--valid-until", type=date, help="last day, YYYY-MM-DD")
        c.add_argument("--relay-mode", choices=("gcm", "otp"))
        c.add_argument(
            "--route-policy",
            choices=POLICIES,
            metavar="CLASS",
            help="routing policy class of the user's relays, one of "
            f"{', '.join(POLICIES)} (the controller weighs links per class; "
            "default on add: balanced)",
        )
        c.set_defaults(func=cmd_contract_add if name == "add" else cmd_contract_set)
    _switches(s, "contract")


def _switches(s: Any, kind: str) -> None:
    for name, value in (("suspend", True), ("resume", False)):
        c = s.add_parser(name, help=f"{name} a {kind}")
        _common(c, kind)
        c.set_defaults(func=cmd_switch, kind=kind, suspended=value)
    show = s.add_parser("show", help=f"show one or every {kind}")
    show.add_argument("id", nargs="?", metavar=kind.upper())
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show, kind=kind)


def _accounting(a: Any) -> None:
    c = a.add_parser(
        "accounting",
        help="export billing lines; verify or seal the signed hash chain",
        description="Without ACTION: billing lines per contract and SAE pair, per day or "
        "month, from --from to --to (inclusive). 'verify': recompute the hash chain and "
        "check every signed daily head. 'seal': sign the heads of past days.",
    )
    c.add_argument("action", nargs="?", choices=("verify", "seal"), metavar="verify|seal")
    today = dt.datetime.now(dt.UTC).date()
    c.add_argument("--from", dest="start", type=date, default=today.replace(day=1))
    c.add_argument("--to", dest="end", type=date, default=today)
    c.add_argument("--user", help="only this user's lines")
    c.add_argument("--by", choices=("day", "month"), default="day")
    c.add_argument("--format", choices=("csv", "json"), default="csv")
    c.add_argument("--public-key", type=types.path, help="verify: the data centre's key (PEM)")
    c.add_argument("--key", type=types.path, help="seal: the data centre's private key (PEM)")
    c.set_defaults(func=cmd_accounting)


# -- commands ---------------------------------------------------------------------------
def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.dir / "registry.db")


def _with(args: argparse.Namespace, act: Callable[[Registry], Any]) -> int:
    reg = _registry(args)
    try:
        result = act(reg)
    finally:
        reg.close()
    if getattr(args, "json", False) and result is not None:
        print_json(_doc(result))
    elif result is not None:
        print(f"aaa: {_one_line(result)}")
    return 0


def _doc(item: Any) -> Any:
    if isinstance(item, list):
        return [_doc(x) for x in item]
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    return item


def _one_line(item: Any) -> str:
    doc = _doc(item)
    return ", ".join(f"{k}={v}" for k, v in doc.items()) if isinstance(doc, dict) else str(doc)


def cmd_init(args: argparse.Namespace) -> int:
    from appliance.aaa.seed import seed
    from appliance.config.topology import load_topology

    def act(reg: Registry) -> Any:
        done = seed(reg, load_topology(args.topology)) if args.topology else None
        wrote = _agent_config(args.dir / "aaa.toml", sorted(reg.snapshot().akms))
        if wrote:
            print(f"aaa: wrote {wrote} (SNMPv3 credentials: keep it private)")
        return done or f"registry at {reg.path}"

    return _with(args, act)


def _agent_config(path: Path, akms: list[int]) -> Path | None:
    """A first aaa.toml for ``qkdn aaa run``: an operator and one SNMP user per AKMS,
    each with random passphrases; never overwrites an existing file."""
    import secrets

    if path.exists():
        return None
    lines = [
        'listen = "127.0.0.1:16161"',
        'registry = "registry.db"',
        'accounting = "accounting.db"',
        "",
        "[operator]",
        'user = "aaa-operator"',
        f'auth = "{secrets.token_urlsafe(24)}"',
        f'priv = "{secrets.token_urlsafe(24)}"',
    ]
    for n in akms:
        lines += [
            "",
            "[[akms]]",
            f"id = {n}",
            f'user = "akms-{n}"',
            f'auth = "{secrets.token_urlsafe(24)}"',
            f'priv = "{secrets.token_urlsafe(24)}"',
            f'# inform = "HOST:PORT"  (where AKMS {n} receives aaaQuotaRevoked INFORMs)',
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write("\n".join(lines) + "\n")
    return path


def cmd_user_add(args: argparse.Namespace) -> int:
    user = User(id=args.id, customer=args.customer, billing=args.billing or "")
    return _with(args, lambda reg: reg.add_user(user))


def cmd_user_set(args: argparse.Namespace) -> int:
    changes = {k: v for k in ("customer", "billing") if (v := getattr(args, k)) is not None}
    return _with(args, lambda reg: reg.set_user(args.id, **changes))


def cmd_sae_add(args: argparse.Namespace) -> int:
    sae = Sae(id=args.id, user=args.user, ukms=args.ukms, fingerprint=args.fingerprint or "")
    return _with(args, lambda reg: reg.add_sae(sae))


def cmd_sae_set(args: argparse.Namespace) -> int:
    changes = {k: v for k in ("user", "ukms", "fingerprint") if (v := getattr(args, k)) is not None}
    return _with(args, lambda reg: reg.set_sae(args.id, **changes))


def _contract_changes(args: argparse.Namespace) -> dict[str, Any]:
    names = [*CONTRACT_OPTIONS, "valid_from", "valid_until", "relay_mode", "route_policy", "user"]
    changes = {k: v for k in names if (v := getattr(args, k)) is not None}
    if args.pair:
        changes["pairs"] = tuple(args.pair)
    return changes


def cmd_contract_add(args: argparse.Namespace) -> int:
    """Limits not given follow from those given: bits = keys x max key size, a month is
    31 days."""
    changes = _contract_changes(args)
    if "pairs" not in changes:
        raise UsageError("a contract needs at least one --pair MASTER:SLAVE")
    size = changes.get("max_key_size", 256)
    if "keys_per_day" in changes:
        changes.setdefault("bits_per_day", min(changes["keys_per_day"] * size, 2**53))
        changes.setdefault("keys_per_month", min(changes["keys_per_day"] * 31, 2**53))
    if "keys_per_month" in changes:
        changes.setdefault("bits_per_month", min(changes["keys_per_month"] * size, 2**53))
    contract = Contract(id=args.id, **changes)
    return _with(args, lambda reg: reg.add_contract(contract))


def cmd_contract_set(args: argparse.Namespace) -> int:
    changes = _contract_changes(args)
    return _with(args, lambda reg: reg.set_contract(args.id, **changes))


def cmd_switch(args: argparse.Namespace) -> int:
    def act(reg: Registry) -> Any:
        setter: dict[str, Callable[..., Any]] = {
            "user": reg.set_user,
            "sae": reg.set_sae,
            "contract": reg.set_contract,
        }
        return setter[args.kind](args.id, suspended=args.suspended)

    return _with(args, act)


def cmd_show(args: argparse.Namespace) -> int:
    def act(reg: Registry) -> Any:
        snap = reg.snapshot()
        table: dict[str, Any] = {"user": snap.users, "sae": snap.saes, "contract": snap.contracts}
        items = table[args.kind]
        if args.id is None:
            return list(items.values())
        getter = {"user": reg.user, "sae": reg.sae, "contract": reg.contract}
        return [getter[args.kind](args.id)]

    if args.json:
        return _with(args, act)
    reg = _registry(args)
    try:
        items = act(reg)
    finally:
        reg.close()
    _table(args.kind, items)
    return 0


def _table(kind: str, items: list[Any]) -> None:
    from rich.table import Table

    from appliance.cli.output import console

    table = Table(title=f"{kind}s")
    fields = [f.name for f in dataclasses.fields(items[0])] if items else ["id"]
    for name in fields:
        table.add_column(name)
    for item in items:
        table.add_row(*(_cell(getattr(item, f)) for f in fields))
    console().print(table)


def _cell(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(f"{m}:{s}" for m, s in value)
    return "" if value is None else str(value)


def cmd_attach(args: argparse.Namespace) -> int:
    def act(reg: Registry) -> Any:
        reg.attach(args.ukms, args.akms)
        return f"UKMS {args.ukms} hangs off AKMS {args.akms}"

    return _with(args, act)


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.aaa.agent import serve
    from appliance.kms.netproc import die_with_supervisor

    die_with_supervisor()  # started by a network's supervisor: never outlive it

    try:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(serve(args.config))
        else:
            asyncio.run(serve(args.config))
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_accounting(args: argparse.Namespace) -> int:
    from appliance.aaa.accounting import Accounting, export, verify

    path = args.dir / "accounting.db"
    if args.action == "verify":
        if args.public_key is None:
            raise UsageError("accounting verify needs --public-key PEM")
        done = verify(path, _public_key(args.public_key))
        print(
            f"aaa: accounting verified: {done.records} records, {done.heads} signed heads, "
            f"chain head {done.last[:16]}"
        )
        return 0
    if not path.is_file():
        raise AaaError(f"{path}: no accounting yet", code="AAA-DB")
    acct = Accounting(path)
    try:
        if args.action == "seal":
            if args.key is None:
                raise UsageError("accounting seal needs --key PEM")
            from appliance.aaa.agent import signing_key

            today = dt.datetime.now(dt.UTC).date().isoformat()
            days = acct.seal(signing_key(args.key), before=today)
            print(f"aaa: sealed {len(days)} day(s): {' '.join(days) or '-'}")
            return 0
        if args.end < args.start:
            raise UsageError("--to is before --from")
        rows = acct.rows(args.start, args.end, user=args.user, by=args.by)
    finally:
        acct.close()
    reg = _registry(args)
    try:
        billing = {u.id: u.billing for u in reg.snapshot().users.values()}
    finally:
        reg.close()
    sys.stdout.write(export(rows, args.format, billing))
    return 0


def _public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AaaError(f"{path}: cannot read the public key: {exc}", code="AAA-KEY") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AaaError(f"{path}: not an Ed25519 public key", code="AAA-KEY")
    return key
