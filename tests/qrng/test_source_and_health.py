"""The emulated QRNG and the health tests: model, cutoffs, detection of every fault."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hal
from hal.emulated.noise import ar1
from hal.emulated.qrng import FAULT_KINDS, QrngParams, model_min_entropy
from qrng.errors import QrngUsageError
from qrng.health import (
    ONLINE_WINDOW,
    STARTUP_SAMPLES,
    HealthConfig,
    HealthMonitor,
    HealthState,
    apt_cutoff,
    rct_cutoff,
    z_for,
)


def source(query: str = "", seed: int = 1) -> hal.EntropySource:
    return hal.open_entropy_source(
        f"emulated-qrng://t?seed={seed}" + (f"&{query}" if query else "")
    )


def monitor_for(src: hal.EntropySource, **overrides: object) -> HealthMonitor:
    st = src.status()
    cfg = dict(
        bits=st.bits_per_sample,
        claimed_entropy=st.model_min_entropy,
        mean=st.expected_mean,
        std=st.expected_std,
        rho=st.expected_rho,
    )
    cfg.update(overrides)
    return HealthMonitor(HealthConfig(**cfg))  # type: ignore[arg-type]


def test_same_seed_same_noise_other_seed_other_noise():
    a, b, c = source(seed=7), source(seed=7), source(seed=8)
    x = a.read(10_000)
    assert np.array_equal(x, b.read(10_000)) and not np.array_equal(x, c.read(10_000))
    assert x.dtype == np.uint8 and source("bits=12").read(10).dtype == np.uint16


@pytest.mark.parametrize("query", ["", "gain=8", "rho=0.4", "bits=4&gain=1.5", "bits=12"])
def test_model_entropy_matches_the_most_common_value(query):
    """The frequency of the model's most likely code (the one holding the mean) in 2M
    samples agrees with the model's min-entropy, within 4 binomial standard errors. (The
    maximum over all codes would be biased upwards when many codes are near-equal.)"""
    src = source(query)
    x = src.read(2_000_000)
    if src.status().expected_rho == 0:
        centre = int(src.params.offset)  # type: ignore[attr-defined]
        count = int(np.count_nonzero(x == centre))
        tolerance = 4 / math.sqrt(count) / math.log(2)  # bits
        assert -math.log2(count / len(x)) == pytest.approx(
            src.status().model_min_entropy, abs=tolerance
        )
    st = src.status()
    assert x.mean() == pytest.approx(st.expected_mean, abs=4 * st.expected_std / 1000)
    assert x.std() == pytest.approx(st.expected_std, rel=0.01)
    xf = x.astype(float) - x.mean()
    lag = float(np.dot(xf[1:], xf[:-1]) / np.dot(xf, xf))
    assert lag == pytest.approx(st.expected_rho, abs=0.005)


def test_model_entropy_accounts_for_correlation_and_rails():
    base = model_min_entropy(QrngParams())
    assert model_min_entropy(QrngParams(rho=0.5)) < base
    assert model_min_entropy(QrngParams(gain=400.0)) < 2  # mostly clipped at the rails
    assert model_min_entropy(QrngParams(bits=1, gain=1.0, offset=1.0)) == pytest.approx(1.0)
    assert math.log2(24 * math.sqrt(2 * math.pi)) == pytest.approx(base, abs=0.01)


@pytest.mark.parametrize("phi", [0.9, 0.3, 0.05])
def test_ar1_with_automatic_rows_equals_the_recursion(phi):
    eps = np.random.default_rng(3).standard_normal(10_000)
    z, expected = 0.2, []
    for e in eps:
        z = phi * z + math.sqrt(1 - phi * phi) * e
        expected.append(z)
    assert np.max(np.abs(ar1(eps, phi, 0.2) - np.array(expected))) < 1e-9


def test_cutoffs_follow_sp800_90b():
    # 90B §4.4.1 example: H = 2, alpha = 2^-20 -> C = 11; §4.4.2 Table 2: H = 1 -> 589 of 1024.
    assert rct_cutoff(2.0, 20) == 11
    assert apt_cutoff(1.0, 8, 20) == 589
    assert apt_cutoff(0.5, 1, 20) == 410  # binary source, W = 512
    assert math.erfc(z_for(20) / math.sqrt(2)) == pytest.approx(2.0**-20, rel=1e-9)


@pytest.mark.parametrize("h", [1.0, 2.5, 4.0, 5.9, 7.5])
def test_apt_cutoff_is_the_binomial_quantile(h):
    """C - 1 = CRITBINOM(W, p, 1 - alpha): P(X <= C - 2) < 1 - alpha <= P(X <= C - 1)."""
    from fractions import Fraction

    w, p, alpha = 1024, 2.0**-h, Fraction(1, 2**20)
    c = apt_cutoff(h, 8, 20)
    pmf = [math.comb(w, k) * Fraction(p) ** k * (1 - Fraction(p)) ** (w - k) for k in range(c)]
    assert sum(pmf[: c - 1]) < 1 - alpha <= sum(pmf)


def test_healthy_source_stays_healthy():
    src = source(seed=11)
    mon = monitor_for(src)
    assert mon.startup(src.read(STARTUP_SAMPLES))
    for _ in range(20):
        assert mon.check(src.read(4 * ONLINE_WINDOW)) is None or mon.state is HealthState.DEGRADED
    assert mon.state in (HealthState.HEALTHY, HealthState.DEGRADED)
    assert mon.counters.samples_released == 80 * ONLINE_WINDOW


@pytest.mark.parametrize(
    "kind, tests",
    [
        ("stuck", {"online"}),
        ("total", {"rct"}),
        ("saturation", {"apt", "rct"}),
        ("drift", {"online"}),
        ("correlation", {"online"}),
        ("burst", {"rct"}),
    ],
)
@pytest.mark.parametrize("query", ["", "bits=16"])
def test_every_fault_is_detected_and_no_later_sample_is_released(kind, tests, query):
    src = source(query, seed=5)
    mon = monitor_for(src)
    assert mon.startup(src.read(STARTUP_SAMPLES))
    onset = src.status().samples_read + 5000
    src.inject(kind, at=onset)  # type: ignore[attr-defined]
    for _ in range(50):
        first = src.status().samples_read
        finding = mon.check(src.read(ONLINE_WINDOW))
        if mon.state is HealthState.FAILED:
            break
    assert mon.state is HealthState.FAILED and finding is not None
    assert finding.test in tests, mon.reason
    assert first + finding.index >= onset  # never before the fault
    # Every released sample precedes the failing block, hence the failing window.
    assert STARTUP_SAMPLES + mon.counters.samples_released <= first
    with pytest.raises(QrngUsageError, match="start-up"):
        mon.check(src.read(ONLINE_WINDOW))
    src.clear_fault()  # type: ignore[attr-defined]
    assert mon.startup(src.read(STARTUP_SAMPLES)) and mon.state is HealthState.HEALTHY


def test_fault_kinds_are_all_covered():
    assert set(FAULT_KINDS) == {"stuck", "total", "saturation", "drift", "correlation", "burst"}


def test_startup_fails_on_a_dead_source_and_counts_it():
    src = source("fault=total")
    mon = monitor_for(src)
    assert not mon.startup(src.read(STARTUP_SAMPLES))
    assert mon.state is HealthState.FAILED and "repetition count" in mon.reason
    assert mon.counters.startup_failures == 1 and mon.counters.rct_failures == 1


def test_bad_monitor_use():
    src = source()
    with pytest.raises(QrngUsageError, match="start-up test needs"):
        monitor_for(src).startup(src.read(100))
    mon = monitor_for(src)
    mon.startup(src.read(STARTUP_SAMPLES))
    with pytest.raises(QrngUsageError, match="multiples"):
        mon.check(src.read(1000))
    with pytest.raises(QrngUsageError, match="claimed entropy"):
        monitor_for(src, claimed_entropy=9.0)


@pytest.mark.parametrize(
    "url, message",
    [
        ("emulated-qrng://q?bits=0", "parameter 'bits'"),
        ("emulated-qrng://q?gain=0", "parameter 'gain'"),
        ("emulated-qrng://q?rho=1", "parameter 'rho'"),
        ("emulated-qrng://q?fault=melt", "unknown QRNG fault 'melt'"),
        ("emulated-qrng://q?speed=3", "unknown parameter"),
        ("emulated-qrng://?bits=8", "expected emulated-qrng://NAME"),
        ("quantum://q", "no entropy source driver for scheme 'quantum'"),
    ],
)
def test_bad_source_urls(url, message):
    with pytest.raises(hal.DeviceUrlError, match=message):
        hal.open_entropy_source(url)


def naive_rct_trip(x: list[int], cutoff: int) -> int | None:
    """Index at which a run first reaches ``cutoff`` identical samples (SP 800-90B §4.4.1)."""
    run = 1
    for i in range(1, len(x)):
        run = run + 1 if x[i] == x[i - 1] else 1
        if run >= cutoff:
            return i
    return None


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.integers(0, 2), min_size=2, max_size=300),
    cuts=st.lists(st.integers(1, 299), max_size=4),
    cutoff=st.integers(2, 7),
)
def test_rct_matches_a_naive_scan_across_block_boundaries(data, cuts, cutoff):
    mon = HealthMonitor(HealthConfig(bits=8, claimed_entropy=1.0, mean=1.0, std=1.0))
    mon.rct_cutoff = cutoff
    bounds = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    expected = naive_rct_trip(data, cutoff)
    for lo, hi in itertools.pairwise(bounds):
        finding = mon._rct(np.array(data[lo:hi], dtype=np.uint8))
        if finding is not None:
            assert expected is not None and lo + finding.index == expected
            return
    assert expected is None
