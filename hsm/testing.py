"""Smartcard test and bench kit: pcscd on demand, emulated cards in vpcd's two slots, and
waiting for pcscd to see them. Used by ``tests/hsm`` and ``bench/card_derive.py``.

pcscd's socket path is fixed, so there is one pcscd per machine: :func:`ensure_pcscd`
reuses a running one and otherwise starts ``pcscd --foreground`` (no systemd needed) and
stops it when done. vpcd has two slots per machine too, so test sessions and benches that
run at once on one machine take turns with :func:`vpcd_slots`, a machine-wide lock.

pcscd polls its readers (every 0.4 s), so a card appears or goes some time after it
connects to vpcd or disconnects. Insertions and removals are waited for as pcscd's poller
sees them, through its event count (:func:`card_events`), never by connecting to the
card: a connection to a card already pulled makes vpcd drop it without the poller seeing
the removal, and if the next card connects before the next poll, the poller sees "still
present", never powers the new card, and the reader reports no card for as long as that
card stays. So every removal is waited for (:func:`wait_for_removal`) before the slot
takes another card. Never for production images (vpcd listens on every interface).
"""

from __future__ import annotations

import fcntl
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from smartcard import scard  # type: ignore[import-untyped]

from hsm.applet import CardState
from hsm.errors import HsmError, ReaderError
from hsm.pcsc import establish, list_readers, parse_url, resolve
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


def card_events(reader: str, timeout: float = 10.0) -> int:
    """pcscd's count of the insertions and removals its poller has seen in ``reader`` (a
    name or ``pcsc://#N``); waits for the reader to appear (pcscd loading the driver)."""
    return _watch(reader, lambda _count, _state: True, timeout, "appeared")


def wait_for_card(reader: str, after: int, timeout: float = 10.0) -> int:
    """Once pcscd's poller has seen a card inserted in ``reader`` since it counted ``after``
    events, the new event count (powered up: the card answers)."""
    return _watch(
        reader,
        lambda count, state: count != after and bool(state & scard.SCARD_STATE_PRESENT),
        timeout,
        "got a card",
    )


def wait_for_removal(reader: str, after: int, timeout: float = 10.0) -> int:
    """Once pcscd's poller has seen the card of ``reader`` go since it counted ``after``
    events (the count returned by :func:`wait_for_card`), the new event count."""
    return _watch(reader, lambda count, _state: count != after, timeout, "saw its card go")


def _watch(reader: str, done: Callable[[int, int], bool], timeout: float, what: str) -> int:
    """Block on pcscd's reader events until ``done(count, state)``, at most ``timeout`` s."""
    url = reader if reader.startswith("pcsc://") else f"pcsc://{reader}"
    deadline = time.monotonic() + timeout
    context = establish()
    try:
        name, known = _reader_name(context, url, deadline), scard.SCARD_STATE_UNAWARE
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            hresult, states = scard.SCardGetStatusChange(context, left_ms, [(name, known)])
            if hresult == scard.SCARD_E_TIMEOUT:
                break
            if hresult != scard.SCARD_S_SUCCESS:
                raise ReaderError(f"cannot watch reader {name!r}: hresult {hresult:#x}")
            known = states[0][1]
            if done(known >> 16, known):
                return int(known >> 16)
            if time.monotonic() > deadline:
                break
    finally:
        scard.SCardReleaseContext(context)
    raise HsmError(f"reader {reader!r} never {what} within {timeout:g} s", code="HSM-VPCD")


def _reader_name(context: object, url: str, deadline: float) -> str:
    """The reader ``url`` names, polled until pcscd lists it or ``deadline`` passes."""
    while True:
        try:
            return resolve(parse_url(url), list_readers(context))
        except ReaderError as exc:
            if exc.code != "HSM-NO-READER" or time.monotonic() > deadline:
                raise
        time.sleep(0.05)  # vpcd's readers appear once pcscd has loaded the driver


class CardRack:
    """Emulated cards in vpcd's two slots, kept inserted across tests and reset to blank.

    Each removal is waited for as pcscd's poller sees it before the slot takes another
    card (see the module docstring), including at :meth:`close`, so whatever opens the
    slots next (another module's rack) finds them empty."""

    def __init__(self) -> None:
        self.cards: dict[int, VirtualCard] = {}
        self._events: dict[int, int] = {}  # port -> pcscd's event count once it saw the card

    def fresh(self, port: int, state: CardState | None = None) -> VirtualCard:
        """A blank (or the given) card in the slot of ``port``, inserted and seen by pcscd."""
        card = self.cards.get(port)
        if card is not None and not card.connected:  # a test pulled it
            self.release(port)
            card = None
        if card is None:
            reader = READER_OF_PORT[port]
            before = card_events(reader)
            card = VirtualCard(port=port, serial=new_serial()).start()
            self.cards[port] = card
            self._events[port] = wait_for_card(reader, after=before)
        card.remove_on = None
        card.replace_state(state or CardState.blank(new_serial()))
        return card

    def release(self, port: int) -> None:
        """Remove the card of ``port`` and wait until pcscd's poller has seen it go (the
        slot is then free for another emulator)."""
        card = self.cards.pop(port, None)
        if card is not None:
            card.close()
            wait_for_removal(READER_OF_PORT[port], after=self._events.pop(port))

    def close(self) -> None:
        for port in list(self.cards):
            self.release(port)
