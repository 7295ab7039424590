"""Most Common Value, Collision, Markov and Compression estimates (SP 800-90B 6.3.1-6.3.4)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from qrng.errors import QrngUsageError
from qrng.sp80090b._core import (
    ZALPHA,
    EstimatorResult,
    as_symbols,
    bisect_decreasing,
    track_of,
    upper_bound,
)


def estimate_mcv(symbols: NDArray[np.integer], alphabet_size: int) -> EstimatorResult:
    """6.3.1: the upper bound on the most common value's probability."""
    data = as_symbols(symbols, alphabet_size, minimum=2, name="MCV")
    mode = int(np.bincount(data, minlength=alphabet_size).max())
    p_hat = mode / data.size
    p_u = upper_bound(p_hat, data.size)
    details = {"Mode count": float(mode), "p-hat": p_hat, "p_u": p_u}
    return EstimatorResult(
        name="MCV", track=track_of(alphabet_size), min_entropy=-math.log2(p_u), details=details
    )


# --- 6.3.2 Collision ------------------------------------------------------------------------

_BLOCK = 64


def _collision_walk(bits: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """Which indices the collision scan visits: from 0 it jumps 2 on a pair, else 3.

    The scan is sequential, so it is run as a finite-state machine (offset of the next
    visited index, 0..2) whose per-block transition functions are composed across blocks at
    once; a short loop over the blocks then fixes each block's entry state.
    """
    steps = bits.size - 1
    nblocks = -(-steps // _BLOCK)
    flat = np.full(nblocks * _BLOCK, 2, dtype=np.int8)
    flat[:steps] = np.where(bits[:-1] == bits[1:], 1, 2)  # t - 1 for t = 2 or 3
    jump = flat.reshape(nblocks, _BLOCK)
    # compose: state s -> (jump - 1 if s == 0 else s - 1), for the three entry states
    maps = np.tile(np.arange(3, dtype=np.int8), (nblocks, 1))
    for k in range(_BLOCK):
        maps = np.where(maps == 0, jump[:, k : k + 1], maps - 1).astype(np.int8)
    table = maps.tolist()
    entry = np.empty(nblocks, dtype=np.int8)
    state = 0
    for b in range(nblocks):
        entry[b] = state
        state = table[b][state]
    visited = np.empty((nblocks, _BLOCK), dtype=np.bool_)
    cur = entry
    for k in range(_BLOCK):
        visited[:, k] = cur == 0
        cur = np.where(cur == 0, jump[:, k], cur - 1).astype(np.int8)
    return visited.ravel()[:steps]


def estimate_collision(bits: NDArray[np.integer]) -> EstimatorResult:
    """6.3.2 on a bitstring, with the tool's closed form for p (X' = -2p^2 + 2p + 2)."""
    data = as_symbols(bits, 2, minimum=8, name="Collision")
    n = data.size
    visited = np.flatnonzero(_collision_walk(data))
    pair = data[visited] == data[visited + 1]
    # a scan that would need a third bit past the end stops without counting
    if visited.size and visited[-1] == n - 2 and not pair[-1]:
        visited, pair = visited[:-1], pair[:-1]
    v = int(visited.size)
    if v < 2:
        raise QrngUsageError("Collision: too few samples for two collisions")
    n2 = int(np.count_nonzero(pair))
    total = 2 * n2 + 3 * (v - n2)
    x_bar = total / v
    sigma = math.sqrt((4.0 * n2 + 9.0 * (v - n2) - total * x_bar) / (v - 1))
    x_prime = max(2.0, x_bar - ZALPHA * sigma / math.sqrt(v))
    details = {"v": float(v), "Sum t_i": float(total), "X-bar": x_bar, "sigma-hat": sigma}
    details["X-bar'"] = x_prime
    if x_prime < 2.5:
        p = 0.5 + math.sqrt(1.25 - 0.5 * x_prime)
        entropy = -math.log2(p)
    else:  # no root: the lower bound p = 1/2 (full entropy), as the standard directs
        p, entropy = 0.5, 1.0
    details["p"] = p
    return EstimatorResult(
        name="Collision", track="bitstring", min_entropy=entropy, details=details
    )


# --- 6.3.3 Markov ---------------------------------------------------------------------------


def estimate_markov(bits: NDArray[np.integer]) -> EstimatorResult:
    """6.3.3: the most likely 128-bit path through a first-order Markov model of the bits."""
    data = as_symbols(bits, 2, minimum=2, name="Markov")
    n = data.size
    head, tail = data[:-1], data[1:]
    c0 = int(np.count_nonzero(head == 0))
    c00 = int(np.count_nonzero((head == 0) & (tail == 0)))
    c10 = int(np.count_nonzero((head == 1) & (tail == 0)))
    c1 = n - 1 - c0
    p00 = c00 / c0 if c0 else 0.0
    p01 = 1.0 - p00 if c0 else 0.0
    p10 = c10 / c1 if c1 else 0.0
    p11 = 1.0 - p10 if c1 else 0.0
    p0 = (c0 + int(data[-1] == 0)) / n
    p1 = 1.0 - p0
    # the six candidate sequences of SP 800-90B 6.3.3 step 3: (first bit's probability,
    # [(transition probability, times)]), each counted only if every transition can occur
    paths = [
        (p0, [(p00, 127)]),
        (p0, [(p01, 64), (p10, 63)]),
        (p0, [(p01, 1), (p11, 126)]),
        (p1, [(p10, 1), (p00, 126)]),
        (p1, [(p10, 64), (p01, 63)]),
        (p1, [(p11, 127)]),
    ]
    h_min = 128.0
    for start, steps in paths:
        if all(p > 0 for p, _ in steps):
            cost = -math.log2(start) - sum(times * math.log2(p) for p, times in steps)
            h_min = min(h_min, cost)
    details = {"P_0": p0, "P_1": p1, "P_{0,0}": p00, "P_{0,1}": p01, "P_{1,0}": p10}
    details.update({"P_{1,1}": p11, "p-hat_max": 2.0**-h_min})
    entropy = min(h_min / 128.0, 1.0)
    return EstimatorResult(name="Markov", track="bitstring", min_entropy=entropy, details=details)


# --- 6.3.4 Compression ----------------------------------------------------------------------

_B = 6  # bits per block
_D = 1000  # dictionary-initialisation blocks


class _CompressionExpectation:
    """E[X] of the compression statistic under the near-uniform family with mode p (step 7).

    G(z) = 1/v * sum_{t=d+1}^{L} sum_{u=1}^{t} log2(u) F(z, t, u), regrouped by u so that
    each evaluation is one pass over u (terms vanish once (1 - z)^(u-1) underflows).
    """

    def __init__(self, num_blocks: int) -> None:
        self.nb = num_blocks
        self.v = num_blocks - _D
        u = np.arange(1, num_blocks + 1, dtype=np.float64)
        self.log2u = np.log2(u)
        # how many t in [d+1, L] have u < t, i.e. weight of the z^2 (1-z)^(u-1) term
        self.weight = num_blocks - np.maximum(u, _D)
        self.tail = u > _D  # the u = t terms, z (1-z)^(t-1)

    def g(self, z: float) -> float:
        rate = math.log1p(-z)
        last = self.nb if rate == 0 else min(self.nb, int(-745.0 / rate) + 2)
        powers = np.exp(np.arange(last, dtype=np.float64) * rate)  # (1-z)^(u-1)
        terms = self.log2u[:last] * powers
        pairs = float(np.dot(terms, self.weight[:last]))
        ends = float(terms[self.tail[:last]].sum())
        return (z * z * pairs + z * ends) / self.v

    def __call__(self, p: float) -> float:
        alph = 1 << _B
        q = (1.0 - p) / (alph - 1.0)
        return self.g(p) + (alph - 1.0) * self.g(q)


def estimate_compression(bits: NDArray[np.integer]) -> EstimatorResult:
    """6.3.4: Maurer-style compression statistic on 6-bit blocks, solved for p by bisection."""
    data = as_symbols(bits, 2, minimum=0, name="Compression")
    num_blocks = data.size // _B
    if num_blocks <= _D:
        raise QrngUsageError(f"Compression: needs more than {_D} {_B}-bit blocks, got {num_blocks}")
    weights = (1 << np.arange(_B - 1, -1, -1)).astype(np.int64)
    blocks = data[: num_blocks * _B].reshape(num_blocks, _B).astype(np.int64) @ weights
    # distance from each block to the previous occurrence of the same value
    order = np.argsort(blocks, kind="stable")
    prev = np.full(num_blocks, -1, dtype=np.int64)
    same = blocks[order[1:]] == blocks[order[:-1]]
    prev[order[1:][same]] = order[:-1][same]
    idx = np.arange(_D, num_blocks)
    dist = np.log2((idx - prev[_D:]).astype(np.float64))
    v = num_blocks - _D
    x_bar = float(dist.sum()) / v
    sigma = 0.5907 * math.sqrt(float(np.dot(dist, dist)) / (v - 1.0) - x_bar * x_bar)
    x_prime = x_bar - ZALPHA * sigma / math.sqrt(v)
    expect = _CompressionExpectation(num_blocks)
    low = 1.0 / (1 << _B)
    p = -1.0
    if expect(low) > x_prime:
        p = bisect_decreasing(expect, x_prime, low, 1.0, fail=low)
    details = {"X-bar": x_bar, "sigma-hat": sigma, "X-bar'": x_prime}
    if p > low:
        entropy = -math.log2(p) / _B
    else:  # no solution: the lower bound for p, i.e. full entropy (step 8)
        p, entropy = low, 1.0
    details["p"] = p
    return EstimatorResult(
        name="Compression", track="bitstring", min_entropy=entropy, details=details
    )
