"""Card emulator: the PSK applet behind vsmartcard's vpcd, so tests and benches go through
the real PC/SC stack (pcscd + vpcd + pyscard) with nothing mocked below pyscard.

vpcd is a pcscd reader driver that *listens* (TCP 35963 for reader "Virtual PCD 00 00",
35964 for "Virtual PCD 00 01"); the emulated card is the client that connects to it. Wire
format: every frame carries a 2-byte big-endian length. A 1-byte frame is a control message
(0 power off, 1 power on, 2 reset, 4 send the ATR, answered with a framed ATR); any longer
frame is a C-APDU, answered with a framed R-APDU. Closing the socket = removing the card.

State persists in a directory (``card.json``, mode 0600, replaced atomically and fsynced
before each response), so a card keeps its PSK, PINs and retry counters across restarts.
That file holds the PSK in clear: this is a bench and test tool. vpcd listens on every
interface: it must never be part of a production image.

An emulator thread left running in a process that uses pyscard hangs the interpreter at
exit: always :meth:`VirtualCard.stop` it (it is a context manager), or run it as a
subprocess (``qkdn card emulate``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from appliance.files import MiB, read_bounded
from hsm.applet import ATR, Applet, CardState
from hsm.errors import HsmError

log = logging.getLogger("qkdn.hsm.vpcd")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 35963
READER_OF_PORT = {35963: "Virtual PCD 00 00", 35964: "Virtual PCD 00 01"}
"""Reader names pcscd gives the two vpcd slots of the Debian configuration."""

CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0, 1, 2, 4
STATE_FILE = "card.json"
MAX_STATE_FILE = MiB


def new_serial() -> str:
    """A fresh emulated-card serial (not secret; the OS RNG is fine for it)."""
    return f"QKDN-EMU-{os.urandom(4).hex().upper()}"


class StateStore:
    """A card's persistent state in a directory (or in memory when ``directory`` is None)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._lock: IO[bytes] | None = None

    def open(self, serial: str | None = None) -> CardState:
        """Load the stored card, or create a blank one; one emulator per directory."""
        if self.directory is None:
            return CardState.blank(serial or new_serial())
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = open(self.directory / "lock", "wb")  # noqa: SIM115 (held while open)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise HsmError(
                f"card state {self.directory}: another emulator uses it", code="HSM-EMU-BUSY"
            ) from None
        path = self.directory / STATE_FILE
        if not path.exists():
            state = CardState.blank(serial or new_serial())
            self.save(state)
            return state
        try:
            state = CardState.from_dict(json.loads(read_bounded(path, MAX_STATE_FILE)))
        except (OSError, ValueError, RecursionError) as exc:
            raise HsmError(
                f"card state {path}: unreadable ({exc})", code="HSM-CARD-STATE"
            ) from None
        if serial and serial != state.serial:
            raise HsmError(
                f"card state {path} is card {state.serial}, not {serial}", code="HSM-CARD-STATE"
            )
        return state

    def save(self, state: CardState) -> None:
        """Write the state atomically (temp file, fsync, rename)."""
        if self.directory is None:
            return
        tmp = self.directory / (STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(state.to_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / STATE_FILE)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class VirtualCard:
    """One emulated card, connected to vpcd (``host``:``port``) while started."""

    def __init__(
        self,
        *,
        port: int = DEFAULT_PORT,
        host: str = DEFAULT_HOST,
        state_dir: Path | None = None,
        serial: str | None = None,
        remove_on: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.store = StateStore(state_dir)
        self.applet = Applet(self.store.open(serial))
        self.remove_on = remove_on
        """Test hook: when it returns True for a C-APDU, the card is pulled instead of answering."""
        self.apdus = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._saved = self.applet.revision
        self._closed = threading.Event()

    @property
    def reader(self) -> str:
        """The PC/SC reader name this card appears in (Debian's vpcd configuration)."""
        return READER_OF_PORT.get(self.port, f"vpcd port {self.port}")

    @property
    def connected(self) -> bool:
        """True while the card is in the reader (connected to vpcd)."""
        return self._sock is not None

    @property
    def serial(self) -> str:
        return self.applet.state.serial

    def replace_state(self, state: CardState) -> None:
        """Swap in another card without a removal (tests: a fresh card, no pcscd poll)."""
        self.applet = Applet(state)
        self._saved = -1
        self._persist()

    # -- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> VirtualCard:
        """Connect to vpcd (retrying until ``timeout``) and serve from a thread."""
        self._sock = connect(self.host, self.port, timeout)
        self._closed.clear()
        self._thread = threading.Thread(
            target=self._serve_quietly, name=f"vpcd-card-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Remove the card (close the socket) and wait for the thread; idempotent."""
        self._disconnect()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def close(self) -> None:
        """:meth:`stop` and release the state directory."""
        self.stop()
        self.store.close()

    def __enter__(self) -> VirtualCard:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run_forever(self, stop: threading.Event, *, retry: float = 1.0) -> None:
        """Serve until ``stop`` is set, reconnecting when vpcd goes away (pcscd restarts)."""
        while not stop.is_set():
            try:
                self._sock = connect(self.host, self.port, timeout=retry)
            except HsmError:
                stop.wait(retry)
                continue
            log.info("card inserted", extra={"serial": self.serial, "port": self.port})
            self._serve_quietly()
            log.info("card removed", extra={"serial": self.serial, "port": self.port})

    # -- the wire -----------------------------------------------------------------------
    def _serve_quietly(self) -> None:
        try:
            self.serve()
        except OSError:
            pass  # removal or vpcd gone: nothing to answer to
        finally:
            self._disconnect()

    def serve(self) -> None:
        """Answer frames on the connected socket until it closes."""
        sock = self._sock
        while sock is not None:
            frame = _recv_frame(sock)
            if frame is None:
                return
            reply = self._handle(frame)
            if reply is None:
                if self._closed.is_set():
                    return
                continue
            sock.sendall(struct.pack(">H", len(reply)) + reply)

    def _handle(self, frame: bytes) -> bytes | None:
        if len(frame) == 1:
            if frame[0] == CTRL_ATR:
                return ATR
            if frame[0] in (CTRL_OFF, CTRL_ON, CTRL_RESET):
                self.applet.power_on()
            return None
        if not frame:
            return None
        if self.remove_on is not None and self.remove_on(frame):
            self._disconnect()
            return None
        self.apdus += 1
        reply = self.applet.process(frame)
        self._persist()
        return reply

    def _persist(self) -> None:
        if self.applet.revision != self._saved:
            self.store.save(self.applet.state)
            self._saved = self.applet.revision

    def _disconnect(self) -> None:
        self._closed.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to vpcd, retried until ``timeout`` (pcscd may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=1.0)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise HsmError(
                    f"vpcd at {host}:{port} is not listening ({exc.strerror or exc}); "
                    "is pcscd running with vsmartcard-vpcd installed?",
                    code="HSM-VPCD",
                ) from None
            time.sleep(0.05)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _quickack(sock: socket.socket) -> None:
    # vpcd writes a frame's length and body separately: without an immediate ACK, Nagle on
    # its side and delayed ACK on ours cost ~40 ms per APDU (measured: 48 ms -> 0.2 ms).
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        _quickack(sock)
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _recv_frame(sock: socket.socket) -> bytes | None:
    head = _recv_exact(sock, 2)
    if head is None:
        return None
    (length,) = struct.unpack(">H", head)
    return _recv_exact(sock, length) if length else b""
