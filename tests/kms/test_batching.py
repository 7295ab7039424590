"""Relay messages for one neighbour coalesce into batches, each keeping its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import pytest

from appliance.kms import messages as m
from appliance.kms.batching import RelayBatcher, error_from
from appliance.kms.errors import KeyUnavailable, MessageError, StaleGrant

OK = m.ItemResult(ok=True)
STALE = "f" * 32
"""An epoch that marks an item to be refused as stale."""


def item(n: int, epoch: str | None = None) -> m.RelayItem:
    return m.RelayItem(path=[3, 2], index=1, message=bytes([n % 256]) * 40, epoch=epoch)


class Peer:
    """Records batches; answers each item, refusing those marked stale. A held peer
    answers nothing until ``answer`` is set."""

    def __init__(self, held: bool = False) -> None:
        self.batches: list[list[m.RelayItem]] = []
        self.answer = asyncio.Event()
        if not held:
            self.answer.set()

    async def send(self, items: list[m.RelayItem]) -> list[m.ItemResult]:
        self.batches.append(items)
        await self.answer.wait()
        stale = m.ItemResult(ok=False, code=StaleGrant.code, message="old grant")
        return [stale if i.epoch == STALE else OK for i in items]


async def outcome(batcher: RelayBatcher, it: m.RelayItem) -> m.ItemResult:
    """What the node adapter makes of an item's result: the result, or its error."""
    result = await batcher.submit(it)
    if not result.ok:
        raise error_from(result.code, result.message)
    return result


async def within_turns(done: Callable[[], bool], turns: int = 10) -> None:
    """Yield to the event loop until ``done()``, at most ``turns`` times (no time passes: a
    batch that waited for a timer would not go)."""
    for _ in range(turns):
        if done():
            return
        await asyncio.sleep(0)  # one turn of the loop
    assert done(), f"not done within {turns} turns of the event loop"


def test_messages_of_one_turn_go_together_and_a_lone_one_waits_for_nothing():
    async def main() -> None:
        peer = Peer()
        batcher = RelayBatcher(peer.send)
        results = await asyncio.gather(*(outcome(batcher, item(i)) for i in range(10)))
        assert results == [OK] * 10 and len(peer.batches) == 1
        lone = asyncio.ensure_future(outcome(batcher, item(99)))
        await within_turns(lambda: len(peer.batches) == 2)
        assert await lone == OK

    asyncio.run(main())


def test_while_batches_are_in_flight_new_messages_queue_and_go_together():
    async def main() -> None:
        peer = Peer(held=True)
        batcher = RelayBatcher(peer.send, depth=1)
        first = asyncio.ensure_future(outcome(batcher, item(0)))
        await within_turns(lambda: len(peer.batches) == 1)  # the first batch is in flight
        rest = [asyncio.ensure_future(outcome(batcher, item(i))) for i in range(1, 6)]
        for i in range(6, 9):
            await asyncio.sleep(0)  # later turns, the first batch still unanswered
            rest.append(asyncio.ensure_future(outcome(batcher, item(i))))
        assert len(peer.batches) == 1  # depth 1: nothing more leaves while one is in flight
        peer.answer.set()
        await asyncio.gather(first, *rest)
        assert [len(b) for b in peer.batches] == [1, 8]

    asyncio.run(main())


def test_each_message_keeps_its_own_error_and_a_failed_request_fails_them_all():
    async def main() -> None:
        peer = Peer()
        batcher = RelayBatcher(peer.send)
        outcomes = await asyncio.gather(
            outcome(batcher, item(1)), outcome(batcher, item(2, STALE)), return_exceptions=True
        )
        assert outcomes[0] == OK and isinstance(outcomes[1], StaleGrant)

        async def broken(items: list[m.RelayItem]) -> list[m.ItemResult]:
            raise KeyUnavailable("peer unreachable")

        failing = RelayBatcher(broken)
        outcomes = await asyncio.gather(
            *(outcome(failing, item(i)) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, KeyUnavailable) for o in outcomes)
        assert failing._in_flight == 0  # and the batcher is ready for more

    asyncio.run(main())


def test_a_batch_the_adapter_can_start_at_once_calls_each_message_back_without_a_task():
    """With ``start`` (the node's way: the batch sent on the open connection, no task), each
    message hears its own result or the batch's error; when ``start`` declines, ``send``
    delivers the batch as before."""

    async def main() -> None:
        answers: list[Callable[[list[m.ItemResult] | BaseException], None]] = []
        declined: list[int] = []

        def start(items: list[m.RelayItem], done: Callable[..., None]) -> bool:
            if items[0].message[0] == 99:  # the adapter has no connection for this one
                declined.append(len(items))
                return False
            answers.append(done)
            return True

        peer = Peer()
        batcher = RelayBatcher(peer.send, start=start)
        heard: list[object] = []
        for i in range(3):
            batcher.send(item(i), heard.append)
        await within_turns(lambda: len(answers) == 1)
        assert len(peer.batches) == 0 and not heard  # started, not yet answered
        stale = m.ItemResult(ok=False, code=StaleGrant.code, message="old grant")
        answers[0]([OK, stale, OK])
        assert heard == [OK, stale, OK] and batcher._in_flight == 0
        batcher.send(item(4), heard.append)
        await within_turns(lambda: len(answers) == 2)
        answers[1](KeyUnavailable("peer unreachable"))  # the whole batch failed
        assert isinstance(heard[-1], KeyUnavailable)
        assert await outcome(batcher, item(99)) == OK  # declined: delivered by send
        assert declined == [1] and len(peer.batches) == 1

    asyncio.run(main())


def test_batches_never_exceed_the_limit():
    async def main() -> None:
        peer = Peer()
        batcher = RelayBatcher(peer.send)
        await asyncio.gather(*(outcome(batcher, item(i)) for i in range(600)))
        assert max(len(b) for b in peer.batches) <= RelayBatcher.MAX_ITEMS
        assert sum(len(b) for b in peer.batches) == 600

    asyncio.run(main())


@pytest.mark.parametrize("bad", [[], "x", [msgspec.to_builtins(item(1))] * 300])
def test_a_node_refuses_malformed_batches(bad):
    """An empty batch, one that is not a list, one over the limit: refused as a whole by
    the decoder, before any item is looked at."""
    body = msgspec.msgpack.encode({"type": "RelayBatch", "v": 1, "items": bad})
    with pytest.raises(MessageError):
        m.decode(body, m.RelayBatch)
