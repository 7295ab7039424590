"""HTTP/1.1 over mutual TLS (for ETSI GS QKD 014 clients), on asyncio.

Same :class:`Request`/:class:`Response` types and handler signature as the HTTP/2 server.
Connections are kept alive (HTTP/1.0 clients close unless they ask otherwise). A refused
request gets a JSON error (014 clients parse a JSON body on every non-200 reply:
``{"message", "details": [{"reason"}]}``) and the connection is closed after it; the
handler is never called with an unparsed request.

The parser is :class:`RequestParser`, sans-IO (bytes in, :class:`Message` out) around
llhttp (``httptools``, the parser of Node.js), used strictly: CRLF line ends only (a
request with bare LF ends is refused with 400, not waited on), no obsolete line folding,
one ``Content-Length`` of ASCII digits and never with ``Transfer-Encoding``, which must be
exactly ``chunked``; HTTP/1.0 and 1.1 only, no protocol upgrade. Every byte it holds is
bounded as it arrives: at most :data:`MAX_HEAD` bytes of head (431), at most
:data:`MAX_BODY` bytes of body (413, for a ``Content-Length`` as soon as the head is read,
for a chunked body as soon as the bytes received pass it: llhttp does not show a chunk's
declared size). ``Expect: 100-continue`` is answered, so clients like curl do not pause
before sending a body.

The session is an ``asyncio.Protocol`` (no stream reader, no task per connection): on a
UKMS the 014 server is on the path of every key request, and a general HTTP library cost
several times more. It answers requests in order, at most :data:`MAX_PIPELINED` waiting; a
request must arrive whole within ``request_timeout`` of its first byte (else 408), an idle
connection is closed after ``idle_timeout``, and each client certificate (SAE) may hold at
most ``max_per_sae`` connections: the next ones get 503 on their first request. Deadlines
run on the event loop's clock (``loop.time``), the seam the tests move.

**HTTP/2 on the same port.** When the server is made with ``h2=True``, its TLS context
offers ``h2`` by ALPN and the client chooses it, the connection is an HTTP/2 one
(:class:`appliance.net.h2.EdgeSession`, on the project's sans-IO core), bounded alike:
32 streams at once, 1 MiB of body and 64 KiB of header per request, 1 MiB receive
windows, the same cap of connections per SAE, and the same request and idle deadlines.
The handler cannot tell the two apart.

What this module must never do: let a malformed request reach the handler, let an
exception escape ``data_received``, or hold a byte it has not bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple, cast

import httptools

from appliance.net.h2 import EdgeSession, Handler, Request, Response, TlsServer
from appliance.pki import peer_name

log = logging.getLogger("qkdn.net")
HandlerNow = Callable[[Request], "Response | None"]
"""A handler's direct path: the response at once, or None (the request goes the usual way)."""
MAX_BODY = 1 << 20
MAX_HEAD = 1 << 16
MAX_FRAMING = 1 << 16
"""Bytes of chunk framing (size lines, extensions, trailers) between two pieces of data."""
MAX_PIPELINED = 32
REQUEST_TIMEOUT = 10.0
"""Seconds from a request's first byte to its last."""
IDLE_TIMEOUT = 60.0
"""Seconds a connection may wait for a request (after it opens or after a response)."""
MAX_PER_SAE = 64
"""Connections one client certificate may hold open at once."""
REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_IDLE, _HEAD, _BODY = 0, 1, 2  # what the parser is in the middle of
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Message(NamedTuple):
    """A complete, accepted request."""

    method: str
    target: str
    headers: dict[str, str]
    """Lower-case names; repeated fields joined with ", "."""
    body: bytes
    keep_alive: bool


class MalformedRequest(ValueError):
    """The bytes received are not an acceptable HTTP/1.1 request: answer ``status``, close.
    ``requests`` are the complete requests that came before the fault in the same feed."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status
        self.requests: list[Message] = []


class RequestParser:
    """Sans-IO: :meth:`feed` bytes, get the complete requests; :class:`MalformedRequest`
    on anything else (after which the parser takes nothing more). ``wants_continue`` is
    set when a request's head asks for ``100-continue`` and none of its body has arrived;
    ``in_request`` while a request has begun and is not complete; ``started`` counts the
    requests begun."""

    def __init__(self) -> None:
        self._llhttp = httptools.HttpRequestParser(self)
        self._done: list[Message] = []
        self._room = MAX_PIPELINED
        self._phase = _IDLE
        self._mark = 0  # moves when the head begins or ends, and at each piece of body
        self._spanned = 0  # bytes of the feeds since the mark last moved
        self._head_size = 0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._refusal: MalformedRequest | None = None
        self.started = 0
        self.wants_continue = False

    @property
    def in_request(self) -> bool:
        return self._phase != _IDLE

    def feed(self, data: bytes, room: int = MAX_PIPELINED) -> list[Message]:
        """The requests completed by ``data``; at most ``room`` of them may be (the session's
        queue of unanswered requests has the rest of :data:`MAX_PIPELINED`)."""
        if self._refusal is not None:
            raise MalformedRequest(str(self._refusal), self._refusal.status)
        self._room, mark = room, self._mark
        try:
            self._llhttp.feed_data(data)
            if self._phase != _IDLE and self._mark == mark:
                self._spanned += len(data)  # all of data is head, or framing of the body
                self._check_spanned()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, MalformedRequest) as exc:
            refusal = self._refusal or MalformedRequest(_llhttp_reason(exc))
            self._refusal, refusal.requests, self._done = refusal, self._done, []
            raise refusal from (None if exc is refusal else exc)
        out, self._done = self._done, []
        return out

    def _check_spanned(self) -> None:
        """Bound what llhttp's wrapper accumulates across feeds (a header or trailer field
        arriving in pieces), which no callback reports until the field is complete: the
        feeds since the head began, or since the last byte of body data."""
        if self._phase == _HEAD and self._spanned > MAX_HEAD:
            self._refuse("request head too large", 431)
        if self._phase == _BODY and self._spanned > MAX_FRAMING:
            self._refuse("chunked framing (extensions, trailers) too large", 413)

    def _refuse(self, reason: str, status: int = 400) -> None:
        self._refusal = MalformedRequest(reason, status)
        raise self._refusal

    # -- llhttp callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._phase, self._mark, self._spanned = _HEAD, self._mark + 1, 0
        self.started += 1
        self._head_size, self._url, self._headers, self._body_size = 0, b"", {}, 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            self._refuse("request head too large", 431)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase != _HEAD:
            return  # a trailer field of a chunked body: ignored (bounded by _check_spanned)
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            self._refuse("request head too large", 431)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").rstrip(" \t")  # llhttp drops the leading blanks
        headers = self._headers
        if key in headers:
            if key in ("content-length", "host", "transfer-encoding"):
                self._refuse(f"repeated {key}")
            text = f"{headers[key]}, {text}"
        headers[key] = text

    def on_headers_complete(self) -> None:
        llhttp, headers = self._llhttp, self._headers
        version = llhttp.get_http_version()
        if version != "1.1" and version != "1.0":
            self._refuse(f"HTTP/{version} is not supported", 505)
        if llhttp.should_upgrade():
            self._refuse("protocol upgrade (or CONNECT) is not supported")
        if version == "1.1" and "host" not in headers:
            self._refuse("missing Host header")
        if "content-length" in headers or "transfer-encoding" in headers:
            self._check_body_headers(headers)
        self._phase, self._mark, self._spanned = _BODY, self._mark + 1, 0

    def _check_body_headers(self, headers: dict[str, str]) -> None:
        coding = headers.get("transfer-encoding")
        if coding is not None and coding.lower() != "chunked":
            self._refuse("unsupported transfer coding")
        length = headers.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):  # llhttp refuses these first
            self._refuse("bad Content-Length")
        digits = length.lstrip("0")  # llhttp bounds the value, not the leading zeros
        if len(digits) > 9 or int(digits or "0") > MAX_BODY:
            self._refuse("request body too large", 413)
        self.wants_continue = headers.get("expect", "").lower() == "100-continue" and (
            digits != "" or coding is not None
        )

    def on_body(self, body: bytes) -> None:
        self.wants_continue, self._mark, self._spanned = False, self._mark + 1, 0
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            self._refuse("request body too large", 413)
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if len(self._done) >= self._room:
            self._refuse("too many pipelined requests")
        self._done.append(
            Message(
                self._llhttp.get_method().decode("ascii"),
                self._url.decode("latin-1"),
                self._headers,
                b"".join(self._chunks),
                self._llhttp.should_keep_alive(),
            )
        )
        self._phase, self.wants_continue, self._chunks = _IDLE, False, []


def _llhttp_reason(exc: Exception) -> str:
    if isinstance(exc, httptools.HttpParserUpgrade):
        return "protocol upgrade is not supported"
    return str(exc) or type(exc).__name__


def encode_response(response: Response, *, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}"]
    lines.append(f"content-length: {len(response.body)}")
    lines.extend(f"{k}: {v}" for k, v in response.headers.items() if k != "content-length")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


def json_error(status: int, message: str, reason: str) -> Response:
    """An error in the 014 shape: ``{"message", "details": [{"reason"}]}``."""
    body = json.dumps({"message": message, "details": [{"reason": reason}]}).encode()
    return Response(status, body, {"content-type": "application/json"})


def _refusal_response(exc: MalformedRequest) -> Response:
    titles = {413: "Request body too large", 431: "Request head too large"}
    return json_error(exc.status, titles.get(exc.status, "Malformed HTTP request"), str(exc))


class _H1Session(asyncio.Protocol):
    """One connection: requests are answered in order, one at a time. The queue holds the
    requests not yet answered and, last, the refusal that ends the connection."""

    def __init__(self, server: H1Server) -> None:
        self.server, self.parser = server, RequestParser()
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.peer: str | None = None
        self.admitted = False  # counted against the server's cap for this SAE
        self.queue: deque[Message | Response] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closing = self.broken = False
        self._timed: int | None = None  # the deadline's subject: -1 idle, else a request
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()
        self.peer = peer_name(transport.get_extra_info("ssl_object"))
        self.server._open.add(self)
        self.admitted = self.server.admit(self.peer)
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.queue.extend(self.parser.feed(data, MAX_PIPELINED - len(self.queue)))
        except MalformedRequest as exc:
            self.queue.extend(exc.requests)
            self._end_with(_refusal_response(exc))
        if self.queue and self.task is None and self.server.handler_now is not None:
            self._answer_now(self.server.handler_now)
        if self.queue and self.task is None:
            self.task = cast(asyncio.AbstractEventLoop, self.loop).create_task(self._answer())
        self._watch()
        self._maybe_continue()

    def _end_with(self, response: Response) -> None:
        """Queue the response that ends the connection; read nothing more."""
        self.broken = True
        self.queue.append(response)
        if self.task is None and self.loop is not None:
            self.task = self.loop.create_task(self._answer())

    def _answer_now(self, handler_now: HandlerNow) -> None:
        """The server's direct path: answer at once, in order, the requests at the front of
        the queue that it serves without waiting; the first it does not, and all after
        it, are left to the task (nothing is being answered meanwhile: no task runs)."""
        while self.queue and self.admitted and not self.closing:
            item = self.queue[0]
            if isinstance(item, Response):
                return
            request = Request(item.method, item.target, item.body, item.headers, self.peer)
            try:
                response = handler_now(request)
            except Exception:  # a handler bug must not kill the server, but must be seen
                log.exception("request handler failed", extra={"path": request.path})
                response = json_error(503, "internal error", "the request could not be served")
            if response is None:
                return
            self.queue.popleft()
            self._send(response, item.keep_alive)

    async def _answer(self) -> None:
        while self.queue and not self.closing:
            item = self.queue.popleft()
            if isinstance(item, Response):
                response, keep_alive = item, False
            elif not self.admitted:
                response, keep_alive = self.server.too_many(), False
            else:
                request = Request(item.method, item.target, item.body, item.headers, self.peer)
                response, keep_alive = await self._handle(request), item.keep_alive
            if not self._send(response, keep_alive):
                break
        self.task = None
        self._watch()
        self._maybe_continue()

    def _send(self, response: Response, keep_alive: bool) -> bool:
        """Write ``response`` (closing after it unless ``keep_alive``); False if the
        connection was gone."""
        if self.transport is None or self.transport.is_closing():
            _written(response, False)
            return False
        self.transport.write(encode_response(response, close=not keep_alive))
        _written(response, True)
        if not keep_alive:
            self.close()
        return True

    async def _handle(self, request: Request) -> Response:
        try:
            return await self.server.handler(request)
        except Exception:  # a handler bug must not kill the server, but must be seen
            log.exception("request handler failed", extra={"path": request.path})
            return json_error(503, "internal error", "the request could not be served")

    def _maybe_continue(self) -> None:
        """100 Continue, once nothing before the request waits to be answered."""
        if self.parser.wants_continue and not (self.queue or self.task or self.broken):
            self.parser.wants_continue = False
            if self.transport is not None and not self.closing:
                self.transport.write(_CONTINUE)

    # -- deadlines ------------------------------------------------------------------------
    def _watch(self) -> None:
        """Set the deadline for what the connection waits on from the client: the rest of a
        begun request, or a next request; none while a response is being made."""
        if self.closing:
            return
        if self.parser.in_request and not self.broken:
            if self._timed != self.parser.started:
                self._set_deadline(self.parser.started, self.server.request_timeout)
        elif self.queue or self.task is not None or self.broken:
            self._timed = None
        elif self._timed != -1:
            self._set_deadline(-1, self.server.idle_timeout)

    def _set_deadline(self, subject: int, seconds: float) -> None:
        loop = cast(asyncio.AbstractEventLoop, self.loop)
        self._timed, self._deadline = subject, loop.time() + seconds
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:  # a later deadline is seen when the timer fires
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closing or self._timed is None:
            return
        loop = cast(asyncio.AbstractEventLoop, self.loop)
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._on_timer)
        elif self._timed == -1:
            self.close()  # idle: nothing is owed to the client
        else:
            self._timed = None
            seconds = self.server.request_timeout
            self._end_with(
                json_error(408, "Request timeout", f"the request was not complete in {seconds} s")
            )

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server._open.discard(self)
        if self.admitted:
            self.admitted = False
            self.server.release(self.peer)
        if self._timer is not None:
            self._timer.cancel()
        if self.task is not None:
            self.task.cancel()


class H1Server(TlsServer):
    """Serve ``handler`` over HTTP/1.1 with TLS."""

    ALERTS = True  # the SAE edge: a refused SAE is told why (certificate_required, unknown_ca)

    def __init__(
        self,
        handler: Handler,
        ssl_ctx: ssl.SSLContext,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        max_per_sae: int = MAX_PER_SAE,
        h2: bool = False,
        handler_now: HandlerNow | None = None,
    ) -> None:
        """``h2``: serve HTTP/2 to clients that choose it by ALPN (the context must offer
        ``h2`` beside ``http/1.1``). ``handler_now``: a direct path for HTTP/1.1 requests
        that can be answered without waiting (its Response), tried first; None sends the
        request to ``handler``."""
        super().__init__(handler, ssl_ctx)
        self.h2 = h2
        self.handler_now = handler_now
        self.request_timeout, self.idle_timeout = request_timeout, idle_timeout
        self.max_per_sae = max_per_sae
        self._per_sae: Counter[str | None] = Counter()

    def admit(self, peer: str | None) -> bool:
        """Count a connection of ``peer`` (HTTP/1.1 or HTTP/2) against its cap."""
        if self._per_sae[peer] >= self.max_per_sae:
            log.warning(
                "connection refused: too many from one SAE",
                extra={"peer": peer, "limit": self.max_per_sae},
            )
            return False
        self._per_sae[peer] += 1
        return True

    def release(self, peer: str | None) -> None:
        self._per_sae[peer] -= 1
        if self._per_sae[peer] <= 0:
            del self._per_sae[peer]

    def too_many(self) -> Response:
        return json_error(
            503,
            "Too many connections from this SAE",
            f"at most {self.max_per_sae} connections per client certificate",
        )

    def _session(self) -> asyncio.Protocol:
        return _ByAlpn(self) if self.h2 else _H1Session(self)


class _ByAlpn(asyncio.Protocol):
    """The protocol the client and the TLS context agreed on by ALPN: HTTP/2 (``h2``) for
    clients that multiplex, else HTTP/1.1; it then gets every call of the connection."""

    def __init__(self, server: H1Server) -> None:
        self.server = server
        self.app: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        self.app = (
            EdgeSession(self.server, self.server) if chosen == "h2" else _H1Session(self.server)
        )
        self.app.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.app is not None:
            self.app.data_received(data)

    def eof_received(self) -> bool | None:
        return self.app.eof_received() if self.app is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is not None:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()


def _written(response: Response, written: bool) -> None:
    """Tell a response's owner whether it left (see :attr:`Response.on_written`)."""
    if response.on_written is not None:
        response.on_written(written)
