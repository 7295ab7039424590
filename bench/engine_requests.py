"""The KMS role engines' own cost per request, without network, event loop or clock.

Drives the five engines of ``tests/kms/engine_bench.py`` (UKMS - AKMS/CKMS - CKMS -
AKMS/CKMS - UKMS) through N relayed enc_keys of one key, each followed by its dec_keys,
and prints the process CPU time per request (the bench harness's own bookkeeping is
included), and with ``--calls`` the Python function calls per request (cProfile). A
load-independent figure for the engines, their events and the messages' codec, to
compare two trees: run this file with ``PYTHONPATH=TREE`` to measure another tree.

    python bench/engine_requests.py --requests 2000 --repeat 5
    python bench/engine_requests.py --requests 500 --calls
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(
    str(Path(__file__).resolve().parent.parent)
)  # after PYTHONPATH: it may name another tree
from tests.kms.engine_bench import Bench, mini_topology


def one_round(bench: Bench) -> None:
    req = bench.enc("sae-a", "sae-b")
    ids = [key_id for key_id, _ in bench.keys("sae-a", req)]
    bench.dec("sae-b", "sae-a", ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per timed run")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs (median printed)")
    parser.add_argument("--calls", action="store_true", help="cProfile call counts instead")
    parser.add_argument("--top", type=int, default=25, help="functions listed with --calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        topology = mini_topology(Path(tmp))
        if args.calls:
            bench = Bench(topology)
            for _ in range(50):
                one_round(bench)
            bench.log.clear()
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.requests):
                one_round(bench)
            profile.disable()
            counts: dict[str, int] = {}  # by code object: pstats would merge same-named ones
            generated = 0
            for entry in profile.getstats():
                code = entry.code
                if isinstance(code, str):
                    name = code
                else:
                    name = f"{Path(code.co_filename).name}:{code.co_firstlineno} {code.co_name}"
                    if code.co_filename == "<string>":
                        generated += entry.callcount
                counts[name] = counts.get(name, 0) + entry.callcount
            n = args.requests
            print(f"function calls per request: {sum(counts.values()) / n:.1f}")
            print(f"  of which generated (dataclass) methods: {generated / n:.1f}")
            for name, count in sorted(counts.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"{count / n:8.2f}  {name}")
            return
        runs = []
        for _ in range(args.repeat):
            bench = Bench(topology)
            for _ in range(50):
                one_round(bench)
            started = time.process_time()
            for _ in range(args.requests):
                one_round(bench)
            runs.append((time.process_time() - started) / args.requests * 1e6)
        print(
            f"CPU per request (enc_keys + dec_keys, 5 engines):"
            f" median {statistics.median(runs):.1f} µs"
            f" over {args.repeat} runs of {args.requests}: {', '.join(f'{r:.1f}' for r in runs)}"
        )


if __name__ == "__main__":
    main()
