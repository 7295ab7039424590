"""Stock takes from memory: keys leased ahead from a UKMS stock store.

Every take from a key store is a transaction ending in an fsync (``synchronous=FULL``),
about a millisecond on this machine, and transactions on one store run one after
another. :class:`StockLease` takes keys from the stock ahead of demand, LEASE at a time,
in one transaction that *deletes* them from the store durably, and hands them out from
memory. No key can be handed out twice: a leased key is gone from the store before anyone
gets it. A crash loses at most the leased keys that were not yet handed out; no SAE has
seen them, so no delivered key is lost (DESIGN.md, invariant 6); their slave copies wait
unclaimed at the slave's UKMS until they expire. A graceful stop puts them back.
"""

from __future__ import annotations

import asyncio
from collections import deque

from appliance.kms.errors import KeyUnavailable
from appliance.kms.store import KeyStore, StoredKey

LEASE = 64
"""Keys taken ahead beyond the request that triggered a refill."""


class StockLease:
    def __init__(self, store: KeyStore, lease: int = LEASE) -> None:
        self.store, self.lease = store, lease
        self._keys: deque[StoredKey] = deque()
        self._lock = asyncio.Lock()
        self.transactions = 0

    def __len__(self) -> int:
        return len(self._keys)

    async def take(self, n: int) -> list[StoredKey]:
        """The ``n`` oldest keys (KeyUnavailable if the stock cannot cover them now)."""
        if len(self._keys) < n:
            async with self._lock:  # one refill at a time; the others then find keys
                if len(self._keys) < n:
                    want = n - len(self._keys) + self.lease
                    got = await asyncio.to_thread(self.store.take_up_to, want)
                    self.transactions += 1
                    self._keys.extend(got)
        if len(self._keys) < n:
            raise KeyUnavailable("stock too low right now")
        return [self._keys.popleft() for _ in range(n)]

    def give_back(self) -> int:
        """Return the leased keys to the store (at a graceful stop); how many."""
        keys, self._keys = list(self._keys), deque()
        if keys:
            self.store.put_many([(k.key_id, k.material) for k in keys])
            for k in keys:
                k.material[:] = bytes(len(k.material))
        return len(keys)
