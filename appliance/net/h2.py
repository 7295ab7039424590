"""HTTP/2 (RFC 9113) over mutual TLS for the inter-KMS interfaces, on asyncio and ``h2``.

:class:`H2Server` calls an async handler per request stream and sends its response;
:class:`H2Client` multiplexes concurrent requests over one connection and reconnects after a
failure. Both identify the peer by the CN of its verified certificate. Flow control is
honoured both ways (every received DATA frame is acknowledged, and bodies wait in an outbox
for window), and the windows are opened wide, since the peers are trusted nodes exchanging
small messages at high rates. Errors surface as :class:`TransportError`, never as h2
exceptions.

Cost matters here: a relay crosses up to 14 hops, each one exchange. So the connection is an
``asyncio.Protocol`` (no reader task, no stream buffers), a whole message is handed over at
once (:class:`_Core`), outbound headers skip h2's validation (we build them), and a batch
of received frames is answered with one socket write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from appliance.errors import ApplianceError
from appliance.pki import peer_name

log = logging.getLogger("qkdn.net")
WINDOW = 1 << 24
MAX_STREAMS = 1000
"""Concurrent streams a server accepts; clients queue beyond what the peer allows."""


class TransportError(ApplianceError):
    """The peer is unreachable, refused us, or broke the connection."""

    code = "NET"


@dataclass
class Request:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    peer: str | None = None
    """CN of the client certificate."""


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


# -- sans-IO core: bytes in, whole messages out ---------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class MessageReceived:
    """A complete request or response (headers, then the body up to END_STREAM)."""

    stream_id: int
    """The stream it came on."""
    headers: dict[str, str]
    """Pseudo-headers (``:method``, ``:path``, ``:status``) and regular fields."""
    body: bytes
    """The whole body."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamReset:
    """The peer abandoned a stream (RST_STREAM)."""

    stream_id: int
    """The stream."""
    error_code: int
    """RFC 9113 error code."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionEnded:
    """The peer sent GOAWAY: no new streams; the connection is to be closed."""

    error_code: int
    """RFC 9113 error code (0: graceful)."""


Event = MessageReceived | StreamReset | ConnectionEnded


class CoreError(Exception):
    """The peer broke the protocol; :meth:`_Core.data_to_send` holds the GOAWAY to send."""


class _Core:
    """One HTTP/2 connection without I/O: received bytes become whole messages, and
    messages to send become bytes as the peer's flow-control windows allow (the rest waits
    in an outbox until WINDOW_UPDATE)."""

    def __init__(self, *, client_side: bool) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self._partial: dict[int, tuple[dict[str, str], bytearray]] = {}
        self._outbox: dict[int, memoryview] = {}
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            }
        )
        self.conn.increment_flow_control_window(WINDOW)

    @property
    def peer_max_streams(self) -> int:
        return int(self.conn.remote_settings.max_concurrent_streams)

    def next_stream_id(self) -> int:
        return int(self.conn.get_next_available_stream_id())

    def data_to_send(self) -> bytes:
        return bytes(self.conn.data_to_send())

    def send(self, stream_id: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Queue a whole message; its body goes out as the windows allow."""
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not body)
        except h2.exceptions.ProtocolError as exc:
            raise CoreError(str(exc)) from None
        if body:
            self._outbox[stream_id] = memoryview(body)
            self._pump(stream_id)

    def receive(self, data: bytes) -> list[Event]:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise CoreError(str(exc)) from None
        out: list[Event] = []
        for event in events:
            self._on(event, out)
        return out

    def _on(self, event: h2.events.Event, out: list[Event]) -> None:
        if isinstance(event, h2.events.RequestReceived | h2.events.ResponseReceived):
            assert event.stream_id is not None and event.headers is not None
            headers = {str(k): str(v) for k, v in event.headers}  # str: header_encoding
            self._partial[event.stream_id] = (headers, bytearray())
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            length = event.flow_controlled_length or 0
            self.conn.acknowledge_received_data(length, event.stream_id)
            entry = self._partial.get(event.stream_id)
            if entry is not None:
                entry[1].extend(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            head, body = self._partial.pop(event.stream_id, ({}, bytearray()))
            out.append(MessageReceived(stream_id=event.stream_id, headers=head, body=bytes(body)))
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self._partial.pop(event.stream_id, None)
            self._outbox.pop(event.stream_id, None)
            out.append(
                StreamReset(stream_id=event.stream_id, error_code=int(event.error_code or 0))
            )
        elif isinstance(event, h2.events.WindowUpdated):
            for stream_id in [event.stream_id] if event.stream_id else list(self._outbox):
                self._pump(stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            out.append(ConnectionEnded(error_code=int(event.error_code or 0)))

    def _pump(self, stream_id: int) -> None:
        view = self._outbox.get(stream_id)
        while view:
            try:
                room = min(
                    self.conn.local_flow_control_window(stream_id),
                    self.conn.max_outbound_frame_size,
                    len(view),
                )
            except h2.exceptions.StreamClosedError:
                room = -1
            if room < 0:
                break
            if room == 0:
                self._outbox[stream_id] = view
                return
            self.conn.send_data(stream_id, bytes(view[:room]), end_stream=room == len(view))
            view = view[room:]
        self._outbox.pop(stream_id, None)


# -- asyncio adapter ------------------------------------------------------------------------
class _Closable(Protocol):
    def close(self) -> None: ...


class _Session(asyncio.Protocol):
    """An HTTP/2 connection on an asyncio TLS transport: feeds the core, writes what it
    produces (one write per batch of received frames), and closes on protocol errors."""

    def __init__(self, *, client_side: bool) -> None:
        self.core = _Core(client_side=client_side)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = peer_name(transport.get_extra_info("ssl_object"))
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.core.receive(data)
        except CoreError as exc:
            log.warning(
                "HTTP/2 protocol error from peer", extra={"peer": self.peer, "reason": str(exc)}
            )
            self.flush()
            self.close()
            return
        for event in events:
            self.on_event(event)
        self.flush()

    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def send(self, stream_id: int, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("connection closed")
        try:
            self.core.send(stream_id, headers, body)
        except CoreError as exc:
            raise ConnectionResetError(str(exc)) from None
        self.flush()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def on_event(self, event: Event) -> None:
        raise NotImplementedError


class TlsServer:
    """What every TLS server of the appliance shares: listening, its port, and a close()
    that also drops open connections (asyncio keeps them otherwise). Stream-based
    subclasses implement :meth:`_connection` for one accepted connection; protocol-based
    ones override :meth:`_listen`."""

    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext) -> None:
        self.handler, self.ssl_ctx = handler, ssl_ctx
        self._server: asyncio.Server | None = None
        self._open: set[_Closable] = set()

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await self._listen(host, port)
        except OSError as exc:
            raise TransportError(
                f"cannot listen on {host}:{port}: {exc.strerror}", code="NET-LISTEN"
            ) from None

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve, host, port, ssl=self.ssl_ctx)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._open):
                conn.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            with contextlib.suppress(asyncio.CancelledError):  # shutdown ends connections
                await self._connection(reader, writer)
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class _ServerSession(_Session):
    """One accepted connection: a handler task per complete request."""

    def __init__(self, server: H2Server) -> None:
        super().__init__(client_side=False)
        self.server = server
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._open.add(self)

    def on_event(self, event: Event) -> None:
        if isinstance(event, MessageReceived):
            head = event.headers
            request = Request(
                head.get(":method", ""), head.get(":path", ""), event.body, head, self.peer
            )
            task = asyncio.get_running_loop().create_task(self._respond(event.stream_id, request))
            self.tasks[event.stream_id] = task
        elif isinstance(event, StreamReset):
            if event.stream_id in self.tasks:
                self.tasks.pop(event.stream_id).cancel()
        elif isinstance(event, ConnectionEnded):
            self.close()

    async def _respond(self, stream_id: int, request: Request) -> None:
        try:
            response = await self.server.handler(request)
        except Exception:  # a handler bug must not kill the connection, but must be seen
            log.exception("request handler failed", extra={"path": request.path})
            response = Response(500, b'{"message":"internal error"}')
        finally:
            self.tasks.pop(stream_id, None)
        head = [
            (":status", str(response.status)),
            ("content-length", str(len(response.body))),
            *response.headers.items(),
        ]
        with contextlib.suppress(ConnectionError):  # the client went away meanwhile
            self.send(stream_id, head, response.body)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server._open.discard(self)
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()


class H2Server(TlsServer):
    """Serve ``handler`` on every HTTP/2 connection accepted with the given TLS context."""

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _ServerSession(self), host, port, ssl=self.ssl_ctx)


class _ClientSession(_Session):
    """The client's connection: each response completes the future of its stream."""

    def __init__(self) -> None:
        super().__init__(client_side=True)
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self.failure = "connection closed by peer"

    def on_event(self, event: Event) -> None:
        if isinstance(event, MessageReceived):
            future = self.pending.pop(event.stream_id, None)
            if future is not None and not future.done():
                status = event.headers.get(":status", "0")
                future.set_result(Response(int(status), event.body, event.headers))
        elif isinstance(event, StreamReset):
            future = self.pending.pop(event.stream_id, None)
            if future is not None and not future.done():
                future.set_exception(ConnectionResetError("stream reset by peer"))
        elif isinstance(event, ConnectionEnded):
            self.failure = "peer closed the connection"
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionResetError(self.failure))


class H2Client:
    """Requests to one peer over one multiplexed, self-reconnecting connection."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_ctx: ssl.SSLContext,
        *,
        expect_peer: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host, self.port, self.ssl_ctx = host, port, ssl_ctx
        self.expect_peer, self.timeout = expect_peer, timeout
        self._session: _ClientSession | None = None
        self._connecting = asyncio.Lock()
        self._waiting: list[asyncio.Future[None]] = []
        self._authority = f"{host}:{port}"

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request and wait for its response (TransportError on failure)."""
        session = self._session
        if session is None or session.closed:
            session = await self._connect()
        while len(session.pending) >= min(session.core.peer_max_streams, MAX_STREAMS):
            await self._wait_for_slot()
            session = await self._connect()
        try:
            return await self._exchange(session, method, path, body, headers)
        finally:
            if self._waiting:
                waiter = self._waiting.pop(0)
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        await waiter

    async def _exchange(
        self,
        session: _ClientSession,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str] | None,
    ) -> Response:
        loop = asyncio.get_running_loop()
        stream_id = session.core.next_stream_id()
        future: asyncio.Future[Response] = loop.create_future()
        session.pending[stream_id] = future
        head = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self._authority),
            (":path", path),
            ("content-length", str(len(body))),
        ]
        if headers:
            head.extend(headers.items())
        timer = loop.call_later(self.timeout, _expire, future)
        try:
            session.send(stream_id, head, body)
            return await future
        except ConnectionError as exc:
            self._drop(session)
            raise TransportError(f"{self._authority}: {exc}") from None
        except TimeoutError:
            session.pending.pop(stream_id, None)
            raise TransportError(f"{self._authority}: no response in {self.timeout} s") from None
        finally:
            timer.cancel()

    async def close(self) -> None:
        if self._session is not None:
            self._drop(self._session)

    def _drop(self, session: _ClientSession) -> None:
        session.close()
        if self._session is session:
            self._session = None

    async def _connect(self) -> _ClientSession:
        async with self._connecting:
            if self._session is not None and not self._session.closed:
                return self._session
            loop = asyncio.get_running_loop()
            try:
                _, session = await asyncio.wait_for(
                    loop.create_connection(_ClientSession, self.host, self.port, ssl=self.ssl_ctx),
                    self.timeout,
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                raise TransportError(
                    f"{self._authority}: cannot connect ({exc.__class__.__name__})"
                ) from None
            if self.expect_peer is not None and session.peer != self.expect_peer:
                session.close()
                raise TransportError(
                    f"{self._authority}: peer is {session.peer!r}, expected {self.expect_peer!r}"
                )
            self._session = session
            return session


def _expire(future: asyncio.Future[Response]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
