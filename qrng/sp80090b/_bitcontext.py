"""MultiMMC and LZ78Y on bitstrings (SP 800-90B 6.3.9, 6.3.10), the fast route.

With two symbols the counts after a context are just the 0s and 1s seen after it, and a
context of m bits is a number. Positions are sorted by their context one bit at a time
(stable partitions), carrying the per-position results along, so every step is a sequential
pass over the 8,000,000-bit strings the bitstring track produces.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from qrng.sp80090b._context import (
    LZ_DEPTH,
    LZ_MAX_DICT,
    MMC_DEPTH,
    MMC_MAX_ENTRIES,
    Groups,
    MultiMmc,
    context_levels,
)
from qrng.sp80090b._core import I32, I64, U8, Bools, EstimatorResult, prediction_result
from qrng.sp80090b._scoring import CHUNK, Tally, score

_EARLY = 16  # bitstring positions below this have a short context; see binary_contexts
_SEEN_BIT = 30  # history-word flag: the position's (16-bit context, bit) pair is admitted


def _bit_history(data: U8) -> NDArray[np.uint32]:
    """Per position q: bit i holds data[q - i] for i = 0..16 (zero before the start)."""
    hist = data.astype(np.uint32)
    span = 1
    while span <= _EARLY:
        shifted = np.zeros_like(hist)
        shifted[span:] = hist[:-span] << np.uint32(span)
        hist |= shifted
        span *= 2
    hist &= np.uint32((1 << (_EARLY + 1)) - 1)
    return hist


def _contexts(hist: NDArray[np.uint32], length: int) -> NDArray[np.uint32]:
    """The ``length`` bits before each position, as numbers (bit 0 = the previous bit)."""
    return (hist >> np.uint32(1)) & np.uint32((1 << length) - 1)


def _first_seen(codes: NDArray[np.uint32], bins: int) -> I64:
    """Index of the first occurrence of every code value (codes.size if it never occurs)."""
    first = np.full(bins, codes.size, dtype=np.int64)
    np.minimum.at(first, codes, np.arange(codes.size, dtype=np.int64))
    return first


class _BitLevels:
    """Bitstring positions (from 16 on) sorted by their preceding m bits, then by position.

    Each level m = 1..16 is a stable partition of the previous order by the bit m places
    back, so equal contexts end up adjacent with positions increasing. The history words
    and the ``carried`` arrays are permuted alike, which keeps every step a sequential pass.
    """

    def __init__(self, hist: NDArray[np.uint32]) -> None:
        self.hist = hist
        self.carried: dict[str, NDArray[Any]] = {}
        self.level = 0
        self.idx = np.arange(hist.size, dtype=np.int32)

    def advance(self) -> None:
        self.level += 1
        ones = ((self.hist >> np.uint32(self.level)) & np.uint32(1)).astype(np.bool_)
        perm = np.concatenate((np.flatnonzero(~ones), np.flatnonzero(ones)))
        self.hist = self.hist[perm]
        self.carried = {name: a[perm] for name, a in self.carried.items()}
        # the contexts come out in increasing numeric order: group c (the members whose
        # context is the number c) is the slice bounds[c]:bounds[c + 1]
        context = _contexts(self.hist, self.level)
        values = np.arange((1 << self.level) + 1, dtype=np.uint32)
        self.bounds = np.searchsorted(context, values).astype(np.int32)
        self.sizes = np.diff(self.bounds)
        self.bit = (self.hist & np.uint32(1)).astype(np.bool_)

    def spread(self, per_group: NDArray[Any]) -> NDArray[Any]:
        """A value per context number, repeated for every member of that context's group."""
        return np.repeat(per_group, self.sizes)

    def before(self, flags: Bools) -> I32:
        """How many earlier members of each member's group have the flag."""
        total = np.empty(flags.size + 1, dtype=np.int32)
        total[0] = 0
        np.cumsum(flags, out=total[1:])
        earlier: I32 = total[:-1] - self.spread(total[self.bounds[:-1]])
        return earlier

    def rank(self) -> I32:
        """How many earlier members each member's group has."""
        earlier: I32 = self.idx - self.spread(self.bounds[:-1])
        return earlier

    def counts(self, counted: Bools | None = None) -> tuple[I32, I32]:
        """Earlier 0s and 1s after the same context (among the counted members)."""
        if counted is None:
            ones = self.before(self.bit)
            return self.rank() - ones, ones
        ones = self.before(self.bit & counted)
        return self.before(counted) - ones, ones


def _mmc_pair_cap(hist: NDArray[np.uint32]) -> tuple[NDArray[np.uint32], bool]:
    """Flag the positions whose (16-bit context, bit) pair the MultiMMC dictionary admits.

    Only the longest context can have more than 100,000 distinct pairs; the first 100,000
    to appear are kept and later ones never counted. Returns the flagged history words and
    whether the limit was reached.
    """
    codes = hist & np.uint32((1 << (_EARLY + 1)) - 1)
    first = _first_seen(codes, 1 << (_EARLY + 1))
    seen = np.sort(first[first < hist.size])
    if seen.size <= MMC_MAX_ENTRIES:
        return hist, False
    keep = first <= seen[MMC_MAX_ENTRIES - 1]
    return hist | (keep[codes].astype(np.uint32) << np.uint32(_SEEN_BIT)), True


def _lz78y_tables(hist: NDArray[np.uint32]) -> list[Bools] | None:
    """Per context length m, which m-bit contexts the LZ78Y dictionary admits (None: all).

    The tool adds contexts at their first occurrence (from position 16), longest first
    within a round, until it holds 65,536; later contexts never predict.
    """
    first16 = _first_seen(_contexts(hist, LZ_DEPTH), 1 << LZ_DEPTH)
    firsts = [first16.reshape(-1, 1 << m).min(axis=0) for m in range(1, LZ_DEPTH + 1)]
    keys = [f * 32 + (LZ_DEPTH - m) for m, f in enumerate(firsts, start=1)]
    created = np.concatenate([k[f < hist.size] for k, f in zip(keys, firsts, strict=True)])
    if created.size <= LZ_MAX_DICT:
        return None
    cutoff = np.partition(created, LZ_MAX_DICT - 1)[LZ_MAX_DICT - 1]
    return [k <= cutoff for k in keys]


def binary_contexts(
    data: U8, mmc: bool, lz78y: bool
) -> tuple[EstimatorResult | None, EstimatorResult | None]:
    """MultiMMC and LZ78Y on a bitstring in one pass over the context lengths 1..16.

    Only positions from 16 on are sorted: they all have full 16-bit contexts, LZ78Y
    counts nothing earlier, and the few MultiMMC (context, bit) pairs before 16 are added
    per context from a small table. MultiMMC's first rounds (< 16) come from the general
    path run on the first 16 bits.
    """
    size = data.size
    full = _bit_history(data)
    hist = full[_EARLY:]
    capped = False
    if mmc:
        hist, capped = _mmc_pair_cap(hist)
    tables = _lz78y_tables(hist) if lz78y else None
    levels = _BitLevels(hist)
    wide = size >= 1 << 24  # LZ78Y scores: count * 64 + length * 2 + guess
    if mmc:  # bit d: context length d+1 made a guess (low half) / a right one (high half)
        levels.carried["mmc"] = np.zeros(hist.size, dtype=np.uint32)
    if lz78y:
        levels.carried["lz"] = np.zeros(hist.size, dtype=np.int64 if wide else np.int32)
    for m in range(1, LZ_DEPTH + 1):
        levels.advance()
        zeros, ones = levels.counts()
        if mmc:
            _binary_mmc_level(levels, m, zeros, ones, full, capped)
        if lz78y:
            live = None if tables is None else levels.spread(tables[m - 1])
            _binary_lz78y_level(levels, m, zeros, ones, live)
    order = np.argsort(_contexts(hist, LZ_DEPTH).astype(np.uint16), kind="stable")
    multi = lz = None
    if mmc:
        masks = np.zeros(size, dtype=np.uint32)
        masks[:_EARLY] = _early_mmc_masks(data[:_EARLY])
        masks[_EARLY + order] = levels.carried["mmc"]
        multi = _mmc_from_masks(masks, data)
    if lz78y:
        packed = np.zeros(size, dtype=levels.carried["lz"].dtype)
        packed[_EARLY + order] = levels.carried["lz"]
        start = LZ_DEPTH + 1
        guess = (packed[start:] & 1).astype(np.bool_)
        outcome = (packed[start:] >= 64) & (guess == data[start:].astype(np.bool_))
        tally = Tally()
        tally.feed(outcome)
        lz = prediction_result("LZ78Y", 2, tally.correct, size - start, tally.longest)
    return multi, lz


def _binary_mmc_level(
    levels: _BitLevels,
    m: int,
    zeros: I32,
    ones: I32,
    full: NDArray[np.uint32],
    capped: bool,
) -> None:
    """MultiMMC at context length m on a bitstring: updates the carried guess/hit masks."""
    if m == MMC_DEPTH and capped:
        admitted = ((levels.hist >> np.uint32(_SEEN_BIT)) & np.uint32(1)).astype(np.bool_)
        zeros, ones = levels.counts(admitted)
        chain = (zeros + ones) > 0
    else:
        chain = (zeros + ones) > 0
        # pairs at positions m..15 precede every sorted member with the same context
        early = full[m:_EARLY]
        if early.size:
            zeros, ones = zeros.copy(), ones.copy()
            for word in early.tolist():
                context = (word >> 1) & ((1 << m) - 1)
                lo, hi = levels.bounds[context], levels.bounds[context + 1]
                (ones if word & 1 else zeros)[lo:hi] += 1
                chain[lo:hi] = True
    masks = levels.carried["mmc"]
    # a longer context guesses only if every shorter one had been seen (the tool's found_x)
    if m > 1:
        chain &= ((masks >> np.uint32(m - 2)) & np.uint32(1)).astype(np.bool_)
    right = chain & ((ones >= zeros) == levels.bit)  # ties go to 1
    masks |= chain.astype(np.uint32) << np.uint32(m - 1)
    masks |= right.astype(np.uint32) << np.uint32(MMC_DEPTH + m - 1)


def _binary_lz78y_level(
    levels: _BitLevels, m: int, zeros: I32, ones: I32, live: Bools | None
) -> None:
    """LZ78Y at context length m on a bitstring: folds into the carried best guess.

    Candidates rank by count, then length (longer wins ties), packed as count * 64 +
    length * 2 + guess; a count of 0 (no guess) stays below 64.
    """
    best = levels.carried["lz"]
    count = np.maximum(zeros, ones).astype(best.dtype)
    if live is not None:
        count *= live
    count <<= 6
    count |= (ones >= zeros).astype(best.dtype) | (m << 1)
    np.maximum(best, count, out=best)


def _early_mmc_masks(head: U8) -> NDArray[np.uint32]:
    """MultiMMC guess/hit masks of the first rounds, by the general path on the first bits."""
    masks = np.zeros(head.size, dtype=np.uint32)
    if head.size < 3:
        return masks
    multi = MultiMmc(head, 2)
    levels = context_levels(head, True, MMC_DEPTH + 1)
    _, order, group = next(levels)
    mine = Groups(order, group, 1)
    for m, order, group in levels:
        nxt = Groups(order, group, m)
        multi.level(m - 1, mine, nxt)
        mine = nxt
    for d in range(MMC_DEPTH):
        masks[2:] |= multi.has[d].astype(np.uint32) << np.uint32(d)
        masks[2:] |= multi.hits[d].astype(np.uint32) << np.uint32(MMC_DEPTH + d)
    return masks


def _mmc_from_masks(masks: NDArray[np.uint32], data: U8) -> EstimatorResult:
    """Replay the MultiMMC scoreboard from per-position bit masks of guesses and hits."""
    shifts = np.arange(MMC_DEPTH, dtype=np.uint32)[:, None]

    def chunks() -> Iterator[tuple[Bools, Bools | None]]:
        for a in range(2, data.size, CHUNK):
            word = masks[a : min(a + CHUNK, data.size)]
            has = ((word >> shifts) & np.uint32(1)).astype(np.bool_)
            hit = ((word >> (shifts + np.uint32(MMC_DEPTH))) & np.uint32(1)).astype(np.bool_)
            yield hit, has

    tally = score(chunks(), MMC_DEPTH)
    return prediction_result("MultiMMC", 2, tally.correct, data.size - 2, tally.longest)
