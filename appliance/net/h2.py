"""HTTP/2 (RFC 9113) over mutual TLS for the inter-KMS interfaces, on asyncio.

:class:`H2Server` calls an async handler per request stream and sends its response;
:class:`H2Client` multiplexes concurrent requests over one connection and reconnects after a
failure. Both identify the peer by the CN of its verified certificate. Flow control is
honoured both ways (receive windows are topped up as they are used, and bodies wait in an
outbox for window), and the windows are opened wide, since the peers are trusted nodes
exchanging small messages at high rates. Errors surface as :class:`TransportError`; a
peer that breaks the protocol gets GOAWAY and the connection is closed.

Cost matters here: a relay crosses up to 14 hops, each one exchange. So the protocol work
is done by the lean sans-IO core of :mod:`appliance.net.h2core` (whole messages, no general
state machine), the connection is an ``asyncio.Protocol`` (no reader task, no stream
buffers), and a batch of received frames is answered with one socket write. This module
only moves bytes between the TLS transport and the core, and runs handlers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import msgspec

from appliance.config.addresses import join_host_port
from appliance.errors import ApplianceError
from appliance.net import tls
from appliance.net.h2core import (
    CANCEL,
    MAX_STREAMS,
    NODES,
    Connection,
    ConnectionEnded,
    Event,
    H2ProtocolError,
    Limits,
    MessageReceived,
    StreamReset,
)
from appliance.pki import peer_name

log = logging.getLogger("qkdn.net")


class TransportError(ApplianceError):
    """The peer is unreachable, refused us, or broke the connection."""

    code = "NET"


class Request(msgspec.Struct):
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    peer: str | None = None
    """CN of the client certificate."""


class Response(msgspec.Struct):
    status: int
    body: bytes = b""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    on_written: Callable[[bool], None] | None = None
    """Told ``True`` once the response is handed to its connection, ``False`` if the
    connection was gone first (HTTP/1.1 server; a dec_keys answer releases its keys)."""
    at_once: bool = False
    """Write it in this very step, not with the answers of this round (HTTP/2 server): an
    answer whose accounting was just committed leaves before anything else can run."""


Handler = Callable[[Request], Awaitable[Response]]


# -- asyncio adapter ------------------------------------------------------------------------
class _Closable(Protocol):
    def close(self) -> None: ...


class _Session(asyncio.Protocol):
    """An HTTP/2 connection on an asyncio TLS transport: feeds the core, writes what it
    produces (one write per batch of received frames), and closes on protocol errors."""

    def __init__(self, *, client_side: bool, limits: Limits = NODES) -> None:
        self.core = Connection(client_side=client_side, limits=limits)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.closed = False
        self._flush_pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.peer = peer_name(transport.get_extra_info("ssl_object"))
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.core.receive(data)
        except H2ProtocolError as exc:  # the core queued GOAWAY
            log.warning(
                "HTTP/2 protocol error from peer",
                extra={"peer": self.peer, "error_code": exc.error_code, "reason": str(exc)},
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

    def flush_soon(self) -> None:
        """Write once this round of the event loop is done: the messages that several tasks
        produce in one round leave in one TLS record and one send()."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_pending = False
        self.flush()

    def close(self) -> None:
        """GOAWAY if the connection is still up, then close the socket."""
        if not self.closed and self.transport is not None:
            self.core.close()
            self.flush()
            self.transport.close()
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def on_event(self, event: Event) -> None:
        raise NotImplementedError


class TlsServer:
    """What every TLS server of the appliance shares: listening, its port, and a close()
    that also drops open connections (asyncio keeps them otherwise). Subclasses make the
    protocol object of each accepted connection (:meth:`_session`)."""

    ALERTS = False
    """Whether a refused handshake sends its TLS alert (:func:`tls.alerting`: the loop's
    own TLS, the handshake through a little Python). The SAE edge, whose clients are not
    ours, has it; the servers between nodes (every relay hop) need not."""

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
        loop = asyncio.get_running_loop()
        if not self.ALERTS:
            return await loop.create_server(self._session, host, port, ssl=self.ssl_ctx)
        return await loop.create_server(
            self._session,
            host,
            port,
            ssl=tls.alerting(self.ssl_ctx),
            ssl_handshake_timeout=tls.HANDSHAKE_TIMEOUT,
        )

    def _session(self) -> asyncio.Protocol:
        raise NotImplementedError

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


class _ServerSession(_Session):
    """One accepted connection: a handler task per complete request."""

    def __init__(self, server: TlsServer, limits: Limits = NODES) -> None:
        super().__init__(client_side=False, limits=limits)
        self.server = server
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.draining = False
        """GOAWAY received: answer what is in progress, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server._open.add(self)

    def on_event(self, event: Event) -> None:
        if isinstance(event, MessageReceived):
            head = event.headers
            request = Request(head[":method"], head[":path"], event.body, head, self.peer)
            task = asyncio.get_running_loop().create_task(self._respond(event.stream_id, request))
            self.tasks[event.stream_id] = task
        elif isinstance(event, StreamReset):
            if event.stream_id in self.tasks:
                self.tasks.pop(event.stream_id).cancel()
        elif isinstance(event, ConnectionEnded):
            self.draining = True
            if not self.tasks:
                self.close()

    async def _respond(self, stream_id: int, request: Request) -> None:
        try:
            response = await self.server.handler(request)
        except Exception:  # a handler bug must not kill the connection, but must be seen
            log.exception("request handler failed", extra={"path": request.path})
            response = Response(500, b'{"message":"internal error"}')
        finally:
            self.tasks.pop(stream_id, None)
        head = [(":status", str(response.status)), ("content-length", str(len(response.body)))]
        if response.headers:
            head.extend(response.headers.items())
        written = self.core.answerable(stream_id) and not self.closed
        self.core.send(stream_id, head, response.body)  # a no-op if the stream is gone
        if self.tasks and not response.at_once:  # other answers on their way: send together
            self.flush_soon()
        else:
            self.flush()
        if response.on_written is not None:
            response.on_written(written)
        if self.draining and not self.tasks:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server._open.discard(self)
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()


class H2Server(TlsServer):
    """Serve ``handler`` on every HTTP/2 connection accepted with the given TLS context."""

    def _session(self) -> asyncio.Protocol:
        return _ServerSession(self)


class _ClientSession(_Session):
    """The client's connection: each response completes the future of its stream; a failure
    fails it with a TransportError (a reset stream or GOAWAY spares the other streams)."""

    def __init__(self, authority: str) -> None:
        super().__init__(client_side=True)
        self.authority = authority
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self.draining = False
        """GOAWAY received: no new requests here."""
        self.failure = "connection closed by peer"

    @property
    def usable(self) -> bool:
        return not (self.closed or self.draining)

    def on_event(self, event: Event) -> None:
        if isinstance(event, MessageReceived):
            future = self.pending.pop(event.stream_id, None)
            if future is not None and not future.done():
                status = int(event.headers[":status"])
                future.set_result(Response(status, event.body, event.headers))
            if self.draining and not self.pending:
                self.close()
        elif isinstance(event, StreamReset):
            who = "the peer" if event.remote else "us (malformed response)"
            self.fail(event.stream_id, f"stream reset by {who} (error {event.error_code})")
        elif isinstance(event, ConnectionEnded):
            self._goaway(event)

    def fail(self, stream_id: int, reason: str) -> None:
        future = self.pending.pop(stream_id, None)
        if future is not None and not future.done():
            future.set_exception(TransportError(f"{self.authority}: {reason}"))

    def _goaway(self, event: ConnectionEnded) -> None:
        """Streams the peer will not answer fail now; the others may still complete."""
        self.draining = True
        self.failure = f"peer closed the connection (GOAWAY {event.error_code})"
        for stream_id in [s for s in self.pending if s > event.last_stream_id]:
            self.fail(stream_id, self.failure)
        if not self.pending:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for stream_id in list(self.pending):
            self.fail(stream_id, self.failure)


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
        self._authority = join_host_port(host, port)  # an IPv6 host in brackets

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request and wait for its response (TransportError on failure)."""
        session = self._session
        if session is None or not session.usable:
            session = await self._connect()
        while len(session.pending) >= min(session.core.peer_max_streams, MAX_STREAMS):
            await self._wait_for_slot()
            session = await self._connect()
        try:
            return await self._exchange(session, method, path, body, headers)
        finally:
            self._wake_one()

    async def connect(self) -> None:
        """Open the connection now unless it is open (TransportError if it cannot be)."""
        session = self._session
        if session is None or not session.usable:
            await self._connect()

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        await waiter

    def start(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> asyncio.Future[Response] | None:
        """:meth:`request` without a coroutine, when the connection is up and has a free
        stream: the future of the response (TransportError or TimeoutError on failure).
        None when it cannot start at once: then use :meth:`request`."""
        session = self._session
        if (
            session is None
            or not session.usable
            or self._waiting
            or len(session.pending) >= min(session.core.peer_max_streams, MAX_STREAMS)
        ):
            return None
        stream_id = session.core.next_stream_id()
        if stream_id is None:
            return None
        future, timer = self._send(session, stream_id, method, path, body, headers)
        future.add_done_callback(functools.partial(self._started_done, session, stream_id, timer))
        return future

    def _started_done(
        self,
        session: _ClientSession,
        stream_id: int,
        timer: asyncio.TimerHandle,
        _: asyncio.Future[Response],
    ) -> None:
        self._finish(session, stream_id, timer)
        self._wake_one()

    async def _exchange(
        self,
        session: _ClientSession,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str] | None,
    ) -> Response:
        stream_id = session.core.next_stream_id()
        if not session.usable:
            raise TransportError(f"{self._authority}: {session.failure}")
        if stream_id is None:  # stream IDs used up: the next request opens a new connection
            self._drop(session)
            raise TransportError(f"{self._authority}: connection worn out, retry")
        future, timer = self._send(session, stream_id, method, path, body, headers)
        try:
            return await future
        except TimeoutError:
            raise TransportError(f"{self._authority}: no response in {self.timeout} s") from None
        finally:
            self._finish(session, stream_id, timer)

    def _send(
        self,
        session: _ClientSession,
        stream_id: int,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str] | None,
    ) -> tuple[asyncio.Future[Response], asyncio.TimerHandle]:
        """Send a request on a fresh stream: the future of its response, and its timer."""
        loop = asyncio.get_running_loop()
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
        session.core.send(stream_id, head, body)
        if len(session.pending) > 1:  # others are sending too: one write for all
            session.flush_soon()
        else:
            session.flush()
        return future, timer

    @staticmethod
    def _finish(session: _ClientSession, stream_id: int, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if session.pending.pop(stream_id, None) is not None:  # timed out or cancelled
            session.core.reset(stream_id, CANCEL)
            session.flush()

    def _wake_one(self) -> None:
        """A stream is free again: let one request waiting for a slot go."""
        while self._waiting:
            waiter = self._waiting.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    async def close(self) -> None:
        if self._session is not None:
            self._drop(self._session)

    def _drop(self, session: _ClientSession) -> None:
        session.close()
        if self._session is session:
            self._session = None

    async def _connect(self) -> _ClientSession:
        async with self._connecting:
            if self._session is not None and self._session.usable:
                return self._session
            if self._session is not None and not self._session.pending:
                self._drop(self._session)  # a drained connection has done its work
            loop = asyncio.get_running_loop()
            try:
                _, session = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _ClientSession(self._authority),
                        self.host,
                        self.port,
                        ssl=self.ssl_ctx,
                    ),
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


# -- the SAE edge ----------------------------------------------------------------------------
EDGE = Limits(streams=32, body=1 << 20, header_list=1 << 16, window=1 << 20)
"""What an SAE's HTTP/2 connection may hold, as its HTTP/1.1 connection may
(:mod:`appliance.net.http1`): 32 requests at once, 1 MiB of body and 64 KiB of header
each, and a 1 MiB receive window per stream and for the connection."""


class Gate(Protocol):
    """What the SAE edge server keeps for all its connections (:class:`http1.H1Server`)."""

    request_timeout: float
    idle_timeout: float

    def admit(self, peer: str | None) -> bool:
        """Count a connection of ``peer`` (False: it already holds as many as allowed)."""
        ...

    def release(self, peer: str | None) -> None: ...

    def too_many(self) -> Response:
        """The answer to every request of a connection beyond the SAE's cap."""
        ...


class EdgeSession(_ServerSession):
    """An SAE's HTTP/2 connection at the ETSI 014 edge (chosen by ALPN beside HTTP/1.1).

    Bounded like an HTTP/1.1 connection: :data:`EDGE` limits; a connection beyond the
    SAE's cap answers its first request with the gate's 503 and closes; a connection that
    sends nothing for ``request_timeout`` while a request is incomplete, or for
    ``idle_timeout`` while nothing is under way, gets GOAWAY and is closed. A dec_keys
    answer hears whether it was handed to the connection (``Response.on_written``)."""

    def __init__(self, server: TlsServer, gate: Gate) -> None:
        super().__init__(server, EDGE)
        self.gate = gate
        self.admitted = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.admitted = self.gate.admit(self.peer)
        self._last = asyncio.get_running_loop().time()
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._last = asyncio.get_running_loop().time()
        super().data_received(data)

    def on_event(self, event: Event) -> None:
        if isinstance(event, MessageReceived) and not self.admitted:
            response = self.gate.too_many()
            head = [(":status", str(response.status)), ("content-type", "application/json")]
            self.core.send(event.stream_id, head, response.body)
            self.close()
            return
        super().on_event(event)

    def _arm(self) -> None:
        if not self.closed:
            wait = min(self.gate.request_timeout, self.gate.idle_timeout)
            self._timer = asyncio.get_running_loop().call_later(wait, self._check)

    def _check(self) -> None:
        """Close a connection that keeps a request incomplete, or sits idle, too long."""
        self._timer = None
        if self.closed:
            return
        quiet = asyncio.get_running_loop().time() - self._last
        receiving = self.core.open_streams > len(self.tasks)
        if (receiving and quiet >= self.gate.request_timeout) or (
            not self.core.open_streams and quiet >= self.gate.idle_timeout
        ):
            log.info("SAE HTTP/2 connection closed: too slow or idle", extra={"peer": self.peer})
            self.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._timer is not None:
            self._timer.cancel()
        if self.admitted:
            self.admitted = False
            self.gate.release(self.peer)
