"""Shared pieces of the SP 800-90B estimators: result type, bounds, root finding, P_local."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from qrng.errors import QrngUsageError

# 99 % upper confidence bound factor. This is the NIST tool's ZALPHA; it prints the same as
# the 2.5758293035489 of SP 800-90B and differs from it by one unit in the last place.
ZALPHA = 2.5758293035489008

# The tool's binary searches stop at "equality" within 4 ULPs, or after ITERMAX rounds.
_ITERMAX = 1076
_MAX_ULPS = 4

BITSTRING = "bitstring"
LITERAL = "literal"

U8 = NDArray[np.uint8]
I32 = NDArray[np.int32]
I64 = NDArray[np.int64]
Bools = NDArray[np.bool_]


@dataclass(frozen=True, kw_only=True)
class EstimatorResult:
    """One estimator's outcome on one track (min-entropy per symbol of that track)."""

    name: str
    track: str
    min_entropy: float
    details: dict[str, float] = field(default_factory=dict)


def upper_bound(p: float, n: int) -> float:
    """The 99 % upper confidence bound on a proportion, capped at 1 (SP 800-90B 6.3.1)."""
    return min(1.0, p + ZALPHA * math.sqrt(p * (1.0 - p) / (n - 1.0)))


def as_symbols(symbols: object, alphabet_size: int, *, minimum: int, name: str) -> U8:
    """Validate an estimator's input: a 1-D integer array of values in [0, alphabet_size)."""
    if not isinstance(symbols, np.ndarray) or symbols.dtype.kind not in "ui":
        raise QrngUsageError(f"{name}: symbols must be a numpy integer array")
    if isinstance(alphabet_size, bool) or not isinstance(alphabet_size, int):
        raise QrngUsageError(f"{name}: alphabet_size must be an int")
    if not 2 <= alphabet_size <= 256:
        raise QrngUsageError(f"{name}: alphabet_size must be in 2..256, got {alphabet_size}")
    data = symbols.ravel()
    if data.size < max(1, minimum):
        raise QrngUsageError(f"{name}: needs at least {minimum} symbols, got {data.size}")
    if data.min() < 0 or data.max() >= alphabet_size:
        raise QrngUsageError(f"{name}: symbol values must lie in [0, {alphabet_size})")
    return data.astype(np.uint8, copy=False)


def track_of(alphabet_size: int) -> str:
    """Binary inputs are the bitstring track; wider alphabets are literal samples."""
    return BITSTRING if alphabet_size == 2 else LITERAL


def _ulp_close(a: float, b: float) -> bool:
    """The tool's relEpsilonEqual(a, b, DBL_MIN, DBL_EPSILON, 4) for finite doubles."""
    if math.isnan(a) or math.isnan(b):
        return False
    if a == b:
        return True
    if math.isinf(a) or math.isinf(b):
        return False
    small, large = sorted((abs(a), abs(b)))
    diff = abs(a - b)
    tiny = 2.2250738585072014e-308
    if small < tiny or diff < tiny or math.isinf(diff) or large * 2.220446049250313e-16 < tiny:
        return diff <= tiny
    if diff <= large * 2.220446049250313e-16:
        return True
    if (a < 0) != (b < 0):
        return False
    ia = np.float64(small).view(np.int64)
    ib = np.float64(large).view(np.int64)
    return int(ib) - int(ia) <= _MAX_ULPS


def _between(x: float, a: float, b: float) -> bool:
    """The tool's INCLOSEDINTERVAL (either bound may be the larger); False for NaN."""
    return (b <= x <= a) if a > b else (a <= x <= b)


def bisect_decreasing(
    f: Callable[[float], float], target: float, lo: float, hi: float, *, fail: float
) -> float:
    """Solve f(p) = target for a decreasing f on [lo, hi] the way the NIST tool does.

    Plain bisection to full double precision, with the tool's exits: `fail` when the target
    leaves the bracketing values (no root in the interval), the upper bound when the
    interval can no longer be split or f stops being monotone.
    """
    lb, hb = lo, hi
    lval, hval = math.inf, -math.inf
    p = (lb + hb) / 2.0
    val = f(p)
    for _ in range(_ITERMAX):
        if _ulp_close(val, target):
            break
        if target < val:
            lb, lval = p, val
        else:
            hb, hval = p, val
        if lb >= hb:
            return min(max(lb, hb), hi)
        if not (_between(lb, lo, hi) and _between(hb, lo, hi)):
            return fail
        if not _between(target, lval, hval):
            return fail
        last, p = p, (lb + hb) / 2.0
        if not (lb < p < hb) or last == p:
            return hb
        val = f(p)
        if not _between(val, lval, hval):
            return hb
    return p


def _safe_log(x: float) -> float:
    return math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)


def log_no_long_run(p: float, r: int, n: int) -> float:
    """log P(no run of r correct predictions in n trials), success probability p (6.3.7 step 10).

    x solves x = 1 + q p^r x^(r+1); iterating on y = x - 1 keeps the precision that the
    tool gets from long double arithmetic.
    """
    q = 1.0 - p
    coef = q * math.pow(p, r)
    y, ylast = 0.0, -1.0
    for _ in range(66):
        if not y - ylast > 1.0842021724855044e-19 * (1.0 + y):
            break
        ylast = y
        try:
            y = coef * math.exp((r + 1.0) * math.log1p(y))
        except OverflowError:
            y = math.inf
    if not math.isfinite(y):
        return math.nan
    return _safe_log(q - p * y) - _safe_log((1.0 - r * y) * q) - (n + 1.0) * math.log1p(y)


def p_local(max_run: int, n: int, lower: float) -> float:
    """The tool's calc_p_local: the p giving a 99 % chance of a longest run below max_run+1."""
    target = math.log(0.99)
    return bisect_decreasing(
        lambda p: log_no_long_run(p, max_run + 1, n), target, lower, 1.0, fail=1.0
    )


def prediction_result(
    name: str, alphabet_size: int, correct: int, n: int, max_run: int
) -> EstimatorResult:
    """Min-entropy from a predictor's hits: the larger of P_global' and P_local (6.3.7-6.3.10)."""
    p_global = correct / n
    # with no hit at all, the bound is the p for which n misses have probability 1 %
    p_prime = upper_bound(p_global, n) if p_global > 0 else 1.0 - math.pow(0.01, 1.0 / n)
    cur = max(1.0 / alphabet_size, p_prime)
    details = {
        "C": float(correct),
        "r": float(max_run + 1),
        "N": float(n),
        "P_global": p_global,
        "P_global'": p_prime,
    }
    # The tool skips P_local when it cannot raise the bound: the chance of no run this long
    # at p = P_global' is already below 99 %.
    if cur < 1.0 and log_no_long_run(cur, max_run + 1, n) > math.log(0.99):
        local = p_local(max_run, n, cur)
        details["P_local"] = local
        cur = max(cur, local)
    return EstimatorResult(
        name=name, track=track_of(alphabet_size), min_entropy=-math.log2(cur), details=details
    )
