"""Driver for an emulated quantum RNG: ``emulated-qrng://NAME?...``.

The physical model is a balanced homodyne detector measuring vacuum fluctuations: the
signal is Gaussian shot noise, band-limited (so consecutive samples correlate with
coefficient ``rho``), digitised by an N-bit ADC with a gain (the noise's standard
deviation in LSB) and an offset, and clipped at the ADC's rails. :func:`model_min_entropy`
derives the min-entropy per sample from those parameters: the probability of the most
likely ADC code given the previous sample, averaged over the previous sample, including
the rail codes, whose probability grows with the gain.

URL parameters:

========== ================================================================ ==========
parameter  meaning                                                          default
========== ================================================================ ==========
bits       ADC resolution, 1..16                                            8
gain       standard deviation of the noise, in ADC LSB                      2^bits/10.67
offset     mean of the noise, in LSB                                        2^(bits-1)
rho        correlation of consecutive samples (detector bandwidth), 0..0.99 0
rate       samples per second; 0 = unthrottled                              0
seed       makes the noise reproducible (tests, benches); absent = OS seed  none
fault      inject a fault at start: stuck, total, saturation, drift,
           correlation, burst                                               none
fault_at   sample index at which the fault starts                           0
========== ================================================================ ==========

Faults (also injectable at run time with :meth:`EmulatedQrng.inject`): ``stuck`` one ADC
bit stuck at 1; ``total`` constant output (the detector is dead); ``saturation`` the gain
jumps so most samples hit the rails; ``drift`` the offset drifts by ``per_sample``
standard deviations per sample; ``correlation`` consecutive samples become correlated
(``rho``); ``burst`` constant bursts of ``length`` samples every ``period`` samples.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hal.clock import Clock
from hal.emulated.noise import ar1, normal_cdf
from hal.entropy import EntropySource, Samples, SourceStatus, sample_dtype
from hal.errors import DeviceUrlError
from hal.url import DeviceUrl

Floats = NDArray[np.floating[Any]]
"""Noise arrays: float32 from the sampler, float64 once correlated."""

FAULT_KINDS = ("stuck", "total", "saturation", "drift", "correlation", "burst")
FAULT_DEFAULTS: dict[str, dict[str, float]] = {
    "stuck": {"bit": -1.0},  # -1: the bit below the MSB
    "total": {},
    "saturation": {"factor": 8.0},
    "drift": {"per_sample": 4e-6},  # standard deviations per sample
    "correlation": {"rho": 0.95},
    "burst": {"period": 100_000.0, "length": 64.0},
}


@dataclass(frozen=True, kw_only=True, slots=True)
class QrngParams:
    """The physical parameters of the emulated homodyne QRNG."""

    bits: int = 8
    gain: float = 24.0
    offset: float = 128.0
    rho: float = 0.0


@dataclass(kw_only=True, slots=True)
class QrngFault:
    """An injected fault: kind, first affected sample, and kind-specific parameters."""

    kind: str
    at: int
    params: dict[str, float] = field(default_factory=dict)


def model_moments(p: QrngParams) -> tuple[float, float, float]:
    """Mean, standard deviation and lag-1 autocorrelation of the ADC codes (rho = 0 or not,
    the marginal is the same); quantisation noise does not correlate, so it dilutes rho."""
    top = (1 << p.bits) - 1
    codes = np.arange(top + 1, dtype=np.float64)
    cdf = normal_cdf((codes[1:] - p.offset) / p.gain)
    pmf = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    mean = float(np.dot(pmf, codes))
    var = float(np.dot(pmf, (codes - mean) ** 2))
    return mean, math.sqrt(var), p.rho * p.gain**2 / var if var > 0 else 0.0


def model_min_entropy(p: QrngParams) -> float:
    """Min-entropy per sample of the model: -log2 E_prev[max_k P(code k | previous sample)]."""
    top = (1 << p.bits) - 1
    s = p.gain * math.sqrt(1.0 - p.rho * p.rho)
    grid = np.linspace(-8.0, 8.0, 1601) if p.rho > 0 else np.zeros(1)
    weights = np.exp(-0.5 * grid**2)
    weights /= weights.sum()
    mu = p.offset + p.gain * p.rho * grid  # conditional mean of the signal, in LSB
    # The most likely code is the one holding the mean, a neighbour, or a rail.
    centre = np.clip(np.floor(mu), 0, top)
    best = np.zeros_like(mu)
    for k in (centre - 1, centre, centre + 1, np.zeros_like(mu), np.full_like(mu, top)):
        k = np.clip(k, 0, top)
        lo = np.where(k == 0, 0.0, normal_cdf((k - mu) / s))
        hi = np.where(k == top, 1.0, normal_cdf((k + 1 - mu) / s))
        best = np.maximum(best, hi - lo)
    return float(-math.log2(float(np.dot(weights, best))))


class EmulatedQrng(EntropySource):
    """The emulated homodyne QRNG: deterministic given a seed, with injectable faults."""

    def __init__(
        self,
        name: str,
        params: QrngParams,
        *,
        seed: int | None,
        rate: float = 0.0,
        fault: QrngFault | None = None,
    ) -> None:
        self.name, self.params, self.bits_per_sample = name, params, params.bits
        self._rng = np.random.Generator(np.random.SFC64(seed))
        self._dtype = sample_dtype(params.bits)
        self._top = (1 << params.bits) - 1
        self._rate, self._start = rate, time.monotonic()
        self._count = 0
        self._z: float | None = None  # last value of the correlated noise
        self._fault = fault
        self._entropy = model_min_entropy(params)
        self._moments = model_moments(params)

    # -- EntropySource ------------------------------------------------------------------
    def read(self, n: int) -> Samples:
        if n < 0:
            raise ValueError("n must be >= 0")
        self._throttle(n)
        eps = self._rng.standard_normal(n, dtype=np.float32)
        start = self._count
        self._count += n
        fault = self._fault
        if fault is None or fault.at >= start + n:
            return self._digitise(
                self._noise(eps, self.params.rho), self.params.offset, self.params.gain
            )
        cut = max(0, fault.at - start)
        before = self._digitise(
            self._noise(eps[:cut], self.params.rho), self.params.offset, self.params.gain
        )
        after = self._faulty(eps[cut:], fault, start + cut)
        return np.concatenate([before, after]).astype(self._dtype)

    def status(self) -> SourceStatus:
        return SourceStatus(
            name=self.name,
            bits_per_sample=self.bits_per_sample,
            sample_rate=self._rate,
            model_min_entropy=self._entropy,
            expected_mean=self._moments[0],
            expected_std=self._moments[1],
            expected_rho=self._moments[2],
            samples_read=self._count,
            fault=None if self._fault is None else self._fault.kind,
        )

    # -- fault injection ----------------------------------------------------------------
    def inject(self, kind: str, at: int | None = None, **params: float) -> None:
        """Start a fault at sample ``at`` (default: the next sample read)."""
        if kind not in FAULT_KINDS:
            raise DeviceUrlError(f"unknown QRNG fault {kind!r} (known: {', '.join(FAULT_KINDS)})")
        unknown = set(params) - set(FAULT_DEFAULTS[kind])
        if unknown:
            raise DeviceUrlError(
                f"fault {kind!r}: unknown parameter(s) {', '.join(sorted(unknown))}"
            )
        merged = {**FAULT_DEFAULTS[kind], **params}
        self._fault = QrngFault(kind=kind, at=self._count if at is None else at, params=merged)

    def clear_fault(self) -> None:
        """Repair the device."""
        self._fault = None

    # -- internals ----------------------------------------------------------------------
    def _throttle(self, n: int) -> None:
        if self._rate > 0:
            due = self._start + (self._count + n) / self._rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _noise(self, eps: Floats, rho: float) -> Floats:
        if rho <= 0 or len(eps) == 0:
            return eps
        z = ar1(eps.astype(np.float64), rho, self._z)  # the recursion needs float64
        self._z = float(z[-1])
        return z

    def _digitise(self, x: Floats, offset: Floats | float, gain: float) -> Samples:
        """ADC codes floor(offset + gain x) clipped to the rails, computed in float32 in
        place (at 16 bits, float32 moves a code boundary by at most 1/256 LSB)."""
        y = np.multiply(x, np.float32(gain), dtype=np.float32)
        y += np.asarray(offset, dtype=np.float32)
        np.clip(y, 0.0, self._top + 0.5, out=y)  # then truncation is floor, and >= top -> top
        codes: Samples = y.astype(self._dtype)
        return codes

    def _faulty(self, eps: Floats, fault: QrngFault, first: int) -> Samples:
        p, f = self.params, fault.params
        index = np.arange(first, first + len(eps), dtype=np.float64) - fault.at
        if fault.kind == "total":
            return np.full(len(eps), int(p.offset), dtype=self._dtype)
        if fault.kind == "correlation":
            return self._digitise(self._noise(eps, f["rho"]), p.offset, p.gain)
        x = self._noise(eps, p.rho)
        if fault.kind == "saturation":
            return self._digitise(x, p.offset, p.gain * f["factor"])
        if fault.kind == "drift":
            return self._digitise(x, p.offset + f["per_sample"] * p.gain * index, p.gain)
        codes = self._digitise(x, p.offset, p.gain)
        if fault.kind == "stuck":
            bit = int(f["bit"]) if f["bit"] >= 0 else max(0, p.bits - 2)
            return codes | self._dtype(1 << bit)
        in_burst = (index % f["period"]) < f["length"]  # burst
        codes[in_burst] = int(p.offset)
        return codes


def _seed(raw: str | None) -> int | None:
    if raw is None:
        return None
    return int.from_bytes(
        hashlib.sha256(b"qkdn/emulated-qrng/seed\0" + raw.encode()).digest()[:8], "big"
    )


def open_entropy_source(url: DeviceUrl, clock: Clock | None = None) -> EmulatedQrng:
    """Open an emulated QRNG from its parsed URL (``clock`` is unused: the noise is timeless)."""
    if not url.name or url.path not in ("", "/"):
        raise DeviceUrlError(f"{url.raw}: expected emulated-qrng://NAME?...")
    bits = url.take_int("bits", 8, lo=1, hi=16)
    full = float(1 << bits)
    params = QrngParams(
        bits=bits,
        gain=url.take_float("gain", full / 10.67, lo=0.0, hi=1e9, lo_open=True),
        offset=url.take_float("offset", full / 2, lo=0.0, hi=full),
        rho=url.take_float("rho", 0.0, lo=0.0, hi=0.99),
    )
    rate = url.take_float("rate", 0.0, lo=0.0, hi=1e12)
    seed = url.take_optional("seed")
    kind = url.take_optional("fault")
    at = url.take_int("fault_at", 0, lo=0, hi=1 << 62)
    url.finish()
    source = EmulatedQrng(url.name, params, seed=_seed(seed), rate=rate)
    if kind is not None:
        source.inject(kind, at=at)
    return source
