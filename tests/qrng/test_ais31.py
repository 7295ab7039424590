"""AIS 31 procedures A and B and the AIS 20/31 v3.0 internal-number tests (qrng.ais31).

Good data comes from numpy's PCG64 with fixed seeds, so every verdict is reproducible.
Each statistic is also checked on hand-made input whose value is worked out in the test,
so a wrong formula fails here even when good data would still pass.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest

from qrng import ais31
from qrng.errors import QrngError, QrngUsageError

Bits = npt.NDArray[np.uint8]
A_BYTES = ais31.A_ATTEMPT_BITS // 8  # 1,035,716


def pcg_bits(n_bits: int, seed: int) -> Bits:
    return np.random.Generator(np.random.PCG64(seed)).integers(0, 2, n_bits, dtype=np.uint8)


def biased_bits(n_bits: int, p_one: float, seed: int) -> Bits:
    return (np.random.Generator(np.random.PCG64(seed)).random(n_bits) < p_one).astype(np.uint8)


def by_name(result: ais31.ProcedureResult, prefix: str) -> ais31.TestResult:
    return next(t for t in result.tests if t.name.startswith(prefix))


def block_start(index: int) -> int:
    """First bit of block ``index`` (0-based) of procedure A's first attempt."""
    return ais31.T0_BITS + index * ais31.BLOCK_BITS


@pytest.fixture(scope="module")
def good_bytes() -> bytes:
    # Enough for two attempts of procedure A, which also covers two of procedure B.
    return np.random.Generator(np.random.PCG64(20240611)).bytes(2 * A_BYTES)


@pytest.fixture(scope="module")
def good_bits(good_bytes: bytes) -> Bits:
    return ais31.bytes_to_bits(good_bytes)


# --- input handling ---------------------------------------------------------------------


def test_bytes_to_bits_reads_msb_first() -> None:
    bits = ais31.bytes_to_bits(b"\x80\x01\xa5")
    assert bits.dtype == np.uint8
    assert bits.tolist() == [1, 0, 0, 0, 0, 0, 0, 0] + [0] * 7 + [1] + [1, 0, 1, 0, 0, 1, 0, 1]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([0, 1] * 10, "numpy array"),
        (np.zeros((2, 10), dtype=np.uint8), "1-D"),
        (np.zeros(10, dtype=np.float64), "dtype"),
        (np.zeros(0, dtype=np.uint8), "no data"),
        (np.full(10, 2, dtype=np.uint8), "0 or 1"),
        (np.zeros(1000, dtype=np.uint8), "8285728 bits (1035716 bytes)"),
    ],
)
def test_procedure_a_rejects_bad_input(bad: object, message: str) -> None:
    with pytest.raises(QrngUsageError, match=re.escape(message)) as err:
        ais31.procedure_a(bad)  # type: ignore[arg-type]
    assert err.value.code == "QRNG-USAGE"


def test_short_data_names_the_required_length() -> None:
    with pytest.raises(QrngUsageError, match="883560 bytes"):
        ais31.procedure_b(np.zeros(1000, dtype=np.uint8))
    with pytest.raises(QrngUsageError, match="255000 bytes"):
        ais31.internal_tests(np.zeros(1000, dtype=np.uint8))
    with pytest.raises(QrngUsageError) as err:
        ais31.run_ais31(b"\x00" * 900_000)
    assert "procedure A needs 1035716 bytes" in err.value.message
    assert "procedure B" not in err.value.message  # 900,000 bytes suffice for B


@pytest.mark.parametrize(
    ("data", "procedures", "message"),
    [
        (b"", "AB", "no data"),
        ("text", "A", "expected bytes"),
        (b"\x00" * 10, "AX", "unknown procedure"),
        (b"\x00" * 10, "", "non-empty"),
    ],
)
def test_run_ais31_usage_errors(data: object, procedures: str, message: str) -> None:
    with pytest.raises(QrngUsageError, match=message):
        ais31.run_ais31(data, procedures=procedures)  # type: ignore[arg-type]


# --- hand-made statistics -----------------------------------------------------------------


def test_t0_counts_distinct_48_bit_words() -> None:
    words = [0, 1, 1 << 47, 1, (1 << 48) - 1]  # the 2nd and 4th are equal
    bits = np.array([(w >> (47 - k)) & 1 for w in words for k in range(48)], dtype=np.uint8)
    assert ais31.distinct_words(bits) == 4


def test_t1_monobit_counts_ones() -> None:
    assert ais31.monobit_statistic(np.array([1, 0, 1, 1], dtype=np.uint8)).tolist() == [3]


def test_t2_poker_small_block_by_hand() -> None:
    # nibbles 0000, 1111: m = 2, f[0] = f[15] = 1 -> X = 16/2 * (1 + 1) - 2 = 14
    x = ais31.poker_statistic(np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8))
    assert x.tolist() == [14.0]


def test_t2_poker_too_uniform_block_fails() -> None:
    # Nibbles 0..15 cycled over 5000 nibbles: 8 values 313 times, 8 values 312 times;
    # X = 16/5000 * (8 * 313^2 + 8 * 312^2) - 5000 = 0.0128, below the lower bound 1.03.
    nibbles = np.arange(5000) % 16
    block = ((nibbles[:, None] >> np.array([3, 2, 1, 0])) & 1).astype(np.uint8).ravel()
    x = float(ais31.poker_statistic(block)[0])
    assert x == pytest.approx(0.0128, abs=1e-9)
    assert not ais31.T2_LOW < x < ais31.T2_HIGH


def test_t3_runs_by_hand() -> None:
    # 0 | 1 | 000 | 1111 | 0: zeros runs of length 1, 3, 1; ones runs of length 1, 4
    counts = ais31.run_counts(np.array([0, 1, 0, 0, 0, 1, 1, 1, 1, 0], dtype=np.uint8))
    assert counts[0, 0].tolist() == [2, 0, 1, 0, 0, 0]
    assert counts[0, 1].tolist() == [1, 0, 0, 1, 0, 0]


def test_t3_long_runs_share_the_last_bucket_and_blocks_split_runs() -> None:
    block = np.array([1] * 9 + [0] * 6 + [1] * 5, dtype=np.uint8)
    counts = ais31.run_counts(block)
    assert counts[0, 1].tolist() == [0, 0, 0, 0, 1, 1]  # runs of 5 and 9 (>= 6)
    assert counts[0, 0].tolist() == [0, 0, 0, 0, 0, 1]  # run of 6
    # A run of zeros across two blocks counts as one run in each block.
    two = ais31.run_counts(np.zeros((2, 4), dtype=np.uint8))
    assert two[:, 0].tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0]]


def test_t3_pairs_block_has_only_runs_of_two() -> None:
    counts = ais31.run_counts(np.tile(np.array([0, 0, 1, 1], dtype=np.uint8), 5000))
    assert counts[0].tolist() == [[0, 5000, 0, 0, 0, 0], [0, 5000, 0, 0, 0, 0]]


def test_t3_interval_bounds_are_inclusive() -> None:
    low = np.array([[lo for lo, _ in ais31.T3_INTERVALS]] * 2)
    high = np.array([[hi for _, hi in ais31.T3_INTERVALS]] * 2)
    below = low.copy()
    below[1, 3] -= 1  # one count (runs of ones of length 4) just outside
    above = high.copy()
    above[0, 5] += 1
    verdict = ais31.runs_in_bounds(np.stack([low, high, below, above]))
    assert verdict.tolist() == [True, True, False, False]


def test_t4_longest_run() -> None:
    assert ais31.longest_run(np.array([0, 1, 1, 1, 0, 0], dtype=np.uint8)).tolist() == [3]
    assert ais31.longest_run(np.zeros((3, 7), dtype=np.uint8)).tolist() == [7, 7, 7]


def test_t5_alternating_and_constant_blocks() -> None:
    # 0101...: Z_tau = 5000 for odd tau, 0 for even; every |Z - 2500| is 2500, so tau0 is
    # the smallest shift, 1, and the test half gives Z = 5000.
    alternating = np.tile(np.array([0, 1], dtype=np.uint8), 10_000)
    constant = np.zeros(20_000, dtype=np.uint8)
    tau0, z = ais31.autocorrelation_statistic(np.stack([alternating, constant]))
    assert tau0.tolist() == [1, 1]
    assert z.tolist() == [5000, 0]


def test_t5_test_window_is_bits_10000_to_15000() -> None:
    # All zeros, so tau0 = 1; a single one at bit 9,999 lies just before the test window
    # (Z = 0), one at bit 15,000 is the last b_{j+tau0} inside it (Z = 1).
    blocks = np.zeros((2, 20_000), dtype=np.uint8)
    blocks[0, 9_999] = 1
    blocks[1, 15_000] = 1
    tau0, z = ais31.autocorrelation_statistic(blocks)
    assert tau0.tolist() == [1, 1]
    assert z.tolist() == [0, 1]


def test_t5_matches_direct_computation() -> None:
    block = pcg_bits(20_000, seed=5)
    direct = np.array(
        [np.count_nonzero(block[:5000] != block[t : t + 5000]) for t in range(1, 5001)]
    )
    tau_direct = int(np.argmax(np.abs(direct - 2500))) + 1
    z_direct = int(
        np.count_nonzero(block[10_000:15_000] != block[10_000 + tau_direct : 15_000 + tau_direct])
    )
    tau0, z = ais31.autocorrelation_statistic(block)
    assert (int(tau0[0]), int(z[0])) == (tau_direct, z_direct)


def test_t5_periodic_block_fails() -> None:
    # Period 100: Z_100 = 0 in both halves, so tau0 = 100 and the test value is 0.
    block = np.tile(pcg_bits(100, seed=6), 200)
    tau0, z = ais31.autocorrelation_statistic(block)
    assert (int(tau0[0]), int(z[0])) == (100, 0)


def test_conditional_counts_by_hand() -> None:
    # pairs: 01 00 11 01 10 10 -> prefix 0: 01, 00 (the 2nd 01 is over quota); prefix 1:
    # 11, 10; the quota of both is complete with the 5th pair, so 10 bits are used.
    bits = np.array([0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 0], dtype=np.uint8)
    tally = ais31.conditional_counts(bits, prefix_bits=1, quota=2)
    assert tally.complete
    assert tally.counts.tolist() == [[1, 1], [1, 1]]
    assert tally.end == 10
    offset = ais31.conditional_counts(
        np.concatenate([[1, 1, 1], bits]), prefix_bits=1, quota=2, start=3
    )
    assert (offset.counts.tolist(), offset.end) == ([[1, 1], [1, 1]], 13)


def test_conditional_counts_reports_exhaustion() -> None:
    tally = ais31.conditional_counts(np.zeros(100, dtype=np.uint8), prefix_bits=2, quota=5)
    assert not tally.complete
    assert tally.counts.sum(axis=1).tolist() == [5, 0, 0, 0]


def test_t6b_transition_statistic_by_hand() -> None:
    # P(1|0) = 0.4, P(1|1) = 0.7: |40000/100000 + 30000/100000 - 1| = 0.3
    counts = np.array([[60_000, 40_000], [30_000, 70_000]], dtype=np.int64)
    assert ais31.transition_statistic(counts) == pytest.approx(0.3)


def test_t7_homogeneity_by_hand() -> None:
    # Equal samples: (50 - 70)^2 / 120 + (50 - 30)^2 / 80 = 8.3333...
    equal = ais31.homogeneity_statistics(np.array([[50, 50], [70, 30]], dtype=np.int64))
    assert equal.tolist() == pytest.approx([400 / 120 + 400 / 80])
    # Unequal samples (40 vs 160), pooled p = (0.4, 0.6): expected 16, 24 and 64, 96.
    unequal = ais31.homogeneity_statistics(np.array([[30, 10], [50, 110]], dtype=np.int64))
    assert unequal.tolist() == pytest.approx([196 / 16 + 196 / 24 + 196 / 64 + 196 / 96])
    # Prefix pairs are x vs x + half: 00 vs 10 and 01 vs 11.
    four = np.array([[10, 10], [5, 15], [10, 10], [15, 5]], dtype=np.int64)
    assert ais31.homogeneity_statistics(four).tolist() == pytest.approx([0.0, 100 / 20 + 100 / 20])


def test_t8_coron_by_hand() -> None:
    # L = 2, Q = 4, K = 4, words 0 1 2 3 | 0 0 1 3: A_5 = 4, A_6 = 1, A_7 = 5, A_8 = 4;
    # g(i) = H_{i-1} / ln 2, so f = (H_3 + 0 + H_4 + H_3) / (4 ln 2).
    words = [0, 1, 2, 3, 0, 0, 1, 3]
    bits = np.array([(w >> s) & 1 for w in words for s in (1, 0)], dtype=np.uint8)
    h3, h4 = 1 + 1 / 2 + 1 / 3, 1 + 1 / 2 + 1 / 3 + 1 / 4
    expected = (h3 + 0 + h4 + h3) / (4 * math.log(2))
    assert ais31.coron_statistic(bits, L=2, Q=4, K=4) == pytest.approx(expected, rel=1e-12)


def test_t8_coron_unseen_word_uses_its_index() -> None:
    # Word 5 (= 1) never occurred before: A_5 = 5, g(5) = H_4 / ln 2.
    bits = np.array([0] * 8 + [0, 1], dtype=np.uint8)
    expected = (1 + 1 / 2 + 1 / 3 + 1 / 4) / math.log(2)
    assert ais31.coron_statistic(bits, L=2, Q=4, K=1) == pytest.approx(expected, rel=1e-12)


def test_t8_coron_low_entropy_bytes() -> None:
    # Bytes uniform over 240 of 256 values: about log2(240) = 7.907 bits, below 7.976.
    rng = np.random.Generator(np.random.PCG64(8))
    values = rng.integers(16, 256, ais31.T8_Q + ais31.T8_K, dtype=np.uint8)
    f = ais31.coron_statistic(np.unpackbits(values))
    assert f == pytest.approx(math.log2(240), abs=0.01)
    assert f < ais31.T8_BOUND


# --- procedure A ------------------------------------------------------------------------


def test_procedure_a_passes_good_data(good_bits: Bits) -> None:
    result = ais31.procedure_a(good_bits)
    assert result.passed, result.tests
    assert (result.attempts, result.bits_used) == (1, ais31.A_ATTEMPT_BITS)
    names = [t.name for t in result.tests]
    assert names == [
        "T0 disjointness",
        "T1 monobit",
        "T2 poker",
        "T3 runs",
        "T4 long run",
        "T5 autocorrelation",
    ]
    assert by_name(result, "T1").value == 257.0
    assert by_name(result, "T1").detail.startswith("257/257 blocks passed")


def test_procedure_a_biased_bits_fail_monobit() -> None:
    result = ais31.procedure_a(biased_bits(ais31.A_ATTEMPT_BITS, 0.53, seed=3))
    assert not result.passed
    assert result.attempts == 1
    assert not by_name(result, "T1").passed
    assert by_name(result, "T1").value < 10  # nearly every block has too many ones


def set_run(bits: Bits, start: int, length: int) -> None:
    """A run of exactly ``length`` ones at ``start``, bounded by zeros."""
    bits[start - 1] = 0
    bits[start : start + length] = 1
    bits[start + length] = 0


def test_one_long_run_fails_t4_and_the_repetition_passes(good_bits: Bits) -> None:
    bits = good_bits.copy()
    set_run(bits, block_start(10) + 5000, 34)
    result = ais31.procedure_a(bits)
    t4 = by_name(result, "T4 long run")
    assert not t4.passed
    assert "failing blocks: 10" in t4.detail
    assert [t.name for t in result.tests if not t.passed] == ["T4 long run"]
    # Exactly one basic test failed: repeated once on the next 8,285,728 bits.
    assert result.passed
    assert (result.attempts, result.bits_used) == (2, 2 * ais31.A_ATTEMPT_BITS)
    assert by_name(result, "T4 long run [repetition]").passed


def test_run_of_33_passes_t4(good_bits: Bits) -> None:
    bits = good_bits[: ais31.A_ATTEMPT_BITS].copy()
    set_run(bits, block_start(10) + 5000, 33)
    assert ais31.longest_run(bits[block_start(10) : block_start(11)]).tolist() == [33]
    result = ais31.procedure_a(bits)
    assert by_name(result, "T4").passed


def test_two_failures_fail_without_repetition(good_bits: Bits) -> None:
    bits = good_bits.copy()
    set_run(bits, block_start(10) + 5000, 40)
    set_run(bits, block_start(200) + 100, 40)
    result = ais31.procedure_a(bits)
    assert not result.passed
    assert result.attempts == 1
    assert "failing blocks: 10, 200" in by_name(result, "T4").detail


def test_repetition_without_fresh_data_fails_closed(good_bits: Bits) -> None:
    bits = good_bits[: ais31.A_ATTEMPT_BITS + 1000].copy()
    set_run(bits, block_start(10) + 5000, 40)
    result = ais31.procedure_a(bits)
    assert not result.passed
    assert result.attempts == 1
    last = result.tests[-1]
    assert last.name == "repetition" and not last.passed
    assert f"{2 * A_BYTES} bytes" in last.detail


def test_repeated_48_bit_word_fails_t0(good_bits: Bits) -> None:
    bits = good_bits.copy()
    bits[1000 * 48 : 1001 * 48] = bits[0:48]
    result = ais31.procedure_a(bits)
    t0 = by_name(result, "T0")
    assert not t0.passed
    assert t0.value == ais31.T0_WORDS - 1
    assert result.passed and result.attempts == 2  # the only failure: one repetition


def test_periodic_block_fails_t5(good_bits: Bits) -> None:
    bits = good_bits[: ais31.A_ATTEMPT_BITS].copy()
    bits[block_start(20) : block_start(21)] = np.tile(pcg_bits(100, seed=9), 200)
    result = ais31.procedure_a(bits)
    t5 = by_name(result, "T5")
    assert not t5.passed
    assert "failing blocks: 20" in t5.detail
    assert not result.passed


# --- procedure B ------------------------------------------------------------------------


def test_procedure_b_passes_good_data(good_bits: Bits) -> None:
    result = ais31.procedure_b(good_bits)
    assert result.passed, result.tests
    assert result.attempts == 1
    assert len(result.tests) == 9
    assert ais31.B_MIN_BITS <= result.bits_used <= ais31.B_ATTEMPT_BITS
    assert by_name(result, "T8").value == pytest.approx(8.0, abs=0.02)


def test_procedure_b_biased_bits_fail_t6a() -> None:
    result = ais31.procedure_b(biased_bits(2 * ais31.B_ATTEMPT_BITS, 0.53, seed=4))
    assert not result.passed
    t6a = by_name(result, "T6a")
    assert not t6a.passed
    assert t6a.value == pytest.approx(0.53, abs=0.005)


def test_procedure_b_correlated_bits_fail_t6b_and_t8() -> None:
    # A Markov chain keeping its bit with probability 0.6: unbiased (T6a passes) but each
    # bit carries H(0.4) = 0.971 bit, so 8-bit words have about 7.8 bits of entropy.
    flips = np.random.Generator(np.random.PCG64(7)).random(2 * ais31.B_ATTEMPT_BITS) < 0.4
    bits = (np.cumsum(flips) % 2).astype(np.uint8)
    result = ais31.procedure_b(bits)
    assert not result.passed
    assert by_name(result, "T6a").passed
    assert by_name(result, "T6b").value == pytest.approx(0.2, abs=0.01)
    t8 = by_name(result, "T8")
    assert not t8.passed
    assert t8.value < 7.9


def test_procedure_b_stuck_source_fails_and_reports_null_values() -> None:
    result = ais31.procedure_b(np.zeros(ais31.B_ATTEMPT_BITS, dtype=np.uint8))
    assert not result.passed
    assert result.attempts == 1
    t6b = by_name(result, "T6b")
    assert not t6b.passed and math.isnan(t6b.value)
    assert "data ran out" in t6b.detail
    text = json.dumps(result.to_json(), allow_nan=False)  # NaN becomes null
    assert '"value": null' in text


# --- the report -------------------------------------------------------------------------


def test_run_ais31_on_good_bytes(good_bytes: bytes) -> None:
    report = ais31.run_ais31(good_bytes)
    assert report.passed
    assert report.procedure_a is not None and report.procedure_a.passed
    assert report.procedure_b is not None and report.procedure_b.passed
    assert report.internal is None
    doc = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert doc["passed"] is True
    assert doc["internal"] is None
    assert doc["procedure_a"]["tests"][1]["name"] == "T1 monobit"


def test_run_ais31_only_requested_procedures(good_bytes: bytes) -> None:
    report = ais31.run_ais31(good_bytes[:A_BYTES], procedures="A")
    assert report.passed
    assert report.procedure_b is None and report.internal is None


# --- AIS 20/31 v3.0 tests on internal random numbers ----------------------------------------


class FakeEstimate:
    def __init__(self, name: str, min_entropy: float) -> None:
        self.name = name
        self.track = "fake"
        self.min_entropy = min_entropy
        self.details: dict[str, object] = {}


@pytest.fixture
def fake_predictors(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """A stand-in qrng.sp80090b whose estimates are popped from the returned list
    (1.0 once it is empty); lets the orchestration be tested before the real one lands."""
    planned: list[float] = []
    calls: list[tuple[int, int]] = []

    def estimator(name: str):  # type: ignore[no-untyped-def]
        def estimate(symbols: Bits, alphabet_size: int) -> FakeEstimate:
            assert symbols.dtype == np.uint8
            calls.append((symbols.size, alphabet_size))
            return FakeEstimate(name, planned.pop(0) if planned else 1.0)

        return estimate

    module = types.ModuleType("qrng.sp80090b")
    module.estimate_multimmc = estimator("MultiMMC")  # type: ignore[attr-defined]
    module.estimate_lz78y = estimator("LZ78Y")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qrng.sp80090b", module)
    yield planned
    assert all(call == (ais31.INTERNAL_PREDICTOR_BITS, 2) for call in calls)


def test_internal_tests_pass_with_good_estimates(
    fake_predictors: list[float], good_bits: Bits
) -> None:
    fake_predictors[:] = [0.95, 0.99]  # the threshold itself passes (>= 0.95)
    result = ais31.internal_tests(good_bits)
    assert result.passed
    assert (result.attempts, result.bits_used) == (1, ais31.INTERNAL_ATTEMPT_BITS)
    assert [t.name for t in result.tests] == [
        "T1 monobit",
        "T2 poker",
        "T3 MultiMMC prediction",
        "T4 LZ78Y prediction",
    ]
    assert by_name(result, "T3").value == 0.95


def test_internal_tests_repeat_once_after_a_failure(
    fake_predictors: list[float], good_bits: Bits
) -> None:
    fake_predictors[:] = [0.949, 1.0]
    result = ais31.internal_tests(good_bits)
    assert not by_name(result, "T3").passed
    assert result.passed and result.attempts == 2
    assert result.bits_used == 2 * ais31.INTERNAL_ATTEMPT_BITS


def test_internal_tests_fail_when_the_repetition_fails(
    fake_predictors: list[float], good_bits: Bits
) -> None:
    fake_predictors[:] = [1.0, 0.5, 0.9, 1.0]
    result = ais31.internal_tests(good_bits)
    assert not result.passed and result.attempts == 2
    assert not by_name(result, "T3 MultiMMC prediction [repetition]").passed


def test_internal_tests_biased_bits_fail_monobit(fake_predictors: list[float]) -> None:
    result = ais31.internal_tests(biased_bits(2 * ais31.INTERNAL_ATTEMPT_BITS, 0.53, seed=10))
    assert not result.passed
    assert not by_name(result, "T1 monobit").passed


def test_internal_tests_without_predictor_module(
    monkeypatch: pytest.MonkeyPatch, good_bits: Bits
) -> None:
    monkeypatch.setitem(sys.modules, "qrng.sp80090b", None)  # import now raises ImportError
    with pytest.raises(QrngError, match=r"qrng\.sp80090b"):
        ais31.internal_tests(good_bits)


def require_real_predictors() -> None:
    """Skip until qrng.sp80090b exists and provides both predictors."""
    module = pytest.importorskip("qrng.sp80090b")
    for name in ("estimate_multimmc", "estimate_lz78y"):
        if not callable(getattr(module, name, None)):
            pytest.skip(f"qrng.sp80090b.{name} has not landed yet")


def test_internal_tests_report_missing_predictors(
    monkeypatch: pytest.MonkeyPatch, good_bits: Bits
) -> None:
    monkeypatch.setitem(sys.modules, "qrng.sp80090b", types.ModuleType("qrng.sp80090b"))
    with pytest.raises(QrngError, match="estimate_multimmc, estimate_lz78y"):
        ais31.internal_tests(good_bits)


def test_internal_tests_with_real_predictors(good_bits: Bits) -> None:
    require_real_predictors()
    result = ais31.internal_tests(good_bits)
    assert result.passed, result.tests
    for label in ("T3", "T4"):
        assert by_name(result, label).value >= ais31.INTERNAL_MIN_ENTROPY


def test_run_ais31_internal_with_real_predictors(good_bytes: bytes) -> None:
    require_real_predictors()
    report = ais31.run_ais31(good_bytes, procedures="I")
    assert report.internal is not None and report.passed
