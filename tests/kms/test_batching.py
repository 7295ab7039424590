"""Relay messages for one neighbour coalesce into batches, each keeping its own outcome."""

from __future__ import annotations

import asyncio

import pytest

from appliance.kms.batching import RelayBatcher
from appliance.kms.errors import KeyUnavailable, StaleGrant


class Peer:
    """Records batches; answers each item, refusing those marked ``stale``."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[dict]] = []
        self.delay = delay

    async def send(self, items: list[dict]) -> list[dict]:
        self.batches.append(items)
        await asyncio.sleep(self.delay)
        return [
            {"code": StaleGrant.code, "message": "old grant"} if i.get("stale") else {"ok": True}
            for i in items
        ]


def test_messages_of_one_turn_go_together_and_a_lone_one_waits_for_nothing():
    async def main() -> None:
        peer = Peer()
        batcher = RelayBatcher(peer.send)
        results = await asyncio.gather(*(batcher.submit({"n": i}) for i in range(10)))
        assert results == [{"ok": True}] * 10 and len(peer.batches) == 1
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await batcher.submit({"n": 99}) == {"ok": True}
        assert loop.time() - t0 < 0.05 and len(peer.batches) == 2

    asyncio.run(main())


def test_while_batches_are_in_flight_new_messages_queue_and_go_together():
    async def main() -> None:
        peer = Peer(delay=0.02)
        batcher = RelayBatcher(peer.send, depth=1)
        first = asyncio.ensure_future(batcher.submit({"n": 0}))
        await asyncio.sleep(0.005)  # the first batch is in flight
        rest = [asyncio.ensure_future(batcher.submit({"n": i})) for i in range(1, 6)]
        for i in range(6, 9):
            await asyncio.sleep(0.001)
            rest.append(asyncio.ensure_future(batcher.submit({"n": i})))
        await asyncio.gather(first, *rest)
        assert [len(b) for b in peer.batches] == [1, 8]  # depth 1: one batch in flight

    asyncio.run(main())


def test_each_message_keeps_its_own_error_and_a_failed_request_fails_them_all():
    async def main() -> None:
        peer = Peer()
        batcher = RelayBatcher(peer.send)
        outcomes = await asyncio.gather(
            batcher.submit({"n": 1}), batcher.submit({"stale": True}), return_exceptions=True
        )
        assert outcomes[0] == {"ok": True} and isinstance(outcomes[1], StaleGrant)

        async def broken(items: list[dict]) -> list[dict]:
            raise KeyUnavailable("peer unreachable")

        failing = RelayBatcher(broken)
        outcomes = await asyncio.gather(
            *(failing.submit({"n": i}) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, KeyUnavailable) for o in outcomes)
        assert failing._in_flight == 0  # and the batcher is ready for more

    asyncio.run(main())


def test_batches_never_exceed_the_limit():
    async def main() -> None:
        peer = Peer()
        batcher = RelayBatcher(peer.send)
        await asyncio.gather(*(batcher.submit({"n": i}) for i in range(600)))
        assert max(len(b) for b in peer.batches) <= RelayBatcher.MAX_ITEMS
        assert sum(len(b) for b in peer.batches) == 600

    asyncio.run(main())


@pytest.mark.parametrize("bad", [[], "x", [1] * 300])
def test_a_node_refuses_malformed_batches(bad):
    from appliance.kms.errors import ProtocolError
    from appliance.kms.node import KmsNode

    node = KmsNode.__new__(KmsNode)  # only the batch check runs before any item
    with pytest.raises(ProtocolError):
        asyncio.run(node._on_relay({"items": bad}, 3))
