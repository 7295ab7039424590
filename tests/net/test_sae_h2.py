"""HTTP/2 at the SAE edge (issue 16 A9): chosen by ALPN beside HTTP/1.1 on one port, and
bounded like the HTTP/1.1 path.

Over real TLS sockets, the project's own HTTP/2 client (:class:`appliance.net.h2.H2Client`)
multiplexes requests on one connection while an HTTP/1.1 client shares the port; the
TLS layer's alert for a missing certificate reaches an HTTP/2 client too. Sans-IO (an
:class:`~appliance.net.h2.EdgeSession` fed by the project's HTTP/2 core as the client):
the stream limit, the body limit, the per-SAE connection cap, the deadlines, and a
dec_keys answer told that it was written.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.net import h2core
from appliance.net.h2 import EDGE, EdgeSession, H2Client, Request, Response, TransportError
from appliance.net.http1 import H1Server
from appliance.pki import client_context, sae_server_context
from tests.net.h1_driver import FakeTransport

ALPN = ("h2", "http/1.1")


async def whoami(request: Request) -> Response:
    return Response(200, json.dumps({"peer": request.peer, "path": request.path}).encode())


def edge_server(pki: Any, handler: Any = whoami, **options: Any) -> H1Server:
    node = pki["node-a"]
    ctx = sae_server_context(node.cert, node.key, node.ca, ALPN, ("1.2", "1.3"))
    return H1Server(handler, ctx, h2=True, **options)


# -- real sockets ---------------------------------------------------------------------------
def test_http2_and_http11_clients_share_the_port_and_http2_multiplexes(pki):
    async def run() -> None:
        server = edge_server(pki)
        await server.start("127.0.0.1", 0)
        sae = pki["sae-1"]
        client = H2Client(
            "127.0.0.1", server.port, client_context(sae.cert, sae.key, sae.ca, ("h2",))
        )
        try:
            answers = await asyncio.gather(
                *(client.request("GET", f"/api/v1/keys/x/status?n={i}") for i in range(40))
            )
            assert [a.status for a in answers] == [200] * 40
            assert {json.loads(a.body)["peer"] for a in answers} == {"sae-1"}
            assert len(server._open) == 1  # 40 requests, one connection (32 at a time)
            version, reply = await asyncio.to_thread(http11_get, pki, server.port)
            assert reply.startswith(b"HTTP/1.1 200") and version == "http/1.1"
        finally:
            await client.close()
            await server.close()

    asyncio.run(run())


def http11_get(pki: Any, port: int) -> tuple[str | None, bytes]:
    sae = pki["sae-1"]
    ctx = client_context(sae.cert, sae.key, sae.ca, ("http/1.1",))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /x HTTP/1.1\r\nHost: kme\r\nConnection: close\r\n\r\n")
        return tls.selected_alpn_protocol(), tls.recv(4096)


@pytest.mark.parametrize("run_loop", [asyncio.run, uvloop.run])
def test_an_http2_client_without_a_certificate_is_told_why(pki, run_loop):
    """The refusal is the TLS layer's alert, read by the client although it sent its
    HTTP/2 preface right after its Finished (the alert leaves before the server reads
    on); with asyncio's own TLS and with uvloop's."""

    async def run() -> str:
        server = edge_server(pki)
        await server.start("127.0.0.1", 0)
        try:
            return await asyncio.to_thread(refused_preface, pki, server.port)
        finally:
            await server.close()

    assert "CERTIFICATE_REQUIRED" in run_loop(run()).upper()


def refused_preface(pki: Any, port: int) -> str:
    ctx = ssl.create_default_context(cafile=str(pki["sae-1"].ca))
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(h2core.PREFACE + settings)
        try:
            while tls.recv(4096):
                pass
        except ssl.SSLError as exc:
            return str(exc.reason)
    return ""


# -- sans-IO: the bounds ---------------------------------------------------------------------
class Wired:
    """An EdgeSession on a fake transport, with the project's HTTP/2 core as the client."""

    def __init__(self, server: H1Server, peer: str = "sae-1") -> None:
        self.transport = FakeTransport(peer)
        self.session = EdgeSession(server, server)
        self.client = h2core.Connection(client_side=True)
        self.events: list[h2core.Event] = []
        self.session.connection_made(self.transport)
        self.pump()

    def pump(self) -> None:
        """Exchange what each side has to send, until neither has anything."""
        for _ in range(100):
            to_server, to_client = self.client.data_to_send(), bytes(self.transport.out)
            self.transport.out.clear()
            if not to_server and not to_client:
                return
            if to_client:
                self.events += self.client.receive(to_client)
            if to_server and not self.transport.closed:
                self.session.data_received(to_server)

    def request(self, path: str, body: bytes = b"") -> int:
        stream_id = self.client.next_stream_id()
        assert stream_id is not None
        head = [(":method", "POST" if body else "GET"), (":scheme", "https")]
        head += [(":authority", "kme"), (":path", path)]
        self.client.send(stream_id, head, body)
        self.pump()
        return stream_id

    def answers(self) -> dict[int, int]:
        return {
            e.stream_id: int(e.headers[":status"])
            for e in self.events
            if isinstance(e, h2core.MessageReceived)
        }

    def resets(self) -> dict[int, int]:
        return {e.stream_id: e.error_code for e in self.events if isinstance(e, h2core.StreamReset)}


async def settle(until: Callable[[], bool]) -> None:
    """Let the event loop run until ``until()`` holds (bounded)."""
    for _ in range(2000):
        if until():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def test_streams_beyond_the_limit_are_refused_and_the_others_answered(pki):
    async def run() -> None:
        gate = asyncio.Event()

        async def held(request: Request) -> Response:
            await gate.wait()
            return Response(200, b"{}")

        wired = Wired(edge_server(pki, held))
        ids = [wired.request(f"/s/{i}") for i in range(EDGE.streams + 3)]
        assert wired.resets() == {i: h2core.REFUSED_STREAM for i in ids[EDGE.streams :]}
        gate.set()
        await settle(lambda: (wired.pump(), len(wired.answers()) == EDGE.streams)[1])
        assert set(wired.answers()) == set(ids[: EDGE.streams])
        wired.session.connection_lost(None)

    asyncio.run(run())


def test_a_body_beyond_the_limit_is_refused_and_one_within_it_served(pki):
    async def run() -> None:
        wired = Wired(edge_server(pki))
        big = wired.request("/big", bytes(EDGE.body + 1))
        small = wired.request("/small", b"{}" * 1000)
        await settle(lambda: (wired.pump(), small in wired.answers())[1])
        assert wired.resets() == {big: h2core.REFUSED_STREAM}
        wired.session.connection_lost(None)

    asyncio.run(run())


def test_a_connection_beyond_the_saes_cap_gets_503_and_is_closed(pki):
    async def run() -> None:
        server = edge_server(pki, max_per_sae=1)
        first, second = Wired(server), Wired(server)
        one, two = first.request("/a"), second.request("/b")
        await settle(lambda: (first.pump(), one in first.answers())[1])
        assert second.answers() == {two: 503} and second.transport.closed
        assert Wired(server, peer="sae-2").request("/c") == 1  # another SAE is not capped
        first.session.connection_lost(None)
        second.session.connection_lost(None)
        third = Wired(server)  # the cap counts open connections only
        three = third.request("/d")
        await settle(lambda: (third.pump(), three in third.answers())[1])
        assert third.answers() == {three: 200}
        third.session.connection_lost(None)

    asyncio.run(run())


@pytest.mark.parametrize("incomplete", [False, True])
def test_an_idle_or_stalled_connection_is_closed(pki, incomplete):
    async def run() -> None:
        server = edge_server(pki, idle_timeout=0.05, request_timeout=0.05)
        wired = Wired(server)
        if incomplete:  # a request head whose body never comes
            stream_id = wired.client.next_stream_id()
            assert stream_id is not None
            wired.client.send(stream_id, [(":method", "POST"), (":path", "/x")], bytes(1))
            frames = wired.client.data_to_send()
            wired.session.data_received(frames[: len(frames) - 10])  # cut inside the DATA
        for _ in range(1000):  # bounded polling for the close (the deadline is 0.05 s)
            if wired.transport.closed:
                break
            await asyncio.sleep(0.01)
        assert wired.transport.closed and wired.session.closed
        wired.session.connection_lost(None)

    asyncio.run(run())


def test_a_dec_keys_answer_hears_that_it_was_written(pki):
    async def run() -> None:
        told: list[bool] = []

        async def taken(request: Request) -> Response:
            response = Response(200, b'{"keys": []}')
            response.on_written = told.append
            return response

        wired = Wired(edge_server(pki, taken))
        stream_id = wired.request("/api/v1/keys/m/dec_keys")
        await settle(lambda: (wired.pump(), stream_id in wired.answers())[1])
        assert told == [True]
        wired.session.connection_lost(None)

    asyncio.run(run())


def test_the_project_client_fails_cleanly_on_a_refused_stream(pki):
    async def run() -> None:
        server = edge_server(pki)
        await server.start("127.0.0.1", 0)
        sae = pki["sae-1"]
        client = H2Client(
            "127.0.0.1", server.port, client_context(sae.cert, sae.key, sae.ca, ("h2",))
        )
        try:
            with pytest.raises(TransportError):
                await client.request("POST", "/big", bytes(EDGE.body + 1))
            assert (await client.request("GET", "/after")).status == 200
        finally:
            await client.close()
            await server.close()

    asyncio.run(run())


# -- fuzzing -----------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
def test_arbitrary_bytes_after_the_preface_never_raise_out_of_the_session(pieces, settings_first):
    """Whatever an SAE sends on an HTTP/2 connection, the session answers, resets streams
    or closes the connection with GOAWAY: nothing escapes ``data_received``."""

    async def run() -> None:
        server = edge_server_plain()
        transport = FakeTransport("sae-1")
        session = EdgeSession(server, server)
        session.connection_made(transport)
        empty_settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        session.data_received(h2core.PREFACE + (empty_settings if settings_first else b""))
        for piece in pieces:
            if transport.closed:
                break
            session.data_received(piece)
        for _ in range(5):
            await asyncio.sleep(0)
        session.connection_lost(None)

    asyncio.run(run())


def edge_server_plain() -> H1Server:
    return H1Server(whoami, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), h2=True)
