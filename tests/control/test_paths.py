"""ControllerPaths, the path provider of an access node's CKMS under the controller: the
controller's answers, its refusals, and what happens while it cannot be reached."""

from __future__ import annotations

import asyncio
import json

import pytest

from appliance.control import model
from appliance.control.paths import ControllerPaths
from appliance.kms.node import Unreachable
from appliance.kms.routing import NoRoute
from appliance.net.h2 import H2Server, Request, Response
from appliance.pki import client_context, server_context
from tests.control.agentfix import free_port


async def stand_in(pki, handle):  # type: ignore[no-untyped-def]
    """A stand-in controller serving ``handle``, and a ControllerPaths that asks it."""
    me, peer = pki["node-a"], pki["node-b"]
    port = free_port()
    server = H2Server(handle, server_context(me.cert, me.key, me.ca, ("h2",)))
    await server.start("127.0.0.1", port)
    ctx = client_context(peer.cert, peer.key, peer.ca, ("h2",))
    return server, ControllerPaths(f"127.0.0.1:{port}", ctx, expect_peer="node-a")


def run(pki, answers):  # type: ignore[no-untyped-def]
    """Ask a stand-in controller that gives ``answers`` in turn; the results or errors."""

    async def main():  # type: ignore[no-untyped-def]
        queue = list(answers)

        async def handle(request: Request) -> Response:
            status, body = queue.pop(0)
            assert json.loads(request.body) == {"src": 2, "dst": 14, "route_policy": "balanced"}
            return Response(status, json.dumps(body).encode())

        server, paths = await stand_in(pki, handle)
        out = []
        try:
            for _ in answers:
                try:
                    out.append(await paths.find(2, 14))
                except Exception as exc:
                    out.append(exc)
            await server.close()
            try:  # the controller gone: the last path given for the pair carries on
                out.append(await paths.find(2, 14))
            except Exception as exc:
                out.append(exc)
            paths.last.clear()
            try:
                out.append(await paths.find(2, 14))
            except Exception as exc:
                out.append(exc)
        finally:
            await paths.close()
        return out

    return asyncio.run(main())


def test_paths_refusals_and_an_unreachable_controller(pki):
    out = run(pki, [
        (200, {"path": [2, 3, 14], "backup": []}),
        (503, {"code": "CTL-NO-PATH", "message": "none"}),
        (503, {"code": "CTL-INSTALL", "message": "hop 3 did not confirm"}),
    ])  # fmt: skip
    assert out[0] == (2, 3, 14)
    assert isinstance(out[1], NoRoute)
    assert isinstance(out[2], Unreachable) and "CTL-INSTALL" in out[2].message
    assert out[3] == (2, 3, 14)
    assert isinstance(out[4], Unreachable) and out[4].code == "KMS-UNREACHABLE"


@pytest.mark.parametrize("body", [{"path": []}, {"path": ["x"]}, {"nopath": 1}])
def test_a_malformed_answer_is_a_coded_error(pki, body):
    (out, *_) = run(pki, [(200, body)])
    assert out.code == "KMS-CONTROLLER"


def test_a_learnt_path_is_used_without_asking_while_the_route_table_stands(pki):
    from appliance.control.agent import RouteTable

    async def main():  # type: ignore[no-untyped-def]
        asked = []

        async def handle(request: Request) -> Response:
            asked.append(json.loads(request.body)["route_policy"])
            path = [2, 3, 14] if len(asked) == 1 else [2, 16, 14]
            return Response(200, json.dumps({"path": path}).encode())

        me, peer = pki["node-a"], pki["node-b"]
        port = free_port()
        server = H2Server(handle, server_context(me.cert, me.key, me.ca, ("h2",)))
        await server.start("127.0.0.1", port)
        paths = ControllerPaths(f"127.0.0.1:{port}", client_context(peer.cert, peer.key,
                                peer.ca, ("h2",)), expect_peer="node-a")  # fmt: skip
        table = RouteTable(2)
        paths.table = lambda: table
        try:
            first = await paths.find(2, 14)
            again = paths.find(2, 14)  # answered at once: no awaitable, no request
            backup = model.Route(src=2, dst=14, prev_hop=None, next_hop=16, slot=1, active=False)
            table.apply([backup], [])  # a standby backup pre-installed: nothing in use moved
            still = paths.find(2, 14)
            table.apply([], [], {model.route_uuid(2, 14, 1): True})  # switched to it here
            changed = await paths.find(2, 14)
            explicit = model.Route(src=2, dst=14, prev_hop=None, next_hop=15, slot=1,
                                   explicit=(2, 15, 14))  # fmt: skip
            table.apply([explicit], [])  # the path in use is written here: no request
            written = paths.find(2, 14)
            other = await paths.find(2, 14, "most-key")  # another class: asked for
            known = paths.find(2, 14, "most-key")  # the route is now this class's: in use
        finally:
            await paths.close()
            await server.close()
        return first, again, still, changed, written, other, known, asked

    assert asyncio.run(main()) == (
        (2, 3, 14), (2, 3, 14), (2, 3, 14), (2, 16, 14), (2, 15, 14), (2, 16, 14),
        (2, 15, 14), ["balanced", "balanced", "most-key"],
    )  # fmt: skip


def test_start_opens_the_connection_before_the_first_ask(pki, monkeypatch):
    """start() connects in the background, waiting for a controller that starts later;
    the first ask then goes over that connection (no second one)."""
    monkeypatch.setattr("appliance.control.paths.OPEN_PAUSE_S", 0.01)

    async def main():  # type: ignore[no-untyped-def]
        async def handle(request: Request) -> Response:
            return Response(200, json.dumps({"path": [2, 3, 14]}).encode())

        me, peer = pki["node-a"], pki["node-b"]
        port = free_port()
        ctx = client_context(peer.cert, peer.key, peer.ca, ("h2",))
        paths = ControllerPaths(f"127.0.0.1:{port}", ctx, expect_peer="node-a")
        server = H2Server(handle, server_context(me.cert, me.key, me.ca, ("h2",)))
        try:
            paths.start()
            paths.start()  # once only
            await server.start("127.0.0.1", port)
            assert paths._opening is not None
            await paths._opening
            opened = len(server._open)
            path = await paths.find(2, 14)
            return opened, len(server._open), path
        finally:
            await paths.close()
            await server.close()

    assert asyncio.run(main()) == (1, 1, (2, 3, 14))


def test_asks_for_a_pair_while_one_is_in_flight_join_it(pki):
    """A channel's first re-key and the requests sent under it ask at once: one request
    to the controller, every asker gets its answer; a joined asker cancelled (its request
    gone) does not cancel the ask of the others."""

    async def main():  # type: ignore[no-untyped-def]
        asked: list[int] = []
        release = asyncio.Event()

        async def handle(request: Request) -> Response:
            asked.append(1)
            await release.wait()  # the install takes its time
            return Response(200, json.dumps({"path": [2, 3, 14]}).encode())

        server, paths = await stand_in(pki, handle)
        try:
            first, second, third = (asyncio.ensure_future(paths.find(2, 14)) for _ in range(3))
            other = asyncio.ensure_future(paths.find(2, 14, "most-key"))  # another class
            for _ in range(1000):  # bounded: until both requests reached the controller
                if len(asked) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert len(asked) == 2
            third.cancel()
            release.set()
            got = await asyncio.gather(first, second, other)
            cancelled = third.cancelled()
            again = await paths.find(2, 14)  # no route table: asked anew, once
        finally:
            await paths.close()
            await server.close()
        return got, cancelled, again, len(asked)

    got, cancelled, again, requests = asyncio.run(main())
    assert got == [(2, 3, 14)] * 3
    assert cancelled and again == (2, 3, 14)
    assert requests == 3  # the pair's three asks as one, the other class's, the last
