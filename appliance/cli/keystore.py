"""``qkdn keystore``: provision and inspect the node's PKCS#11 keystore (hsm.keystore).

``init`` makes a token ready (optionally initialising it, SoftHSM2 or any module with
``C_InitToken``) and creates the non-extractable KEK and the wrapped data key if absent;
``status`` opens the keystore as the node would and shows what it found. PINs come from the
URI (pin-source / pin-value), an SO PIN file, or a hidden prompt; they are never printed.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from rich.table import Table

from appliance.cli.output import console, print_json
from appliance.errors import UsageError

HELP = """\
The node's key-encryption key lives non-extractable in a PKCS#11 token chosen by an
RFC 7512 URI; key-store records are sealed under a data key that is stored only wrapped
by it. See hsm/keystore.py for the design.
"""
URL_HELP = (
    "RFC 7512 URI, e.g. 'pkcs11:token=node-5;object=qkdn-kek"
    "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/qkdn/token.pin'"
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "keystore",
        help="the node's PKCS#11 keystore: init, status",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k = p.add_subparsers(dest="keystore_command", metavar="ACTION", parser_class=type(p))
    k.required = True

    init = k.add_parser(
        "init",
        help="create the KEK and data key (and the token) if absent",
        description="Provision the keystore: with --init-token or --so-pin-source, first "
        "initialise a free token with the URI's label and PIN if no token has that label "
        "(never re-initialises one); then create the KEK and the wrapped data key if absent.",
        epilog="example: qkdn keystore init 'pkcs11:token=node-5?pin-source=file:/etc/"
        "qkdn/token.pin' --so-pin-source file:/root/so.pin",
    )
    init.add_argument("url", metavar="URL", help=URL_HELP)
    init.add_argument("--init-token", action="store_true", help="initialise the token if absent")
    init.add_argument(
        "--so-pin-source",
        metavar="file:PATH",
        help="security officer PIN file (implies --init-token; else prompted)",
    )
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=cmd_init)

    status = k.add_parser(
        "status",
        help="open the keystore and show its token, KEK and data key",
        description="Open the keystore as the node does (nothing is created) and show the "
        "token, the KEK's attributes and the data key ID.",
    )
    status.add_argument("url", metavar="URL", help=URL_HELP)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)


def cmd_init(args: argparse.Namespace) -> int:
    from hsm.keystore import provision

    so_pin = None
    if args.so_pin_source or args.init_token:
        so_pin = _so_pin(args.so_pin_source)
    info = provision(args.url, so_pin=so_pin, pin=_user_pin(args.url))
    return _show(info.as_dict(), args.json, "keystore provisioned")


def cmd_status(args: argparse.Namespace) -> int:
    from hsm.keystore import open_node_key

    info = open_node_key(args.url, pin=_user_pin(args.url)).info
    return _show(info.as_dict(), args.json, "keystore")


def _user_pin(url: str) -> str | None:
    """None if the URI carries the PIN; a hidden prompt on a terminal; else the URI's error."""
    from hsm.pkcs11url import parse

    parsed = parse(url)
    if "pin-source" in parsed.query or "pin-value" in parsed.query or not sys.stdin.isatty():
        return None
    return getpass.getpass(f"user PIN of token {parsed.token!r}: ")


def _so_pin(source: str | None) -> str:
    from hsm.pkcs11url import pin_source_path, read_pin_file

    if source:
        return read_pin_file(pin_source_path(source))
    if not sys.stdin.isatty():
        raise UsageError("--init-token needs --so-pin-source file:PATH when not on a terminal")
    first = getpass.getpass("new security officer PIN: ")
    if first != getpass.getpass("again: "):
        raise UsageError("the two SO PINs differ")
    return first


def _show(info: dict[str, Any], as_json: bool, title: str) -> int:
    if as_json:
        print_json(info)
        return 0
    table = Table(title=title, show_header=False)
    table.add_column("field")
    table.add_column("value")
    flags = info.pop("kek_flags")
    info["created"] = "created now" if info["created"] else "existing"
    for name, value in info.items():
        table.add_row(name, str(value))
    table.add_row("kek attributes", ", ".join(f"{k}={v}" for k, v in flags.items()))
    console().print(table)
    return 0
