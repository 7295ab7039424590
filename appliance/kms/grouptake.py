"""Group commit for stock takes: concurrent enc_keys share one store transaction.

Every take from a key store is a transaction ending in an fsync (``synchronous=FULL``), and
transactions on one store run one after another. :class:`GroupTaker` collects the takes
that arrive while one is running and makes them the next transaction together, in
arrival order (:meth:`KeyStore.take_next_for`): one fsync serves them all, and each taker
still gets its own keys exactly once. A lone take waits for nothing.
"""

from __future__ import annotations

import asyncio

from appliance.kms.errors import KeyUnavailable
from appliance.kms.store import KeyStore, StoredKey


class GroupTaker:
    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._queue: list[tuple[int, asyncio.Future[list[StoredKey]]]] = []
        self._running = False
        self._drainer: asyncio.Task[None] | None = None
        self.transactions = 0

    async def take(self, n: int) -> list[StoredKey]:
        """The ``n`` oldest keys (KeyUnavailable if the stock cannot cover them now)."""
        future: asyncio.Future[list[StoredKey]] = asyncio.get_running_loop().create_future()
        self._queue.append((n, future))
        if not self._running:
            self._running = True
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue, []
                self.transactions += 1
                try:
                    taken = await asyncio.to_thread(self.store.take_next_for, [n for n, _ in group])
                except Exception as exc:  # the store failed: each taker hears it
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                unclaimed: list[StoredKey] = []
                for (_, future), keys in zip(group, taken, strict=True):
                    if keys is None:
                        if not future.done():
                            future.set_exception(KeyUnavailable("stock too low right now"))
                    elif future.done():  # its caller went away: the keys go back
                        unclaimed.extend(keys)
                    else:
                        future.set_result(keys)
                if unclaimed:
                    back = [(k.key_id, k.material) for k in unclaimed]
                    await asyncio.to_thread(self.store.put_many, back)
        finally:
            self._running = False
