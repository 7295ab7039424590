"""``qkdn sae stream open|get|close``: an ETSI GS QKD 004 client acting as one SAE.

Each command is one connection to the SAE's KME (its 004 endpoint from ``qkdn net status``):
a stream lives on at the KMEs between commands. For people: key fingerprints (SHA-256, 8
bytes) and key IDs, never the chunks themselves; ``--json`` prints the answers, chunks
included (base64), for scripts. A status other than success is one line with the code
``SAE-004-<STATUS>`` and exit status 1 (after the JSON document with ``--json``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
from pathlib import Path
from typing import Any

from appliance.cli import args as types
from appliance.cli.net import DEFAULT_DIR, status_doc
from appliance.cli.output import console, print_json
from appliance.errors import ApplianceError, UsageError
from appliance.kms import frames004 as f

U32 = (1 << 32) - 1
MAX_COUNT = 10_000
ksid_arg = types.matching(
    re.compile(r"[0-9a-f]{32}"), "a Key_stream_ID of 32 lower-case hex digits"
)


def register(sub: Any) -> None:
    """Add ``stream`` to the ``qkdn sae`` actions."""
    p = sub.add_parser(
        "stream",
        help="ETSI 004 key streams: open, get, close",
        description="Act as one SAE on an ETSI 004 key stream of a running network.",
        epilog="examples:\n  qkdn sae stream open --sae sae-berlin-1 --to sae-bonn-1\n"
        "  qkdn sae stream open --sae sae-bonn-1 --from sae-berlin-1 --ksid KSID\n"
        "  qkdn sae stream get --sae sae-bonn-1 --ksid KSID --index 0 --count 4\n"
        "  qkdn sae stream close --sae sae-bonn-1 --ksid KSID",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_subparsers(dest="stream_command", metavar="ACTION", parser_class=type(p))
    s.required = True
    for name, helptext in (
        ("open", "open a stream (OPEN_CONNECT), or join one with --ksid"),
        ("get", "chunks of a stream by index (GET_KEY)"),
        ("close", "close our end of a stream (CLOSE)"),
    ):
        c = s.add_parser(name, help=helptext, description=helptext)
        c.add_argument("--dir", type=types.path, default=DEFAULT_DIR, help="network directory")
        c.add_argument("--sae", required=True, help="the SAE we act as (its certificate is used)")
        c.add_argument("--json", action="store_true", help="print the answers as JSON")
        c.add_argument("--ksid", type=ksid_arg, required=name != "open", help="the stream")
        c.set_defaults(func=cmd_stream)
        if name == "open":
            _open_options(c)
        elif name == "get":
            c.add_argument("--index", type=types.integer(0, U32), default=0, help="first index")
            c.add_argument(
                "--count",
                type=types.integer(1, MAX_COUNT),
                default=1,
                help=f"chunks from --index on, 1..{MAX_COUNT} (default: 1)",
            )


def _open_options(c: argparse.ArgumentParser) -> None:
    ends = c.add_mutually_exclusive_group(required=True)
    ends.add_argument("--to", metavar="SAE", help="the destination SAE (we are the source)")
    ends.add_argument("--from", dest="source", metavar="SAE", help="the source SAE")
    c.add_argument("--chunk", type=types.integer(1, f.MAX_CHUNK), default=32, help="bytes")
    for opt, what in (
        ("--max-bps", "most key bits per second (0: no maximum)"),
        ("--min-bps", "key bits per second needed at least"),
        ("--timeout", "ms a GET_KEY waits, and a stream nobody calls lives (0: default)"),
        ("--ttl", "seconds the stream lives (0: default)"),
    ):
        c.add_argument(opt, type=types.integer(0, U32), default=0, help=what)
    c.add_argument(
        "--metadata",
        choices=("json", "none"),
        default="json",
        help="each chunk's metadata: its key ID as JSON (default), or none",
    )


def cmd_stream(args: argparse.Namespace) -> int:
    from appliance.sae004 import Client004, Client004Error

    if not (args.dir / "nodes").is_dir():
        raise UsageError(f"no network in {args.dir} (qkdn net up first)")
    saes = {s["id"]: s for s in status_doc(args.dir)["saes"]}
    for name in (args.sae, getattr(args, "to", None), getattr(args, "source", None)):
        if name is not None and name not in saes:
            raise UsageError(f"unknown SAE {name!r} (known: {', '.join(sorted(saes))})")
    me = saes[args.sae]
    if not me.get("etsi004"):
        raise UsageError(f"the KME of {args.sae} serves no ETSI 004 key streams")
    host, port = me["etsi004"].rsplit(":", 1)
    try:
        with Client004(
            host.strip("[]"),
            int(port),
            cert=Path(me["cert"]),
            key=Path(me["key"]),
            ca=Path(me["ca_cert"]),
        ) as client:
            return _run(args, client)
    except OSError as exc:  # ssl.SSLError included
        raise ApplianceError(
            f"cannot reach the 004 server of {args.sae} at {me['etsi004']}: "
            f"{exc.__class__.__name__}",
            code="SAE-CONNECT",
        ) from None
    except Client004Error as exc:
        raise ApplianceError(exc.message, code=exc.code) from None


def _run(args: argparse.Namespace, client: Any) -> int:
    ksid = bytes.fromhex(args.ksid) if args.ksid else f.ZERO_KSID
    if args.stream_command == "open":
        source = args.source or args.sae
        destination = args.to or args.sae
        qos = f.Qos(
            key_chunk_size=args.chunk,
            max_bps=args.max_bps,
            min_bps=args.min_bps,
            timeout=args.timeout,
            ttl=args.ttl,
            metadata_mimetype="application/json" if args.metadata == "json" else "",
        )
        opened = client.open_connect(f"qkd://{source}", f"qkd://{destination}", qos, ksid)
        _show_open(args, opened)
        _check(opened.status, (f.Status.SUCCESS, f.Status.PEER_NOT_CONNECTED))
        return 0
    if args.stream_command == "close":
        closed = client.close(ksid)
        if args.json:
            print_json(_status(closed.status))
        else:
            console().print(f"stream {args.ksid}: {closed.status.name}")
        _check(closed.status, (f.Status.SUCCESS,))
        return 0
    answers = client.get_keys(ksid, list(range(args.index, args.index + args.count)))
    _show_keys(args, answers)
    for answer in answers:
        _check(answer.status, (f.Status.SUCCESS,))
    return 0


def _status(status: f.Status) -> dict[str, Any]:
    return {"status": int(status), "status_name": status.name}


def _check(status: f.Status, ok: tuple[f.Status, ...]) -> None:
    if status not in ok:
        raise ApplianceError(
            f"the KME answered {status.name} ({int(status)})", code=f"SAE-004-{status.name}"
        )


def _show_open(args: argparse.Namespace, opened: f.OpenConnectAnswer) -> None:
    q = opened.qos
    qos = {name: getattr(q, name) for name in f.Qos.__dataclass_fields__}
    if args.json:
        print_json({**_status(opened.status), "ksid": opened.ksid.hex(), "qos": qos})
        return
    console().print(f"stream {opened.ksid.hex()}: {opened.status.name}")
    console().print("granted QoS: " + ", ".join(f"{k}={v}" for k, v in qos.items()))


def _show_keys(args: argparse.Namespace, answers: list[f.GetKeyAnswer]) -> None:
    try:
        if args.json:
            docs = [
                {
                    **_status(a.status),
                    "index": a.index,
                    "key": base64.b64encode(a.key).decode(),
                    "metadata": a.metadata.decode("utf-8", "replace"),
                }
                for a in answers
            ]
            print_json(docs)
            return
        from rich.table import Table

        table = Table(title=f"chunks for {args.sae}")
        for col in ("index", "status", "bits", "fingerprint (SHA-256, first 8 bytes)", "metadata"):
            table.add_column(col)
        for a in answers:
            fingerprint = hashlib.sha256(a.key).hexdigest()[:16] if a.key else ""
            table.add_row(
                str(a.index),
                a.status.name,
                str(len(a.key) * 8),
                fingerprint,
                a.metadata.decode("utf-8", "replace"),
            )
        console().print(table)
    finally:
        for a in answers:
            a.key[:] = bytes(len(a.key))
