"""HTTP/1.1 over mutual TLS (for ETSI GS QKD 014 clients), on asyncio and ``h11``.

Same :class:`Request`/:class:`Response` types and handler signature as the HTTP/2 server.
Connections are kept alive. A malformed request gets a JSON 400 (014 clients parse a JSON
body on every non-200 reply) and the connection is closed; the handler is never called
with an unparsed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl

import h11

from appliance.net.h2 import Request, Response, TlsServer
from appliance.pki import peer_name

MAX_BODY = 1 << 20
READ_CHUNK = 1 << 16


def _json_error(status: int, message: str) -> Response:
    body = json.dumps({"message": message}).encode()
    return Response(status, body, {"content-type": "application/json"})


class H1Server(TlsServer):
    """Serve ``handler`` over HTTP/1.1 with TLS."""

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_name(writer.get_extra_info("ssl_object"))
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while await self._one_exchange(conn, reader, writer, peer):
                conn.start_next_cycle()

    async def _one_exchange(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str | None,
    ) -> bool:
        """Read one request, answer it; False when the connection should end."""
        try:
            request = await self._read_request(conn, reader, peer)
        except h11.RemoteProtocolError as exc:
            await self._send(conn, writer, _json_error(400, f"malformed HTTP request: {exc}"))
            return False
        if request is None:
            return False
        try:
            response = await self.handler(request)
        except Exception:  # a handler bug must not kill the server
            response = _json_error(503, "internal error")
        await self._send(conn, writer, response)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, peer: str | None
    ) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_CHUNK)
                conn.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
                return Request(
                    head.method.decode(), head.target.decode("latin-1"), bytes(body), headers, peer
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        headers = [("content-length", str(len(response.body))), *response.headers.items()]
        try:
            data = conn.send(h11.Response(status_code=response.status, headers=headers))
            data += conn.send(h11.Data(data=response.body)) if response.body else b""
            data += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        writer.write(data)
        await writer.drain()
