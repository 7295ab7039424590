"""Benchmark of the PKCS#11 keystore (issue 6): records sealed and opened per second.

Measures, in one run and on a private SoftHSM2 token made for the run:
  * the file ``NodeKey`` (AES-256-GCM-SIV, deterministic nonce): the baseline;
  * ``Pkcs11NodeKey`` (envelope: records sealed in the process under a DEK that the token's
    KEK unwraps once at open): what the node uses;
  * per-record AES-256-GCM through the token (one ``C_EncryptInit``/``C_Encrypt`` or
    ``C_DecryptInit``/``C_Decrypt`` per record, random 96-bit IV): the design rejected
    for speed, measured here to show why;
  * ``open_node_key`` (load, log in, find the KEK, unwrap the DEK): a start-up cost;
  * a ``KeyStore`` put_many + take_oldest of 1,000 keys with each node key (SQLite with
    ``synchronous=FULL`` included), keys/s.
32-byte keys; the three contenders run interleaved, one run of each per round, and rates
are medians over ``--runs`` rounds of ``--records`` records (a quarter as many through the
token); ratios are medians of the per-round ratios to the file NodeKey.
Usage: python bench/pkcs11_keystore.py [--records N] [--runs R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-pin"
KEY = bytes(range(32))


def setup_softhsm(root: Path) -> str:
    """A private SoftHSM2 (set before the module loads) and a provisioned keystore URI."""
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    pin = root / "pin"
    pin.write_text(PIN)
    pin.chmod(0o600)
    return f"pkcs11:token=bench;object=qkdn-kek?module-path={MODULE}&pin-source=file:{pin}"


Ops = dict[str, Callable[[int], None]]


def timed(fn: Callable[[int], None], n: int) -> float:
    """Items/s of one run of ``fn(n)``."""
    start = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - start)


def record_ops(key: Any, n: int) -> Ops:
    """Seal and open of ``n`` distinct 32-byte records with ``key`` (a node key)."""
    aads = [f"link-1-2\0key-{i}".encode() for i in range(n)]
    records = [key.seal(aad, KEY) for aad in aads]

    def seal(count: int) -> None:
        for aad in aads[:count]:
            key.seal(aad, KEY)

    def open_(count: int) -> None:
        for aad, record in zip(aads[:count], records, strict=False):
            key.open(aad, record)

    return {"seal": seal, "open": open_}


def token_gcm_ops(session: Any) -> Ops:
    """Per-record AES-GCM through the token with a session key (the rejected design)."""
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.mechanisms import GCMParams

    key = session.generate_key(
        KeyType.AES,
        256,
        store=False,
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )
    aad = b"link-1-2\0key-0"
    iv = os.urandom(12)
    record = key.encrypt(KEY, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad))

    def seal(count: int) -> None:
        for _ in range(count):
            params = GCMParams(os.urandom(12), aad)
            key.encrypt(KEY, mechanism=Mechanism.AES_GCM, mechanism_param=params)

    def open_(count: int) -> None:
        for _ in range(count):
            params = GCMParams(iv, aad)
            key.decrypt(record, mechanism=Mechanism.AES_GCM, mechanism_param=params)

    return {"seal": seal, "open": open_}


def compare(contenders: dict[str, tuple[Ops, int]], runs: int) -> dict[str, dict[str, float]]:
    """Interleaved runs (every contender once per round, so load swings hit all alike):
    median rate of each, and the median of the per-round ratios to the first contender."""
    rates: dict[str, dict[str, list[float]]] = {c: {"seal": [], "open": []} for c in contenders}
    for _ in range(runs):
        for name, (ops, n) in contenders.items():
            for op, fn in ops.items():
                rates[name][op].append(timed(fn, n))
    base = next(iter(contenders))
    out: dict[str, dict[str, float]] = {}
    for name, by_op in rates.items():
        out[name] = {}
        for op, values in by_op.items():
            ratios = [v / b for v, b in zip(values, rates[base][op], strict=True)]
            out[name][f"{op}_per_s"] = round(statistics.median(values))
            out[name][f"{op}_vs_file"] = round(statistics.median(ratios), 3)
    return out


def store_rates(root: Path, keys: dict[str, Any], runs: int) -> dict[str, int]:
    """Keys/s through a KeyStore per node key: put_many(1000) then take_oldest(1000), both
    counted (SQLite commits with fsync included); interleaved rounds, medians."""
    from appliance.kms.store import KeyStore

    stores = {
        n: KeyStore(root / f"{n}.db", "link-1-2", k, capacity=10_000) for n, k in keys.items()
    }
    counter = iter(range(10**9))
    rates: dict[str, list[float]] = {n: [] for n in keys}

    for _ in range(runs):
        for name, store in stores.items():

            def cycle(count: int, store: KeyStore = store) -> None:
                store.put_many("s", [(f"k{next(counter)}", KEY) for _ in range(count)])
                store.take_oldest("s", "ksa", count)

            rates[name].append(timed(cycle, 1000))
    for store in stores.values():
        store.close()
    return {n: round(statistics.median(r)) for n, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    out: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
        "records": args.records,
        "runs": args.runs,
    }
    with tempfile.TemporaryDirectory(prefix="qkdn-p11-bench-") as tmp:
        root = Path(tmp)
        url = setup_softhsm(root)
        import pkcs11

        from appliance.kms.store import NodeKey
        from hsm.keystore import open_node_key, provision

        provision(url, so_pin="bench-so-pin")
        starts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            p11_key = open_node_key(url)
            starts.append((time.perf_counter() - t) * 1e3)
        out["open_node_key_ms"] = statistics.median(starts)
        file_key = NodeKey(KEY)
        token = pkcs11.lib(MODULE).get_token(token_label="bench")
        with token.open(user_pin=PIN) as session:
            contenders = {
                "file_nodekey": (record_ops(file_key, args.records), args.records),
                "pkcs11_envelope": (record_ops(p11_key, args.records), args.records),
                "token_gcm_per_record": (token_gcm_ops(session), args.records // 4),
            }
            out.update(compare(contenders, args.runs))
        both = {"file_nodekey": file_key, "pkcs11_envelope": p11_key}
        out["store_keys_per_s"] = store_rates(root, both, args.runs)
        out["load_avg_1m_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
