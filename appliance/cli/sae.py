"""``qkdn sae``: a small ETSI 014 client acting as one SAE of a running network (and, with
``qkdn sae stream``, an ETSI 004 one: :mod:`appliance.cli.sae_stream`).

For people: key IDs and key fingerprints (SHA-256, 8 bytes), never the keys themselves. For
scripts: ``--json`` prints the 014 response as is, keys included (that is what it is for).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
from typing import Any

from rich.table import Table

from appliance.cli import args as types
from appliance.cli import sae_stream
from appliance.cli.net import DEFAULT_DIR, status_doc
from appliance.cli.output import console, print_json
from appliance.errors import ApplianceError, UsageError
from appliance.sae_http import HttpResponseError, Unanswered
from appliance.tkey import SaeEndpoint, call, endpoints

MAX_NUMBER = 100_000
MAX_ALSO = 8
"""Additional slave SAEs one request may name (the KME's ``max_SAE_ID_count``)."""
MAX_SIZE = 65536
"""The largest key a contract can allow (appliance.config.topology.Contract.max_key_size)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sae",
        help="get keys as an SAE of a running network (ETSI 014)",
        description="Act as one SAE of a network started with 'qkdn net up'.",
        epilog="examples:\n  qkdn sae get --sae sae-berlin-1 --slave sae-bonn-1 "
        "--number 2\n  qkdn sae get-by-id --sae sae-bonn-1 --master sae-berlin-1 "
        "KEY_ID\n  qkdn sae get --sae sae-east-1 --slave sae-west-1 --also sae-west-2   "
        "# the same keys for two slaves",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_subparsers(dest="sae_command", metavar="ACTION", parser_class=type(p))
    s.required = True
    for name, helptext in (
        ("status", "the key status towards a slave SAE"),
        ("get", "new keys for a slave SAE (enc_keys)"),
        ("get-by-id", "keys a master SAE obtained for us (dec_keys)"),
    ):
        c = s.add_parser(name, help=helptext, description=helptext)
        c.add_argument("--dir", type=types.path, default=DEFAULT_DIR, help="network directory")
        c.add_argument("--sae", required=True, help="the SAE we act as (its certificate is used)")
        c.add_argument("--json", action="store_true", help="print the 014 response as JSON")
        if name == "get-by-id":
            c.add_argument("--master", required=True, help="the master SAE that got the keys")
            c.add_argument("key_ids", nargs="+", metavar="KEY_ID")
        else:
            c.add_argument("--slave", required=True, help="the slave SAE")
        if name == "get":
            c.add_argument(
                "--number",
                type=types.integer(1, MAX_NUMBER),
                default=1,
                help=f"how many keys, 1..{MAX_NUMBER} (default: 1)",
            )
            c.add_argument(
                "--size",
                type=types.integer(8, MAX_SIZE, multiple_of=8),
                help=f"bits per key, a multiple of 8 up to {MAX_SIZE} (default: the KME's)",
            )
            c.add_argument(
                "--also",
                action="append",
                default=[],
                metavar="SAE",
                help=f"an additional slave SAE that gets the same keys (ETSI 014 Annex B; "
                f"repeat for more, up to {MAX_ALSO}); each fetches them with get-by-id",
            )
        c.set_defaults(func=cmd_sae)
    sae_stream.register(s)


def _request(sae: SaeEndpoint, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        with sae.connect() as conn:
            status, doc = call(conn, path, body)
    except (OSError, Unanswered) as exc:  # ssl.SSLError included; a hang-up before any answer
        raise ApplianceError(
            f"cannot reach the KME of {sae.sae} on port {sae.port}: {exc.__class__.__name__}",
            code="SAE-CONNECT",
        ) from None
    except HttpResponseError as exc:
        raise ApplianceError(
            f"the KME's answer is not valid HTTP: {exc}", code="SAE-PROTOCOL"
        ) from None
    except ValueError:
        raise ApplianceError(
            "the KME answered with something that is not JSON", code="SAE-PROTOCOL"
        ) from None
    if status != 200:
        raise ApplianceError(f"{status}: {doc.get('message', '')}", code=f"SAE-HTTP-{status}")
    return doc


def cmd_sae(args: argparse.Namespace) -> int:
    if not (args.dir / "nodes").is_dir():
        raise UsageError(f"no network in {args.dir} (qkdn net up first)")
    status = status_doc(args.dir)
    known = {s["id"] for s in status["saes"]}
    peer: str = getattr(args, "slave", None) or args.master
    also: list[str] = getattr(args, "also", [])
    if len(also) > MAX_ALSO:
        raise UsageError(f"--also: at most {MAX_ALSO} additional slave SAEs")
    for name in (args.sae, peer, *also):
        if name not in known:
            raise UsageError(f"unknown SAE {name!r} (known: {', '.join(sorted(known))})")
    me, _ = endpoints(status, args.sae, peer)
    if args.sae_command == "status":
        doc = _request(me, f"/api/v1/keys/{peer}/status")
    elif args.sae_command == "get" and also:  # 014 takes additional slaves in a POST only
        body: dict[str, Any] = {"number": args.number, "additional_slave_SAE_IDs": also}
        if args.size is not None:
            body["size"] = args.size
        doc = _request(me, f"/api/v1/keys/{peer}/enc_keys", body)
    elif args.sae_command == "get":
        size = "" if args.size is None else f"&size={args.size}"
        doc = _request(me, f"/api/v1/keys/{peer}/enc_keys?number={args.number}{size}")
    else:
        ids = {"key_IDs": [{"key_ID": k} for k in args.key_ids]}  # 014: GET takes one ID
        doc = _request(me, f"/api/v1/keys/{peer}/dec_keys", ids)
    if args.json:
        print_json(doc)
    elif "keys" in doc:
        table = Table(title=f"keys for {args.sae}")
        for col in ("key_ID", "bits", "fingerprint (SHA-256, first 8 bytes)"):
            table.add_column(col)
        for k in doc["keys"]:
            raw = base64.b64decode(k["key"])
            table.add_row(k["key_ID"], str(len(raw) * 8), hashlib.sha256(raw).hexdigest()[:16])
        console().print(table)
    else:
        for field, value in doc.items():
            console().print(f"{field}: {value}")
    return 0
