"""Coalescing of relay messages bound for one neighbour into one HTTP/2 request.

Under load most of a hop's cost is per request (a TLS record, a socket write, a wake-up of
the peer), not per message. :class:`RelayBatcher` sends at once whatever was submitted in
the same event-loop turn, and while ``depth`` batches (one by default) are in flight it
lets new messages queue and go together in the next one. A lone message on an idle link
waits for nothing: it leaves at the end of the turn it was submitted in, so sequential
latency is unchanged; under load a message waits at most one hop round trip, and each
request then carries several. Each message keeps its own result or error.

This is the node adapter's business (it decides when bytes leave); the engines see one
call per hop message (:mod:`appliance.kms.engines.ckms`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from appliance.kms import messages as m
from appliance.kms.errors import KeyUnavailable, KmsError, StaleGrant, StaleKey, UnknownChannel

Send = Callable[[list[m.RelayItem]], Awaitable[list[m.ItemResult]]]

ERRORS: dict[str, type[KmsError]] = {
    StaleGrant.code: StaleGrant,
    StaleKey.code: StaleKey,
    UnknownChannel.code: UnknownChannel,
}
"""Error codes a caller reacts to (dropping its link keys, or reopening its AKMS channel);
any other is scarcity."""


def error_from(code: str, reason: str) -> KmsError:
    """The exception a peer's error answer stands for."""
    return ERRORS.get(code, KeyUnavailable)(reason)


class RelayBatcher:
    """Messages for one neighbour, sent in batches of up to MAX_ITEMS."""

    MAX_ITEMS = m.MAX_RELAY_ITEMS

    def __init__(self, send: Send, depth: int = 1) -> None:
        self._send, self.depth = send, depth
        self._queue: list[tuple[m.RelayItem, asyncio.Future[m.ItemResult]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = self.messages = 0
        """Requests and messages sent so far (``/v1/status`` reports them)."""

    def submit(self, item: m.RelayItem) -> asyncio.Future[m.ItemResult]:
        """Queue one message; the future holds its result, or the whole request's error."""
        future: asyncio.Future[m.ItemResult] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        return future

    def _kick(self) -> None:
        if self._queue and self._in_flight < self.depth and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queue or self._in_flight >= self.depth:
            return
        items = self._queue[: self.MAX_ITEMS]
        del self._queue[: self.MAX_ITEMS]
        self._in_flight += 1
        self.batches += 1
        self.messages += len(items)
        task = asyncio.create_task(self._deliver(items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, items: list[tuple[m.RelayItem, asyncio.Future[m.ItemResult]]]) -> None:
        try:
            results = await self._send([item for item, _ in items])
            for (_, future), result in zip(items, results, strict=True):
                if not future.done():
                    future.set_result(result)
        except BaseException as exc:  # the whole request failed: every message with it
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._kick()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
