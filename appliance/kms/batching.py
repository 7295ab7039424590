"""Coalescing of relay messages bound for one neighbour into one HTTP/2 request.

Under load most of a hop's cost is per request (a TLS record, a socket write, a wake-up of
the peer), not per message. :class:`RelayBatcher` sends at once whatever was submitted in
the same event-loop turn, and while ``depth`` batches (one by default) are in flight it
lets new messages queue and go together in the next one. A lone message on an idle link
waits for nothing: it leaves at the end of the turn it was submitted in, so sequential
latency is unchanged; under load a message waits at most one hop round trip, and each
request then carries several. Each message keeps its own result or error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.kms.errors import KeyUnavailable, KmsError, StaleGrant, StaleKey, UnknownChannel

Send = Callable[[list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]

ERRORS: dict[str, type[KmsError]] = {
    StaleGrant.code: StaleGrant,
    StaleKey.code: StaleKey,
    UnknownChannel.code: UnknownChannel,
}
"""Error codes a caller reacts to (dropping its link keys, or reopening its AKMS channel);
any other is scarcity."""


def error_from(code: Any, reason: str) -> KmsError:
    """The exception a peer's error answer stands for."""
    return ERRORS.get(str(code), KeyUnavailable)(reason)


class RelayBatcher:
    """Messages for one neighbour, sent in batches of up to MAX_ITEMS."""

    MAX_ITEMS = 256

    def __init__(self, send: Send, depth: int = 1) -> None:
        self._send, self.depth = send, depth
        self._queue: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = self.messages = 0
        """Requests and messages sent so far (``/v1/status`` reports them)."""

    async def submit(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Send one message; its result, or the error its receiver answered."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((doc, future))
        self._kick()
        result = await future
        if "code" in result and "ok" not in result:
            raise error_from(result["code"], str(result.get("message", "refused")))
        return result

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

    async def _deliver(
        self, items: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]
    ) -> None:
        try:
            results = await self._send([doc for doc, _ in items])
            for (_, future), result in zip(items, results, strict=True):
                if not future.done():
                    future.set_result(result if isinstance(result, dict) else {"code": "KMS"})
        except BaseException as exc:  # the whole request failed: every message with it
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._kick()
