"""ETSI GS QKD 004 v2.1.1 frames: the binary TLS framing of ETSI's reference implementation,
as typed messages, without I/O.

The standard defines the API (OPEN_CONNECT, GET_KEY, CLOSE), not a wire format; this is the
framing existing 004 clients speak. Every message is an 8-byte header, then its payload:

* header: version major, minor, patch (three unsigned bytes), the service type (one signed
  byte), the payload length (big-endian uint32);
* service types: OPEN_CONNECT request/response 0x02/0x03, GET_KEY 0x04/0x05, CLOSE 0x08/0x09;
* OPEN_CONNECT request: source URI and destination URI, each NUL-terminated; QoS (7
  big-endian uint32: key_chunk_size in bytes, max_bps, min_bps, jitter, priority, timeout
  in ms, TTL in s, then a 256-byte NUL-padded metadata MIME type); the 16-byte
  Key_stream_ID (all zeros: the KME allocates one);
* OPEN_CONNECT response: status (uint32), the granted QoS, the Key_stream_ID;
* GET_KEY request: Key_stream_ID, index (uint32), metadata buffer size (uint32);
* GET_KEY response: status, index, key_chunk_size (uint32 each), the key bytes, metadata
  size (uint32), the metadata;
* CLOSE request: Key_stream_ID; CLOSE response: status.

The layouts are ``construct`` structures (the payloads not compiled: the compiled form
does not check that a fixed-size field was read whole). The hot path of a key stream, the
header, a GET_KEY request and its answer, is packed and unpacked by hand with ``struct``
(a few µs, where construct takes 30 to 70): the tests check both give the same bytes and
values, and construct still judges every payload the fast path does not take.
:class:`FrameReader` cuts a byte stream into frames (sans-IO: bytes in, frames out);
:func:`decode_request` / :func:`decode_response` turn a frame into its typed message,
:func:`encode` a message into a frame.

Everything is bounded before it is used: a header announcing more than the reader's
``max_payload`` is a :class:`FrameError` at once (the stream cannot be resynchronised), a
URI is at most :data:`MAX_URI` bytes of UTF-8 without control characters, a MIME type
printable ASCII, a key chunk at most :data:`MAX_CHUNK` bytes, metadata at most
:data:`MAX_METADATA`. A payload that does not match its layout exactly (truncated,
trailing bytes, a URI without its NUL) is a :class:`MalformedPayload` naming the service,
so a server answers it with that service's response and an error status. Nothing here
logs, and a message holding key bits prints without them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from construct import (
    Bytes,
    ConstructError,
    CString,
    GreedyBytes,
    Int8sb,
    Int8ub,
    Int32ub,
    Prefixed,
    Struct,
    Terminated,
    this,
)

from appliance.kms.errors import KmsError

VERSION = (2, 1, 1)
"""The version this side sends (004 v2.1.1); a peer's frames must have major version 2."""
HEADER_BYTES = 8
KSID_BYTES = 16
ZERO_KSID = bytes(KSID_BYTES)
MIME_BYTES = 256
MAX_URI = 255
"""Bytes of a source or destination URI (without its NUL)."""
MAX_CHUNK = 1024
"""Bytes of one key chunk (the relay's KSA key bound: 8,192 bits)."""
MAX_METADATA = 1024
"""Bytes of a GET_KEY answer's metadata."""
MAX_REQUEST = 2 * (MAX_URI + 1) + 7 * 4 + MIME_BYTES + KSID_BYTES
"""The largest request payload (an OPEN_CONNECT with two URIs of the longest)."""
MAX_RESPONSE = 3 * 4 + MAX_CHUNK + 4 + MAX_METADATA
"""The largest response payload (a GET_KEY answer with the longest chunk and metadata)."""
U32_MAX = (1 << 32) - 1


class Service(IntEnum):
    """The service type of a frame."""

    OPEN_CONNECT = 0x02
    OPEN_CONNECT_RESPONSE = 0x03
    GET_KEY = 0x04
    GET_KEY_RESPONSE = 0x05
    CLOSE = 0x08
    CLOSE_RESPONSE = 0x09


REQUESTS = (Service.OPEN_CONNECT, Service.GET_KEY, Service.CLOSE)


class Status(IntEnum):
    """004 status codes."""

    SUCCESS = 0
    PEER_NOT_CONNECTED = 1
    """OPEN_CONNECT succeeded, the peer application is not connected (yet)."""
    INSUFFICIENT_KEY = 2
    """GET_KEY failed: not enough key available."""
    GET_KEY_PEER_NOT_CONNECTED = 3
    """GET_KEY failed: the peer application is not connected."""
    NO_QKD_CONNECTION = 4
    """OPEN_CONNECT failed: no QKD connection available."""
    KSID_IN_USE = 5
    """OPEN_CONNECT failed: the Key_stream_ID is already in use."""
    TIMEOUT = 6
    """The call timed out, or the stream expired."""
    QOS_NOT_MET = 7
    """OPEN_CONNECT failed: the QoS cannot be met (the answer carries a counter-proposal)."""
    METADATA_TOO_SMALL = 8
    """GET_KEY failed: the metadata buffer is too small (the answer says how large)."""


class FrameError(KmsError):
    """The byte stream is not 004 framing this side can follow (bad version, a length past
    the bound): the connection cannot continue."""

    code = "E004-FRAME"


class MalformedPayload(KmsError):
    """A frame whose header is sound but whose payload does not match its layout."""

    code = "E004-PAYLOAD"

    def __init__(self, service: int, message: str) -> None:
        super().__init__(message)
        self.service = service


# -- layouts ---------------------------------------------------------------------------------
HEADER = Struct(
    "major" / Int8ub,
    "minor" / Int8ub,
    "patch" / Int8ub,
    "service" / Int8sb,
    "length" / Int32ub,
).compile()
QOS = Struct(
    "key_chunk_size" / Int32ub,
    "max_bps" / Int32ub,
    "min_bps" / Int32ub,
    "jitter" / Int32ub,
    "priority" / Int32ub,
    "timeout" / Int32ub,
    "ttl" / Int32ub,
    "metadata_mimetype" / Bytes(MIME_BYTES),
)
OPEN_CONNECT = Struct(
    "source" / CString("utf8"),
    "destination" / CString("utf8"),
    "qos" / QOS,
    "ksid" / Bytes(KSID_BYTES),
    Terminated,
)
OPEN_CONNECT_RESPONSE = Struct(
    "status" / Int32ub, "qos" / QOS, "ksid" / Bytes(KSID_BYTES), Terminated
)
GET_KEY = Struct(
    "ksid" / Bytes(KSID_BYTES), "index" / Int32ub, "metadata_size" / Int32ub, Terminated
)
GET_KEY_RESPONSE = Struct(
    "status" / Int32ub,
    "index" / Int32ub,
    "key_chunk_size" / Int32ub,
    "key" / Bytes(this.key_chunk_size),
    "metadata" / Prefixed(Int32ub, GreedyBytes),
    Terminated,
)
CLOSE = Struct("ksid" / Bytes(KSID_BYTES), Terminated)
CLOSE_RESPONSE = Struct("status" / Int32ub, Terminated)


_HEADER = struct.Struct(">BBBbI")
"""The header, as :data:`HEADER` (by hand: the hot path)."""
_GET_KEY = struct.Struct(">16sII")
_GET_KEY_ANSWER_HEAD = struct.Struct(">BBBbIIII")
"""Header, then status, index and key_chunk_size of a GET_KEY answer."""


# -- messages ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Qos:
    """A stream's quality of service, as asked or as granted."""

    key_chunk_size: int = 32
    """Bytes per chunk (per GET_KEY)."""
    max_bps: int = 0
    """The most key bits per second the application takes (0: no maximum)."""
    min_bps: int = 0
    """The key bits per second the application needs at least."""
    jitter: int = 0
    """Allowed deviation of the rate, bit/s (accepted and echoed)."""
    priority: int = 0
    """Accepted and echoed."""
    timeout: int = 0
    """Milliseconds (0: the KME's default)."""
    ttl: int = 0
    """Seconds the stream lives (0: the KME's default)."""
    metadata_mimetype: str = ""
    """MIME type of the GET_KEY metadata ("" for none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenConnect:
    """OPEN_CONNECT: open (or join) a key stream between two applications."""

    source: str
    """URI of the source application."""
    destination: str
    """URI of the destination application."""
    qos: Qos
    """Asked quality of service."""
    ksid: bytes = ZERO_KSID
    """The stream to join; all zeros asks the KME for a new one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenConnectAnswer:
    status: Status
    """SUCCESS or PEER_NOT_CONNECTED when open; the failure otherwise."""
    qos: Qos
    """Granted (or, with QOS_NOT_MET, what could be granted)."""
    ksid: bytes = ZERO_KSID
    """The stream (zeros when none was opened)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GetKey:
    """GET_KEY: the chunk of a stream at an index."""

    ksid: bytes
    index: int
    metadata_size: int
    """Bytes of metadata the caller can take."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GetKeyAnswer:
    status: Status
    index: int
    key: bytearray = field(default_factory=bytearray)
    """The chunk (empty unless SUCCESS); the receiver erases it after use."""
    metadata: bytes = b""
    """On METADATA_TOO_SMALL: empty, and ``metadata_needed`` says how large."""
    metadata_needed: int = 0

    def __repr__(self) -> str:
        return (
            f"GetKeyAnswer(status={self.status!r}, index={self.index}, "
            f"key=<{len(self.key)} bytes redacted>, metadata={len(self.metadata)} bytes)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    """CLOSE: end this application's part of a stream."""

    ksid: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseAnswer:
    status: Status


Request = OpenConnect | GetKey | Close
Response = OpenConnectAnswer | GetKeyAnswer | CloseAnswer


@dataclass(frozen=True, slots=True)
class Frame:
    """A header and its payload, as cut from the stream."""

    version: tuple[int, int, int]
    service: int
    payload: bytes


# -- the stream of frames ------------------------------------------------------------------------
class FrameReader:
    """Sans-IO: :meth:`feed` bytes, get the complete frames. FrameError for a header this
    side cannot follow (major version other than 2, or a length above ``max_payload``);
    after it the reader takes nothing more. ``pending`` says whether a frame has begun."""

    def __init__(self, max_payload: int = MAX_REQUEST) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._failed: FrameError | None = None

    @property
    def pending(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER_BYTES:
            major, minor, patch, service, length = _HEADER.unpack_from(self._buf)
            if major != VERSION[0]:
                self._failed = FrameError(f"004 version {major}.x is not served (2.x)")
            elif length > self.max_payload:
                self._failed = FrameError(
                    f"a payload of {length} bytes (at most {self.max_payload})"
                )
            if self._failed is not None:
                self._buf.clear()
                raise self._failed
            end = HEADER_BYTES + length
            if len(self._buf) < end:
                break
            frames.append(Frame((major, minor, patch), service, bytes(self._buf[HEADER_BYTES:end])))
            del self._buf[:end]
        return frames


# -- decoding ------------------------------------------------------------------------------------
def decode_request(frame: Frame) -> Request:
    """The request a frame carries; MalformedPayload (naming the service) if its payload does
    not match, FrameError for a service type that is not a request."""
    service = frame.service
    if service not in REQUESTS:
        raise FrameError(f"service type {service:#04x} is not a request this KME serves")
    if service == Service.GET_KEY and len(frame.payload) == _GET_KEY.size:  # the hot path
        ksid, index, metadata_size = _GET_KEY.unpack(frame.payload)
        return GetKey(ksid=ksid, index=index, metadata_size=metadata_size)
    try:
        if service == Service.GET_KEY:
            c = GET_KEY.parse(frame.payload)
            return GetKey(ksid=c.ksid, index=c.index, metadata_size=c.metadata_size)
        if service == Service.CLOSE:
            return Close(ksid=CLOSE.parse(frame.payload).ksid)
        c = OPEN_CONNECT.parse(frame.payload)
        return OpenConnect(
            source=_uri(c.source),
            destination=_uri(c.destination),
            qos=_qos(c.qos),
            ksid=c.ksid,
        )
    except (ConstructError, UnicodeDecodeError, ValueError) as exc:
        raise MalformedPayload(service, f"malformed {Service(service).name} payload") from exc


def decode_response(frame: Frame) -> Response:
    """The response a frame carries (for clients); MalformedPayload or FrameError."""
    service = frame.service
    try:
        if service == Service.GET_KEY_RESPONSE:
            c = GET_KEY_RESPONSE.parse(frame.payload)
            if c.key_chunk_size > MAX_CHUNK or len(c.metadata) > MAX_METADATA:
                raise ValueError("key chunk or metadata too long")
            return GetKeyAnswer(
                status=Status(c.status),
                index=c.index,
                key=bytearray(c.key),
                metadata=c.metadata,
            )
        if service == Service.CLOSE_RESPONSE:
            return CloseAnswer(status=Status(CLOSE_RESPONSE.parse(frame.payload).status))
        if service == Service.OPEN_CONNECT_RESPONSE:
            c = OPEN_CONNECT_RESPONSE.parse(frame.payload)
            return OpenConnectAnswer(status=Status(c.status), qos=_qos(c.qos), ksid=c.ksid)
    except (ConstructError, UnicodeDecodeError, ValueError) as exc:
        raise MalformedPayload(service, f"malformed response {service:#04x}") from exc
    raise FrameError(f"service type {service:#04x} is not a response")


def _uri(text: str) -> str:
    if not 0 < len(text.encode()) <= MAX_URI or not text.isprintable():
        raise ValueError("a URI of 1 to 255 bytes, printable")
    return text


def _qos(c: object) -> Qos:
    raw: bytes = c.metadata_mimetype  # type: ignore[attr-defined]
    mime, _, pad = raw.partition(b"\0")
    if pad.strip(b"\0") or not all(0x20 < b < 0x7F for b in mime):
        raise ValueError("the MIME type is printable ASCII, NUL-padded")
    return Qos(
        key_chunk_size=c.key_chunk_size,  # type: ignore[attr-defined]
        max_bps=c.max_bps,  # type: ignore[attr-defined]
        min_bps=c.min_bps,  # type: ignore[attr-defined]
        jitter=c.jitter,  # type: ignore[attr-defined]
        priority=c.priority,  # type: ignore[attr-defined]
        timeout=c.timeout,  # type: ignore[attr-defined]
        ttl=c.ttl,  # type: ignore[attr-defined]
        metadata_mimetype=mime.decode("ascii"),
    )


# -- encoding ------------------------------------------------------------------------------------
def encode(message: Request | Response) -> bytes | bytearray:
    """The frame (header and payload) of a message (a GET_KEY answer's in a bytearray, for
    its key bits to be erased once written)."""
    if isinstance(message, GetKeyAnswer):  # the hot path
        return encode_key_answer(message)
    service, payload = _payload(message)
    head: bytes = HEADER.build(
        {
            "major": VERSION[0],
            "minor": VERSION[1],
            "patch": VERSION[2],
            "service": service,
            "length": len(payload),
        }
    )
    return head + payload


def encode_key_answer(message: GetKeyAnswer) -> bytearray:
    """A GET_KEY answer's frame, by hand (equal to :data:`GET_KEY_RESPONSE` after
    :data:`HEADER`), in a buffer the caller erases once written (and ``message.key``)."""
    key, metadata = message.key, message.metadata
    if len(key) > U32_MAX or len(metadata) > U32_MAX:
        raise ValueError("a key chunk or metadata too long")
    length = 12 + len(key) + 4 + len(metadata)
    head = _GET_KEY_ANSWER_HEAD.pack(
        *VERSION, Service.GET_KEY_RESPONSE, length, int(message.status), message.index, len(key)
    )
    frame = bytearray(head)
    frame += key
    frame += len(metadata).to_bytes(4, "big")
    frame += metadata
    return frame


def _payload(message: Request | Response) -> tuple[Service, bytes]:
    if isinstance(message, GetKey):
        return Service.GET_KEY, GET_KEY.build(_fields(message))
    if isinstance(message, GetKeyAnswer):
        data = {
            "status": int(message.status),
            "index": message.index,
            "key_chunk_size": len(message.key),
            "key": bytes(message.key),
            "metadata": message.metadata,
        }
        return Service.GET_KEY_RESPONSE, GET_KEY_RESPONSE.build(data)
    if isinstance(message, Close):
        return Service.CLOSE, CLOSE.build({"ksid": message.ksid})
    if isinstance(message, CloseAnswer):
        return Service.CLOSE_RESPONSE, CLOSE_RESPONSE.build({"status": int(message.status)})
    if isinstance(message, OpenConnect):
        data = {
            "source": message.source,
            "destination": message.destination,
            "qos": _qos_fields(message.qos),
            "ksid": message.ksid,
        }
        return Service.OPEN_CONNECT, OPEN_CONNECT.build(data)
    data = {"status": int(message.status), "qos": _qos_fields(message.qos), "ksid": message.ksid}
    return Service.OPEN_CONNECT_RESPONSE, OPEN_CONNECT_RESPONSE.build(data)


def _fields(message: GetKey) -> dict[str, object]:
    return {"ksid": message.ksid, "index": message.index, "metadata_size": message.metadata_size}


def _qos_fields(qos: Qos) -> dict[str, object]:
    mime = qos.metadata_mimetype.encode("ascii")
    if len(mime) >= MIME_BYTES:
        raise ValueError("a MIME type of at most 255 bytes")
    return {
        "key_chunk_size": qos.key_chunk_size,
        "max_bps": qos.max_bps,
        "min_bps": qos.min_bps,
        "jitter": qos.jitter,
        "priority": qos.priority,
        "timeout": qos.timeout,
        "ttl": qos.ttl,
        "metadata_mimetype": mime.ljust(MIME_BYTES, b"\0"),
    }
