"""Driver for vendor QKD modules that act as an ETSI GS QKD 014 KME: ``etsi014+https://...``.

URL format::

    etsi014+https://qkdm-8.local:8443?sae=kms-8&peer_sae=kms-9&cert=/etc/qkdn/kms-8.pem
                   &key=/etc/qkdn/kms-8.key&ca=/etc/qkdn/qkdm-ca.pem

=========== ============================================================== ==========
parameter   meaning                                                        default
=========== ============================================================== ==========
sae         this KMS's SAE ID (its client certificate names it)            required
peer_sae    the SAE ID of the KMS at the other end of the link             required
cert        client certificate (PEM; may also hold the private key)        required
key         client private key (PEM), if not in ``cert``                   none
ca          CA bundle that signs the KME's certificate                     system CAs
size        key size to ask for, bits                                      KME default
timeout     seconds for connecting and for each answer                     5
retries     extra attempts where a retry is safe (see :mod:`hal.etsi014`)  2
backoff     first wait before a retry, s (doubles each time)               0.2
batch       keys asked for per ``enc_keys`` (``number``), 1..128           32
idle        seconds a kept-alive connection may rest before it is replaced 4
=========== ============================================================== ==========

:meth:`get_key` hands out keys of the master end, taken from the KME ``batch`` at a time
with ``enc_keys`` for ``peer_sae`` (fewer when the KME holds fewer, down to one) and held
in memory until handed out (erased by :meth:`close`); :meth:`get_key_by_id` is ``dec_keys``
from ``peer_sae`` (this end is the slave). Mutual TLS: the KME must present a certificate
from ``ca`` for the URL's host, and this end presents ``cert``.

One connection is kept alive and reused. Before a request goes out on it, a connection
the KME has closed (readable, or idle longer than ``idle``) is replaced, so a request is
only ever lost with a connection that fails under it. Retries: a refused connection and a
503 are retried with backoff (nothing was served); a lost answer is retried only for
``status`` and ``dec_keys``. A lost ``enc_keys`` answer raises KeyOutcomeUnknown, never a
second request, so no key is delivered twice: the keys it may have drawn (up to
``batch``) are given up. A KME that cannot be reached yields a ``down`` status, not an
exception. Calls are serialised by a lock (the connection and the held keys are shared).
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from hal import etsi014
from hal.clock import Clock
from hal.errors import (
    DeviceDisconnected,
    DeviceError,
    DeviceTimeout,
    DeviceUnavailable,
    DeviceUrlError,
    HalError,
    KeyNotFound,
    KeyOutcomeUnknown,
    NoKeyAvailable,
    TrustError,
)
from hal.qkdm import LinkState, QkdKey, Qkdm, QkdmStatus
from hal.url import DeviceUrl


class _NotSent(Exception):
    """The request never reached the KME (refused, TLS failure before sending)."""


class Etsi014Qkdm(Qkdm):
    """One end of a QKD link whose module speaks ETSI 014 as a KME."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sae: str,
        peer_sae: str,
        context: ssl.SSLContext,
        size: int | None = None,
        timeout: float = 5.0,
        retries: int = 2,
        backoff: float = 0.2,
        batch: int = 32,
        idle: float = 4.0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port, self.sae, self.peer_sae = host, port, sae, peer_sae
        self.name = f"etsi014:{sae}@{host}:{port}"
        self._ctx, self._size, self._timeout = context, size, timeout
        self._retries, self._backoff, self._sleep = retries, backoff, sleep
        self._batch, self._idle, self._monotonic = batch, idle, monotonic
        self._last: etsi014.KmeStatus | None = None
        self._held: deque[QkdKey] = deque()
        self._conn: http.client.HTTPSConnection | None = None
        self._rested_since = 0.0
        self._lock = threading.RLock()

    # -- the Qkdm interface ---------------------------------------------------------------
    def get_key(self) -> QkdKey:
        with self._lock:
            if not self._held:
                self._held.extend(self._draw())
            return self._held.popleft()

    def get_key_by_id(self, key_id: str) -> QkdKey:
        with self._lock:
            request = etsi014.dec_keys_request(self.peer_sae, [key_id])
            body = self._call(request)
            return etsi014.parse_keys(body, number=1, size_bits=None)[0]

    def key_count(self) -> int:
        with self._lock:
            return self._status().stored_key_count + len(self._held)

    def close(self) -> None:
        """Erase the keys held and close the connection."""
        with self._lock:
            while self._held:
                self._held.popleft().erase()
            self._drop_connection()

    def _draw(self) -> list[QkdKey]:
        """One ``enc_keys`` of up to ``batch`` keys (and at most the KME's
        ``max_key_per_request``, read once from its status first); fewer, down to one,
        while the KME says it holds too few (a definite answer: nothing was drawn)."""
        last = self._last if self._last is not None or self._batch == 1 else self._status()
        number = min(self._batch, last.max_key_per_request if last is not None else 1)
        while True:
            request = etsi014.enc_keys_request(self.peer_sae, number, self._size)
            try:
                body = self._call(request)
            except NoKeyAvailable:
                if number == 1:
                    raise
                number = max(1, number // 4)
                continue
            return etsi014.parse_keys(body, number=number, size_bits=self._expected_size())

    def status(self) -> QkdmStatus:
        with self._lock:
            try:
                kme = self._status()
            except DeviceError as exc:
                return self._down(exc.message)
            held = len(self._held)
        ext = kme.extension
        state = kme.link_state()
        reading = QkdmStatus(
            link=str(ext.get("link") or f"{kme.source_kme}-{kme.target_kme}")[:64],
            state=state,
            skr_bps=etsi014.finite_or_none(ext.get("skr_bps")) or 0.0,
            qber=etsi014.finite_or_none(ext.get("qber")),
            key_count=kme.stored_key_count + held,
            max_key_count=kme.max_key_count,
            key_size=kme.key_size,
            keys_produced=int(etsi014.finite_or_none(ext.get("keys_produced")) or 0),
        )
        self._observe_state(state, "status reading", link=reading.link)
        return reading

    # -- internals ------------------------------------------------------------------------
    def _status(self) -> etsi014.KmeStatus:
        self._last = etsi014.parse_status(self._call(etsi014.status_request(self.peer_sae)))
        return self._last

    def _expected_size(self) -> int | None:
        if self._size is not None:
            return self._size
        return self._last.key_size if self._last else None

    def _down(self, reason: str) -> QkdmStatus:
        self._observe_state(LinkState.DOWN, reason)
        last = self._last
        return QkdmStatus(
            link=f"{last.source_kme}-{last.target_kme}" if last else self.name,
            state=LinkState.DOWN,
            skr_bps=0.0,
            qber=None,
            key_count=0,
            max_key_count=last.max_key_count if last else 0,
            key_size=last.key_size if last else 0,
            keys_produced=0,
        )

    def _call(self, request: etsi014.Request) -> bytes:
        """The 200 body for ``request``, with the retries that are safe; else a typed error."""
        try:
            return self._attempts(request)
        except (DeviceDisconnected, DeviceTimeout, TrustError) as exc:
            self._observe_state(LinkState.DOWN, exc.message)
            raise

    def _attempts(self, request: etsi014.Request) -> bytes:
        delay, outcome_unknown = self._backoff, False
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            try:
                status, body = self._once(request)
            except _NotSent as exc:
                if last:
                    raise DeviceDisconnected(f"{self.name}: {exc}") from None
            except TimeoutError:
                outcome_unknown = True
                if last or not request.retry_unknown_outcome:
                    raise self._lost(request, "no answer in time") from None
            except (OSError, http.client.HTTPException) as exc:
                outcome_unknown = True
                if last or not request.retry_unknown_outcome:
                    raise self._lost(request, f"connection lost ({type(exc).__name__})") from None
            else:
                if status == 200:
                    return body
                error = etsi014.error_for(status, body, self.name)
                if isinstance(error, KeyNotFound) and outcome_unknown:
                    raise KeyOutcomeUnknown(
                        f"{self.name}: key not found after a lost answer: it may have been "
                        "served to the lost request; treat it as unusable"
                    )
                if not isinstance(error, DeviceUnavailable) or last:
                    raise error
            self._sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _lost(self, request: etsi014.Request, why: str) -> HalError:
        if request.retry_unknown_outcome:
            return DeviceTimeout(f"{self.name}: {why}")
        return KeyOutcomeUnknown(
            f"{self.name}: {why} after enc_keys was sent; the key it may have drawn is "
            "not retried, so it is never delivered twice"
        )

    def _once(self, request: etsi014.Request) -> tuple[int, bytes]:
        """One exchange on the kept-alive connection (opened first if need be); the
        connection is dropped after any failure and after an answer that ends it."""
        conn = self._connection()
        headers = {"Accept": "application/json"}
        if request.body is not None:
            headers["Content-Type"] = "application/json"
        reusable = False
        try:
            conn.request(request.method, request.path, body=request.body, headers=headers)
            response = conn.getresponse()
            body = response.read(etsi014.MAX_BODY + 1)
            if len(body) > etsi014.MAX_BODY:
                raise DeviceError(f"{self.name}: KME answer larger than {etsi014.MAX_BODY} bytes")
            reusable = not response.will_close and response.isclosed()
            return response.status, body
        except ssl.SSLError as exc:
            if "CERTIFICATE" in str(exc.reason or "").upper():
                raise TrustError(f"{self.name}: KME refused our certificate") from None
            raise
        finally:
            if reusable:
                self._rested_since = self._monotonic()
            else:
                self._drop_connection()

    def _connection(self) -> http.client.HTTPSConnection:
        """The kept-alive connection if the KME has not closed it and it has not rested
        longer than ``idle``; else a new one (a failure here sent nothing: _NotSent)."""
        conn = self._conn
        if conn is not None and (
            self._monotonic() - self._rested_since > self._idle or _closed_by_peer(conn)
        ):
            self._drop_connection()
            conn = None
        if conn is not None:
            return conn
        conn = http.client.HTTPSConnection(
            self.host, self.port, context=self._ctx, timeout=self._timeout
        )
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise TrustError(f"{self.name}: KME certificate rejected: {exc.reason}") from None
        except ssl.SSLError as exc:
            conn.close()
            raise TrustError(f"{self.name}: TLS handshake failed: {exc.reason}") from None
        except OSError as exc:
            conn.close()
            raise _NotSent(exc.strerror or type(exc).__name__) from None
        if conn.sock is not None:  # small requests go out at once (no Nagle wait)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = conn
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _closed_by_peer(conn: http.client.HTTPSConnection) -> bool:
    """Whether a resting connection has something to read: the KME closed it (EOF or a
    TLS close_notify), or sent what no request asked for. Either way it is not reused."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def client_context(cert: str, key: str | None, ca: str | None) -> ssl.SSLContext:
    """A TLS 1.2+ client context presenting ``cert`` and trusting ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        detail = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or "unreadable"
        raise DeviceUrlError(f"etsi014: client certificate {cert}: {detail}") from None
    return ctx


def open_qkdm(url: DeviceUrl, clock: Clock | None = None) -> Etsi014Qkdm:
    """Open a vendor QKDM's KME from its parsed URL."""
    parts = urlsplit(f"https://{url.name}")
    try:
        port = parts.port or 443
    except ValueError:
        raise DeviceUrlError(f"{url.raw}: bad port") from None
    if not parts.hostname or url.path not in ("", "/"):
        raise DeviceUrlError(f"{url.raw}: expected etsi014+https://HOST[:PORT]?sae=...")
    sae, peer = url.take_str("sae"), url.take_str("peer_sae")
    cert, key, ca = url.take_str("cert"), url.take_optional("key"), url.take_optional("ca")
    size_raw = url.take_optional("size")
    timeout = url.take_float("timeout", 5.0, lo=0.001, hi=600.0)
    retries = url.take_int("retries", 2, lo=0, hi=20)
    backoff = url.take_float("backoff", 0.2, lo=0.0, hi=60.0)
    batch = url.take_int("batch", 32, lo=1, hi=128)
    idle = url.take_float("idle", 4.0, lo=0.0, hi=3600.0)
    url.finish()
    size = None
    if size_raw is not None:
        if not size_raw.isdigit() or int(size_raw) % 8 or not 8 <= int(size_raw) <= 1 << 20:
            raise DeviceUrlError(f"{url.raw}: size must be a positive multiple of 8 bits")
        size = int(size_raw)
    return Etsi014Qkdm(
        host=parts.hostname,
        port=port,
        sae=sae,
        peer_sae=peer,
        context=client_context(cert, key, ca),
        size=size,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        batch=batch,
        idle=idle,
    )
