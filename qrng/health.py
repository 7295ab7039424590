"""Health tests of the noise source (SP 800-90B §4.4, AIS 31 PTG.2), vectorised, no I/O.

:class:`HealthMonitor` checks blocks of raw samples before any of them may be used:

* Repetition Count Test (90B §4.4.1), cutoff ``C = 1 + ceil(-log2(alpha) / H)``;
* Adaptive Proportion Test (90B §4.4.2) on non-overlapping windows of 1024 samples (512
  for binary sources), cutoff ``C = 1 + CRITBINOM(W, 2^-H, 1 - alpha)`` computed exactly;
* an online test tied to the stochastic model (AIS 31 PTG.2): each block's mean, standard
  deviation and lag-1 autocorrelation against the model's, with bounds from the estimators'
  standard errors at ``alpha`` (failure) and at ``alpha_warn`` (degraded);
* a total-failure test: any 256-sample stretch whose range collapses below half the
  model's standard deviation (a dead detector with a flicker of electronic noise).

Rules of this module: blocks are whole multiples of the online window, so no test window
straddles two blocks and a failing block is never released in part; the first failure
moves the monitor to ``failed`` and it stays there until :meth:`HealthMonitor.startup`
passes on fresh samples; every event is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from hal.entropy import Samples
from qrng.errors import QrngUsageError

ONLINE_WINDOW = 65536
"""Samples per online-test window; also the block granularity of the monitor."""
STARTUP_SAMPLES = ONLINE_WINDOW
"""Samples tested (and discarded) by a start-up test: 64 APT windows, one online window."""
TOTAL_FAILURE_WINDOW = 256


class HealthState(StrEnum):
    """Where the noise source stands."""

    STARTING = "starting"
    """No start-up test has passed yet: no output."""
    HEALTHY = "healthy"
    """All tests pass."""
    DEGRADED = "degraded"
    """The online test saw a warning-level deviation; output continues, the event counts."""
    FAILED = "failed"
    """A test failed: no output until a new start-up test passes."""


def rct_cutoff(h: float, alpha_exp: int) -> int:
    """SP 800-90B §4.4.1: C = 1 + ceil(-log2(alpha) / H), alpha = 2^-alpha_exp."""
    return 1 + math.ceil(alpha_exp / h)


def _binom_cdf_tail_start(n: int, p: float, quantile: float) -> int:
    """Smallest k with P(X <= k) >= quantile for X ~ Binomial(n, p) (Excel CRITBINOM)."""
    log_p, log_q = math.log(p), math.log1p(-p)
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.exp(
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * log_p
            + (n - k) * log_q
        )
        if cdf >= quantile:
            return k
    return n


def apt_window(bits: int) -> int:
    """SP 800-90B §4.4.2: W = 1024 for non-binary sources, 512 for binary ones."""
    return 512 if bits == 1 else 1024


def apt_cutoff(h: float, bits: int, alpha_exp: int) -> int:
    """SP 800-90B §4.4.2: C = 1 + CRITBINOM(W, 2^-H, 1 - alpha), at most W."""
    w = apt_window(bits)
    return min(w, 1 + _binom_cdf_tail_start(w, 2.0**-h, 1.0 - 2.0**-alpha_exp))


def z_for(alpha_exp: float) -> float:
    """Two-sided normal quantile for alpha = 2^-alpha_exp (bisection on erfc)."""
    target, lo, hi = 2.0**-alpha_exp, 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erfc(mid / math.sqrt(2)) > target else (lo, mid)
    return hi


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    """What the tests assume about the source, and how strict they are."""

    bits: int
    """Sample width."""
    claimed_entropy: float
    """Min-entropy per sample the tests guard (<= the model's)."""
    mean: float
    """Model mean of the samples."""
    std: float
    """Model standard deviation."""
    rho: float = 0.0
    """Model lag-1 autocorrelation."""
    alpha_exp: int = 40
    """False-positive rate 2^-alpha_exp per test (SP 800-90B suggests 20..40)."""
    warn_exp: int = 16
    """Online-test deviation at rate 2^-warn_exp marks the source degraded."""

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise QrngUsageError(f"sample width {self.bits} bits; expected 1..16")
        if not 0 < self.claimed_entropy <= self.bits:
            raise QrngUsageError(
                f"claimed entropy {self.claimed_entropy}; expected 0 < H <= "
                f"{self.bits} bits per sample"
            )
        if self.std <= 0 or not 1 <= self.alpha_exp <= 64:
            raise QrngUsageError("health model needs std > 0 and 1 <= alpha_exp <= 64")


@dataclass
class HealthCounters:
    """Event and volume counters, reported with the state."""

    samples_tested: int = 0
    samples_released: int = 0
    samples_discarded: int = 0
    blocks: int = 0
    startups: int = 0
    startup_failures: int = 0
    rct_failures: int = 0
    apt_failures: int = 0
    online_failures: int = 0
    online_warnings: int = 0
    total_failures: int = 0


@dataclass(frozen=True)
class Finding:
    """The first problem a test found in a block."""

    test: str
    """``rct``, ``apt``, ``online`` or ``total``."""
    index: int
    """Offset in the block of the sample at which the test tripped."""
    detail: str
    """Human-readable reason."""
    fatal: bool = True


@dataclass
class HealthMonitor:
    """Runs every health test over blocks of raw samples and keeps the state."""

    config: HealthConfig
    state: HealthState = HealthState.STARTING
    reason: str = "no start-up test yet"
    counters: HealthCounters = field(default_factory=HealthCounters)

    def __post_init__(self) -> None:
        c = self.config
        self.rct_cutoff = rct_cutoff(c.claimed_entropy, c.alpha_exp)
        self.apt_window = apt_window(c.bits)
        self.apt_cutoff = apt_cutoff(c.claimed_entropy, c.bits, c.alpha_exp)
        self.z_fail, self.z_warn = z_for(c.alpha_exp), z_for(c.warn_exp)
        self._last: int | None = None  # last sample of the previous block (RCT carry)
        self._run = 0  # length of the run that ended the previous block

    # -- public -----------------------------------------------------------------------
    def startup(self, samples: Samples) -> bool:
        """Start-up test on fresh samples (all discarded); True moves the state to healthy."""
        if len(samples) < STARTUP_SAMPLES:
            raise QrngUsageError(
                f"start-up test needs {STARTUP_SAMPLES} samples, got {len(samples)}"
            )
        self.counters.startups += 1
        self._last, self._run = None, 0
        findings = self._findings(samples[: len(samples) - len(samples) % ONLINE_WINDOW])
        self.counters.samples_discarded += len(samples)
        fatal = [f for f in findings if f.fatal]
        if fatal:
            self.counters.startup_failures += 1
            self._fail(fatal[0], during="start-up")
            return False
        self.state, self.reason = HealthState.HEALTHY, "start-up test passed"
        return True

    def check(self, block: Samples) -> Finding | None:
        """Test a block; return None if every sample may be used, else the first finding.

        A fatal finding fails the monitor and the whole block is discarded; only a warning
        (online test) lets the block through with the state ``degraded``.
        """
        if self.state in (HealthState.STARTING, HealthState.FAILED):
            raise QrngUsageError(f"health monitor is {self.state}: run a start-up test first")
        if len(block) % ONLINE_WINDOW:
            raise QrngUsageError(f"blocks must be multiples of {ONLINE_WINDOW} samples")
        findings = self._findings(block)
        fatal = [f for f in findings if f.fatal]
        if fatal:
            self.counters.samples_discarded += len(block)
            self._fail(fatal[0], during="operation")
            return fatal[0]
        self.counters.samples_released += len(block)
        if findings:
            self.counters.online_warnings += 1
            self.state, self.reason = HealthState.DEGRADED, findings[0].detail
            return findings[0]
        if self.state is HealthState.DEGRADED:
            self.state, self.reason = HealthState.HEALTHY, "online test back within bounds"
        return None

    # -- the tests --------------------------------------------------------------------
    def _findings(self, block: Samples) -> list[Finding]:
        self.counters.samples_tested += len(block)
        self.counters.blocks += 1
        found = [f for f in (self._rct(block), self._apt(block), self._total(block)) if f]
        found += self._online(block)
        return sorted(found, key=lambda f: (not f.fatal, f.index))

    def _rct(self, x: Samples) -> Finding | None:
        """Runs of identical samples, carried across blocks.

        Only positions equal to their predecessor are enumerated (rare on a healthy
        source), and a run of ``C`` samples is ``C - 1`` consecutive such positions.
        """
        same = np.flatnonzero(x[1:] == x[:-1]) + 1
        if self._last is not None and x[0] == self._last:
            same = np.concatenate([[0], same])
        carried = self._run if self._last is not None else 1
        self._last = int(x[-1])
        # Runs of consecutive positions in `same` (each extends the run of its predecessor).
        breaks = np.flatnonzero(np.diff(same) != 1) + 1
        starts = np.concatenate([[0], breaks]).astype(np.int64)
        ends = np.concatenate([breaks, [len(same)]]).astype(np.int64)
        lengths = ends - starts + 1  # samples in each run: the first one plus the repeats
        if len(same) and same[0] == 0:
            lengths[0] += carried - 1
        tail_run = int(lengths[-1]) if len(same) and same[-1] == len(x) - 1 else 1
        self._run = tail_run
        bad = np.flatnonzero(lengths >= self.rct_cutoff)
        if not len(bad):
            return None
        i = int(bad[0])
        first_repeat = int(same[starts[i]])
        already = int(lengths[i]) - (int(ends[i]) - int(starts[i]))  # samples before the repeats
        trip = first_repeat + self.rct_cutoff - 1 - already
        return Finding(
            "rct",
            max(0, trip),
            f"repetition count: {int(lengths[i])} identical samples (cutoff {self.rct_cutoff})",
        )

    def _apt(self, x: Samples) -> Finding | None:
        """Count of each window's first sample within the window."""
        windows = x.reshape(-1, self.apt_window)
        counts = np.count_nonzero(windows == windows[:, :1], axis=1)
        bad = np.flatnonzero(counts >= self.apt_cutoff)
        if not len(bad):
            return None
        w = int(bad[0])
        hits = np.flatnonzero(windows[w] == windows[w, 0])
        trip = w * self.apt_window + int(hits[self.apt_cutoff - 1])
        return Finding(
            "apt",
            trip,
            f"adaptive proportion: {int(counts[w])} of "
            f"{self.apt_window} samples equal (cutoff {self.apt_cutoff})",
        )

    def _total(self, x: Samples) -> Finding | None:
        """A stretch whose range collapsed below half the model's standard deviation: the
        noise is gone (256 Gaussian samples span about 5.6 standard deviations)."""
        stretches = x.reshape(-1, TOTAL_FAILURE_WINDOW)
        spread = stretches.max(axis=1) - stretches.min(axis=1)
        bad = np.flatnonzero(spread < self.config.std / 2)
        if not len(bad):
            return None
        i = int(bad[0])
        return Finding(
            "total",
            (i + 1) * TOTAL_FAILURE_WINDOW - 1,
            f"total failure: samples span {int(spread[i])} LSB, model standard "
            f"deviation {self.config.std:.3g}",
        )

    def _online(self, x: Samples) -> list[Finding]:
        """Each window's mean, std and lag-1 autocorrelation against the model.

        Samples are centred on the model mean in float32 before any sum, so the sums of
        squares stay small and exact enough (errors ~1e-5 of the standard errors used).
        """
        c = self.config
        m = ONLINE_WINDOW
        f = x.astype(np.float32).reshape(-1, m)
        f -= np.float32(c.mean)
        s1 = f.sum(axis=1).astype(np.float64)
        s2 = np.vecdot(f, f).astype(np.float64)
        s11 = np.vecdot(f[:, 1:], f[:, :-1]).astype(np.float64)
        dev = s1 / m
        var = np.maximum(s2 / m - dev * dev, 1e-12)
        lag = (s11 / (m - 1) - dev * dev) / var
        rho = min(max(c.rho, 0.0), 0.999)
        se = {  # standard errors of the estimators for an AR(1) process
            "mean": c.std / math.sqrt(m) * math.sqrt((1 + rho) / (1 - rho)),
            "std": c.std * math.sqrt((1 + rho * rho) / (2 * m * (1 - rho * rho))),
            "lag-1 autocorrelation": max(1 - rho * rho, 1e-3) / math.sqrt(m),
        }
        values = {
            "mean": (dev + c.mean, c.mean),
            "std": (np.sqrt(var), c.std),
            "lag-1 autocorrelation": (lag, c.rho),
        }
        found: list[Finding] = []
        for name, (got, want) in values.items():
            z = np.abs(got - want) / se[name]
            for limit, fatal in ((self.z_fail, True), (self.z_warn, False)):
                bad = np.flatnonzero(z > limit)
                if len(bad):
                    w = int(bad[0])
                    found.append(
                        Finding(
                            "online",
                            (w + 1) * m - 1,
                            f"online test: {name} {float(got[w]):.4g}, model "
                            f"{want:.4g} ({float(z[w]):.1f} standard errors)",
                            fatal,
                        )
                    )
                    break
        return found

    def _fail(self, finding: Finding, *, during: str) -> None:
        counter = {
            "rct": "rct_failures",
            "apt": "apt_failures",
            "online": "online_failures",
            "total": "total_failures",
        }[finding.test]
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        self.state, self.reason = HealthState.FAILED, f"{during}: {finding.detail}"
