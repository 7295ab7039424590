"""Sans-IO HTTP/2 (RFC 9113) connection for the inter-node transport: bytes in, events out.

:class:`Connection` is what :mod:`appliance.net.h2` drives over a TLS socket. It replaces the
general-purpose ``h2`` state machine, which cost ~0.4 ms of CPU per exchange and side, with
just what whole-message request/response traffic between trusted nodes needs, while staying
conformant in what it sends and strict in what it accepts.

Rules of this file:

* No I/O, no asyncio, no clock. :meth:`Connection.receive` takes bytes and returns events;
  :meth:`Connection.send` and friends queue frames; :meth:`Connection.data_to_send` drains them.
* Messages are whole: a request or response is handed over once its END_STREAM arrived, and
  is sent as HEADERS (+ CONTINUATION), then DATA as the flow-control windows allow; the rest
  waits in an outbox until WINDOW_UPDATE. Nothing is streamed, no trailers are sent (received
  ones are checked and dropped), server push is off (ENABLE_PUSH = 0, so a PUSH_PROMISE is a
  connection error), received PRIORITY frames are checked and ignored.
* Every fault of the peer is either a stream error (RST_STREAM sent, a :class:`StreamReset`
  event, the connection goes on) or a connection error (GOAWAY queued, :class:`H2ProtocolError`
  raised; the connection is dead and later calls do nothing). Never any other exception.
* Flow control both ways: we open our receive windows to :data:`WINDOW` (or the window of
  the connection's :class:`Limits`) and top them up when half is used; we never send more
  DATA than the peer's stream and connection windows allow.
* HPACK: received header blocks are decoded by :mod:`appliance.net.hpackdec` (dynamic table;
  Huffman through the ``hpack`` library's table). We encode by hand with static-table indices
  and literals without indexing, and never use a dynamic table: our first header block sets
  its size to 0, so the peer's decoder state never depends on ours (RFC 7541 §4.2, §6.3).
* A stream's state is two flags: ``remote_done`` (END_STREAM received) and ``local_done``
  (END_STREAM sent); with both set, or after RST_STREAM either way, it is closed and
  forgotten. An ID of the peer's parity at or below the highest it opened, or of ours below
  the next we would use, and not in the table, is a closed stream; anything above is idle.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import msgspec
from hpack.table import HeaderTable

from appliance.net.hpackdec import Decoder, HpackError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WINDOW = 1 << 24
"""Our receive windows (stream and connection): wide, the peers are trusted nodes."""
MAX_STREAMS = 1000
"""Concurrent streams we accept from a peer."""
MAX_BODY = 64 << 20
"""A message body beyond this is refused (stream error)."""
MAX_HEADER_LIST = 64 << 10
"""Largest decoded header list we accept (also the cap on a header block in transit)."""
MAX_STREAM_ID = (1 << 31) - 1
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384


@dataclass(frozen=True, slots=True)
class Limits:
    """What a connection accepts from its peer: the defaults suit trusted nodes; the SAE
    edge, whose clients are not ours, passes tighter ones."""

    streams: int = MAX_STREAMS
    """Concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS; more are refused)."""
    body: int = MAX_BODY
    """Bytes of one message body (more: the stream is refused or cancelled)."""
    header_list: int = MAX_HEADER_LIST
    """Bytes of one decoded header list, and of a header block in transit."""
    window: int = WINDOW
    """Our receive window, per stream and for the connection (at least 65,535)."""


NODES = Limits()

# Frame types (RFC 9113 §6) and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 5, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (RFC 9113 §7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

# Settings (RFC 9113 §6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

_SELF_DEPENDENT = 0x100  # not a wire flag: marks a HEADERS whose priority names itself
_HEAD = struct.Struct(">HBBBL")  # 24-bit length as H + B, type, flags, stream ID
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_BAD_NAME = re.compile(rb"[\x00-\x20A-Z\x7f-\xff:]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
_STATIC = {(n.decode(), v.decode()): i for i, (n, v) in enumerate(HeaderTable.STATIC_TABLE, 1)}
_STATIC_NAME: dict[str, int] = {}
for (_n, _v), _i in _STATIC.items():
    _STATIC_NAME.setdefault(_n, _i)


# -- events ---------------------------------------------------------------------------------
class MessageReceived(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A complete, well-formed request (server) or final response (client)."""

    stream_id: int
    """The stream it came on."""
    headers: dict[str, str]
    """Pseudo-header fields (``:method``, ``:path``, ``:status``...) and regular fields."""
    body: bytes
    """The whole body."""


class StreamReset(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A stream ended without a message: the peer reset it, or we did (malformed message)."""

    stream_id: int
    """The stream."""
    error_code: int
    """RFC 9113 error code."""
    remote: bool
    """True if the peer sent the RST_STREAM."""


class ConnectionEnded(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The peer sent GOAWAY: open no new streams; those above ``last_stream_id`` failed."""

    error_code: int
    """RFC 9113 error code (0: a graceful shutdown)."""
    last_stream_id: int
    """Highest of our streams the peer may still answer."""


Event = MessageReceived | StreamReset | ConnectionEnded


class H2ProtocolError(Exception):
    """A connection error: GOAWAY with ``error_code`` is queued and the connection is dead."""

    def __init__(self, error_code: int, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code


class _StreamError(Exception):
    """Internal: reset one stream and go on."""

    def __init__(self, stream_id: int, error_code: int) -> None:
        super().__init__(stream_id, error_code)
        self.stream_id, self.error_code = stream_id, error_code


class _Stream:
    __slots__ = (
        "chunks",
        "headers",
        "local_done",
        "received",
        "recv_window",
        "remote_done",
        "send_window",
    )

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.headers: dict[str, str] | None = None
        self.chunks: list[bytes] = []
        self.received = 0
        self.send_window = send_window
        self.recv_window = recv_window
        self.remote_done = False
        self.local_done = False


# -- HPACK encoding (RFC 7541), by hand -------------------------------------------------------
def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1: ``value`` with an N-bit prefix, ``first`` holding the high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return _integer(len(raw), 7, 0) + raw


def encode_field(name: str, value: str) -> bytes:
    """One header field: a static-table index, or a literal without indexing."""
    name = name.lower()
    index = _STATIC.get((name, value))
    if index is not None:
        return _integer(index, 7, 0x80)
    index = _STATIC_NAME.get(name)
    if index is not None:
        return _integer(index, 4, 0x00) + _string(value)
    return b"\x00" + _string(name) + _string(value)


# -- the connection ---------------------------------------------------------------------------
class Connection:
    """One HTTP/2 connection, client or server side, without I/O (see the rules above)."""

    def __init__(self, *, client_side: bool, limits: Limits = NODES) -> None:
        self.client_side = client_side
        self.limits = limits
        self.closed = False
        self.peer_max_streams = 100
        """What the peer allows; RFC 9113's recommended minimum until its SETTINGS arrive."""
        self._out: list[bytes] = []
        self._in = b""
        self._preface = not client_side  # a server first expects the client's preface
        self._settings_seen = False
        self._decoder = Decoder(max_list_size=limits.header_list)
        self._first_block = True
        self._encoded: dict[tuple[str, str], bytes] = {}
        self._checked: dict[int, tuple[list[tuple[bytes, bytes]], dict[str, str]]] = {}
        self._streams: dict[int, _Stream] = {}
        self._outbox: dict[int, memoryview] = {}
        self._next_id = 1 if client_side else 2
        self._highest_peer_id = 0
        self._reset_by_us: set[int] = set()
        self._send_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_FRAME
        self._recv_window = limits.window  # the default 65,535 plus our first WINDOW_UPDATE
        self._recv_unacked = 0
        self._block: tuple[int, int, list[bytes], int] | None = None  # stream, flags, parts, size
        self._handlers = (
            self._on_data,
            self._on_headers,
            self._on_priority,
            self._on_rst_stream,
            self._on_settings,
            self._on_push_promise,
            self._on_ping,
            self._on_goaway,
            self._on_window_update,
            self._on_continuation,
        )
        self._start()

    def _start(self) -> None:
        settings = b"".join(
            _SETTING.pack(*pair)
            for pair in (
                (ENABLE_PUSH, 0),
                (MAX_CONCURRENT_STREAMS, self.limits.streams),
                (INITIAL_WINDOW_SIZE, self.limits.window),
                (MAX_HEADER_LIST_SIZE, self.limits.header_list),
            )
        )
        if self.client_side:
            self._out.append(PREFACE)
        self._frame(SETTINGS, 0, 0, settings)
        if self.limits.window > DEFAULT_WINDOW:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.limits.window - DEFAULT_WINDOW))

    # -- what the adapter calls -------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out, self._out = self._out, []
        return b"".join(out)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def next_stream_id(self) -> int | None:
        """The ID for a new request, or None once IDs are exhausted (open a new connection)."""
        return self._next_id if self._next_id <= MAX_STREAM_ID else None

    def send(self, stream_id: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send a whole message: a request on a new stream (client), or the response on the
        stream of a request (server; ignored if that stream was reset meanwhile)."""
        if self.closed:
            return
        if self.client_side:
            if stream_id != self._next_id or stream_id > MAX_STREAM_ID:
                raise ValueError(f"stream {stream_id} is not the next one ({self._next_id})")
            self._next_id += 2
            stream = self._streams[stream_id] = _Stream(
                self._peer_initial_window, self.limits.window
            )
        else:
            found = self._streams.get(stream_id)
            if found is None or found.local_done:
                return
            stream = found
        self._send_headers(stream_id, headers, end_stream=not body)
        if body:
            self._outbox[stream_id] = memoryview(body)
            self._pump(stream_id, stream)
        else:
            self._local_done(stream_id, stream)

    def answerable(self, stream_id: int) -> bool:
        """Whether a response can still be sent on the peer's stream ``stream_id``."""
        found = self._streams.get(stream_id)
        return not self.closed and found is not None and not found.local_done

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Abandon a stream (RST_STREAM); nothing more is sent or reported for it."""
        if not self.closed and self._streams.pop(stream_id, None) is not None:
            self._outbox.pop(stream_id, None)
            self._forget(stream_id)
            self._frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))

    def close(self, error_code: int = NO_ERROR, message: str = "") -> None:
        """Queue GOAWAY; the connection accepts nothing more."""
        if not self.closed:
            self.closed = True
            debug = message.encode()[:256]
            self._frame(
                GOAWAY, 0, 0, _U32.pack(self._highest_peer_id) + _U32.pack(error_code) + debug
            )

    def receive(self, data: bytes) -> list[Event]:
        """Process received bytes; the events they complete (H2ProtocolError: GOAWAY queued)."""
        if self.closed:
            return []
        buf = self._in + data if self._in else data
        out: list[Event] = []
        try:
            pos = self._check_preface(buf) if self._preface else 0
            pos = self._frames(buf, pos, out)
        except H2ProtocolError as exc:
            self.close(exc.error_code, str(exc))
            raise
        self._in = buf[pos:]
        self._top_up_connection()
        return out

    # -- frame parsing ----------------------------------------------------------------------
    def _check_preface(self, buf: bytes) -> int:
        if len(buf) < len(PREFACE):
            if not PREFACE.startswith(buf):
                raise H2ProtocolError(PROTOCOL_ERROR, "invalid connection preface")
            return -1
        if not buf.startswith(PREFACE):
            raise H2ProtocolError(PROTOCOL_ERROR, "invalid connection preface")
        self._preface = False
        return len(PREFACE)

    def _frames(self, buf: bytes, pos: int, out: list[Event]) -> int:
        if pos < 0:  # preface incomplete
            return 0
        end = len(buf)
        while end - pos >= 9:
            high, low, kind, flags, stream_id = _HEAD.unpack_from(buf, pos)
            length = high << 8 | low
            if length > DEFAULT_FRAME:  # our SETTINGS_MAX_FRAME_SIZE
                raise H2ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            stop = pos + 9 + length
            if stop > end:
                break
            payload = buf[pos + 9 : stop]
            pos = stop
            self._frame_in(kind, flags, stream_id & MAX_STREAM_ID, payload, out)
        return pos

    def _frame_in(
        self, kind: int, flags: int, stream_id: int, payload: bytes, out: list[Event]
    ) -> None:
        if not self._settings_seen and (kind != SETTINGS or flags & ACK):
            raise H2ProtocolError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if self._block is not None and kind != CONTINUATION:
            raise H2ProtocolError(PROTOCOL_ERROR, "header block interrupted")
        if kind > CONTINUATION:
            return  # unknown frame types are ignored (RFC 9113 §4.1)
        try:
            self._handlers[kind](flags, stream_id, payload, out)
        except _StreamError as exc:
            self._stream_error(exc.stream_id, exc.error_code, out)

    def _stream_error(self, stream_id: int, error_code: int, out: list[Event]) -> None:
        stream = self._streams.pop(stream_id, None)
        self._outbox.pop(stream_id, None)
        self._forget(stream_id)
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))
        if stream is not None:
            out.append(StreamReset(stream_id=stream_id, error_code=error_code, remote=False))

    def _forget(self, stream_id: int) -> None:
        """Remember (boundedly) that we reset a stream, so late frames for it are ignored."""
        if len(self._reset_by_us) >= 4096:
            self._reset_by_us.clear()
        self._reset_by_us.add(stream_id)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise H2ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    # -- per frame type ---------------------------------------------------------------------
    def _on_data(self, flags: int, stream_id: int, payload: bytes, out: list[Event]) -> None:
        if stream_id == 0:
            raise H2ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        self._consume(len(payload))  # padding and frames for closed streams count too
        data = self._unpad(flags, payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._closed_stream(stream_id, "DATA"):
                raise _StreamError(stream_id, STREAM_CLOSED)
            return
        if stream.headers is None:
            raise _StreamError(stream_id, PROTOCOL_ERROR)  # DATA before the response head
        if stream.remote_done:
            raise _StreamError(stream_id, STREAM_CLOSED)
        stream.recv_window -= len(payload)
        if stream.recv_window < 0:
            raise _StreamError(stream_id, FLOW_CONTROL_ERROR)
        stream.received += len(data)
        if stream.received > self.limits.body:
            raise _StreamError(stream_id, CANCEL if self.client_side else REFUSED_STREAM)
        if data:
            stream.chunks.append(data)
        if flags & END_STREAM:
            self._remote_done(stream_id, stream, out)
        elif stream.recv_window <= self.limits.window // 2:
            top_up = self.limits.window - stream.recv_window
            self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(top_up))
            stream.recv_window = self.limits.window

    def _consume(self, length: int) -> None:
        self._recv_window -= length
        if self._recv_window < 0:
            raise H2ProtocolError(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_unacked += length

    def _top_up_connection(self) -> None:
        if self._recv_unacked >= self.limits.window // 2 and not self.closed:
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, out: list[Event]) -> None:
        if stream_id == 0:
            raise H2ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(fragment) < 5:
                raise H2ProtocolError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if _U32.unpack_from(fragment)[0] & MAX_STREAM_ID == stream_id:
                flags |= _SELF_DEPENDENT
            fragment = fragment[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, fragment, out)
        else:
            self._block = (stream_id, flags, [fragment], len(fragment))

    def _on_continuation(
        self, flags: int, stream_id: int, payload: bytes, out: list[Event]
    ) -> None:
        if self._block is None or self._block[0] != stream_id:
            raise H2ProtocolError(PROTOCOL_ERROR, "CONTINUATION without a header block")
        first, first_flags, parts, size = self._block
        parts.append(payload)
        size += len(payload)
        if size > self.limits.header_list:
            raise H2ProtocolError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._block = None
            self._header_block(first, first_flags, b"".join(parts), out)
        else:
            self._block = (first, first_flags, parts, size)

    def _header_block(self, stream_id: int, flags: int, block: bytes, out: list[Event]) -> None:
        """A complete header block; ``flags`` are those of its HEADERS frame."""
        try:  # always decoded, even for a stream we refuse: the HPACK context must stay in step
            fields = self._decoder.decode(block)
        except HpackError as exc:
            raise H2ProtocolError(COMPRESSION_ERROR, f"HPACK: {exc}") from None
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._open_peer_stream(stream_id)
            if stream is None:
                return
        if flags & _SELF_DEPENDENT:  # RFC 9113 §5.3.1
            raise _StreamError(stream_id, PROTOCOL_ERROR)
        if stream.remote_done:
            raise _StreamError(stream_id, STREAM_CLOSED)
        self._on_fields(stream_id, stream, fields, bool(flags & END_STREAM), out)

    def _open_peer_stream(self, stream_id: int) -> _Stream | None:
        """HEADERS for a stream not in the table: a new request (server side), a stream we
        reset (ignored: None), else a connection error."""
        theirs = stream_id % 2 == (0 if self.client_side else 1)
        if self.client_side or not theirs or stream_id <= self._highest_peer_id:
            if self._closed_stream(stream_id, "HEADERS"):
                raise H2ProtocolError(STREAM_CLOSED, f"HEADERS on closed stream {stream_id}")
            return None
        self._highest_peer_id = stream_id
        if len(self._streams) >= self.limits.streams:
            raise _StreamError(stream_id, REFUSED_STREAM)
        stream = self._streams[stream_id] = _Stream(self._peer_initial_window, self.limits.window)
        return stream

    def _on_fields(
        self,
        stream_id: int,
        stream: _Stream,
        pairs: list[tuple[bytes, bytes]],
        end: bool,
        out: list[Event],
    ) -> None:
        if stream.headers is not None:  # trailers: checked, then dropped
            if not end or _check_fields(pairs, frozenset()) is None:
                raise _StreamError(stream_id, PROTOCOL_ERROR)
            self._remote_done(stream_id, stream, out)
            return
        headers = self._checked_head(pairs)
        if headers is None:
            raise _StreamError(stream_id, PROTOCOL_ERROR)
        if self.client_side and headers[":status"].startswith("1"):
            if end:  # an interim response cannot end the stream
                raise _StreamError(stream_id, PROTOCOL_ERROR)
            return
        stream.headers = headers
        if end:
            self._remote_done(stream_id, stream, out)

    def _checked_head(self, pairs: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
        """The fields of a request or response head as a dict (a fresh one: the handler may
        keep it), or None if malformed. A head that the decoder shares (same bytes, no
        dynamic table) is checked once."""
        pure = self._decoder.pure
        if pure:
            hit = self._checked.get(id(pairs))
            if hit is not None and hit[0] is pairs:  # we hold ``pairs``: its id is not reused
                return dict(hit[1])
        allowed = frozenset((b":status",)) if self.client_side else _REQUEST_PSEUDO
        headers = _check_fields(pairs, allowed)
        if headers is None or not _complete(headers, self.client_side):
            return None
        if pure:
            if len(self._checked) >= 256:
                self._checked.clear()
            self._checked[id(pairs)] = (pairs, headers)
            return dict(headers)
        return headers

    def _remote_done(self, stream_id: int, stream: _Stream, out: list[Event]) -> None:
        assert stream.headers is not None
        body = stream.chunks[0] if len(stream.chunks) == 1 else b"".join(stream.chunks)
        declared = stream.headers.get("content-length")
        if declared is not None and declared != str(len(body)):
            raise _StreamError(stream_id, PROTOCOL_ERROR)
        stream.remote_done = True
        stream.chunks = []
        if stream.local_done:
            del self._streams[stream_id]
        out.append(MessageReceived(stream_id=stream_id, headers=stream.headers, body=body))

    def _on_priority(self, flags: int, stream_id: int, payload: bytes, out: list[Event]) -> None:
        if stream_id == 0:
            raise H2ProtocolError(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise _StreamError(stream_id, FRAME_SIZE_ERROR)
        if _U32.unpack_from(payload)[0] & MAX_STREAM_ID == stream_id:
            raise _StreamError(stream_id, PROTOCOL_ERROR)

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes, out: list[Event]) -> None:
        if stream_id == 0:
            raise H2ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise H2ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM of wrong length")
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            self._closed_stream(stream_id, "RST_STREAM")
            return
        self._outbox.pop(stream_id, None)
        code = _U32.unpack(payload)[0]
        out.append(StreamReset(stream_id=stream_id, error_code=code, remote=True))

    def _closed_stream(self, stream_id: int, what: str) -> bool:
        """A frame for a stream not in the table. Idle: connection error. Reset by us: to be
        ignored (the peer may have sent it before our RST_STREAM arrived), so False.
        Otherwise closed: True (the caller decides how bad that is)."""
        theirs = stream_id % 2 == (0 if self.client_side else 1)
        idle = stream_id > self._highest_peer_id if theirs else stream_id >= self._next_id
        if idle:
            raise H2ProtocolError(PROTOCOL_ERROR, f"{what} on idle stream {stream_id}")
        return stream_id not in self._reset_by_us

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, out: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise H2ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of wrong length")
        first, self._settings_seen = not self._settings_seen, True
        if first:
            self.peer_max_streams = MAX_STREAM_ID  # unlimited unless it says otherwise
        for offset in range(0, len(payload), 6):
            self._setting(*_SETTING.unpack_from(payload, offset))
        self._frame(SETTINGS, ACK, 0, b"")
        if first:
            self._pump_all()

    def _setting(self, key: int, value: int) -> None:
        if key == ENABLE_PUSH and (value > 1 or (value == 1 and self.client_side)):
            raise H2ProtocolError(PROTOCOL_ERROR, f"ENABLE_PUSH = {value}")
        if key == MAX_CONCURRENT_STREAMS:
            self.peer_max_streams = value
        elif key == INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise H2ProtocolError(FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE = {value}")
            delta, self._peer_initial_window = value - self._peer_initial_window, value
            for stream in self._streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise H2ProtocolError(FLOW_CONTROL_ERROR, "stream window overflow")
            self._pump_all()
        elif key == MAX_FRAME_SIZE:
            if not DEFAULT_FRAME <= value <= (1 << 24) - 1:
                raise H2ProtocolError(PROTOCOL_ERROR, f"MAX_FRAME_SIZE = {value}")
            self._peer_max_frame = value

    def _on_push_promise(
        self, flags: int, stream_id: int, payload: bytes, out: list[Event]
    ) -> None:
        raise H2ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE although push is disabled")

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, out: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise H2ProtocolError(FRAME_SIZE_ERROR, "PING of wrong length")
        if not flags & ACK:
            self._frame(PING, ACK, 0, payload)

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes, out: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise H2ProtocolError(FRAME_SIZE_ERROR, "GOAWAY too short")
        last = _U32.unpack_from(payload)[0] & MAX_STREAM_ID
        code = _U32.unpack_from(payload, 4)[0]
        out.append(ConnectionEnded(error_code=code, last_stream_id=last))

    def _on_window_update(
        self, flags: int, stream_id: int, payload: bytes, out: list[Event]
    ) -> None:
        if len(payload) != 4:
            raise H2ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of wrong length")
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise H2ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise H2ProtocolError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._pump_all()
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            self._closed_stream(stream_id, "WINDOW_UPDATE")
            return
        if increment == 0:
            raise _StreamError(stream_id, PROTOCOL_ERROR)
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise _StreamError(stream_id, FLOW_CONTROL_ERROR)
        self._pump(stream_id, stream)

    # -- sending ----------------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        self._out.append(_HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id))
        if payload:
            self._out.append(payload)

    def _send_headers(
        self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool
    ) -> None:
        parts = [b"\x20"] if self._first_block else []  # dynamic table size 0 (see rules)
        self._first_block = False
        cache = self._encoded
        for field in headers:
            encoded = cache.get(field)
            if encoded is None:
                if len(cache) >= 512:
                    cache.clear()
                encoded = cache[field] = encode_field(*field)
            parts.append(encoded)
        block = b"".join(parts)
        flags = END_STREAM if end_stream else 0
        size = self._peer_max_frame
        if len(block) <= size:
            self._frame(HEADERS, flags | END_HEADERS, stream_id, block)
            return
        self._frame(HEADERS, flags, stream_id, block[:size])
        for start in range(size, len(block), size):
            last = start + size >= len(block)
            self._frame(
                CONTINUATION, END_HEADERS if last else 0, stream_id, block[start : start + size]
            )

    def _pump_all(self) -> None:
        for stream_id in list(self._outbox):
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._pump(stream_id, stream)

    def _pump(self, stream_id: int, stream: _Stream) -> None:
        """Send as much of the stream's queued body as the windows allow."""
        view = self._outbox.get(stream_id)
        if not self._settings_seen:  # a peer may shrink windows in its first SETTINGS, and
            return  # some never reopen one made negative: wait for them (once per connection)
        while view:
            room = min(self._send_window, stream.send_window, self._peer_max_frame, len(view))
            if room <= 0:
                self._outbox[stream_id] = view
                return
            last = room == len(view)
            self._frame(DATA, END_STREAM if last else 0, stream_id, bytes(view[:room]))
            self._send_window -= room
            stream.send_window -= room
            view = view[room:]
        if stream_id in self._outbox:
            del self._outbox[stream_id]
            self._local_done(stream_id, stream)

    def _local_done(self, stream_id: int, stream: _Stream) -> None:
        stream.local_done = True
        if stream.remote_done:
            del self._streams[stream_id]


# -- header checks (RFC 9113 §8.2, §8.3) --------------------------------------------------------
def _check_fields(
    pairs: list[tuple[bytes, bytes]], allowed_pseudo: frozenset[bytes]
) -> dict[str, str] | None:
    """The fields as a dict, or None if malformed: pseudo-fields first, each once and known;
    names lowercase without forbidden characters; no connection-specific fields; values
    without NUL, CR, LF or surrounding whitespace."""
    headers: dict[str, str] = {}
    regular = False
    try:
        for name, value in pairs:
            if name[:1] == b":":
                if regular or name not in allowed_pseudo or name.decode() in headers:
                    return None
                if _BAD_VALUE.search(value):
                    return None
            else:
                regular = True
                if not name or _BAD_NAME.search(name) or _BAD_VALUE.search(value):
                    return None
                if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
                    return None
            headers[name.decode()] = value.decode()
    except UnicodeDecodeError:
        return None
    return headers


def _complete(headers: dict[str, str], response: bool) -> bool:
    """The pseudo-fields a request (method, scheme, non-empty path) or response (3-digit
    status) must carry."""
    if response:
        status = headers.get(":status", "")
        return len(status) == 3 and status.isdigit()
    return bool(headers.get(":method") and headers.get(":scheme") and headers.get(":path"))
