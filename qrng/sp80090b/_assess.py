"""The tool's ea_non_iid initial entropy assessment: which estimators run on which track."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest

import numpy as np

from qrng.errors import QrngUsageError
from qrng.sp80090b._basic import (
    estimate_collision,
    estimate_compression,
    estimate_markov,
    estimate_mcv,
)
from qrng.sp80090b._core import BITSTRING, LITERAL, U8, EstimatorResult
from qrng.sp80090b._predict import context_estimates, estimate_lag, estimate_multimcw
from qrng.sp80090b._prep import prepare
from qrng.sp80090b._tuples import tuple_estimates

ESTIMATORS = (
    "MCV",
    "Collision",
    "Markov",
    "Compression",
    "t-Tuple",
    "LRS",
    "MultiMCW",
    "Lag",
    "MultiMMC",
    "LZ78Y",
)

_MCW_MIN = 4096  # the tool skips MultiMCW below 4096 symbols, LZ78Y below 18
_LZ78Y_MIN = 18


@dataclass(frozen=True, kw_only=True)
class NonIidReport:
    """Outcome of the SP 800-90B non-IID assessment of one data set (all values in bits).

    ``h_original`` is the minimum over the literal-track estimators (per sample) and
    ``h_bitstring`` the minimum over the bitstring-track ones (per bit). ``min_entropy`` is
    the assessed value per sample: min(H_original, bits_per_sample x H_bitstring).

    Samples that take only two values are a bitstring already: for 1-bit samples the tool
    runs every estimator once on them (it labels that pass "Literal"), reported here as the
    bitstring track with ``h_original`` None. Two values on wider samples are assessed the
    same way but count as the literal track, as in the tool (``h_bitstring`` then keeps its
    starting value 1.0 and takes no part in ``min_entropy``).
    """

    bits_per_sample: int
    samples: int
    results: list[EstimatorResult]
    h_original: float | None
    h_bitstring: float
    min_entropy: float

    def to_json(self) -> dict[str, object]:
        """Each estimator's min-entropy by track, the two track minima and the final value."""
        tracks: dict[str, dict[str, float]] = {BITSTRING: {}, LITERAL: {}}
        for result in self.results:
            tracks[result.track][result.name] = result.min_entropy
        return {
            "bits_per_sample": self.bits_per_sample,
            "samples": self.samples,
            "estimators": {track: values for track, values in tracks.items() if values},
            "h_original": self.h_original,
            "h_bitstring": self.h_bitstring,
            "min_entropy": self.min_entropy,
        }


Timer = Callable[[str, str, float], None]
Step = Callable[[], list[EstimatorResult | None]]


def _binary_steps(data: U8) -> list[tuple[str, Step]]:
    """All ten estimators on a bitstring (the tool's bitstring track, or binary samples)."""
    return [
        ("MultiMMC+LZ78Y", lambda: list(context_estimates(data, 2, lz78y=_lz_ok(data)))),
        ("t-Tuple+LRS", lambda: list(tuple_estimates(data, 2))),
        ("Lag", lambda: [estimate_lag(data, 2)]),
        ("Compression", lambda: [_optional(lambda: estimate_compression(data))]),
        ("MultiMCW", lambda: [estimate_multimcw(data, 2) if data.size >= _MCW_MIN else None]),
        ("Collision", lambda: [estimate_collision(data)]),
        ("MCV", lambda: [estimate_mcv(data, 2)]),
        ("Markov", lambda: [estimate_markov(data)]),
    ]


def _literal_steps(data: U8, k: int) -> list[tuple[str, Step]]:
    """The estimators that also apply to k-ary samples (6.3.1 and 6.3.5-6.3.10)."""
    return [
        ("MultiMMC+LZ78Y", lambda: list(context_estimates(data, k, lz78y=_lz_ok(data)))),
        ("MultiMCW", lambda: [estimate_multimcw(data, k) if data.size >= _MCW_MIN else None]),
        ("Lag", lambda: [estimate_lag(data, k)]),
        ("t-Tuple+LRS", lambda: list(tuple_estimates(data, k))),
        ("MCV", lambda: [estimate_mcv(data, k)]),
    ]


def _lz_ok(data: U8) -> bool:
    return data.size >= _LZ78Y_MIN


def _optional(run: Callable[[], EstimatorResult]) -> EstimatorResult | None:
    """The tool skips an estimator that lacks data (Compression: 1000 blocks or fewer)."""
    try:
        return run()
    except QrngUsageError:
        return None


def _run(
    steps: list[tuple[str, str, Step]], timer: Timer | None, workers: int
) -> list[EstimatorResult]:
    """Run the steps, costliest first, on up to ``workers`` threads (numpy releases the GIL
    in its heavy loops, so the two tracks' estimators overlap on a multi-core machine)."""

    def timed(track: str, label: str, step: Step) -> list[EstimatorResult]:
        start = time.perf_counter()
        results = step()
        if timer is not None:
            timer(track, label, time.perf_counter() - start)
        return [_on_track(r, track) for r in results if r is not None]

    if workers <= 1:
        return [r for track, label, step in steps for r in timed(track, label, step)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(timed, *s) for s in steps]
        return [r for f in futures for r in f.result()]


def _on_track(result: EstimatorResult, track: str) -> EstimatorResult:
    if result.track == track:
        return result
    return EstimatorResult(
        name=result.name, track=track, min_entropy=result.min_entropy, details=result.details
    )


def _order(result: EstimatorResult) -> tuple[int, int]:
    return ESTIMATORS.index(result.name), 0 if result.track == BITSTRING else 1


def _interleave(*lists: list[tuple[str, str, Step]]) -> list[tuple[str, str, Step]]:
    """Costliest steps first across tracks (each list is already ordered by cost)."""
    out: list[tuple[str, str, Step]] = []
    for group in zip_longest(*lists):
        out += [step for step in group if step is not None]
    return out


def assess_non_iid(
    samples: np.ndarray | bytes,
    bits_per_sample: int | None = None,
    *,
    timer: Timer | None = None,
    workers: int | None = None,
) -> NonIidReport:
    """SP 800-90B section 6.3 non-IID assessment, as NIST's ea_non_iid does it by default.

    ``samples`` holds one sample per byte (bytes, or an integer numpy array of values in
    0..255). With ``bits_per_sample`` None the width is that of the widest sample, like the
    tool. ``workers`` threads run the estimators (default: up to 2, the CPU count); results
    do not depend on it. ``timer``, if given, is called with (track, step, seconds) after
    each step.
    """
    prep = prepare(samples, bits_per_sample)
    width, k = prep.bits_per_sample, prep.alphabet_size
    threads = workers if workers is not None else min(2, os.cpu_count() or 1)
    if k == 2:
        track = BITSTRING if width == 1 else LITERAL
        steps = [(track, label, step) for label, step in _binary_steps(prep.symbols)]
        results = _run(steps, timer, threads)
        lowest = min(r.min_entropy for r in results)
        if width == 1:
            h_original, h_bitstring, final = None, min(1.0, lowest), min(1.0, lowest)
        else:
            h_original, h_bitstring = min(float(width), lowest), 1.0
            final = h_original
    else:
        bits = [(BITSTRING, label, step) for label, step in _binary_steps(prep.bits)]
        literal = [(LITERAL, label, step) for label, step in _literal_steps(prep.symbols, k)]
        results = _run(_interleave(bits, literal), timer, threads)
        on_bits = [r.min_entropy for r in results if r.track == BITSTRING]
        on_samples = [r.min_entropy for r in results if r.track == LITERAL]
        h_bitstring = min([1.0, *on_bits])
        h_original = min([float(width), *on_samples])
        final = min(float(width), width * h_bitstring, h_original)
    results.sort(key=_order)
    if not (0.0 <= final <= width and math.isfinite(final)):
        raise AssertionError(f"assessed min-entropy {final} outside [0, {width}]")
    return NonIidReport(
        bits_per_sample=width,
        samples=int(prep.symbols.size),
        results=results,
        h_original=h_original,
        h_bitstring=h_bitstring,
        min_entropy=final,
    )
