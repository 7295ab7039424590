"""MultiMCW and Lag prediction estimates (SP 800-90B 6.3.7, 6.3.8).

The tool updates window counts and lag scoreboards one sample at a time; here every
sub-predictor's guesses for a chunk of rounds are computed at once (running counts per
window, lagged comparisons) and the winner bookkeeping is replayed by _scoring.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from qrng.sp80090b._core import I64, U8, Bools, EstimatorResult, as_symbols, prediction_result
from qrng.sp80090b._scoring import CHUNK, score

# --- 6.3.7 MultiMCW -------------------------------------------------------------------------

_WINDOWS = (63, 255, 1023, 4095)


def _mcw_binary(data: U8, ones: I64, start: int, stop: int) -> Bools:
    """Hits of the four most-common-in-window guesses for rounds start..stop-1 (odd windows:
    no ties between two symbols). ``ones`` is the running count of 1s, with a leading 0."""
    truth = data[start:stop].astype(np.bool_)
    hits = np.zeros((len(_WINDOWS), stop - start), dtype=np.bool_)
    for j, w in enumerate(_WINDOWS):
        a = max(start, w)
        if a < stop:
            guess = 2 * (ones[a:stop] - ones[a - w : stop - w]) > w
            hits[j, a - start :] = guess == truth[a - start :]
    return hits


class _LastSeen:
    """Last occurrence of a symbol before a position, for many (symbol, position) queries."""

    def __init__(self, data: U8) -> None:
        order = np.argsort(data, kind="stable")
        self.scale = data.size + 1
        self.keys = data[order].astype(np.int64) * self.scale + order
        self.order = order
        self.data = data
        same = data[order[1:]] == data[order[:-1]]
        self.previous = np.full(data.size, -1, dtype=np.int64)  # of the same symbol
        self.previous[order[1:][same]] = order[:-1][same]

    def before(self, symbol: I64, position: I64) -> I64:
        at = np.searchsorted(self.keys, symbol * self.scale + position) - 1
        found = self.order[np.maximum(at, 0)]
        ok = (at >= 0) & (self.data[found] == symbol)
        return np.where(ok, found, -1)


_SCAN_BACK = 4  # look this many samples back for a top-count symbol before searching


def _mode_hits(data: U8, count: NDArray[np.int16], seen: _LastSeen, a: int) -> Bools:
    """For window counts (symbols x rounds a, a+1, ...), whether the window's mode (ties to
    the symbol seen last) is the symbol that comes next."""
    rounds = count.shape[1]
    top = count.max(axis=0)
    cols = np.arange(rounds)
    truth = data[a : a + rounds]
    hits = np.zeros(rounds, dtype=np.bool_)
    # right guesses need the true symbol at the top count
    todo = np.flatnonzero(count[truth, cols] == top)
    # the latest symbol at the top count is the guess: the last few samples settle most
    for back in range(1, _SCAN_BACK + 1):
        if todo.size == 0:
            return hits
        prev = data[a + todo - back]
        done = count[prev, todo] == top[todo]
        hits[todo[done]] = prev[done] == truth[todo[done]]
        todo = todo[~done]
    if todo.size == 0:
        return hits
    # otherwise compare the last occurrences of the other symbols sharing the top count
    col, tied = np.nonzero((count[:, todo] == top[todo]).T)
    other = tied != truth[todo[col]]
    col, tied = col[other], tied[other]
    own = seen.previous[a + todo]
    latest = seen.before(tied.astype(np.int64), (a + todo[col]).astype(np.int64))
    beaten = np.zeros(todo.size, dtype=np.bool_)
    beaten[col[latest > own[col]]] = True
    hits[todo] = ~beaten
    return hits


def _mcw_literal(data: U8, k: int, seen: _LastSeen, start: int, stop: int) -> Bools:
    """Same for a wider alphabet: the mode of each window, ties to the most recent symbol.

    Window counts per symbol come from running counts over the chunk and the 4095 samples
    before it (int32 to accumulate, int16 to compare).
    """
    lo = max(0, start - _WINDOWS[-1])
    span = stop - lo
    occ = np.zeros((k, span + 1), dtype=np.int32)
    occ[data[lo:stop], np.arange(1, span + 1)] = 1
    np.cumsum(occ, axis=1, out=occ)  # occ[:, t]: counts in data[lo : lo + t]
    small = occ.astype(np.int16)
    hits = np.zeros((len(_WINDOWS), stop - start), dtype=np.bool_)
    for j, w in enumerate(_WINDOWS):
        a = max(start, w)
        if a < stop:
            t0, t1 = a - lo, stop - lo
            count = small[:, t0:t1] - small[:, t0 - w : t1 - w]
            hits[j, a - start :] = _mode_hits(data, count, seen, a)
    return hits


def estimate_multimcw(symbols: NDArray[np.integer], alphabet_size: int) -> EstimatorResult:
    """6.3.7: four most-common-in-window predictors (windows 63, 255, 1023, 4095)."""
    data = as_symbols(symbols, alphabet_size, minimum=_WINDOWS[-1] + 1, name="MultiMCW")
    first = _WINDOWS[0]
    ones = np.concatenate(([0], np.cumsum(data, dtype=np.int64)))
    seen = _LastSeen(data) if alphabet_size > 2 else None

    def chunks() -> Iterator[tuple[Bools, Bools | None]]:
        step = 1 << 14 if alphabet_size > 2 else CHUNK
        for a in range(first, data.size, step):
            b = min(a + step, data.size)
            if alphabet_size == 2:
                yield _mcw_binary(data, ones, a, b), None
            else:
                assert seen is not None
                yield _mcw_literal(data, alphabet_size, seen, a, b), None

    tally = score(chunks(), len(_WINDOWS))
    return prediction_result(
        "MultiMCW", alphabet_size, tally.correct, data.size - first, tally.longest
    )


# --- 6.3.8 Lag ------------------------------------------------------------------------------

_LAGS = 128


def estimate_lag(symbols: NDArray[np.integer], alphabet_size: int) -> EstimatorResult:
    """6.3.8: predictors that repeat the symbol d = 1..128 positions back."""
    data = as_symbols(symbols, alphabet_size, minimum=3, name="Lag")
    padded = np.concatenate((np.full(_LAGS, -1, dtype=np.int16), data.astype(np.int16)))

    def chunks() -> Iterator[tuple[Bools, Bools | None]]:
        for a in range(1, data.size, CHUNK):
            b = min(a + CHUNK, data.size)
            # row d-1 holds data[i-d] for the rounds i in [a, b) (padding never matches)
            lagged = sliding_window_view(padded[a : b + _LAGS - 1], b - a)[::-1]
            yield lagged == padded[a + _LAGS : b + _LAGS], None

    tally = score(chunks(), _LAGS)
    return prediction_result("Lag", alphabet_size, tally.correct, data.size - 1, tally.longest)
