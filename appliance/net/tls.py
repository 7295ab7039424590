"""A lean server-side TLS layer on a plain asyncio transport, for the SAE edge.

Why it exists: a refused handshake must send its TLS alert (``certificate_required``,
``unknown_ca``: ETSI 014 SAEs are not ours and must be told why), and the event loop's own
TLS (uvloop's, in C) closes without it. asyncio's Python layer (``sslproto``) sends it once
told to, but its general machinery (flow-control states, write backlog, buffered-protocol
modes) costs a UKMS about a seventh of its CPU per request. This layer does only what a
server of whole requests needs: it feeds the received bytes to an ``ssl.SSLObject`` over
memory BIOs, hands the plaintext to the application protocol, encrypts what that protocol
writes, and writes every byte OpenSSL produces, an alert included, before closing.

What it does not do: renegotiation (refused by the context, ``OP_NO_RENEGOTIATION``),
client-side TLS, or ``write_eof``. A handshake not done within :data:`HANDSHAKE_TIMEOUT`
seconds is aborted. Key material never passes through here: only TLS records and the HTTP
bytes of the application protocol, which this module neither logs nor keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any, cast

log = logging.getLogger("qkdn.net")

HANDSHAKE_TIMEOUT = 30.0
"""Seconds a client has from its connection to the end of its handshake."""
LINGER = 2.0
"""Seconds a refused connection is kept half-closed for its alert to be read."""
READ_CHUNK = 256 * 1024
"""Plaintext bytes taken from OpenSSL per read call."""


class AlertingTls(asyncio.Protocol):
    """The TLS server side of one accepted connection; ``app`` sees a TLS transport."""

    def __init__(self, app: asyncio.Protocol, ctx: ssl.SSLContext) -> None:
        self.app = app
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._tcp: asyncio.Transport | None = None
        self._app_transport = _TlsTransport(self)
        self._connected = False  # the handshake is done and the app was told
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None

    # -- the TCP side -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._in.write(data)
        if not self._connected and not self._handshake():
            return
        self._read()

    def eof_received(self) -> bool | None:
        return False  # the TCP transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._connected:
            self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._connected:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self._connected:
            self.app.resume_writing()

    # -- TLS ------------------------------------------------------------------------------
    def _handshake(self) -> bool:
        """Advance the handshake; True once it is done (the app then has its transport)."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as exc:  # refused: the alert OpenSSL wrote goes out first
            log.debug("TLS handshake refused", extra={"reason": exc.reason or exc.__class__})
            self._flush()
            self._linger()
            return False
        self._flush()  # the end of the handshake, and TLS 1.3 session tickets
        if self._timer is not None:
            self._timer.cancel()
        self._connected = True
        self.app.connection_made(self._app_transport)
        return not self._closing

    def _read(self) -> None:
        while not self._closing:
            try:
                chunk = self._ssl.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the client's close_notify
                self.close()
                break
            except ssl.SSLError as exc:
                log.debug("TLS record refused", extra={"reason": exc.reason or exc.__class__})
                self._flush()
                self._close_tcp()
                break
            if not chunk:
                self.close()
                break
            self.app.data_received(chunk)
        self._flush()

    def _flush(self) -> None:
        if self._out.pending and self._tcp is not None and not self._tcp.is_closing():
            self._tcp.write(self._out.read())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        view = memoryview(data)
        while view:
            view = view[self._ssl.write(view) :]
        self._flush()

    def close(self) -> None:
        """close_notify, then the socket once what is written has left."""
        if self._closing:
            return
        if self._connected:
            with contextlib.suppress(ssl.SSLError):  # the client's close_notify: not waited for
                self._ssl.unwrap()
            self._flush()
        self._close_tcp()

    def _linger(self) -> None:
        """After a refused handshake: the alert leaves with a FIN, and what the client still
        sends (an HTTP/2 client's preface follows its Finished at once) is read and dropped
        until it closes, for at most :data:`LINGER` seconds. Closing with bytes unread
        would send a reset, which can destroy the alert before the client reads it."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._tcp is None or self._tcp.is_closing() or not self._tcp.can_write_eof():
            self._close_tcp()
            return
        self._tcp.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGER, self._close_tcp)

    def _close_tcp(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.close()

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def _too_slow(self) -> None:
        if not self._connected:
            log.debug("TLS handshake timed out")
            self.abort()

    def extra(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        return default if self._tcp is None else self._tcp.get_extra_info(name, default)


class _TlsTransport(asyncio.Transport):
    """What the application protocol holds: plaintext in, TLS records out."""

    def __init__(self, tls: AlertingTls) -> None:
        super().__init__()
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def is_closing(self) -> bool:
        return self._tls._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.extra(name, default)

    def pause_reading(self) -> None:
        if self._tls._tcp is not None:
            self._tls._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._tls._tcp is not None:
            self._tls._tcp.resume_reading()

    def is_reading(self) -> bool:
        return self._tls._tcp is not None and self._tls._tcp.is_reading()

    def get_write_buffer_size(self) -> int:
        return 0 if self._tls._tcp is None else self._tls._tcp.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tls._tcp is not None:
            self._tls._tcp.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return False
