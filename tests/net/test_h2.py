"""HTTP/2 over mutual TLS between two nodes: identities, concurrency, flow control, failures,
malformed input from a raw TLS socket, and interoperability with the ``h2`` library."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.net import h2core
from appliance.net.h2 import H2Client, H2Server, Request, Response, TransportError
from appliance.pki import client_context, peer_name, server_context


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


def test_start_sends_at_once_on_an_open_connection_and_otherwise_declines(pki):
    """``start`` (no coroutine) works only on an open connection with a free stream; its
    response is the one ``request`` gets, and a request it started that times out is
    reset and fails with TimeoutError, the connection going on."""

    async def main() -> None:
        async def hold(request: Request) -> Response:
            if request.path == "/hold":
                await asyncio.Event().wait()  # never answers
            return await echo(request)

        server = await start(pki, hold)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"), timeout=0.3)
        assert client.start("POST", "/x", b"abc") is None  # not connected yet: nothing sent
        assert (await client.request("POST", "/x", b"abc")).body == b"cba"
        started = client.start("POST", "/y", b"hello")
        assert started is not None
        assert (await started).body == b"olleh"
        held = client.start("POST", "/hold", b"x")
        assert held is not None
        with pytest.raises(TimeoutError):
            await held
        assert (await client.request("POST", "/z", b"ab")).body == b"ba"  # same connection
        await client.close()
        await server.close()

    asyncio.run(main())


def test_connect_opens_the_connection_before_any_request(pki):
    """``connect`` opens the connection (so ``start`` sends at once on the first request),
    leaves an open one alone, and reports a peer that does not listen."""

    async def main() -> None:
        server = await start(pki)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"), expect_peer="node-a")
        await client.connect()
        await client.connect()  # already open: nothing happens
        started = client.start("POST", "/x", b"abc")
        assert started is not None
        assert (await started).body == b"cba"
        port = server.port
        await client.close()
        await server.close()
        gone = H2Client("127.0.0.1", port, ctx(pki, "node-b"), timeout=2.0)
        with pytest.raises(TransportError):
            await gone.connect()

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


def test_many_concurrent_streams_beyond_the_servers_limit(pki):
    async def main() -> None:
        server = await start(pki)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"))
        bodies = [str(i).encode() for i in range(1500)]  # more than MAX_STREAMS (1000) at once
        responses = await asyncio.gather(*(client.request("POST", "/x", b) for b in bodies))
        assert [r.body for r in responses] == [b[::-1] for b in bodies]
        await client.close()
        await server.close()

    asyncio.run(main())


def test_a_request_that_times_out_is_reset_and_its_handler_cancelled(pki):
    cancelled = asyncio.Event  # replaced inside the loop

    async def main() -> None:
        nonlocal cancelled
        cancelled = asyncio.Event()

        async def slow(request: Request) -> Response:
            if request.path == "/slow":
                try:
                    await asyncio.Event().wait()  # never answers: only a cancel ends it
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            return await echo(request)

        server = await start(pki, slow)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"), timeout=0.3)
        with pytest.raises(TransportError, match="no response"):
            await client.request("POST", "/slow", b"x")
        await asyncio.wait_for(cancelled.wait(), 5)  # our RST_STREAM reached the server
        assert (await client.request("POST", "/fast", b"ab")).body == b"ba"  # same connection
        await client.close()
        await server.close()

    asyncio.run(main())


def test_requests_in_flight_fail_cleanly_when_the_server_closes(pki):
    async def main() -> None:
        arrived, all_in = 0, asyncio.Event()

        async def stuck(request: Request) -> Response:
            nonlocal arrived
            arrived += 1
            if arrived == 5:
                all_in.set()
            await asyncio.Event().wait()  # never answers
            raise AssertionError("not reached")

        server = await start(pki, stuck)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"), timeout=5.0)
        calls = [asyncio.create_task(client.request("POST", "/x", b"1")) for _ in range(5)]
        await asyncio.wait_for(all_in.wait(), 5)  # all five are in the server's handler
        await server.close()
        for call in calls:
            with pytest.raises(TransportError):
                await asyncio.wait_for(call, 3)
        await client.close()

    asyncio.run(main())


# -- malformed input from a raw TLS socket ---------------------------------------------------------
async def raw_exchange(pki, port: int, data: bytes, wait: float = 5) -> bytes:
    """Send ``data`` after TLS on a bare socket; everything received until the server closes
    (or stays silent for ``wait`` seconds)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx(pki, "node-b"), server_hostname="node-a"
    )
    writer.write(data)
    received = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        while chunk := await asyncio.wait_for(reader.read(65536), wait):
            received += chunk
    writer.close()
    return received


async def send_and_hang_up(pki, server: H2Server, data: bytes) -> None:
    """Send ``data`` after TLS, close, and return once the server has dropped the
    connection: it has then handled every byte of ``data`` (a connection is lost only after
    all it received was delivered)."""
    _, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=ctx(pki, "node-b"), server_hostname="node-a"
    )
    writer.write(data)
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    deadline = asyncio.get_running_loop().time() + 5
    while server._open:  # bounded: the server sees our close within a few loop turns
        assert asyncio.get_running_loop().time() < deadline, "the server kept the connection"
        await asyncio.sleep(0.01)


def goaway_code(received: bytes) -> int | None:
    """The error code of the first GOAWAY frame in ``received``, if any."""
    while len(received) >= 9:
        length = int.from_bytes(received[:3], "big")
        if received[3] == h2core.GOAWAY:
            return int.from_bytes(received[13:17], "big")
        received = received[9 + length :]
    return None


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (h2core.PREFACE + frame(h2core.SETTINGS, 0, 0) + frame(h2core.DATA, 0, 0, b"x"), 1),
        (
            h2core.PREFACE
            + frame(h2core.SETTINGS, 0, 0)
            + frame(h2core.HEADERS, 4, 1, b"\xff\xff"),
            9,
        ),
        (h2core.PREFACE + frame(h2core.SETTINGS, 0, 0, b"\0"), 6),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(10), 1),
    ],
    ids=["data-on-stream-0", "bad-hpack", "bad-settings", "http1"],
)
def test_malformed_frames_get_goaway_and_the_server_lives_on(pki, data: bytes, code: int):
    async def main() -> None:
        server = await start(pki)
        received = await raw_exchange(pki, server.port, data)
        assert goaway_code(received) == code
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"))
        assert (await client.request("POST", "/x", b"still")).body == b"llits"
        await client.close()
        await server.close()

    asyncio.run(main())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=300))
def test_fuzzed_bytes_on_a_live_server_never_crash_it(pki, junk: bytes):
    async def main() -> None:
        server = await start(pki)
        opening = h2core.PREFACE + frame(h2core.SETTINGS, 0, 0)
        await send_and_hang_up(pki, server, opening + junk)
        client = H2Client("127.0.0.1", server.port, ctx(pki, "node-b"))
        assert (await client.request("POST", "/x", b"ok")).body == b"ko"
        await client.close()
        await server.close()

    asyncio.run(main())


# -- interoperability with the python-hyper h2 library over TLS ---------------------------------
class LibServer(asyncio.Protocol):
    """An HTTP/2 server built on the ``h2`` library: answers the SHA-256 of each request
    body, with a small receive window (1000 bytes) so that our client must wait for it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        self.bodies: dict[int, bytearray] = {}
        self.peer = peer_name(transport.get_extra_info("ssl_object"))
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.bodies[event.stream_id] = bytearray()
                if dict(event.headers)[":path"] == "/reset":
                    self.conn.reset_stream(event.stream_id, 8)  # CANCEL
                    del self.bodies[event.stream_id]
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id in self.bodies:
                    self.bodies[event.stream_id] += event.data
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.bodies:
                answer = hashlib.sha256(self.bodies.pop(event.stream_id)).hexdigest().encode()
                head = [(":status", "200"), ("x-peer", self.peer or ""), ("x-lib", "h2")]
                self.conn.send_headers(event.stream_id, head)
                self.conn.send_data(event.stream_id, answer, end_stream=True)
        self.transport.write(self.conn.data_to_send())


def test_our_client_against_an_h2_library_server(pki):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            LibServer, "127.0.0.1", 0, ssl=ctx(pki, "node-a", server=True)
        )
        port = server.sockets[0].getsockname()[1]
        client = H2Client("127.0.0.1", port, ctx(pki, "node-b"), expect_peer="node-a")
        bodies = [bytes([i]) * (100 + 997 * i) for i in range(60)]  # up to 60 kB, window 1000
        responses = await asyncio.gather(*(client.request("POST", "/v1/x", b) for b in bodies))
        for body, response in zip(bodies, responses, strict=True):
            assert response.status == 200 and response.headers["x-lib"] == "h2"
            assert response.body == hashlib.sha256(body).hexdigest().encode()
            assert response.headers["x-peer"] == "node-b"
        await client.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


async def lib_client(
    pki, port: int, bodies: list[bytes]
) -> dict[int, tuple[dict[str, str], bytes]]:
    """Requests from an ``h2``-library client with a small window (1000 bytes): the answers
    (headers, body) by stream."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx(pki, "node-b"), server_hostname="node-a"
    )
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    pending: dict[int, bytes] = {}
    for body in bodies:
        stream_id = conn.get_next_available_stream_id()
        head = [(":method", "POST"), (":scheme", "https"), (":authority", "a"), (":path", "/p")]
        conn.send_headers(stream_id, [*head, ("content-length", str(len(body)))])
        pending[stream_id] = body

    def send_what_windows_allow() -> None:
        for stream_id, rest in list(pending.items()):
            while rest:
                window = conn.local_flow_control_window(stream_id)
                room = min(window, conn.max_outbound_frame_size, len(rest))
                if room <= 0:
                    break
                conn.send_data(stream_id, rest[:room], end_stream=room == len(rest))
                rest = rest[room:]
            pending[stream_id] = rest
            if not rest:
                del pending[stream_id]
        writer.write(conn.data_to_send())

    send_what_windows_allow()
    answers: dict[int, tuple[dict[str, str], bytearray]] = {}
    ended = 0
    while ended < len(bodies):
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "server closed the connection"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                answers[event.stream_id] = (dict(event.headers), bytearray())
            elif isinstance(event, h2.events.DataReceived):
                answers[event.stream_id][1].extend(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended += 1
        send_what_windows_allow()
    writer.close()
    return {k: (h, bytes(b)) for k, (h, b) in answers.items()}


def test_an_h2_library_client_against_our_server(pki):
    async def main() -> None:
        server = await start(pki)
        bodies = [bytes([65 + i % 26]) * (10 + 7000 * i) for i in range(20)]  # up to 133 kB
        answers = await lib_client(pki, server.port, bodies)
        assert sorted(answers) == list(range(1, 2 * len(bodies), 2))
        for stream_id, body in zip(sorted(answers), bodies, strict=True):
            headers, answer = answers[stream_id]
            assert headers[":status"] == "200" and headers["x-peer"] == "node-b"
            assert answer == body[::-1]  # sent through their 1000-byte windows
        await server.close()

    asyncio.run(main())


def test_a_stream_reset_by_the_server_fails_that_request_only(pki):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            LibServer, "127.0.0.1", 0, ssl=ctx(pki, "node-a", server=True)
        )
        port = server.sockets[0].getsockname()[1]
        client = H2Client("127.0.0.1", port, ctx(pki, "node-b"))
        calls = [client.request("POST", "/reset" if i == 3 else "/ok", b"x") for i in range(8)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[3], TransportError) and "reset" in results[3].message
        assert all(
            isinstance(r, Response) and r.status == 200 for i, r in enumerate(results) if i != 3
        )
        assert (await client.request("POST", "/ok", b"again")).status == 200
        await client.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
