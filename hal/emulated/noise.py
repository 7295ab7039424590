"""Gaussian noise helpers shared by the emulated devices (QKD links, QRNG sources)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

Floats = NDArray[np.float64]


def ar1(eps: Floats, phi: float, z_prev: float | None, row: int = 0) -> Floats:
    """Unit-variance AR(1) path ``z[k] = phi z[k-1] + c eps[k]``, ``c = sqrt(1 - phi^2)``.

    ``z_prev`` continues an earlier path; None starts in the stationary state (z[0] =
    eps[0]). Vectorised by rows: within a row the path from a zero start is
    ``c phi^i cumsum(eps[j] phi^-j)``; only the row-to-row carry is a Python loop. Rows are
    as long as ``phi^-row`` stays far from overflow (``row`` forces a length, which must
    divide ``len(eps)``; the emulated link uses 64 so its blocks stay bit-reproducible).
    """
    if phi < 1e-4:  # correlation shorter than a step: white noise
        return eps.astype(np.float64, copy=True)
    c = math.sqrt(1.0 - phi * phi)
    z = float(eps[0]) * (1.0 - c) / phi if z_prev is None else z_prev  # gives z[0] = eps[0]
    if row <= 0:
        row = max(1, min(4096, int(600.0 / -math.log(phi)), len(eps)))
    pad = -len(eps) % row
    rows = np.concatenate([eps, np.zeros(pad)]).reshape(-1, row)
    powers = phi ** np.arange(row)
    local = c * powers * np.cumsum(rows / powers, axis=1)
    carry = phi * powers
    out = np.empty_like(local)
    for r in range(rows.shape[0]):
        out[r] = local[r] + carry * z
        z = float(out[r, -1])
    path: Floats = out.ravel()[: len(eps)]
    return path


def normal_cdf(x: Floats) -> Floats:
    """Standard normal CDF, element-wise (no scipy: erf through math)."""
    erf = np.frompyfunc(math.erf, 1, 1)
    values = np.asarray(erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)), dtype=np.float64)
    cdf: Floats = 0.5 * (1.0 + values)
    return cdf
