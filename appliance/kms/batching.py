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
import functools
from collections.abc import Awaitable, Callable, Sequence

from appliance.kms import messages as m
from appliance.kms.errors import KeyUnavailable, KmsError, StaleGrant, StaleKey, UnknownChannel

Send = Callable[[list[m.RelayItem]], Awaitable[list[m.ItemResult]]]
Start = Callable[[list[m.RelayItem], Callable[[list[m.ItemResult] | BaseException], None]], bool]
"""Sends a batch at once if it can (True), calling back with its results or its error."""
Done = Callable[[m.ItemResult | BaseException], None]
"""Told what became of one message: its result, or the error of its whole request."""

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

    def __init__(self, send: Send, depth: int = 1, *, start: Start | None = None) -> None:
        """``send`` delivers a batch in a task; ``start``, when given, is tried first: it
        sends at once if it can (True) and calls back with the batch's outcome."""
        self._send, self._start, self.depth = send, start, depth
        self._queue: list[tuple[m.RelayItem, Done]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = self.messages = 0
        """Requests and messages sent so far (``/v1/status`` reports them)."""

    def submit(self, item: m.RelayItem) -> asyncio.Future[m.ItemResult]:
        """Queue one message; the future holds its result, or the whole request's error."""
        future: asyncio.Future[m.ItemResult] = asyncio.get_running_loop().create_future()
        self.send(item, functools.partial(_settle, future))
        return future

    def send(self, item: m.RelayItem, done: Done) -> None:
        """Queue one message; ``done`` is called with its result, or the whole request's
        error, once its batch is answered (the node adapter's way: no future per message)."""
        self._queue.append((item, done))
        self._kick()

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
        if self._start is not None:
            answered = functools.partial(self._answered, items)
            if self._start([item for item, _ in items], answered):
                return
        task = asyncio.create_task(self._deliver(items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, items: list[tuple[m.RelayItem, Done]]) -> None:
        outcomes: Sequence[m.ItemResult | BaseException]
        try:
            outcomes = await self._send([item for item, _ in items])
        except BaseException as exc:  # the whole request failed: every message with it
            outcomes = [exc] * len(items)
            if not isinstance(exc, Exception):
                self._done(items, outcomes)
                raise
        finally:
            self._in_flight -= 1
        self._done(items, outcomes)
        self._kick()

    def _answered(
        self, items: list[tuple[m.RelayItem, Done]], outcome: list[m.ItemResult] | BaseException
    ) -> None:
        self._in_flight -= 1
        self._done(items, [outcome] * len(items) if isinstance(outcome, BaseException) else outcome)
        self._kick()

    @staticmethod
    def _done(
        items: list[tuple[m.RelayItem, Done]], outcomes: Sequence[m.ItemResult | BaseException]
    ) -> None:
        for (_, done), outcome in zip(items, outcomes, strict=True):
            try:
                done(outcome)
            except Exception as exc:  # one message's bug: the others still hear theirs
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "relay outcome callback failed", "exception": exc}
                )

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


def _settle(future: asyncio.Future[m.ItemResult], outcome: m.ItemResult | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
