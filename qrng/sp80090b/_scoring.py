"""Winner bookkeeping shared by the prediction estimators (SP 800-90B 6.3.7-6.3.9).

A prediction estimator runs several sub-predictors and, each round, counts the guess of the
one with the best record so far. Given every sub-predictor's hits for a chunk of rounds at
once, the winner of each round follows from running scores, so only this part is replayed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from qrng.sp80090b._core import I32, I64, Bools

CHUNK = 1 << 13  # rounds per chunk of winner bookkeeping


class _Scoreboard:
    """The tool's choice of predictor: the best score so far, ties to the latest to reach it.

    Within a round the sub-predictors are scored in order, each correct one taking the lead
    if its score is at least the leader's. So after a round the leader is the last
    predictor (in order) that scored in that round and holds the top score, or else
    unchanged.
    """

    def __init__(self, predictors: int) -> None:
        self.scores = np.zeros(predictors, dtype=np.int32)
        self.winner = 0

    def leaders(self, hits: Bools) -> I64:
        """For predictors x rounds hits, the predictor in charge before each round."""
        rounds = hits.shape[1]
        # Only a predictor that can catch up with the top score within the chunk can lead.
        pick = np.flatnonzero(self.scores + rounds >= self.scores.max())
        if pick.size < self.scores.size:
            sub = hits[pick]
            start = int(np.searchsorted(pick, self.winner))
            before, after, final = self._leaders(sub, self.scores[pick], start)
            self.scores += np.count_nonzero(hits, axis=1).astype(np.int32)
            self.winner = int(pick[after])
            return pick[before]
        before, after, final = self._leaders(hits, self.scores, self.winner)
        self.scores, self.winner = final, after
        return before

    @staticmethod
    def _leaders(hits: Bools, base: I32, winner: int) -> tuple[I64, int, I32]:
        count, rounds = hits.shape
        wide = int(base.max()) + rounds >= 1 << 22  # scores must fit beside 8 index bits
        key: NDArray[Any] = np.cumsum(hits, axis=1, dtype=np.int64 if wide else np.int32)
        key += base[:, None]
        final = key[:, -1].astype(np.int32)
        # score above (predictor + 1 if it scored this round): the row maximum names the
        # last predictor that scored and reached the top score, or none (low byte 0)
        key <<= 8
        key |= hits * np.arange(1, count + 1, dtype=key.dtype)[:, None]
        last = (key.max(axis=0) & 0xFF).astype(np.int64) - 1
        changed = last >= 0
        source = np.where(changed, np.arange(rounds), -1)
        np.maximum.accumulate(source, out=source)
        after = np.where(source >= 0, last[np.maximum(source, 0)], winner)
        before = np.empty(rounds, dtype=np.int64)
        before[0] = winner
        before[1:] = after[:-1]
        return before, int(after[-1]), final


class Tally:
    """Correct predictions C and the longest run of them, fed outcome by outcome."""

    def __init__(self) -> None:
        self.correct = 0
        self.run = 0
        self.longest = 0

    def feed(self, outcomes: Bools) -> None:
        if outcomes.size == 0:
            return
        self.correct += int(np.count_nonzero(outcomes))
        misses = np.flatnonzero(~outcomes)
        if misses.size == 0:
            self.run += outcomes.size
            self.longest = max(self.longest, self.run)
            return
        gaps = np.diff(misses) - 1
        inner = int(gaps.max()) if gaps.size else 0
        self.longest = max(self.longest, self.run + int(misses[0]), inner)
        self.run = outcomes.size - 1 - int(misses[-1])
        self.longest = max(self.longest, self.run)


def score(chunks: Iterable[tuple[Bools, Bools | None]], predictors: int) -> Tally:
    """Replay the winner bookkeeping over (hits, has-a-guess) chunks, predictors x rounds."""
    board, tally = _Scoreboard(predictors), Tally()
    for hits, has in chunks:
        rounds = np.arange(hits.shape[1])
        winner = board.leaders(hits)
        outcome = hits[winner, rounds]
        if has is not None:  # a winner without a guess neither scores nor breaks the run
            outcome = outcome[has[winner, rounds]]
        tally.feed(outcome)
    return tally
