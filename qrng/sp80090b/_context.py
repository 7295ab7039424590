"""MultiMMC and LZ78Y prediction estimates (SP 800-90B 6.3.9, 6.3.10), any alphabet.

Both predict the next symbol from what followed the same context (the last 1..16 symbols)
before. Grouping the positions by context, level by level, with stable sorts turns the
tool's dictionaries into running counts within each group: a guess is the follower seen most
often so far (the tool's PostfixDictionary: ties to the larger symbol). The dictionaries'
size limits are kept: MultiMMC admits 100,000 (context, follower) pairs per length, LZ78Y
65,536 contexts in all. Bitstrings take the faster route of _bitcontext.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from qrng.sp80090b._core import I32, I64, U8, Bools, EstimatorResult, prediction_result
from qrng.sp80090b._scoring import CHUNK, Tally, score

MMC_DEPTH = 16  # MultiMMC context lengths 1..16
MMC_MAX_ENTRIES = 100_000  # (context, follower) pairs per length
LZ_DEPTH = 16  # LZ78Y context lengths 1..16
LZ_MAX_DICT = 65_536  # contexts in the LZ78Y dictionary, all lengths together


# --- grouping positions by context ----------------------------------------------------------


def context_levels(data: U8, binary: bool, top: int) -> Iterator[tuple[int, I32, I32]]:
    """For m = 1..top: positions q in [m, len] sorted by their context data[q-m:q].

    Yields (m, order, group): positions with equal contexts are adjacent and increasing;
    group numbers them. Built least-significant-symbol first: each level stably re-sorts
    the previous one by the symbol one further back.
    """
    order = np.arange(data.size + 1, dtype=np.int32)
    group = np.zeros(data.size + 1, dtype=np.int32)
    for m in range(1, top + 1):
        keep = order >= m
        order, group = order[keep], group[keep]
        if order.size == 0:
            return
        key = data[order - m]
        if binary:
            ones = key.astype(np.bool_)
            perm = np.concatenate((np.flatnonzero(~ones), np.flatnonzero(ones)))
        else:
            perm = np.argsort(key, kind="stable")
        order, group, key = order[perm], group[perm], key[perm]
        fresh = np.empty(order.size, dtype=np.bool_)
        fresh[0] = True
        fresh[1:] = (key[1:] != key[:-1]) | (group[1:] != group[:-1])
        group = (np.cumsum(fresh, dtype=np.int32) - 1).astype(np.int32)
        yield m, order, group


class Groups:
    """One level's grouping restricted to positions >= lo, with ranks and first members."""

    def __init__(self, order: I32, group: I32, lo: int) -> None:
        if order.size and order.min() < lo:
            keep = order >= lo
            order, group = order[keep], group[keep]
        self.order, self.group = order, group
        fresh = np.empty(order.size, dtype=np.bool_)
        fresh[:1] = True
        fresh[1:] = group[1:] != group[:-1]
        self.fresh = fresh
        idx = np.arange(order.size, dtype=np.int32)
        head = np.maximum.accumulate(np.where(fresh, idx, 0))
        self.rank = idx - head  # earlier members of the same group
        self.first = order[head]  # position of the group's first member

    def by_position(self, values: I32, out: I32) -> I32:
        """Per-member values written into ``out`` by position (others left as they were)."""
        out[self.order] = values
        return out

    def previous_best(self, key: I64, scale: int) -> I64:
        """Largest key among the earlier members of each member's group (0 if none)."""
        tagged = self.group.astype(np.int64) * scale + key
        np.maximum.accumulate(tagged, out=tagged)
        best = np.zeros(key.size, dtype=np.int64)
        best[1:] = tagged[:-1] - self.group[1:].astype(np.int64) * scale
        best[self.fresh] = 0
        return best


# --- 6.3.9 MultiMMC -------------------------------------------------------------------------


class MultiMmc:
    """Per context length d+1 = 1..16, the counting Markov model's guesses for every round.

    A guess is the most frequent follower of the context so far (ties to the larger
    symbol, as the tool's PostfixDictionary keeps them), counting only the first 100,000
    distinct (context, follower) pairs of each length. A longer model only guesses if all
    shorter ones had seen their context.
    """

    def __init__(self, data: U8, k: int) -> None:
        self.data, self.k = data, k
        rounds = data.size - 2  # rounds i = 2..len-1
        self.hits = np.zeros((MMC_DEPTH, rounds), dtype=np.bool_)
        self.has = np.zeros((MMC_DEPTH, rounds), dtype=np.bool_)
        self.chain = np.ones(data.size + 1, dtype=np.bool_)
        self.spare = np.empty(data.size + 1, dtype=np.int32)
        self.best = np.zeros(data.size + 1, dtype=np.int64)

    def level(self, m: int, cur: Groups, nxt: Groups) -> None:
        data, size = self.data, self.data.size
        q = cur.order
        follow = np.minimum(q + 1, size)
        # earlier occurrences of each (context, follower) pair: the next level's rank
        seen = nxt.by_position(nxt.rank, self.spare)[follow].astype(np.int64)
        live = q < size  # position len has no follower
        new_pairs = nxt.first[nxt.fresh]  # first occurrences (as position q + 1)
        new_pairs = new_pairs[new_pairs <= size]
        if new_pairs.size > MMC_MAX_ENTRIES:
            cap = np.partition(new_pairs, MMC_MAX_ENTRIES - 1)[MMC_MAX_ENTRIES - 1]
            live &= nxt.by_position(nxt.first, self.spare)[follow] <= cap
        symbol = data[np.minimum(q, size - 1)].astype(np.int64)
        key = np.where(live, ((seen + 1) << 8) | symbol, 0)
        best = self.best  # positions below m are not members and stay 0
        best[q] = cur.previous_best(key, (size + 2) << 8)
        self.chain &= best > 0
        d = m - 1
        self.has[d] = self.chain[2:size]
        self.has[d, : max(0, m - 1)] = False  # rounds i < m + 1 have no context yet
        self.hits[d] = self.has[d] & ((best[2:size] & 0xFF) == data[2:])

    def result(self) -> EstimatorResult:
        def chunks() -> Iterator[tuple[Bools, Bools | None]]:
            for a in range(0, self.hits.shape[1], CHUNK):
                b = a + CHUNK
                yield self.hits[:, a:b], self.has[:, a:b]

        tally = score(chunks(), MMC_DEPTH)
        rounds = self.data.size - 2
        return prediction_result("MultiMMC", self.k, tally.correct, rounds, tally.longest)


# --- 6.3.10 LZ78Y ---------------------------------------------------------------------------


def _lz78y_cutoff(data: U8, binary: bool) -> int | None:
    """Creation key of the last context the LZ78Y dictionary admits (None: never full).

    The tool adds contexts at their first occurrence (from position 16), longest first
    within a round, until 65,536 exist. That order is key = position * 32 + (16 - length);
    it is found on growing prefixes of the data, as the dictionary usually fills early.
    """
    size = data.size
    span = 1 << 14
    while True:
        end = min(size, span)
        keys = []
        for m, order, group in context_levels(data[:end], binary, LZ_DEPTH):
            gr = Groups(order, group, LZ_DEPTH)
            first = gr.first[gr.fresh]
            first = first[first < end]
            keys.append(first.astype(np.int64) * 32 + (LZ_DEPTH - m))
        every = np.concatenate(keys)
        if every.size >= LZ_MAX_DICT:
            return int(np.partition(every, LZ_MAX_DICT - 1)[LZ_MAX_DICT - 1])
        if end == size:
            return None
        span *= 4


class _Lz78y:
    """Per context length 1..16, the LZ78Y dictionary's guess and its count for every round;
    the round's guess is the one with the highest count, ties to the longer context."""

    def __init__(self, data: U8, k: int) -> None:
        self.data, self.k = data, k
        self.cutoff = _lz78y_cutoff(data, k == 2)
        size = data.size
        self.best = np.full(size + 1, -1, dtype=np.int64)  # see level()
        self.spare = np.empty(size + 1, dtype=np.int32)

    def level(self, m: int, cur: Groups, nxt: Groups) -> None:
        data, size = self.data, self.data.size
        q = cur.order
        seen = nxt.by_position(nxt.rank, self.spare)[np.minimum(q + 1, size)].astype(np.int64)
        live = q < size
        if self.cutoff is not None:
            live &= cur.first.astype(np.int64) * 32 + (LZ_DEPTH - m) <= self.cutoff
        symbol = data[np.minimum(q, size - 1)].astype(np.int64)
        key = np.where(live, ((seen + 1) << 8) | symbol, 0)
        best = cur.previous_best(key, (size + 2) << 8)
        # rank by count, then length (longer wins ties): count << 13 | length << 8 | guess
        score = np.where(best > 0, ((best >> 8) << 13) | (m << 8) | (best & 0xFF), -1)
        np.maximum(self.best[q], score, out=score)
        self.best[q] = score

    def result(self) -> EstimatorResult:
        data, size = self.data, self.data.size
        start = LZ_DEPTH + 1
        best = self.best[start:size]
        outcome = (best >= 0) & ((best & 0xFF) == data[start:])
        tally = Tally()
        tally.feed(outcome)
        return prediction_result("LZ78Y", self.k, tally.correct, size - start, tally.longest)


def general_contexts(
    data: U8, k: int, mmc: bool, lz78y: bool
) -> tuple[EstimatorResult | None, EstimatorResult | None]:
    """MultiMMC and LZ78Y from one pass over the context lengths (they share the sorting)."""
    multi = MultiMmc(data, k) if mmc else None
    lz = _Lz78y(data, k) if lz78y else None
    levels = context_levels(data, k == 2, LZ_DEPTH + 1)
    _, order, group = next(levels)
    prev, mine = (order, group), Groups(order, group, 1)
    for m, order, group in levels:
        level = m - 1
        if multi is not None:
            nxt = Groups(order, group, m)
            multi.level(level, mine, nxt)
            mine = nxt
        if lz is not None:
            lz.level(level, Groups(*prev, LZ_DEPTH), Groups(order, group, LZ_DEPTH + 1))
        prev = (order, group)
    return (multi.result() if multi else None), (lz.result() if lz else None)
