"""A lean HTTP/1.1 client over one kept-alive mutual-TLS socket, for SAE-side 014 calls.

Why not ``http.client``: the T_key benches run 16 requesters on the same two cores as the
16 node processes, so the client's CPU per request is part of what is measured; the
standard client parses every header block with the ``email`` package and reads through
several buffered layers. This one writes each request with one ``sendall`` and parses the
response from what each ``recv`` returned.

Two parts. :class:`ResponseParser` is the protocol without I/O: bytes in, one
:class:`Response` out (Content-Length, chunked, or read-to-close bodies; RFC 9112 §6.3).
:class:`HttpsConnection` is the thin socket adapter: it connects lazily, reconnects when
the server closed the idle connection between requests, and retries a GET once if a
reused connection was closed before any byte of the answer (the server's idle close
crossed the request; a POST is never replayed). Every socket operation has the
connection's timeout.

What it must never do: return a response it did not fully read, or reuse a connection
whose state is unknown (after an error, an unframed body or stray bytes it is closed).
A reply that is not well-formed HTTP/1.1 (line ends other than CRLF included) raises
:class:`HttpResponseError`; a server that stops sending raises TimeoutError.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from appliance.errors import ApplianceError

READ_SIZE = 1 << 16
"""Bytes asked of each ``recv`` (a TLS record is at most 16 KiB of them)."""
MAX_HEAD = 1 << 16
"""Longest status line plus header block (and longest chunked trailer section) accepted."""
MAX_BODY = 1 << 26
"""Longest body accepted (64 MiB; a batch of 1024 keys is about 80 KiB)."""
MAX_CHUNK_LINE = 1024
"""Longest chunk-size line, extensions included."""
REPLAYABLE = frozenset({"GET"})
"""Methods sent again on a fresh connection when a reused one closed without answering."""

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SECTION = rf"(?:\r\n{_TOKEN}:[^\r\n\x00]*)*"  # header fields, each after its line break
_HEAD = re.compile(rf"HTTP/1\.([01]) ([0-9]{{3}})(?: ([^\r\n\x00]*))?({_SECTION})")
"""A whole response head (status line and fields, decoded as latin-1); obs-fold refused."""
_TRAILER = re.compile(_SECTION)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class HttpResponseError(ApplianceError):
    """The server's reply is not a well-formed HTTP/1.1 response, or it ended early."""

    code = "SAE-HTTP-RESPONSE"


class Unanswered(HttpResponseError):
    """The connection closed (or was reset) before the first byte of the response."""

    code = "SAE-HTTP-UNANSWERED"


@dataclass(slots=True, kw_only=True)
class Response:
    status: int
    """The status code."""
    reason: str
    """The reason phrase (may be empty)."""
    headers: dict[str, str]
    """Lower-case field names; repeated fields joined with ``", "``."""
    body: bytes
    """The body, de-chunked."""
    will_close: bool
    """The connection cannot carry another request after this response."""


# ---- the protocol, no I/O -------------------------------------------------------------


class ResponseParser:
    """One HTTP/1.1 response (to a GET or POST) from the bytes the server sent.

    Rules of this class: ``feed`` every chunk the socket returns until it returns the
    response, or call ``feed_eof`` when the socket reached end of file; either raises
    :class:`HttpResponseError` on a malformed reply. ``_STEP`` is the state table: each
    state's method consumes what it can and names the next state, or returns None when
    it needs more bytes. Head and chunked bodies are parsed from one buffer; a body of
    known length (or read to the close) is kept as the pieces received and joined once.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # first unparsed byte of _buf
        self._scan = 0  # where the search for the blank line ending a block resumes
        self._state = "head"
        self._status, self._reason, self._http10 = 0, "", False
        self._headers: dict[str, str] = {}
        self._started = False
        self._kind = "none"  # how the body ends: none, length, chunked or eof
        self._pieces: list[bytes | bytearray] = []  # body bytes received, or chunks' data
        self._have = 0  # bytes in _pieces
        self._left = 0  # body length (Content-Length), or bytes of the current chunk

    @property
    def started(self) -> bool:
        """Some byte of the response has arrived."""
        return self._started

    def feed(self, data: bytes) -> Response | None:
        """Take the next bytes; the response once it is complete."""
        state, self._started = self._state, True
        if state == "length" or state == "to-eof":
            self._pieces.append(data)
            self._have += len(data)
        elif state == "done":
            raise HttpResponseError("bytes after a complete response")
        else:
            self._buf += data
        while state != "done":
            nxt = _STEP[state](self)
            if nxt is None:
                return None
            state = self._state = nxt
        return self._response()

    def feed_eof(self) -> Response:
        """The server closed the connection: the response, if that is how it ends."""
        if not self._started:
            raise Unanswered("the server closed the connection without answering")
        if self._state != "to-eof":
            raise HttpResponseError(f"connection closed in a response ({self._state})")
        self._state = "done"
        return self._response()

    # the states; each returns the next state, or None for "need more bytes"

    def _head(self) -> str | None:
        block = self._block()
        if block is None:
            return None
        match = _HEAD.fullmatch(block.decode("latin-1"))
        if match is None:
            raise HttpResponseError(f"malformed response head {bytes(block[:60])!r}")
        version, status, reason, fields = match.groups()
        self._status, self._reason, self._http10 = int(status), reason or "", version == "0"
        self._headers = _fields(fields)
        if 100 <= self._status < 200:  # informational: the real response follows
            if self._status == 101:
                raise HttpResponseError("101 Switching Protocols was not asked for")
            if self._pos > MAX_HEAD:
                raise HttpResponseError("too many informational responses")
            return "head"
        return self._framing()

    def _framing(self) -> str:
        """How the body ends (RFC 9112 §6.3), for a response to a GET or POST."""
        if self._status == 204 or self._status == 304:
            return "done"
        coding = self._headers.get("transfer-encoding")
        if coding is not None:
            if coding.lower() != "chunked":
                raise HttpResponseError(f"unsupported Transfer-Encoding {coding[:40]!r}")
            self._kind = "chunked"
            return "chunk-size"
        length = self._headers.get("content-length")
        self._pieces, self._have = [self._buf[self._pos :]], len(self._buf) - self._pos
        if length is None:
            self._kind = "eof"
            return "to-eof"
        self._kind, self._left = "length", _content_length(length)
        return "length"

    def _length(self) -> str | None:
        return "done" if self._have >= self._left else None

    def _to_eof(self) -> None:
        if self._have > MAX_BODY:
            raise HttpResponseError("body too long")
        return None

    def _chunk_size(self) -> str | None:
        if self._pos:  # drop what is parsed: the buffer holds one chunk at a time
            del self._buf[: self._pos]
            self._pos = 0
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > MAX_CHUNK_LINE:
                raise HttpResponseError("chunk-size line too long")
            return None
        size = bytes(self._buf[:end]).split(b";", 1)[0].strip(b" \t")
        if not _HEX.fullmatch(size):
            raise HttpResponseError(f"bad chunk size {size[:20]!r}")
        self._pos = self._scan = end + 2
        self._left = int(size, 16)
        if self._have + self._left > MAX_BODY:
            raise HttpResponseError("body too long")
        return "chunk-data" if self._left else "trailer"

    def _chunk_data(self) -> str | None:
        end = self._pos + self._left
        if len(self._buf) < end + 2:
            return None
        if self._buf[end : end + 2] != b"\r\n":
            raise HttpResponseError("chunk data not followed by CRLF")
        self._pieces.append(self._buf[self._pos : end])
        self._have += self._left
        self._pos = end + 2
        return "chunk-size"

    def _trailer(self) -> str | None:
        if self._buf.startswith(b"\r\n", self._pos):  # no trailer fields: the usual case
            self._pos += 2
            return "done"
        block = self._block()
        if block is None:
            return None
        if not _TRAILER.fullmatch("\r\n" + block.decode("latin-1")):
            raise HttpResponseError("malformed trailer section")
        return "done"  # trailer fields are checked, then dropped: nothing here uses them

    # helpers

    def _block(self) -> bytearray | None:
        """The lines up to the next blank line (consumed), or None if it has not arrived."""
        end = self._buf.find(b"\r\n\r\n", max(self._pos, self._scan - 3))
        if end < 0:
            if len(self._buf) - self._pos > MAX_HEAD:
                raise HttpResponseError("header block too long")
            self._scan = len(self._buf)
            return None
        if end - self._pos > MAX_HEAD:
            raise HttpResponseError("header block too long")
        block = self._buf[self._pos : end]
        self._pos = self._scan = end + 4
        return block

    def _response(self) -> Response:
        body = b"".join(self._pieces)
        if self._kind == "length":
            extra = len(body) > self._left
            body = body[: self._left] if extra else body
        else:  # stray bytes after the response (none can follow a body read to the close)
            extra = len(self._buf) > self._pos and self._kind != "eof"
        return Response(
            status=self._status,
            reason=self._reason,
            headers=self._headers,
            body=body,
            will_close=extra or self._kind == "eof" or self._will_close(),
        )

    def _will_close(self) -> bool:
        """What the Connection field (and the version) say."""
        connection = self._headers.get("connection")
        if connection is None:
            return self._http10
        tokens = {t.strip().lower() for t in connection.split(",")}
        return "close" in tokens or (self._http10 and "keep-alive" not in tokens)


_STEP: dict[str, Callable[[ResponseParser], str | None]] = {
    "head": ResponseParser._head,
    "length": ResponseParser._length,
    "chunk-size": ResponseParser._chunk_size,
    "chunk-data": ResponseParser._chunk_data,
    "trailer": ResponseParser._trailer,
    "to-eof": ResponseParser._to_eof,
}
"""The parser's state table: state -> the method that consumes input in that state."""


def _fields(section: str) -> dict[str, str]:
    """Header fields by lower-case name; a repeated field's values joined by ``", "``.

    ``section`` matched ``_SECTION`` already: each line is ``name:value``.
    """
    fields: dict[str, str] = {}
    for line in section.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        key, value = name.lower(), value.strip(" \t")
        fields[key] = f"{fields[key]}, {value}" if key in fields else value
    return fields


def _content_length(value: str) -> int:
    """The length from a Content-Length field (repeated values must agree)."""
    if not (value.isascii() and value.isdigit()):
        values = {v.strip() for v in value.split(",")}
        if len(values) != 1:
            raise HttpResponseError(f"conflicting Content-Length {value[:40]!r}")
        value = values.pop()
        if not (value.isascii() and value.isdigit()):
            raise HttpResponseError(f"bad Content-Length {value[:40]!r}")
    if len(value) > 18 or int(value) > MAX_BODY:
        raise HttpResponseError("body too long")
    return int(value)


def request_bytes(
    method: str, path: str, host: str, body: bytes | None, content_type: str
) -> bytes:
    """The whole request, ready for one ``sendall``."""
    if path[:1] != "/" or " " in path or not path.isprintable():  # no CR, LF, NUL, ...
        raise ValueError(f"bad request target {path!r}")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    elif method in ("POST", "PUT"):
        head += "Content-Length: 0\r\n"
    return (head + "\r\n").encode("ascii") + (body or b"")


# ---- the socket adapter ---------------------------------------------------------------


class HttpsConnection:
    """Requests over one TLS connection to ``host:port``, opened on first use and kept."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext, *, timeout: float = 30.0
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._context = context
        self._authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._sock: ssl.SSLSocket | None = None
        self._poll: select.poll | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
    ) -> Response:
        """Send one request and read its whole response (HEAD is not supported)."""
        if method == "HEAD":  # its response announces a body it does not carry
            raise ValueError("HEAD requests are not supported")
        message = request_bytes(method, path, self._authority, body, content_type)
        reused = self._sock is not None and self._idle_ok()
        try:
            return self._exchange(message)
        except Unanswered:
            if not reused or method not in REPLAYABLE:
                raise
        return self._exchange(message)  # the server had closed it as we sent: once more

    def close(self) -> None:
        """Close the socket (the next request opens a new one)."""
        sock, self._sock, self._poll = self._sock, None, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> HttpsConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _exchange(self, message: bytes) -> Response:
        sock = self._sock if self._sock is not None else self._open()
        parser = ResponseParser()
        try:
            sock.sendall(message)
            response = None
            while response is None:
                data = sock.recv(READ_SIZE)
                response = parser.feed(data) if data else parser.feed_eof()
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.close()
            if parser.started:
                raise
            raise Unanswered(f"the connection was reset before an answer: {exc}") from exc
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response

    def _open(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        self._sock, self._poll = sock, select.poll()
        self._poll.register(sock, select.POLLIN)
        return sock

    def _idle_ok(self) -> bool:
        """Whether the kept socket can carry a request; closes it if the server ended it.

        Between requests nothing should be readable. When something is, it is either a
        TLS 1.3 session ticket (harmless: the read consumes it and wants more), or the
        server's close or stray bytes, after which the socket is not reused.
        """
        assert self._sock is not None and self._poll is not None
        if not self._poll.poll(0) and not self._sock.pending():
            return True
        self._sock.settimeout(0)
        try:
            self._sock.recv(1)  # b"" (closed) or a stray byte: either way, not reusable
        except ssl.SSLWantReadError:
            self._sock.settimeout(self.timeout)
            return True
        except OSError:
            pass
        self.close()
        return False
