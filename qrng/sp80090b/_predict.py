"""The prediction estimators' public entry points (SP 800-90B 6.3.7-6.3.10)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from qrng.errors import QrngUsageError
from qrng.sp80090b._bitcontext import binary_contexts
from qrng.sp80090b._context import LZ_DEPTH, general_contexts
from qrng.sp80090b._core import EstimatorResult, as_symbols
from qrng.sp80090b._window import estimate_lag, estimate_multimcw

__all__ = [
    "context_estimates",
    "estimate_lag",
    "estimate_lz78y",
    "estimate_multimcw",
    "estimate_multimmc",
]


def context_estimates(
    symbols: NDArray[np.integer], alphabet_size: int, *, mmc: bool = True, lz78y: bool = True
) -> tuple[EstimatorResult | None, EstimatorResult | None]:
    """MultiMMC and LZ78Y from one pass over the context lengths (they share the sorting)."""
    minimum = LZ_DEPTH + 3 if lz78y else 4
    data = as_symbols(symbols, alphabet_size, minimum=minimum, name="MultiMMC/LZ78Y")
    if alphabet_size == 2:
        return binary_contexts(data, mmc, lz78y)
    return general_contexts(data, alphabet_size, mmc, lz78y)


def estimate_multimmc(symbols: NDArray[np.integer], alphabet_size: int) -> EstimatorResult:
    """6.3.9: multi Markov model with counting, context lengths 1..16."""
    result, _ = context_estimates(symbols, alphabet_size, lz78y=False)
    if result is None:
        raise QrngUsageError("MultiMMC: too few samples")
    return result


def estimate_lz78y(symbols: NDArray[np.integer], alphabet_size: int) -> EstimatorResult:
    """6.3.10: LZ78-like dictionary of contexts up to 16 symbols (65,536 entries at most)."""
    _, result = context_estimates(symbols, alphabet_size, mmc=False)
    if result is None:
        raise QrngUsageError("LZ78Y: too few samples")
    return result
