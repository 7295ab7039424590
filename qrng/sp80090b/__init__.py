"""SP 800-90B (January 2018) section 6.3 non-IID min-entropy estimators.

What the noise source's raw samples are worth, in bits of min-entropy per sample, by the ten
estimators of SP 800-90B 6.3: Most Common Value, Collision, Markov, Compression, t-Tuple,
LRS, MultiMCW, Lag, MultiMMC and LZ78Y. :func:`assess_non_iid` combines them as NIST's
reference tool (usnistgov/SP800-90B_EntropyAssessment, ``ea_non_iid`` with its default
options) does, and reproduces that tool's numbers: the bitstring and literal tracks, its
symbol mapping, confidence bounds, root finding and dictionary limits.

The per-estimator functions take a 1-D integer array of symbols in [0, alphabet_size) and
return an :class:`EstimatorResult`; alphabet_size 2 means a bitstring.

Layout: _prep (input checks, width, symbol map, bitstring), _core (result type, bounds,
root finding, P_local), _basic (6.3.1-6.3.4), _tuples (6.3.5-6.3.6 on a suffix array),
_window (6.3.7-6.3.8), _context and _bitcontext (6.3.9-6.3.10), _scoring (the predictors'
winner bookkeeping), _assess (the tool's combination of both tracks).
"""

from __future__ import annotations

from qrng.sp80090b._assess import ESTIMATORS, NonIidReport, assess_non_iid
from qrng.sp80090b._basic import (
    estimate_collision,
    estimate_compression,
    estimate_markov,
    estimate_mcv,
)
from qrng.sp80090b._core import ZALPHA, EstimatorResult
from qrng.sp80090b._predict import (
    estimate_lag,
    estimate_lz78y,
    estimate_multimcw,
    estimate_multimmc,
)
from qrng.sp80090b._tuples import estimate_lrs, estimate_t_tuple

__all__ = [
    "ESTIMATORS",
    "ZALPHA",
    "EstimatorResult",
    "NonIidReport",
    "assess_non_iid",
    "estimate_collision",
    "estimate_compression",
    "estimate_lag",
    "estimate_lrs",
    "estimate_lz78y",
    "estimate_markov",
    "estimate_mcv",
    "estimate_multimcw",
    "estimate_multimmc",
    "estimate_t_tuple",
]
