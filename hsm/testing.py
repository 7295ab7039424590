"""Smartcard test and bench kit: pcscd on demand, emulated cards in vpcd's two slots, and
waiting for pcscd to see them. Used by ``tests/hsm`` and ``bench/card_derive.py``.

pcscd's socket path is fixed, so there is one pcscd per machine: :func:`ensure_pcscd`
reuses a running one and otherwise starts ``pcscd --foreground`` (no systemd needed) and
stops it when done. vpcd has two slots per machine too, so test sessions and benches that
run at once on one machine take turns with :func:`vpcd_slots`, a machine-wide lock.
pcscd polls its readers, so a card appears 0.2-0.5 s after it connects to vpcd:
:func:`wait_for_card` waits for it. Never for production images (vpcd listens on
every interface).
"""

from __future__ import annotations

import fcntl
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hsm.applet import CardState
from hsm.errors import HsmError, ReaderError
from hsm.pcsc import PcscTransport
from hsm.vpcd import READER_OF_PORT, VirtualCard, new_serial

PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
PORTS = (35963, 35964)
LOCK_PATH = Path(tempfile.gettempdir()) / "qkdn-vpcd-slots.lock"


@contextmanager
def vpcd_slots(timeout: float = 600.0) -> Iterator[None]:
    """Exclusive use of vpcd's two slots (and of a pcscd started here) on this machine."""
    with open(LOCK_PATH, "a+b") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HsmError(
                        f"vpcd's slots stayed busy for {timeout:g} s ({LOCK_PATH})",
                        code="HSM-VPCD",
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pcscd_running(path: Path = PCSCD_SOCKET) -> bool:
    """True if something accepts connections on pcscd's socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@contextmanager
def ensure_pcscd(timeout: float = 10.0, log: Path | None = None) -> Iterator[bool]:
    """pcscd running for the duration; yields True if it was started here (and stops it)."""
    if pcscd_running():
        yield False
        return
    binary = shutil.which("pcscd") or "/usr/sbin/pcscd"
    if not Path(binary).exists():
        raise HsmError("pcscd is not installed (apt-get install pcscd)", code="HSM-PCSC")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [binary, "--foreground"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not pcscd_running():
            if proc.poll() is not None or time.monotonic() > deadline:
                seen = f"; see {log}" if log else ""
                raise HsmError(
                    f"pcscd did not start (exit status {proc.poll()}){seen}", code="HSM-PCSC"
                )
            time.sleep(0.05)
        yield True
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def wait_for_card(reader: str, timeout: float = 10.0) -> None:
    """Return once pcscd reports a card in ``reader`` (a name or ``#N``)."""
    url = reader if reader.startswith("pcsc://") else f"pcsc://{reader}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            PcscTransport(url, timeout=max(0.0, deadline - time.monotonic())).close()
            return
        except ReaderError as exc:
            if exc.code != "HSM-NO-READER" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # vpcd's readers appear once pcscd has loaded the driver


def wait_for_removal(reader: str, timeout: float = 10.0) -> None:
    """Return once pcscd no longer sees a card in ``reader``."""
    url = reader if reader.startswith("pcsc://") else f"pcsc://{reader}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            PcscTransport(url, timeout=0).close()
        except ReaderError as exc:
            if exc.code == "HSM-NO-CARD":
                return
        time.sleep(0.05)
    raise HsmError(f"the card in {reader!r} was not removed within {timeout:g} s")


class CardRack:
    """Emulated cards in vpcd's two slots, kept inserted across tests and reset to blank."""

    def __init__(self) -> None:
        self.cards: dict[int, VirtualCard] = {}

    def fresh(self, port: int, state: CardState | None = None) -> VirtualCard:
        """A blank (or the given) card in the slot of ``port``, inserted and seen by pcscd."""
        card = self.cards.get(port)
        if card is not None and not card.connected:  # a test pulled it
            self.release(port)
            card = None
        if card is None:
            card = VirtualCard(port=port, serial=new_serial()).start()
            self.cards[port] = card
            wait_for_card(READER_OF_PORT[port])
        card.remove_on = None
        card.replace_state(state or CardState.blank(new_serial()))
        return card

    def release(self, port: int) -> None:
        """Remove the card of ``port`` (the slot is then free for another emulator)."""
        card = self.cards.pop(port, None)
        if card is not None:
            card.close()
            wait_for_removal(READER_OF_PORT[port])

    def close(self) -> None:
        for port in list(self.cards):
            self.cards.pop(port).close()
