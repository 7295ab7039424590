"""Benchmark of the inter-node message codec (appliance/kms/messages.py) against today's JSON.

One encode and one decode of the same message, per codec:

* ``json``: what the nodes do today: ``json.dumps`` of a dict whose binary fields are base64
  text, ``json.loads`` and ``base64.b64decode(validate=True)`` of each binary field;
* ``msgpack``: :func:`messages.encode` and :func:`messages.decode` (typed, every bound checked,
  the outgoing message checked too, the incoming one checked to be canonical);
* ``msgpack-raw``: msgspec's encoder and typed decoder alone, without those two checks (what
  they cost).

Messages: a :class:`RelayBatch` of 1 and of 16 items whose hop messages are 96 bytes (a GCM
hop of a 32-byte CN key), and a :class:`KsaAnswer` carrying a real 1,024-key batch of 256-bit
keys under link keys (49 KB). Reported: encoded size, and microseconds per encode + decode as
the median of interleaved runs (process CPU time), with the ratio json / msgpack.

Usage: python bench/messages.py [--runs 9] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from appliance.kms import ksa, messages
from appliance.kms.messages import KsaAnswer, Message, RelayBatch, RelayItem
from appliance.kms.relay import Direction, Hop, Mode, Segment, seal_gcm

Codec = Callable[[], object]


def relay_batch(n: int) -> RelayBatch:
    epoch = uuid.uuid4().hex
    items = [
        RelayItem(path=[5, 4, 3, 1], index=2, message=os.urandom(96), epoch=epoch) for _ in range(n)
    ]
    return RelayBatch(items=items)


def ksa_answer() -> KsaAnswer:
    keys = [(str(uuid.uuid4()), os.urandom(32)) for _ in range(1024)]
    hop = Hop(
        request_id=os.urandom(16),
        hop=0,
        direction=Direction.TO_REQUESTER,
        link="link-1-2",
        mode=Mode.GCM,
        segments=(Segment(str(uuid.uuid4()), 0, 32),),
    )
    sealed = seal_gcm(hop, ksa.encode_batch(keys), os.urandom(32))
    return KsaAnswer(sealed=sealed, epoch=uuid.uuid4().hex)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any) -> bytes:
    return base64.b64decode(text, validate=True)


def json_body(msg: Message) -> bytes:
    """Today's form of the message: its fields in a dict, binary fields in base64."""
    if isinstance(msg, RelayBatch):
        items = [
            {"path": i.path, "index": i.index, "message": b64(i.message), "epoch": i.epoch}
            for i in msg.items
        ]
        return json.dumps({"items": items}).encode()
    assert isinstance(msg, KsaAnswer)
    return json.dumps({"sealed": b64(msg.sealed), "epoch": msg.epoch}).encode()


def json_read(msg: Message, body: bytes) -> object:
    """Today's reading: parse, then decode the base64 of each binary field (the field-by-field
    type checks of today are left out: the baseline is, if anything, flattered)."""
    doc = json.loads(body)
    if isinstance(msg, RelayBatch):
        return [unb64(item["message"]) for item in doc["items"]]
    return unb64(doc["sealed"])


def as_json(msg: Message) -> Codec:
    return lambda: json_read(msg, json_body(msg))


def as_msgpack(msg: Message) -> Codec:
    kind = type(msg)
    return lambda: messages.decode(messages.encode(msg), kind)


def as_msgpack_raw(msg: Message) -> Codec:
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(type(msg))
    return lambda: decoder.decode(encoder.encode(msg))


def per_call_us(codec: Codec, seconds: float = 0.2) -> float:
    """CPU microseconds per call (process time: the machine may be shared)."""
    n, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        for _ in range(16):
            codec()
        n += 16
    return elapsed / n * 1e6


def measure(msg: Message, runs: int) -> dict[str, Any]:
    codecs = {"json": as_json(msg), "msgpack": as_msgpack(msg), "msgpack-raw": as_msgpack_raw(msg)}
    times: dict[str, list[float]] = {name: [] for name in codecs}
    for _ in range(runs):  # interleaved, so that a busy moment hits every codec alike
        for name, codec in codecs.items():
            times[name].append(per_call_us(codec))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "msgpack_bytes": len(messages.encode(msg)),
        "json_bytes": len(json_body(msg)),
        **{f"{name}_us": round(v, 2) for name, v in med.items()},
        "ratio_json_over_msgpack": round(med["json"] / med["msgpack"], 2),
        "checks_cost_us": round(med["msgpack"] - med["msgpack-raw"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--json", type=Path, help="write the results there too")
    args = parser.parse_args()
    cases = {
        "RelayBatch x1 (96-byte hop)": relay_batch(1),
        "RelayBatch x16 (96-byte hops)": relay_batch(16),
        "KsaAnswer (1,024 keys of 256 bits)": ksa_answer(),
    }
    results = {name: measure(msg, args.runs) for name, msg in cases.items()}
    print(f"python {platform.python_version()}, msgspec {msgspec.__version__}, {args.runs} runs")
    for name, r in results.items():
        print(
            f"{name:36} {r['msgpack_bytes']:>6} B (json {r['json_bytes']:>6} B)  "
            f"json {r['json_us']:>6.1f} µs  "
            f"msgpack {r['msgpack_us']:>7.1f} µs ({r['ratio_json_over_msgpack']:.1f}x)  "
            f"raw msgspec {r['msgpack-raw_us']:>7.1f} µs"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
