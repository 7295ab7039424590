"""HTTP/2 over mutual TLS between two nodes."""

from __future__ import annotations

import asyncio

import pytest

from appliance.net.h2 import H2Client, H2Server, Request, Response, TransportError
from appliance.pki import client_context, server_context


def ctx(pki, name, server=False):
    ident = pki[name]
    make = server_context if server else client_context
    return make(ident.cert, ident.key, pki["node-a"].ca, ("h2",))


async def echo(request: Request) -> Response:
    return Response(200, request.body[::-1], {"x-peer": request.peer or "", "x-path": request.path})


async def start(pki, handler=echo) -> H2Server:
    server = H2Server(handler, ctx(pki, "node-a", server=True))
    await server.start("127.0.0.1", 0)
    return server


def test_round_trip_with_identities(pki):
    async def main() -> None:
        server = await start(pki)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"), expect_peer="node-a")
        resp = await client.request("POST", "/relay/1", b"hello")
        assert (resp.status, resp.body) == (200, b"olleh")
        assert resp.headers["x-peer"] == "node-b" and resp.headers["x-path"] == "/relay/1"
        await client.close()
        await server.close()

    asyncio.run(main())


def test_concurrent_streams_and_large_bodies(pki):
    async def main() -> None:
        server = await start(pki)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"))
        bodies = [bytes([i % 256]) * (1000 + i) for i in range(300)]  # beyond 100 streams
        responses = await asyncio.gather(*(client.request("POST", "/x", b) for b in bodies))
        assert [r.body for r in responses] == [b[::-1] for b in bodies]
        big = bytes(range(256)) * 12_000  # 3 MB: beyond every default window
        assert (await client.request("POST", "/big", big)).body == big[::-1]
        await client.close()
        await server.close()

    asyncio.run(main())


def test_a_client_from_another_ca_is_refused(pki):
    async def main() -> None:
        server = await start(pki)
        intruder = pki["intruder"]
        bad = client_context(intruder.cert, intruder.key, pki["node-a"].ca, ("h2",))
        client = H2Client("127.0.0.1", server.port, bad, timeout=2.0)
        with pytest.raises(TransportError):
            await client.request("POST", "/x", b"let me in")
        await client.close()
        await server.close()

    asyncio.run(main())


def test_the_wrong_server_identity_is_refused(pki):
    async def main() -> None:
        server = await start(pki)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"), expect_peer="node-c")
        with pytest.raises(TransportError, match="expected 'node-c'"):
            await client.request("GET", "/x")
        await server.close()

    asyncio.run(main())


def test_reconnects_after_the_server_restarts(pki):
    async def main() -> None:
        server = await start(pki)
        port = server.port
        client = H2Client("127.0.0.1", port, ctx(pki, "node-b"), timeout=2.0)
        assert (await client.request("POST", "/x", b"1")).body == b"1"
        await server.close()
        with pytest.raises(TransportError):
            await client.request("POST", "/x", b"2")
        again = H2Server(echo, ctx(pki, "node-a", server=True))
        await again.start("127.0.0.1", port)
        assert (await client.request("POST", "/x", b"34")).body == b"43"
        await client.close()
        await again.close()

    asyncio.run(main())


def test_a_failing_handler_answers_500(pki):
    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    async def main() -> None:
        server = await start(pki, broken)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"))
        assert (await client.request("GET", "/x")).status == 500
        await client.close()
        await server.close()

    asyncio.run(main())
