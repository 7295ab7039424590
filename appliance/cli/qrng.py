"""``qkdn qrng``: run the PTG.3 generator, capture raw samples, assess them, self-test.

A node runs ``qkdn qrng selftest --json`` at boot from the node runtime alone: rich (the
``provisioning`` extra) is imported only by the commands that draw tables or progress bars.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

import hal
from appliance.cli import args as types
from appliance.cli.output import console, print_json
from appliance.errors import ApplianceError, UsageError
from appliance.files import MiB, read_bounded
from qrng.errors import QrngUsageError

DEFAULT_SOURCE = "emulated-qrng://bench?bits=16"
MAX_OUTPUT = 1 << 40
"""1 TiB: the most one ``run`` or ``raw`` writes (bytes, or samples)."""
MAX_INPUT = 256 * MiB
"""The largest sample file ``assess`` and ``ais31`` read (SP 800-90B asks for 1,000,000)."""
AMOUNT = types.size(1, MAX_OUTPUT)
HELP = """\
The node's random number generator, functionality class PTG.3 (BSI AIS 20/31): a
physical noise source (a QRNG opened by URL), health tests on every raw sample, vetted
conditioning, and a CTR_DRBG reseeded with fresh entropy before every request.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "qrng",
        help="PTG.3 random numbers: run, raw, assess, ais31, selftest",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q = p.add_subparsers(dest="qrng_command", metavar="ACTION", parser_class=type(p))
    q.required = True

    run = q.add_parser(
        "run",
        help="write PTG.3 output to a file",
        description="Write N bytes of PTG.3 output, with live health status.",
        epilog="example: qkdn qrng run --source 'emulated-qrng://q1?bits=16' "
        "--bytes 100M --out rand.bin",
    )
    run.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        metavar="URL",
        help="noise source URL (default: %(default)s)",
    )
    run.add_argument(
        "--bytes", required=True, type=AMOUNT, metavar="N", help="how much: 1000, 64K, 100M, 2G"
    )
    run.add_argument("--out", required=True, type=types.path, metavar="FILE")
    run.add_argument(
        "--claimed-entropy",
        type=types.number(0, 16, lo_open=True),
        metavar="H",
        help="min-entropy per sample to rely on, 0 < H <= 16 (default: the source model's)",
    )
    run.add_argument("--conditioner", default="cbcmac", choices=["cbcmac", "sha512"])
    run.add_argument("--json", action="store_true", help="print the health report as JSON")
    run.set_defaults(func=cmd_run)

    raw = q.add_parser(
        "raw",
        help="write raw noise samples for entropy assessment",
        description="Write raw samples: one byte each up to 8 bits, two bytes "
        "(little-endian) above.",
        epilog="example: qkdn qrng raw --source 'emulated-qrng://q1?bits=8' "
        "--samples 1000000 --out raw.bin",
    )
    raw.add_argument("--source", default="emulated-qrng://raw", metavar="URL")
    raw.add_argument("--samples", required=True, type=AMOUNT, metavar="N")
    raw.add_argument("--out", required=True, type=types.path, metavar="FILE")
    raw.set_defaults(func=cmd_raw)

    assess = q.add_parser(
        "assess",
        help="SP 800-90B non-IID min-entropy assessment",
        description="Run the ten SP 800-90B non-IID estimators on a file of "
        "raw samples (one per byte) and print each estimate and the final "
        "min-entropy per sample.",
    )
    assess.add_argument("file", type=types.path, metavar="FILE")
    assess.add_argument(
        "--bits-per-sample",
        type=types.integer(1, 8),
        metavar="K",
        help="1..8 (default: from the data)",
    )
    assess.add_argument("--json", action="store_true")
    assess.set_defaults(func=cmd_assess)

    ais = q.add_parser(
        "ais31",
        help="AIS 31 statistical tests (procedures A and B)",
        description="Run AIS 31 procedure A (T0-T5) and B (T6-T8) on a file of "
        "random bytes (bits taken MSB first).",
    )
    ais.add_argument("file", type=types.path, metavar="FILE")
    ais.add_argument("--json", action="store_true")
    ais.set_defaults(func=cmd_ais31)

    st = q.add_parser(
        "selftest",
        help="known-answer tests and a start-up test",
        description="Run the post-processing known-answer tests, a start-up "
        "test of the source, a short PTG.3 run, and check that an injected "
        "fault stops output.",
    )
    st.add_argument("--source", default=DEFAULT_SOURCE, metavar="URL")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_selftest)


@contextmanager
def _open_out(path: Path) -> Iterator[BinaryIO]:
    """``path`` open for writing: USAGE if it cannot be opened, IO if writing it fails."""
    try:
        fh = path.open("wb")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with fh:
            yield fh
    except OSError as exc:  # a full disk (ENOSPC), an I/O error
        raise ApplianceError(f"cannot write {path}: {exc.strerror}", code="IO") from None


def _read_input(path: Path) -> bytes:
    try:
        data = read_bounded(path, MAX_INPUT)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if not data:
        raise QrngUsageError(f"{path}: empty file")
    return data


def cmd_run(args: argparse.Namespace) -> int:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from qrng.ptg3 import Ptg3Generator

    total = args.bytes
    gen = Ptg3Generator(
        hal.open_entropy_source(args.source),
        claimed_entropy=args.claimed_entropy,
        conditioner=args.conditioner,
    )
    out = console()
    start = time.perf_counter()
    with (
        _open_out(args.out) as fh,
        Progress(
            TextColumn("PTG.3 [bold]{task.fields[state]}[/]"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=out,
            transient=True,
            disable=not out.is_terminal,
        ) as bar,
    ):
        task = bar.add_task("run", total=total, state=gen.state)
        done = 0
        while done < total:
            chunk = gen.random_bytes(min(1 << 20, total - done))
            fh.write(chunk)
            done += len(chunk)
            bar.update(task, completed=done, state=gen.state)
    elapsed = time.perf_counter() - start
    report = gen.health()
    report.update(
        bytes=total, seconds=round(elapsed, 3), mbit_per_s=round(total * 8 / elapsed / 1e6, 1)
    )
    if args.json:
        print_json(report)
    else:
        out.print(
            f"wrote {total} bytes to {args.out} in {elapsed:.2f} s "
            f"({report['mbit_per_s']} Mbit/s); health {report['state']}: {report['reason']}"
        )
    return 0


def cmd_raw(args: argparse.Namespace) -> int:
    count = args.samples
    source = hal.open_entropy_source(args.source)
    dtype = "<u1" if source.bits_per_sample <= 8 else "<u2"
    with _open_out(args.out) as fh:
        done = 0
        while done < count:
            block = source.read(min(1 << 20, count - done))
            fh.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
            done += len(block)
    status = source.status()
    console().print(
        f"wrote {count} raw {status.bits_per_sample}-bit samples to {args.out}; "
        f"model min-entropy {status.model_min_entropy:.4f} bits/sample"
    )
    return 0


def cmd_assess(args: argparse.Namespace) -> int:
    data = _read_input(args.file)
    from qrng.sp80090b import assess_non_iid

    report = assess_non_iid(np.frombuffer(data, dtype=np.uint8), args.bits_per_sample)
    if args.json:
        print_json(report.to_json())
        return 0
    from rich.table import Table

    table = Table(
        title=f"SP 800-90B non-IID assessment of {args.file} ({report.samples} "
        f"{report.bits_per_sample}-bit samples)"
    )
    for col in ("estimator", "track", "min-entropy"):
        table.add_column(col, justify="right" if col == "min-entropy" else "left")
    for r in report.results:
        table.add_row(r.name, r.track, f"{r.min_entropy:.6f}")
    out = console()
    out.print(table)
    h_orig = "-" if report.h_original is None else f"{report.h_original:.6f}"
    out.print(
        f"H_original {h_orig}; H_bitstring {report.h_bitstring:.6f}; "
        f"assessed min-entropy: [bold]{report.min_entropy:.6f}[/] bits per sample"
    )
    return 0


def cmd_ais31(args: argparse.Namespace) -> int:
    data = _read_input(args.file)
    from qrng.ais31 import run_ais31

    report = run_ais31(data)
    if args.json:
        print_json(report.to_json())
        return 0 if report.passed else 1
    from rich.table import Table

    table = Table(title=f"AIS 31 statistical tests of {args.file}")
    for col in ("procedure", "test", "value", "bounds", "result"):
        table.add_column(col)
    for proc in (report.procedure_a, report.procedure_b, report.internal):
        if proc is None:
            continue
        for t in proc.tests:
            table.add_row(
                proc.name,
                t.name,
                f"{t.value:.6g}",
                t.bounds,
                "[green]pass[/]" if t.passed else "[red]FAIL[/]",
            )
    out = console()
    out.print(table)
    out.print("AIS 31: " + ("[green]passed[/]" if report.passed else "[red]FAILED[/]"))
    return 0 if report.passed else 1


def cmd_selftest(args: argparse.Namespace) -> int:
    from qrng.errors import EntropySourceFailure
    from qrng.ptg3 import Ptg3Generator

    gen = Ptg3Generator(hal.open_entropy_source(args.source))
    results: dict[str, bool] = dict(gen.kats)
    results["start-up test of the source"] = gen.state.value in ("healthy", "degraded")
    results["PTG.3 output (1 MiB)"] = len(gen.random_bytes(1 << 20)) == 1 << 20
    inject = getattr(gen.source, "inject", None)
    if inject is not None:  # emulated sources: a dead detector must stop output
        inject("total")
        try:
            gen.random_bytes(1 << 20)
            results["injected total failure stops output"] = False
        except EntropySourceFailure:
            results["injected total failure stops output"] = True
    ok = all(results.values())
    if args.json:
        print_json({"passed": ok, "tests": results})
    else:
        from rich.table import Table

        table = Table(title="qrng self-test")
        table.add_column("test")
        table.add_column("result")
        for name, passed in results.items():
            table.add_row(name, "[green]pass[/]" if passed else "[red]FAIL[/]")
        console().print(table)
    return 0 if ok else 1
