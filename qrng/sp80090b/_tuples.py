"""t-Tuple and LRS estimates (SP 800-90B 6.3.5, 6.3.6) from a suffix array.

Both estimators need, for every tuple length t, statistics over the overlapping t-tuples:
the largest count (t-Tuple) and the number of equal pairs (LRS). A suffix array with its
LCP array gives all lengths at once, as the tool does (it uses libdivsufsort and Kaufer's
stack algorithm). Here the suffix array is built by prefix doubling on numpy sorts, the LCP
array by binary lifting over the doubling ranks, and the per-length statistics from the
nearest smaller LCP values on each side (pointer jumping instead of a stack).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from qrng.errors import QrngUsageError
from qrng.sp80090b._core import (
    ZALPHA,
    EstimatorResult,
    as_symbols,
    track_of,
)

I64 = NDArray[np.int64]
U64 = NDArray[np.uint64]

_TUPLE_CUTOFF = 35  # a t-tuple must occur at least 35 times (6.3.5 step 1)


def _symbol_bits(alphabet_size: int) -> int:
    """Bits per symbol in the packed windows: 1, 2, 4 or 8 (dividing 64)."""
    for bits in (1, 2, 4, 8):
        if alphabet_size <= 1 << bits:
            return bits
    return 8


def _windows(text: NDArray[np.uint8], bits: int, extra: int) -> U64:
    """For every position, the next 64 bits of the packed text (zero past the end).

    ``extra`` more positions past the end are included (all zero bits beyond the text).
    """
    n = text.size
    if bits == 8:
        stream = text
    else:
        shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
        stream = np.packbits(((text[:, None] >> shifts) & 1).ravel())
    total = n + extra
    nbytes = (total * bits) // 8 + 2
    padded = np.zeros(nbytes + 16, dtype=np.uint8)
    padded[: stream.size] = stream
    # big-endian 64-bit word at every byte offset (an overlapping strided view)
    words = np.ndarray(shape=(nbytes + 8,), dtype=">u8", buffer=padded.data, strides=(1,)).astype(
        np.uint64
    )
    offset = np.arange(total, dtype=np.int64) * bits
    byte, shift = offset >> 3, (offset & 7).astype(np.uint64)
    nxt = padded[byte + 8].astype(np.uint64)
    out: U64 = (words[byte] << shift) | ((nxt << shift) >> np.uint64(8))
    return out


def _leading_zeros(x: U64) -> I64:
    """Count of leading zero bits of each 64-bit word (64 for zero)."""
    # x >> 11 has at most 53 bits, so it converts to a double exactly; the exponent field
    # of that double is its bit length (minus one, plus the bias).
    big = x >= np.uint64(1 << 11)
    exact = np.where(big, x >> np.uint64(11), x).astype(np.float64)
    length = (exact.view(np.int64) >> 52) - 1022  # bit length for nonzero values
    length = np.where(exact > 0, length + np.where(big, 11, 0), 0)
    return 64 - length


class _SuffixArray:
    """Suffix array of ``text`` plus the doubling ranks needed to compute its LCP array."""

    def __init__(self, text: NDArray[np.uint8], alphabet_size: int) -> None:
        self.n = n = text.size
        self.bits = bits = _symbol_bits(alphabet_size)
        self.windows = _windows(text, bits, extra=64)
        index_bits = max(1, (n - 1).bit_length())
        self.h0 = h0 = (64 - index_bits) // bits  # symbols sorted by the first pass
        # first pass: sort (first h0 symbols, position) packed into one word
        prefix = self.windows[:n] >> np.uint64(64 - h0 * bits)
        keys = np.sort((prefix << np.uint64(index_bits)) | np.arange(n, dtype=np.uint64))
        self.sa = (keys & np.uint64((1 << index_bits) - 1)).astype(np.int64)
        fresh = np.empty(n, dtype=np.bool_)
        fresh[0] = True
        fresh[1:] = (keys[1:] >> np.uint64(index_bits)) != (keys[:-1] >> np.uint64(index_bits))
        self.levels: list[tuple[int, NDArray[np.int32]]] = []
        self._double(fresh)

    def _rank_after(self, rank: I64, pos: I64) -> I64:
        """Rank of the suffix at pos; past the end, distinct values below every rank."""
        inside = pos < self.n
        return np.where(inside, rank[np.minimum(pos, self.n - 1)], self.n - pos - 1)

    def _double(self, fresh: NDArray[np.bool_]) -> None:
        """Prefix doubling (Larsson-Sadakane style): refine only the unsorted groups."""
        n, sa = self.n, self.sa
        slots = np.arange(n, dtype=np.int64)
        head = np.maximum.accumulate(np.where(fresh, slots, 0))
        rank = np.empty(n, dtype=np.int64)
        rank[sa] = head
        h = self.h0
        self.levels.append((h, rank.astype(np.int32)))
        self.first_rank = self.levels[0][1]
        size = np.diff(np.append(np.flatnonzero(fresh), n))
        active = slots[np.repeat(size > 1, size)]
        while active.size:
            elems = sa[active]
            second = self._rank_after(rank, elems + h) + h + 1
            key = rank[elems] * (n + h + 2) + second
            order = np.argsort(key, kind="stable")
            key, elems = key[order], elems[order]
            sa[active] = elems
            new = np.empty(active.size, dtype=np.bool_)
            new[0] = True
            new[1:] = key[1:] != key[:-1]
            rank[elems] = np.maximum.accumulate(np.where(new, active, 0))
            h *= 2
            self.levels.append((h, rank.astype(np.int32)))
            # keep the slots whose new group still has two members or more
            starts = np.flatnonzero(new)
            size = np.diff(np.append(starts, active.size))
            active = active[np.repeat(size > 1, size)]

    def lcp(self) -> I64:
        """lcp[j] = longest common prefix of the suffixes at sa[j-1] and sa[j], j >= 1."""
        n, sa = self.n, self.sa
        a, b = sa[:-1], sa[1:]
        common = np.zeros(n - 1, dtype=np.int64)
        # Neighbours split by the first sort differ within their first h0 symbols; only the
        # others need the doubling ranks (binary lifting, largest step first). The last
        # level has all ranks distinct, so it never matches and is skipped.
        deep = np.flatnonzero(self.first_rank[a] == self.first_rank[b])
        if deep.size:
            da, db = a[deep], b[deep]
            extra = np.zeros(deep.size, dtype=np.int64)
            for h, rank in reversed(self.levels[:-1]):
                pa, pb = da + extra, db + extra
                ok = (pa < n) & (pb < n)
                match = rank[np.minimum(pa, n - 1)] == rank[np.minimum(pb, n - 1)]
                extra += h * (ok & match)
            common[deep] = extra
        wa = self.windows[sa]
        diff = wa[:-1] ^ wa[1:]
        if deep.size:
            pa = np.minimum(a[deep] + common[deep], n)
            pb = np.minimum(b[deep] + common[deep], n)
            diff[deep] = self.windows[pa] ^ self.windows[pb]
        common += _leading_zeros(diff) // self.bits
        out: I64 = np.minimum(common, n - np.maximum(a, b))
        return out


def _nearest(values: NDArray[np.int32], *, left: bool) -> NDArray[np.int32]:
    """Nearest index to the left with a value <= (or to the right with a value <) each value.

    ``values`` has sentinels -1 at both ends. Pointer jumping: each pointer skips over the
    run its target already skipped, which keeps the number of rounds logarithmic.
    """
    size = values.size
    step = -1 if left else 1
    ptr = np.arange(size, dtype=np.int32) + np.int32(step)
    # round one compares with the direct neighbour, whose own pointer is one further
    inner, near = values[1:-1], values[:-2] if left else values[2:]
    todo = np.flatnonzero(near > inner if left else near >= inner).astype(np.int32) + 1
    ptr[todo] += np.int32(step)
    mine = values[todo]
    while todo.size:
        seen = values[ptr[todo]]
        skip = seen > mine if left else seen >= mine
        todo, mine = todo[skip], mine[skip]
        ptr[todo] = ptr[ptr[todo]]
    return ptr


class TupleStatistics:
    """Per tuple length t: the largest t-tuple count and the number of equal t-tuple pairs."""

    def __init__(self, text: NDArray[np.uint8], alphabet_size: int) -> None:
        n = text.size
        self.n = n
        sa = _SuffixArray(text, alphabet_size)
        lcp = sa.lcp()
        values = np.concatenate(([-1], lcp, [-1])).astype(np.int32)
        self.longest = longest = int(lcp.max()) if lcp.size else 0  # v, the LRS length
        lft = _nearest(values, left=True)[1:-1]
        rgt = _nearest(values, left=False)[1:-1]
        pos = np.arange(1, n, dtype=np.int64)
        # each pair of suffixes is counted at the leftmost minimum of the LCPs between them
        pairs = ((pos - lft) * (rgt - pos)).astype(np.float64)  # exact: all below 2^53
        by_length = np.bincount(lcp, weights=pairs, minlength=longest + 1)
        self.pair_counts = np.cumsum(by_length[::-1])[::-1]  # pairs with lcp >= t
        group = np.zeros(longest + 2, dtype=np.int64)
        np.maximum.at(group, lcp, rgt - lft)
        top = np.maximum.accumulate(group[::-1])[::-1]  # largest group with lcp >= t
        self.max_counts = np.maximum(top, 1)  # index t: max count of a t-tuple

    def max_count(self, t: int) -> int:
        return int(self.max_counts[t]) if t <= self.longest else 1


def _bound(p: float, n: int) -> float:
    return min(1.0, p + ZALPHA * math.sqrt(p * (1.0 - p) / (n - 1)))


def _t_tuple(stats: TupleStatistics, alphabet_size: int) -> tuple[EstimatorResult | None, int]:
    """6.3.5; also returns u, the first length whose most common tuple is seen < 35 times."""
    n = stats.n
    u = 1
    while u <= stats.longest and stats.max_count(u) >= _TUPLE_CUTOFF:
        u += 1
    if u == 1:
        return None, u
    t = np.arange(1, u, dtype=np.float64)
    counts = stats.max_counts[1:u].astype(np.float64)
    p_max = float(np.max((counts / (n - t + 1)) ** (1.0 / t)))
    p_u = _bound(p_max, n)
    details = {"t": float(u - 1), "p-hat_max": p_max, "p_u": p_u}
    result = EstimatorResult(
        name="t-Tuple", track=track_of(alphabet_size), min_entropy=-math.log2(p_u), details=details
    )
    return result, u


def _lrs(stats: TupleStatistics, alphabet_size: int, u: int) -> EstimatorResult | None:
    """6.3.6: collision probability of the tuples longer than the t-Tuple range."""
    n, v = stats.n, stats.longest
    if v < u:
        return None
    t = np.arange(u, v + 1, dtype=np.float64)
    pairs = stats.pair_counts[u : v + 1]
    total = np.floor((n - t) * (n - t + 1) / 2.0)
    p_max = float(np.max((pairs / total) ** (1.0 / t)))
    p_u = _bound(p_max, n)
    details = {"u": float(u), "v": float(v), "p-hat": p_max, "p_u": p_u}
    return EstimatorResult(
        name="LRS", track=track_of(alphabet_size), min_entropy=-math.log2(p_u), details=details
    )


def tuple_estimates(
    symbols: NDArray[np.integer], alphabet_size: int
) -> tuple[EstimatorResult | None, EstimatorResult | None]:
    """Both suffix-array estimators from one suffix array; None where the tool skips one."""
    data = as_symbols(symbols, alphabet_size, minimum=2, name="t-Tuple/LRS")
    stats = TupleStatistics(data, alphabet_size)
    t_tuple, u = _t_tuple(stats, alphabet_size)
    return t_tuple, _lrs(stats, alphabet_size, u)


def estimate_t_tuple(symbols: NDArray[np.integer], alphabet_size: int) -> EstimatorResult:
    """6.3.5 alone; raises QrngUsageError where the tool skips it (no tuple seen 35 times)."""
    result, _ = tuple_estimates(symbols, alphabet_size)
    if result is None:
        raise QrngUsageError("t-Tuple: no symbol occurs 35 times, the estimate does not apply")
    return result


def estimate_lrs(symbols: NDArray[np.integer], alphabet_size: int) -> EstimatorResult:
    """6.3.6 alone; raises QrngUsageError where the tool skips it (no repeat long enough)."""
    _, result = tuple_estimates(symbols, alphabet_size)
    if result is None:
        raise QrngUsageError("LRS: no tuple longer than the t-Tuple range repeats")
    return result
