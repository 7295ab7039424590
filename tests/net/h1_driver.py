"""Drives one session of the HTTP/1.1 server without sockets (bytes in, response bytes out),
and reads what it wrote back as HTTP responses, strictly (llhttp's response parser)."""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

import httptools

from appliance.net.h2 import Handler
from appliance.net.http1 import H1Server


class _Peer:
    """Stands for the TLS object: the client certificate's subject."""

    def __init__(self, cn: str) -> None:
        self.cn = cn

    def getpeercert(self) -> dict[str, Any]:
        return {"subject": ((("commonName", self.cn),),)}


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: str | None) -> None:
        super().__init__()
        self.peer = None if peer is None else _Peer(peer)
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "a write after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "ssl_object" else default


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the points of ``cuts`` that fall inside it."""
    points = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def server(handler: Handler, **options: Any) -> H1Server:
    return H1Server(handler, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), **options)


async def exchange(
    srv: H1Server, pieces: list[bytes], *, peer: str | None = "sae-1", settle: bool = True
) -> FakeTransport:
    """Feed ``pieces`` to a new session (letting it answer between pieces if ``settle``),
    wait until it has answered all it can, then drop the connection."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    transport = FakeTransport(peer)
    session: Any = srv._session()
    session.connection_made(transport)
    for piece in pieces:
        session.data_received(piece)
        if settle:
            await _settled(session)
    await _settled(session)
    session.connection_lost(None)
    await asyncio.sleep(0)
    assert not errors, errors
    return transport


async def _settled(session: Any) -> None:
    for _ in range(1000):
        if session.task is None:
            return
        await asyncio.sleep(0)
    raise AssertionError("the session did not finish answering")


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


class _Collector:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.current = Reply(0)
        self.partial = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_message_begin(self) -> None:
        self.current, self.partial = Reply(0), True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self.current.status, self.partial = self.parser.get_status_code(), False
        self.replies.append(self.current)


def replies(raw: bytes) -> list[Reply]:
    """The responses in ``raw``, which must be whole, well-formed HTTP/1.1 responses."""
    collector = _Collector()
    collector.parser = httptools.HttpResponseParser(collector)
    collector.parser.feed_data(raw)
    assert not collector.partial, f"a response cut short: {bytes(raw[-200:])!r}"
    return collector.replies
