"""TLS at the SAE edge: the event loop's own TLS, made to send the alert of a refused handshake.

Why it exists: a refused handshake must send its TLS alert (``certificate_required``,
``unknown_ca``: ETSI 014 SAEs are not ours and must be told why). The event loop's TLS
(uvloop's, in C; asyncio's own has the same shape) runs the handshake on an
``ssl.SSLObject`` over memory BIOs and, when ``do_handshake`` raises, closes the socket
without writing what OpenSSL put in the outgoing BIO: the alert is lost. When
``do_handshake`` asks for more bytes instead, the loop first writes out the outgoing BIO.

So the edge's context (:func:`alerting`) makes its TLS objects :class:`AlertFirst`: a
refused handshake is reported to the loop as "more bytes wanted" once, the loop sends the
alert, and the refusal itself is raised at the next call, when the client's next bytes
come (its first request, say), and the loop closes the connection. A client that reads the
alert and closes ends it at once; one that says nothing more is dropped by the loop's
handshake timeout (:data:`HANDSHAKE_TIMEOUT`). Only the handshake runs through Python here:
once it is done, the connection's records are the loop's business alone (in C for uvloop),
which is what a request costs at the edge.

What it does not do: renegotiation (refused by the context, ``OP_NO_RENEGOTIATION``) or
client-side TLS. Key material never passes through here: only the handshake.
"""

from __future__ import annotations

import ssl

HANDSHAKE_TIMEOUT = 30.0
"""Seconds a client has from its connection to the end of its handshake (and a refused
client that neither closes nor sends anything, to read its alert)."""


class AlertFirst(ssl.SSLObject):
    """A server-side TLS object whose refused handshake lets the loop send the alert first
    (see the module's docstring)."""

    refusal: ssl.SSLError | None = None
    """Why the handshake was refused (set once the alert is on its way)."""

    def do_handshake(self) -> None:
        if self.refusal is not None:
            raise self.refusal
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:  # the alert OpenSSL wrote is in the outgoing BIO
            self.refusal = exc
            raise ssl.SSLWantReadError("handshake refused: the alert goes out first") from exc


def alerting(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """``ctx``, its TLS objects made :class:`AlertFirst` (``SSLContext.sslobject_class``)."""
    ctx.sslobject_class = AlertFirst
    return ctx
