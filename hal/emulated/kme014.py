"""An emulated vendor QKD module pair that serves ETSI GS QKD 014 over mutual TLS.

One HTTPS server plays the KMEs of both ends of one emulated link: the master SAE takes
keys with ``enc_keys`` from end ``a`` of the link, the slave SAE takes the same keys by
ID with ``dec_keys`` from end ``b``. A caller is identified by the common name of its
client certificate, as vendor KMEs do. Errors are JSON, as clients expect; the
``details`` member carries a ``hal_code`` so the emulator's errors map exactly.

:class:`KmeFaults` injects what field KMEs do: 503s, malformed JSON, answers that never
come, and connections dropped after a key was drawn. Test and bench equipment only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from hal.errors import HalError, KeyNotFound, LinkDownError, NoKeyAvailable
from hal.qkdm import LinkState, QkdKey, Qkdm


@dataclass(kw_only=True)
class KmeFaults:
    """Faults the KME injects into its next answers (counts decrease as they fire)."""

    unavailable: int = 0
    """Answer this many requests with 503."""
    malformed: int = 0
    """Answer this many key requests with a body that is not JSON (no key drawn)."""
    hang: bool = False
    """Stop answering (requests wait until this is cleared or the server stops)."""
    drop_after_draw: int = 0
    """Draw a key, then close the connection without answering, this many times."""


class EmulatedKme:
    """The HTTPS server; ``start()`` binds 127.0.0.1 (port 0 picks a free one)."""

    def __init__(
        self,
        *,
        master: Qkdm,
        slave: Qkdm,
        master_sae: str,
        slave_sae: str,
        server_pem: Path,
        ca_pem: Path,
        port: int = 0,
    ) -> None:
        self.master, self.slave = master, slave
        self.master_sae, self.slave_sae = master_sae, slave_sae
        self.faults = KmeFaults()
        self.served = 0  # keys drawn from the module (including dropped answers)
        self.connections = 0  # TLS connections accepted
        self.calls: Counter[str] = Counter()  # requests by operation (status, enc_keys, ...)
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.port = port
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_pem))
        ctx.load_cert_chain(str(server_pem))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.context = ctx
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmulatedKme:
        """Listen and serve in a thread (again after :meth:`stop`, on the same port)."""
        self.release.clear()
        self._server = _Server(("127.0.0.1", self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop the open connections (kept alive by clients), as a KME
        that goes away does; hanging requests are released."""
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.drop_connections()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)

    def drop_connections(self) -> None:
        """Close every open connection, as a KME closes the idle ones."""
        if self._server is not None:
            self._server.drop_connections()

    def __enter__(self) -> EmulatedKme:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the API --------------------------------------------------------------------------
    def handle(self, caller: str, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """(HTTP status, JSON document, or a bytes body for malformed answers)."""
        parts = path.split("?", 1)[0].strip("/").split("/")
        if len(parts) != 5 or parts[:3] != ["api", "v1", "keys"]:
            return 404, {"message": "no such resource"}
        sae, call = unquote(parts[3]), parts[4]
        self.calls[call] += 1
        if caller not in (self.master_sae, self.slave_sae):
            return 401, {"message": "unknown SAE (client certificate)"}
        if call == "status":
            return self._status(caller, sae)
        if call == "enc_keys" and caller == self.master_sae and sae == self.slave_sae:
            return self._enc_keys(body, method)
        if call == "dec_keys" and caller == self.slave_sae and sae == self.master_sae:
            return self._dec_keys(body)
        if call in ("enc_keys", "dec_keys"):
            return _error(400, "key not found: no such SAE pair for this caller", KeyNotFound)
        return 404, {"message": "no such resource"}

    def _module(self, caller: str) -> Qkdm | None:
        return {self.master_sae: self.master, self.slave_sae: self.slave}.get(caller)

    def _status(self, caller: str, sae: str) -> tuple[int, Any]:
        module = self._module(caller)
        if module is None or {caller, sae} != {self.master_sae, self.slave_sae}:
            return 401, {"message": "unknown SAE pair"}
        s = module.status()
        master = caller == self.master_sae
        return 200, {
            "source_KME_ID": "kme-a" if master else "kme-b",
            "target_KME_ID": "kme-b" if master else "kme-a",
            "master_SAE_ID": self.master_sae if master else self.slave_sae,
            "slave_SAE_ID": self.slave_sae if master else self.master_sae,
            "key_size": s.key_size,
            "stored_key_count": s.key_count,
            "max_key_count": s.max_key_count,
            "max_key_per_request": 128,
            "max_key_size": s.key_size,
            "min_key_size": s.key_size,
            "max_SAE_ID_count": 0,
            "status_extension": {
                "link": s.link,
                "link_state": s.state.value,
                "skr_bps": s.skr_bps,
                "qber": s.qber,
                "keys_produced": s.keys_produced,
            },
        }

    def _enc_keys(self, body: bytes, method: str) -> tuple[int, Any]:
        try:
            doc = json.loads(body or b"{}") if method == "POST" else {}
            number = int(doc.get("number", 1))
            size = doc.get("size")
        except (ValueError, TypeError, AttributeError):
            return 400, {"message": "bad request body"}
        key_size = self.master.status().key_size
        if size is not None and size != key_size:
            return 400, {"message": f"size must be {key_size}"}
        if not 1 <= number <= 128:
            return 400, {"message": "number must be in 1..128"}
        if self.master.key_count() < number:
            state = self.master.status().state
            cls = LinkDownError if state is not LinkState.UP else NoKeyAvailable
            return _error(400, "not enough keys in the buffer", cls)
        return self._draw(lambda: [self.master.get_key() for _ in range(number)])

    def _dec_keys(self, body: bytes) -> tuple[int, Any]:
        try:
            ids = [item["key_ID"] for item in json.loads(body)["key_IDs"]]
        except (ValueError, TypeError, KeyError):
            return 400, {"message": "bad request body"}
        return self._draw(lambda: [self.slave.get_key_by_id(str(i)) for i in ids])

    def _draw(self, take: Any) -> tuple[int, Any]:
        try:
            keys: list[QkdKey] = take()
        except HalError as exc:
            return _error(400, exc.message, type(exc))
        self.served += len(keys)
        doc = {
            "keys": [
                {"key_ID": k.key_id, "key": base64.b64encode(k.material).decode()} for k in keys
            ]
        }
        for k in keys:
            k.erase()
        return 200, doc


def _error(status: int, message: str, cls: type[HalError]) -> tuple[int, Any]:
    return status, {"message": message, "details": [{"hal_code": cls.code}]}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: Any, kme: EmulatedKme) -> None:
        self.kme = kme
        self.open: set[socket.socket] = set()
        self.open_lock = threading.Lock()
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the request's own thread, so a client that never
        # completes it cannot stall the accept loop.
        request.settimeout(10)
        # answers go out as two writes (head, body): without this, Nagle's algorithm holds
        # the body until the client's delayed ACK, some 40 ms per request
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.kme.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self.open_lock:
            self.open.add(tls)
            self.kme.connections += 1
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            with self.open_lock:
                self.open.discard(tls)

    def drop_connections(self) -> None:
        with self.open_lock:
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read errors from the client side

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        kme = self.server.kme
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else {}
        caller = _common_name(cert or {})
        if kme.faults.hang:
            kme.release.wait()
            return self._drop()
        with kme.lock:
            faults = kme.faults
            if faults.unavailable:
                faults.unavailable -= 1
                return self._send(503, {"message": "KME busy, retry later"})
            keys_call = "_keys" in self.path
            if keys_call and faults.malformed:
                faults.malformed -= 1
                return self._send(200, b'{"keys": [{"key_ID": "')
            status, doc = kme.handle(caller, method, self.path, body)
            if keys_call and status == 200 and faults.drop_after_draw:
                faults.drop_after_draw -= 1
                return self._drop()
        self._send(status, doc)

    def _send(self, status: int, doc: Any) -> None:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):  # already closed by the peer
            self.connection.shutdown(socket.SHUT_RDWR)


def _common_name(cert: dict[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
