"""An ETSI GS QKD 004 client: one SAE's connection to its KME's key-stream server.

Written from the frame layout alone (:mod:`appliance.kms.frames004`), over one mutual-TLS
socket: :meth:`Client004.open_connect`, :meth:`Client004.get_key` (also pipelined:
:meth:`Client004.get_keys` sends several requests before reading their answers) and
:meth:`Client004.close`. :meth:`Client004.send_raw` and :meth:`Client004.read` let tests
send frames a well-behaved client never would. Every read has the connection's timeout;
an answer longer than the response bound is refused, not read.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from appliance.errors import ApplianceError
from appliance.kms import frames004 as f

READ_SIZE = 1 << 16
T = TypeVar("T")


class Client004Error(ApplianceError):
    """The KME closed the connection, or answered with something that is not 004."""

    code = "SAE-004-PROTOCOL"


class Client004:
    """One connection to a 004 server as the SAE whose certificate is given."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cert: Path,
        key: Path,
        ca: Path,
        timeout: float = 30.0,
    ) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the private CA names nodes, not hosts
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(cert, key)
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            self.sock = ctx.wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = f.FrameReader(f.MAX_RESPONSE)
        self._frames: list[f.Frame] = []

    def __enter__(self) -> Client004:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.sock.close()

    # -- the API ----------------------------------------------------------------------------
    def open_connect(
        self, source: str, destination: str, qos: f.Qos, ksid: bytes = f.ZERO_KSID
    ) -> f.OpenConnectAnswer:
        request = f.OpenConnect(source=source, destination=destination, qos=qos, ksid=ksid)
        return self._ask(request, f.OpenConnectAnswer)

    def get_key(self, ksid: bytes, index: int, metadata_size: int = 1024) -> f.GetKeyAnswer:
        request = f.GetKey(ksid=ksid, index=index, metadata_size=metadata_size)
        return self._ask(request, f.GetKeyAnswer)

    def get_keys(
        self, ksid: bytes, indices: list[int], metadata_size: int = 1024
    ) -> list[f.GetKeyAnswer]:
        """GET_KEY for each index, all sent before the first answer is read."""
        self.sock.sendall(
            b"".join(
                f.encode(f.GetKey(ksid=ksid, index=i, metadata_size=metadata_size)) for i in indices
            )
        )
        return [self._expect(f.GetKeyAnswer) for _ in indices]

    def close(self, ksid: bytes) -> f.CloseAnswer:
        return self._ask(f.Close(ksid=ksid), f.CloseAnswer)

    # -- frames -------------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> f.Response:
        """The next answer; Client004Error if the KME closed the connection instead."""
        while not self._frames:
            try:
                data = self.sock.recv(READ_SIZE)
            except ssl.SSLError as exc:
                raise Client004Error(f"the KME ended the TLS session ({exc.reason})") from None
            except ConnectionError as exc:
                raise Client004Error(f"the KME closed the connection ({exc})") from None
            if not data:
                raise Client004Error("the KME closed the connection")
            try:
                self._frames += self.reader.feed(data)
            except f.FrameError as exc:
                raise Client004Error(exc.message) from None
        frame = self._frames.pop(0)
        try:
            return f.decode_response(frame)
        except (f.FrameError, f.MalformedPayload) as exc:
            raise Client004Error(exc.message) from None

    def _ask(self, request: f.Request, kind: type[T]) -> T:
        self.sock.sendall(f.encode(request))
        return self._expect(kind)

    def _expect(self, kind: type[T]) -> T:
        answer = self.read()
        if not isinstance(answer, kind):
            raise Client004Error(f"expected {kind.__name__}, got {type(answer).__name__}")
        return answer
