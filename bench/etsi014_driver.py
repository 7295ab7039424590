"""Benchmark of the vendor-QKDM driver (``etsi014+https://``) against the emulated 014 QKDM.

One emulated link (both ends in this process), its emulated KME over mutual TLS on
loopback (:class:`hal.emulated.kme014.EmulatedKme`), and the driver at each end: keys/s
taken by the master end (``get_key``: ``enc_keys``) and read by ID at the slave end
(``get_key_by_id``: ``dec_keys``), medians of ``--repeats`` runs. ``--url-extra`` adds
URL parameters (e.g. ``batch=1``); ``--driver PATH`` measures another version of the
driver module (e.g. the previous one, from ``git show``) against the same emulator.

Usage: python bench/etsi014_driver.py [--keys N] [--repeats R] [--url-extra "batch=32"]
       [--driver PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import hal
from hal.emulated.kme014 import EmulatedKme
from hal.emulated.pki import make_pki
from hal.url import DeviceUrl

LINK = "emulated://bench-link?skr=1e8&seed=bench&end={end}"


def opener(driver: Path | None) -> Callable[[str], hal.Qkdm]:
    """``hal.open_qkdm``, or the ``open_qkdm`` of the driver module in ``driver`` (another
    version of ``hal/etsi014_driver.py``, run against this emulator)."""
    if driver is None:
        return hal.open_qkdm
    spec = importlib.util.spec_from_file_location("bench_driver", driver)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda url: cast(hal.Qkdm, module.open_qkdm(DeviceUrl.parse(url), None))


def rates(keys: int, repeats: int, extra: str, driver: Path | None) -> dict[str, Any]:
    open_qkdm = opener(driver)
    clock = hal.ManualClock(0)
    a = hal.open_qkdm(LINK.format(end="a"), clock=clock)
    b = hal.open_qkdm(LINK.format(end="b"), clock=clock)
    clock.advance(100)
    enc, dec = [], []
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp), ["kms-a", "kms-b"])
        kme = EmulatedKme(
            master=a, slave=b, master_sae="kms-a", slave_sae="kms-b",
            server_pem=pki.server, ca_pem=pki.ca,
        )  # fmt: skip
        with kme:

            def url(sae: str, peer: str) -> str:
                base = (
                    f"etsi014+https://127.0.0.1:{kme.port}?sae={sae}&peer_sae={peer}"
                    f"&cert={pki.clients[sae]}&ca={pki.ca}"
                )
                return base + (f"&{extra}" if extra else "")

            for _ in range(repeats):
                master, slave = (
                    open_qkdm(url("kms-a", "kms-b")),
                    open_qkdm(url("kms-b", "kms-a")),
                )
                start = time.perf_counter()
                taken = [master.get_key() for _ in range(keys)]
                enc.append(keys / (time.perf_counter() - start))
                ids = [k.key_id for k in taken]
                for key in taken:
                    key.erase()
                start = time.perf_counter()
                for key_id in ids:
                    slave.get_key_by_id(key_id).erase()
                dec.append(keys / (time.perf_counter() - start))
                master.close()
                slave.close()
    return {
        "keys_per_run": keys,
        "repeats": repeats,
        "url_extra": extra,
        "enc_keys_per_s_median": round(statistics.median(enc), 1),
        "enc_keys_per_s_runs": [round(r, 1) for r in enc],
        "dec_keys_per_s_median": round(statistics.median(dec), 1),
        "dec_keys_per_s_runs": [round(r, 1) for r in dec],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2000, help="keys per run (1..20000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs (1..9)")
    parser.add_argument("--url-extra", default="", help='extra URL parameters, e.g. "batch=1"')
    parser.add_argument("--driver", type=Path, help="another etsi014_driver.py to measure")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (1 <= args.keys <= 20_000 and 1 <= args.repeats <= 9):
        parser.error("--keys must be in 1..20000 and --repeats in 1..9")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU, Python {platform.python_version()}",
        "load_average": os.getloadavg()[0],
        "driver": str(args.driver or "hal/etsi014_driver.py"),
        **rates(args.keys, args.repeats, args.url_extra, args.driver),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
