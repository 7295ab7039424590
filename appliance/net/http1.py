"""HTTP/1.1 over mutual TLS (for ETSI GS QKD 014 clients), on asyncio.

Same :class:`Request`/:class:`Response` types and handler signature as the HTTP/2 server.
Connections are kept alive (HTTP/1.0 clients close unless they ask otherwise). A malformed
request gets a JSON 400 (014 clients parse a JSON body on every non-200 reply) and the
connection is closed; the handler is never called with an unparsed request.

The parser is :class:`RequestParser`, sans-IO and strict (RFC 9112): a request line, header
fields without folding, a body by ``Content-Length`` or ``chunked`` transfer coding, at most
:data:`MAX_HEAD` bytes of head and :data:`MAX_BODY` of body. ``Expect: 100-continue`` is
answered, so clients like curl do not pause before sending a large body. The session is an
``asyncio.Protocol`` (no stream reader, no task per connection): on a UKMS the 014 server
is on the path of every key request, and a general HTTP library cost several times more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from typing import cast

from appliance.net.h2 import Request, Response, TlsServer
from appliance.pki import peer_name

log = logging.getLogger("qkdn.net")
MAX_BODY = 1 << 20
MAX_HEAD = 1 << 16
MAX_PIPELINED = 32
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.([01])")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:;[^\r\n]*)?")
REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class MalformedRequest(ValueError):
    """The bytes received are not an acceptable HTTP/1.1 request."""


class RequestParser:
    """Sans-IO: :meth:`feed` bytes, get the complete requests (method, target, headers,
    body, keep-alive); MalformedRequest on anything else. ``wants_continue`` is set once
    when a request's head asks for ``100-continue`` and its body has not arrived."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head: tuple[str, str, dict[str, str], bool] | None = None
        self._length = 0  # body bytes expected (Content-Length), or -1: chunked
        self._body = bytearray()
        self.wants_continue = False

    def feed(self, data: bytes) -> list[tuple[str, str, dict[str, str], bytes, bool]]:
        self._buf += data
        out = []
        while True:
            if self._head is None and not self._parse_head():
                break
            body = self._parse_body()
            if body is None:
                break
            method, target, headers, keep_alive = cast(
                tuple[str, str, dict[str, str], bool], self._head
            )
            out.append((method, target, headers, body, keep_alive))
            self._head, self._body = None, bytearray()
        return out

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise MalformedRequest("request head too large")
            return False
        if end > MAX_HEAD:
            raise MalformedRequest("request head too large")
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise MalformedRequest("bad request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            value = value.strip(b" \t")
            if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
                raise MalformedRequest("bad header field")
            key = name.decode("ascii").lower()
            text = value.decode("latin-1")
            if key in headers:
                if key in ("content-length", "host", "transfer-encoding"):
                    raise MalformedRequest(f"repeated {key}")
                text = f"{headers[key]}, {text}"
            headers[key] = text
        version = match.group(3)
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (version == b"1" or "keep-alive" in connection)
        if version == b"1" and "host" not in headers:
            raise MalformedRequest("missing Host header")
        self._length = self._body_length(headers)
        self.wants_continue = headers.get("expect", "").lower() == "100-continue" and (
            self._length != 0 and not self._buf
        )
        method, target = match.group(1).decode("ascii"), match.group(2).decode("ascii")
        self._head = (method, target, headers, keep_alive)
        return True

    @staticmethod
    def _body_length(headers: dict[str, str]) -> int:
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if coding.strip().lower() != "chunked" or "content-length" in headers:
                raise MalformedRequest("unsupported transfer coding")
            return -1
        length = headers.get("content-length", "0").strip()
        if not length.isdigit() or len(length) > 9:
            raise MalformedRequest("bad Content-Length")
        if int(length) > MAX_BODY:
            raise MalformedRequest("request body too large")
        return int(length)

    def _parse_body(self) -> bytes | None:
        if self._length >= 0:
            if len(self._buf) < self._length:
                return None
            body = bytes(self._buf[: self._length])
            del self._buf[: self._length]
            return body
        while True:  # chunked: size line, data, CRLF ... 0-size chunk, trailers, CRLF
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    raise MalformedRequest("chunk size line too long")
                return None
            match = _CHUNK_SIZE.fullmatch(bytes(self._buf[:end]))
            if match is None:
                raise MalformedRequest("bad chunk size")
            size = int(match.group(1), 16)
            if size == 0:  # the last chunk: trailer fields (ignored) up to an empty line
                stop = self._buf.find(b"\r\n\r\n", end)
                if stop < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise MalformedRequest("chunked trailer too large")
                    return None
                del self._buf[: stop + 4]
                return bytes(self._body)
            if len(self._buf) < end + 2 + size + 2:
                return None
            if self._buf[end + 2 + size : end + 4 + size] != b"\r\n":
                raise MalformedRequest("chunk not terminated by CRLF")
            self._body += self._buf[end + 2 : end + 2 + size]
            if len(self._body) > MAX_BODY:
                raise MalformedRequest("request body too large")
            del self._buf[: end + 4 + size]


def encode_response(response: Response, *, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}"]
    lines.append(f"content-length: {len(response.body)}")
    lines.extend(f"{k}: {v}" for k, v in response.headers.items() if k != "content-length")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


def _json_error(status: int, message: str) -> Response:
    body = json.dumps({"message": message}).encode()
    return Response(status, body, {"content-type": "application/json"})


class _H1Session(asyncio.Protocol):
    """One connection: requests are answered in order, one at a time."""

    def __init__(self, server: H1Server) -> None:
        self.server, self.parser = server, RequestParser()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.queue: deque[tuple[str, str, dict[str, str], bytes, bool]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closing = self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = peer_name(transport.get_extra_info("ssl_object"))
        self.server._open.add(self)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.queue.extend(self.parser.feed(data))
            if len(self.queue) > MAX_PIPELINED:
                raise MalformedRequest("too many pipelined requests")
        except MalformedRequest as exc:
            self.broken = True  # answer what came before, then a 400, then close
            self.queue.append(("", "", {}, str(exc).encode(), False))
        if self.parser.wants_continue and self.transport is not None:
            self.parser.wants_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.queue and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        while self.queue and not self.closing:
            method, target, headers, body, keep_alive = self.queue.popleft()
            if not method:  # the parser refused the bytes: 400, and the connection ends
                response = _json_error(400, f"malformed HTTP request: {body.decode()}")
            else:
                response = await self._handle(Request(method, target, body, headers, self.peer))
            if self.transport is None or self.transport.is_closing():
                break
            self.transport.write(encode_response(response, close=not keep_alive))
            if not keep_alive:
                self.close()
        self.task = None

    async def _handle(self, request: Request) -> Response:
        try:
            return await self.server.handler(request)
        except Exception:  # a handler bug must not kill the server, but must be seen
            log.exception("request handler failed", extra={"path": request.path})
            return _json_error(503, "internal error")

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server._open.discard(self)
        if self.task is not None:
            self.task.cancel()


class H1Server(TlsServer):
    """Serve ``handler`` over HTTP/1.1 with TLS."""

    def _session(self) -> asyncio.Protocol:
        return _H1Session(self)
