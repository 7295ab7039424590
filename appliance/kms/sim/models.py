"""In-memory models of what a simulated node keeps across a crash: its key store.

:class:`ModelStore` behaves as :class:`appliance.kms.shards.ShardedStore` does for the
engines (sessions, kinds, pending takes, the refetch window after a crash, release and
restore, the stock's oldest-first takes, levels, expiry); a test holds the two side by
side under Hypothesis. An operation is *committed* when the simulation applies it; what a
crash keeps is exactly what was committed. Bits are copied in and out, so a caller erasing
its copy erases nothing here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.kms.errors import KeyUnavailable, StoreError
from appliance.kms.events import Housekeep, Levels
from appliance.kms.store import REFETCH_WINDOW
from appliance.kms.storeops import Put, Release, Restore, StoredKey, Take, TakeOldest

TTL = 7 * 86400.0
"""The store's default key lifetime."""


@dataclass(slots=True)
class _Row:
    session: str
    kind: str
    bits: bytes
    expires: float
    seq: int
    run: str | None = None
    """The run that took it and has not released it (pending), else None."""
    taken_at: float = 0.0


class ModelStore:
    """The key store of one simulated node."""

    def __init__(self, clock: Callable[[], float], *, refetch_window: float = REFETCH_WINDOW):
        self._clock, self.refetch_window = clock, refetch_window
        self._rows: dict[str, _Row] = {}
        self._seq = 0
        self.run = "run-0"

    def restart(self, run: str) -> None:
        """A new run of the node (after a crash): pending takes of the old run stay pending."""
        self.run = run

    def apply(
        self, op: Put | Take | TakeOldest | Release | Restore | Levels | Housekeep
    ) -> int | list[StoredKey] | dict[str, int]:
        """Commit one operation; its outcome (or its KmsError, raised)."""
        now = self._clock()
        if isinstance(op, Put):
            return self._put(op, now)
        if isinstance(op, Take):
            return self._take(op, now)
        if isinstance(op, TakeOldest):
            return self._take_oldest(op, now)
        if isinstance(op, Release | Restore):
            return self._settle(op)
        if isinstance(op, Levels):
            return self._levels(op.kind, now)
        return self._purge(now)

    def _put(self, op: Put, now: float) -> int:
        if len({k for k, _ in op.keys}) != len(op.keys) or any(k in self._rows for k, _ in op.keys):
            raise StoreError("a key ID is already stored")
        for key_id, bits in op.keys:
            self._seq += 1
            self._rows[key_id] = _Row(op.session, op.kind, bytes(bits), now + TTL, self._seq)
        return len(op.keys)

    def _takeable(self, row: _Row | None, op: Take, now: float) -> bool:
        if row is None or row.session != op.session or row.kind != op.kind or row.expires <= now:
            return False
        if row.run is None:
            return True
        return row.run != self.run and now < row.taken_at + self.refetch_window

    @staticmethod
    def _held(row: _Row | None, op: Take) -> bool:
        """Held for the taking session (though perhaps not takeable now)."""
        return row is not None and row.session == op.session and row.kind == op.kind

    def _take(self, op: Take, now: float) -> list[StoredKey]:
        doubles = sorted({k for k in op.key_ids if op.key_ids.count(k) > 1})
        if doubles or not op.key_ids:  # refused before looking, as the store does
            error = KeyUnavailable(f"{len(doubles)} key IDs asked for twice")
            error.missing = doubles
            raise error
        missing = [k for k in op.key_ids if not self._takeable(self._rows.get(k), op, now)]
        if missing:
            error = KeyUnavailable(f"{len(missing)} of {len(op.key_ids)} keys are not here")
            error.missing = missing
            error.held = [k for k in missing if self._held(self._rows.get(k), op)]
            raise error
        taken = []
        for key_id in op.key_ids:
            row = self._rows[key_id]
            if row.run is None:
                row.taken_at = now
            row.run = self.run
            taken.append(StoredKey(key_id, bytearray(row.bits)))
        return taken

    def _take_oldest(self, op: TakeOldest, now: float) -> list[StoredKey]:
        oldest = sorted(
            (r.seq, k)
            for k, r in self._rows.items()
            if r.session == op.session and r.kind == op.kind and r.run is None and r.expires > now
        )
        taken = []
        for _, key_id in oldest[: op.n]:
            row = self._rows.pop(key_id)
            taken.append(StoredKey(key_id, bytearray(row.bits)))
        return taken

    def _settle(self, op: Release | Restore) -> int:
        done = 0
        for key_id in op.key_ids:
            row = self._rows.get(key_id)
            if row is None or row.run != self.run:  # the session only names the shard
                continue
            if isinstance(op, Release):
                del self._rows[key_id]
            else:
                row.run, row.taken_at = None, 0.0
            done += 1
        return done

    def _levels(self, kind: str, now: float) -> dict[str, int]:
        levels: dict[str, int] = {}
        for row in self._rows.values():
            if row.kind == kind and row.run is None and row.expires > now:
                levels[row.session] = levels.get(row.session, 0) + 1
        return levels

    def _purge(self, now: float) -> int:
        gone = [
            k
            for k, r in self._rows.items()
            if r.expires <= now or (r.run is not None and r.taken_at <= now - self.refetch_window)
        ]
        for key_id in gone:
            del self._rows[key_id]
        return len(gone)

    def holds(self, key_id: str, kind: str | None = None) -> bool:
        row = self._rows.get(key_id)
        return row is not None and kind in (None, row.kind)
