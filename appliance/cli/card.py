"""``qkdn card``: smartcards that carry an AKMS pair's pre-shared key.

``enroll`` runs the ceremony of :mod:`hsm.enroll` (PSK from the PTG.3 generator onto two
blank cards, signed audit record); ``status``, ``change-pin``, ``unblock``, ``lock`` and
``terminate`` look after enrolled cards; ``emulate`` runs an emulated card behind vpcd for
benches and tests; ``audit-verify`` checks audit records.

Secrets (PINs, admin PINs, PUKs) come from hidden prompts, or, for scripted provisioning,
from files readable by their owner only: ``--*-pin-file`` files hold one secret on their
first line; ``--pins-a`` / ``--pins-b`` files hold ``pin=``, ``admin-pin=`` and ``puk=``
lines. Secrets are never printed or logged.
"""

from __future__ import annotations

import argparse
import getpass
import signal
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from rich.table import Table

from appliance.cli import args as types
from appliance.cli.output import console, print_json
from appliance.config.addresses import join_host_port
from appliance.errors import UsageError

DEFAULT_QRNG = "emulated-qrng://provisioning?bits=16"
MAX_WAIT_S = 3600.0
WAIT = types.number(0, MAX_WAIT_S)
HELP = """\
Smartcards that carry the pre-shared key (PSK) bootstrapping the channel between two AKMS.
A card never reveals its PSK: it derives session keys from it (SP 800-108 CMAC KDF) after
the user PIN is presented. Readers are PC/SC URLs: pcsc://#0 (first reader) or
pcsc://READER-NAME (percent-encoded, or a unique prefix).
"""
ENROLL_EPILOG = """\
examples:
  qkdn card enroll --pair akms-1 akms-2 --signing-key station.pem --audit enroll.jsonl
  qkdn card enroll --pair akms-1 akms-2 --card-a pcsc://#0 --card-b pcsc://#1 \\
      --pins-a a.pins --pins-b b.pins --signing-key station.pem --audit enroll.jsonl

A --pins file (chmod 600) holds three lines: pin=..., admin-pin=..., puk=... (6 to 16
printable ASCII characters each). Blank cards open with the factory admin PIN 12345678
unless --transport-pin-file names another. The audit record is signed with the Ed25519
key in --signing-key (openssl genpkey -algorithm ed25519 -out station.pem).
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "card",
        help="PSK smartcards: enroll, status, change-pin, unblock, lock, terminate, emulate",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c = p.add_subparsers(dest="card_command", metavar="ACTION", parser_class=type(p))
    c.required = True

    st = c.add_parser(
        "status",
        help="the cards in the readers",
        description="Show each reader and its card: serial, lifecycle, retry counters, key slots.",
    )
    st.add_argument("--reader", metavar="URL", help="only this reader (default: all)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    en = c.add_parser(
        "enroll",
        help="write a fresh PSK to the two blank cards of an AKMS pair",
        description="The enrollment ceremony: a PSK from the PTG.3 generator onto card A and "
        "card B, each with its own PINs; both cards must derive the same test key; the PSK "
        "is then zeroised on this station and a signed audit record is appended.",
        epilog=ENROLL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    en.add_argument("--pair", nargs=2, required=True, metavar=("NODE_A", "NODE_B"))
    en.add_argument("--card-a", default="pcsc://#0", metavar="URL", help="default: %(default)s")
    en.add_argument("--card-b", default="pcsc://#1", metavar="URL", help="default: %(default)s")
    en.add_argument(
        "--pins-a", type=types.path, metavar="FILE", help="card A's secrets (else: prompt)"
    )
    en.add_argument(
        "--pins-b", type=types.path, metavar="FILE", help="card B's secrets (else: prompt)"
    )
    en.add_argument(
        "--transport-pin-file",
        type=types.path,
        metavar="FILE",
        help="the blank cards' admin PIN (default: the factory 12345678)",
    )
    en.add_argument(
        "--signing-key",
        type=types.path,
        required=True,
        metavar="PEM",
        help="Ed25519 private key that signs the audit record",
    )
    en.add_argument(
        "--audit",
        type=types.path,
        required=True,
        metavar="FILE",
        help="audit log (JSON lines) the record is appended to",
    )
    en.add_argument("--operator", default=None, help="who runs the ceremony (default: login)")
    en.add_argument(
        "--qrng",
        default=DEFAULT_QRNG,
        metavar="URL",
        help="noise source of the PTG.3 generator (default: %(default)s)",
    )
    en.add_argument(
        "--timeout",
        type=WAIT,
        default=10.0,
        metavar="S",
        help=f"how long to wait for each card, 0..{MAX_WAIT_S:g} (default: %(default)s s)",
    )
    en.add_argument("--json", action="store_true", help="print the signed record")
    en.set_defaults(func=cmd_enroll)

    ch = c.add_parser(
        "change-pin",
        help="change a card's PIN, admin PIN or PUK",
        description="Change the PIN (or admin PIN, or PUK) given its current value.",
    )
    _reader_arg(ch)
    ch.add_argument("--which", choices=["pin", "admin-pin", "puk"], default="pin")
    ch.add_argument("--old-pin-file", type=types.path, metavar="FILE")
    ch.add_argument("--new-pin-file", type=types.path, metavar="FILE")
    ch.set_defaults(func=cmd_change_pin)

    ub = c.add_parser(
        "unblock",
        help="reset a blocked PIN with the PUK",
        description="Reset the PIN's retry counter with the PUK and set a new PIN.",
    )
    _reader_arg(ub)
    ub.add_argument("--puk-file", type=types.path, metavar="FILE")
    ub.add_argument("--new-pin-file", type=types.path, metavar="FILE")
    ub.set_defaults(func=cmd_unblock)

    for name, what in (
        ("lock", "take a personalised card out of service (it keeps its key, refuses to use it)"),
        ("terminate", "wipe a card's keys for good (irreversible)"),
    ):
        x = c.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        _reader_arg(x)
        x.add_argument("--admin-pin-file", type=types.path, metavar="FILE")
        x.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        x.set_defaults(func=cmd_admin, action=name)

    em = c.add_parser(
        "emulate",
        help="run an emulated card behind vpcd (benches and tests only)",
        description="Run an emulated qkdn PSK card as a client of vsmartcard's vpcd (a pcscd "
        "reader driver): port 35963 is reader 'Virtual PCD 00 00', 35964 'Virtual PCD 00 01'. "
        "With --state the card keeps its PSK, PINs and counters across restarts (in clear: "
        "never use it for real keys). vpcd listens on every interface: never install it on a "
        "production image.",
        epilog="example: qkdn card emulate --port 35963 --state /var/tmp/card-a",
    )
    em.add_argument("--port", type=types.port, default=35963, help="vpcd's port, 1..65535")
    em.add_argument("--host", type=types.host, default="127.0.0.1", help="vpcd's host")
    em.add_argument("--state", type=types.path, metavar="DIR", help="persist the card here")
    em.add_argument("--serial", help="serial of a new card (default: random)")
    em.set_defaults(func=cmd_emulate)

    av = c.add_parser(
        "audit-verify",
        help="check the signatures of enrollment records",
        description="Verify every record of an audit log against a public key.",
    )
    av.add_argument("file", type=types.path, metavar="FILE")
    av.add_argument(
        "--public-key",
        type=types.path,
        required=True,
        metavar="PEM",
        help="the station's Ed25519 public key (or its private key PEM)",
    )
    av.add_argument("--json", action="store_true")
    av.set_defaults(func=cmd_audit_verify)


def _reader_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reader", default="pcsc://#0", metavar="URL", help="default: %(default)s")
    parser.add_argument(
        "--timeout",
        type=WAIT,
        default=5.0,
        metavar="S",
        help=f"how long to wait for the card, 0..{MAX_WAIT_S:g} (default: %(default)s s)",
    )


# -- secrets ---------------------------------------------------------------------------


def secret(path: Path | None, prompt: str, *, confirm: bool = False) -> bytearray:
    """A secret from an owner-only file, or from a hidden prompt (twice when ``confirm``)."""
    from hsm.card import read_pin_file

    if path is not None:
        return read_pin_file(path)
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to ask for the {prompt}: give it in a file (see --help)")
    first = getpass.getpass(f"{prompt}: ")
    if confirm and getpass.getpass(f"{prompt} (again): ") != first:
        raise UsageError(f"the two entries of the {prompt} differ")
    return bytearray(first.encode())


def _secrets_for(role: str, path: Path | None) -> Any:
    from hsm.enroll import CardSecrets

    if path is not None:
        return CardSecrets.from_file(path)
    card = f"card {role.upper()}"
    return CardSecrets(
        pin=secret(None, f"{card} new PIN", confirm=True),
        admin_pin=secret(None, f"{card} new admin PIN", confirm=True),
        puk=secret(None, f"{card} new PUK", confirm=True),
    )


# -- commands --------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from hsm.errors import CardError, ReaderError
    from hsm.pcsc import list_readers

    readers = [args.reader] if args.reader else [f"pcsc://#{i}" for i in range(len(list_readers()))]
    rows: list[dict[str, Any]] = []
    for url in readers:
        try:
            with _open(url, 0.0 if not args.reader else 5.0) as card:
                rows.append({"reader": card.reader, "card": card.info().to_dict()})
        except (ReaderError, CardError) as exc:
            if args.reader and not _no_card(exc):
                raise
            rows.append({"reader": _name_of(url), "card": None, "problem": exc.message})
    if args.json:
        print_json({"readers": rows})
        return 0
    table = Table(title="smartcard readers")
    for col in ("reader", "serial", "lifecycle", "PIN", "admin PIN", "PUK", "key slots"):
        table.add_column(col)
    for row in rows:
        info = row["card"]
        if info is None:
            table.add_row(row["reader"], f"[dim]{row['problem']}[/]", "", "", "", "", "")
            continue
        r = info["retries"]
        tries = [f"{r[k]['left']}/{r[k]['max']}" for k in ("pin", "admin-pin", "puk")]
        slots = ", ".join(str(s) for s in info["slots"]) or "-"
        table.add_row(row["reader"], info["serial"], info["lifecycle"], *tries, slots)
    console().print(table)
    return 0


def _no_card(exc: Exception) -> bool:
    return getattr(exc, "code", "") in ("HSM-NO-CARD", "HSM-APPLET")


def _name_of(url: str) -> str:
    from hsm.pcsc import list_readers, parse_url, resolve

    try:
        return resolve(parse_url(url), list_readers())
    except Exception:
        return url


def _open(url: str, timeout: float) -> Any:
    from hsm.card import Card

    return Card.open(url, timeout=timeout)


def cmd_enroll(args: argparse.Namespace) -> int:
    import qrng
    from hsm.applet import FACTORY_PINS, Ref
    from hsm.enroll import Enrollee, append_record, enroll_pair, load_signing_key

    signer = load_signing_key(args.signing_key)
    if args.card_a == args.card_b:
        raise UsageError("--card-a and --card-b name the same reader")
    transport = (
        secret(args.transport_pin_file, "transport admin PIN")
        if args.transport_pin_file
        else bytearray(FACTORY_PINS[Ref.ADMIN_PIN].encode())
    )
    secrets = [_secrets_for("a", args.pins_a), _secrets_for("b", args.pins_b)]
    started = time.perf_counter()
    generator = qrng.node_generator(args.qrng)
    cards = [_open(args.card_a, args.timeout)]
    try:
        cards.append(_open(args.card_b, args.timeout))
        a, b = (
            Enrollee(role=role, node=node, card=card, secrets=s)
            for role, node, card, s in zip("ab", args.pair, cards, secrets, strict=True)
        )
        record = enroll_pair(
            a,
            b,
            generator=generator,
            transport_admin_pin=transport,
            signer=signer,
            operator=args.operator or getpass.getuser(),
            station=socket.gethostname(),
            now=datetime.now(UTC),
            rng_url=args.qrng,
        )
    finally:
        for card in cards:
            card.close()
        for s in secrets:
            s.wipe()
        transport[:] = bytes(len(transport))
    append_record(args.audit, record)
    if args.json:
        print_json(record)
        return 0
    ca, cb = record["cards"]["a"], record["cards"]["b"]
    took = time.perf_counter() - started
    console().print(
        f"enrolled {args.pair[0]} (card {ca['serial']}) and {args.pair[1]} "
        f"(card {cb['serial']}): KCV {record['kcv']}, PSK zeroised on this station, "
        f"{took:.2f} s; signed record appended to {args.audit}"
    )
    return 0


def cmd_change_pin(args: argparse.Namespace) -> int:
    from hsm.applet import Ref

    ref = {"pin": Ref.USER_PIN, "admin-pin": Ref.ADMIN_PIN, "puk": Ref.PUK}[args.which]
    label = {"pin": "PIN", "admin-pin": "admin PIN", "puk": "PUK"}[args.which]
    old = secret(args.old_pin_file, f"current {label}")
    new = secret(args.new_pin_file, f"new {label}", confirm=True)
    try:
        with _open(args.reader, args.timeout) as card:
            card.change_pin(old, new, ref)
            serial = card.info().serial
    finally:
        old[:], new[:] = bytes(len(old)), bytes(len(new))
    console().print(f"{label} of card {serial} changed")
    return 0


def cmd_unblock(args: argparse.Namespace) -> int:
    puk = secret(args.puk_file, "PUK")
    new = secret(args.new_pin_file, "new PIN", confirm=True)
    try:
        with _open(args.reader, args.timeout) as card:
            card.unblock(puk, new)
            info = card.info()
    finally:
        puk[:], new[:] = bytes(len(puk)), bytes(len(new))
    left, most = info.retries["pin"]
    console().print(f"PIN of card {info.serial} reset ({left}/{most} tries)")
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    with _open(args.reader, args.timeout) as card:
        serial = card.info().serial
        if not args.yes:
            if not sys.stdin.isatty():
                raise UsageError(f"{args.action} needs --yes when there is no terminal")
            answer = input(f"{args.action} card {serial} in {card.reader!r}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                console().print("nothing done")
                return 1
        admin = secret(args.admin_pin_file, "admin PIN")
        try:
            (card.lock if args.action == "lock" else card.terminate)(admin)
        finally:
            admin[:] = bytes(len(admin))
    done = "locked" if args.action == "lock" else "terminated"
    console().print(f"card {serial}: {done}")
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    from hsm.vpcd import VirtualCard

    try:
        card = VirtualCard(port=args.port, host=args.host, state_dir=args.state, serial=args.serial)
    except OSError as exc:
        where = exc.filename or args.state
        raise UsageError(f"--state: cannot use {where}: {exc.strerror}") from None
    stop = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    where = f"state in {args.state}" if args.state else "state in memory only"
    print(
        f"emulated card {card.serial} on vpcd {join_host_port(args.host, args.port)} "
        f"(reader {card.reader!r}), {where}; Ctrl-C removes it",
        flush=True,
    )
    try:
        card.run_forever(stop)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        card.close()
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from hsm.enroll import key_id, load_public_key, read_records, verify_record

    trusted = load_public_key(args.public_key)
    records = [verify_record(doc, trusted) for doc in read_records(args.file)]
    if args.json:
        print_json({"key_id": key_id(trusted), "verified": records})
        return 0
    for rec in records:
        cards = rec.get("cards", {})
        console().print(
            f"ok {rec.get('time')} {rec.get('operator')}: {rec.get('pair', {}).get('a')} "
            f"({cards.get('a', {}).get('serial')}) + {rec.get('pair', {}).get('b')} "
            f"({cards.get('b', {}).get('serial')}), KCV {rec.get('kcv')}"
        )
    console().print(f"{len(records)} record(s) signed by key {key_id(trusted)}")
    return 0
