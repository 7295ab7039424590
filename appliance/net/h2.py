"""HTTP/2 (RFC 9113) over mutual TLS for the inter-KMS interfaces, on asyncio and ``h2``.

:class:`H2Server` calls an async handler per request stream and sends its response;
:class:`H2Client` multiplexes concurrent requests over one connection and reconnects after a
failure. Both identify the peer by the CN of its verified certificate. Flow control is
honoured both ways (every received DATA frame is acknowledged, and sends wait for window),
and the windows are opened wide, since the peers are trusted nodes exchanging small
messages at high rates. Errors surface as :class:`TransportError`, never as h2 exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from appliance.errors import ApplianceError
from appliance.pki import peer_name

log = logging.getLogger("qkdn.net")
WINDOW = 1 << 24
READ_CHUNK = 1 << 16
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


class _Channel:
    """One HTTP/2 connection: the h2 state machine, the socket writer and flow control."""

    def __init__(self, conn: h2.connection.H2Connection, writer: asyncio.StreamWriter) -> None:
        self.conn, self.writer = conn, writer
        self.window_open: dict[int, asyncio.Event] = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def open_windows(self) -> None:
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            }
        )
        self.conn.increment_flow_control_window(WINDOW)

    def on_window(self, stream_id: int) -> None:
        targets = self.window_open.values() if stream_id == 0 else [self.window_open.get(stream_id)]
        for event in targets:
            if event is not None:
                event.set()

    async def send(self, stream_id: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Headers, then the body as the flow-control windows allow; one socket write per
        message unless it has to wait for window (small writes cost a TLS record each)."""
        self.conn.send_headers(stream_id, headers, end_stream=not body)
        view = memoryview(body)
        while view:
            room = min(
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size,
                len(view),
            )
            if room <= 0:
                event = self.window_open.setdefault(stream_id, asyncio.Event())
                event.clear()
                self.flush()
                await event.wait()
                continue
            self.conn.send_data(stream_id, bytes(view[:room]), end_stream=room == len(view))
            view = view[room:]
        self.flush()
        self.window_open.pop(stream_id, None)
        await self.writer.drain()


def _headers(raw: list[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in raw}


class TlsServer:
    """What every TLS server of the appliance shares: listening, its port, and a close()
    that also drops open connections (asyncio keeps them otherwise). Subclasses implement
    :meth:`_connection` for one accepted connection."""

    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext) -> None:
        self.handler, self.ssl_ctx = handler, ssl_ctx
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, host, port, ssl=self.ssl_ctx)
        except OSError as exc:
            raise TransportError(
                f"cannot listen on {host}:{port}: {exc.strerror}", code="NET-LISTEN"
            ) from None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            with contextlib.suppress(asyncio.CancelledError):  # shutdown ends connections
                await self._connection(reader, writer)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class H2Server(TlsServer):
    """Serve ``handler`` on every HTTP/2 connection accepted with the given TLS context."""

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_name(writer.get_extra_info("ssl_object"))
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        chan = _Channel(conn, writer)
        conn.initiate_connection()
        chan.open_windows()
        chan.flush()
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        tasks: set[asyncio.Task[None]] = set()
        try:
            while data := await reader.read(READ_CHUNK):
                for event in conn.receive_data(data):
                    self._on_event(event, chan, streams, tasks, peer)
                chan.flush()
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:  # the base class closes the connection
            for task in tasks:
                task.cancel()

    def _on_event(
        self,
        event: h2.events.Event,
        chan: _Channel,
        streams: dict[int, tuple[dict[str, str], bytearray]],
        tasks: set[asyncio.Task[None]],
        peer: str | None,
    ) -> None:
        if isinstance(event, h2.events.RequestReceived):
            streams[event.stream_id] = (_headers(event.headers), bytearray())  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            streams[event.stream_id][1].extend(event.data)
            chan.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            headers, body = streams.pop(event.stream_id)
            request = Request(
                headers.get(":method", ""), headers.get(":path", ""), bytes(body), headers, peer
            )
            task = asyncio.create_task(self._respond(chan, event.stream_id, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif isinstance(event, h2.events.StreamReset):
            streams.pop(event.stream_id, None)
        elif isinstance(event, h2.events.WindowUpdated):
            chan.on_window(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            chan.writer.close()

    async def _respond(self, chan: _Channel, stream_id: int, request: Request) -> None:
        try:
            response = await self.handler(request)
        except Exception:  # a handler bug must not kill the connection, but must be seen
            log.exception("request handler failed", extra={"path": request.path})
            response = Response(500, b'{"message":"internal error"}')
        headers = [
            (":status", str(response.status)),
            ("content-length", str(len(response.body))),
            *response.headers.items(),
        ]
        with contextlib.suppress(
            h2.exceptions.StreamClosedError, ConnectionError, h2.exceptions.ProtocolError
        ):
            await chan.send(stream_id, headers, response.body)


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
        self._chan: _Channel | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[Response], dict[str, str], bytearray]] = {}
        self._connecting = asyncio.Lock()
        self._slots = asyncio.Semaphore(100)  # RFC 9113's recommended minimum the peer allows

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request and wait for its response (TransportError on failure)."""
        async with self._slots:
            return await self._request(method, path, body, headers)

    async def _request(
        self, method: str, path: str, body: bytes, headers: dict[str, str] | None
    ) -> Response:
        chan = await self._connect()
        stream_id = chan.conn.get_next_available_stream_id()
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = (future, {}, bytearray())
        head = [
            (":method", method),
            (":path", path),
            (":scheme", "https"),
            (":authority", f"{self.host}:{self.port}"),
            ("content-length", str(len(body))),
            *(headers or {}).items(),
        ]
        try:
            await chan.send(stream_id, head, body)
            return await asyncio.wait_for(future, self.timeout)
        except (ConnectionError, h2.exceptions.ProtocolError, ssl.SSLError) as exc:
            self._drop(f"{exc.__class__.__name__}")
            raise TransportError(f"{self.host}:{self.port}: connection lost") from None
        except TimeoutError:
            self._pending.pop(stream_id, None)
            raise TransportError(
                f"{self.host}:{self.port}: no response in {self.timeout} s"
            ) from None

    async def close(self) -> None:
        self._drop("closed")
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task

    async def _connect(self) -> _Channel:
        async with self._connecting:
            if self._chan is not None and not self._chan.writer.is_closing():
                return self._chan
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, ssl=self.ssl_ctx), self.timeout
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                raise TransportError(
                    f"{self.host}:{self.port}: cannot connect ({exc.__class__.__name__})"
                ) from None
            peer = peer_name(writer.get_extra_info("ssl_object"))
            if self.expect_peer is not None and peer != self.expect_peer:
                writer.close()
                raise TransportError(
                    f"{self.host}:{self.port}: peer is {peer!r}, expected {self.expect_peer!r}"
                )
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
            )
            chan = _Channel(conn, writer)
            conn.initiate_connection()
            chan.open_windows()
            chan.flush()
            self._chan = chan
            self._reader_task = asyncio.create_task(self._read(chan, reader))
            return chan

    async def _read(self, chan: _Channel, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(READ_CHUNK):
                for event in chan.conn.receive_data(data):
                    self._on_event(chan, event)
                chan.flush()
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        if self._chan is chan:
            self._drop("connection closed by peer")

    def _on_event(self, chan: _Channel, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            entry = self._pending.get(event.stream_id)
            if entry:
                entry[1].update(_headers(event.headers))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            chan.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            entry = self._pending.get(event.stream_id)
            if entry:
                entry[2].extend(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            entry = self._pending.pop(event.stream_id, None)
            if entry and not entry[0].done():
                headers = entry[1]
                entry[0].set_result(
                    Response(int(headers.get(":status", "0")), bytes(entry[2]), headers)
                )
        elif isinstance(event, h2.events.StreamReset):
            entry = self._pending.pop(event.stream_id, None)
            if entry and not entry[0].done():
                entry[0].set_exception(TransportError("stream reset by peer"))
        elif isinstance(event, h2.events.WindowUpdated):
            chan.on_window(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._drop("peer closed the connection")

    def _drop(self, reason: str) -> None:
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.writer.close()
        pending, self._pending = self._pending, {}
        for future, _, _ in pending.values():
            if not future.done():
                future.set_exception(TransportError(f"{self.host}:{self.port}: {reason}"))
