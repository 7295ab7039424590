"""PC/SC transport: APDUs to a smartcard through pcscd, with pyscard's low-level ``scard`` API.

URL format (the reader part; query parameters belong to :mod:`hsm.card`)::

    pcsc://READER-NAME     a reader by name, percent-encoded (pcsc://Virtual%20PCD%2000%2000),
                           or by a prefix that matches exactly one reader
    pcsc://#N              the N-th reader pcscd lists, from 0

A transport waits up to ``timeout`` seconds for a card to be inserted (pcscd polls
readers, so a card appears 0.2-0.5 s after it is inserted). A card removed during a
command gives :class:`~hsm.errors.CardRemovedError`; every other PC/SC failure gives
:class:`~hsm.errors.ReaderError` with pcsc-lite's own message. Connections are shared;
callers group the APDUs of one operation in :meth:`PcscTransport.transaction` so no other
application interleaves, and the card is reset when the transport closes so no verified
PIN outlives the session. This module never sees what the APDUs mean.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote

from smartcard import scard  # type: ignore[import-untyped]

from hsm.errors import CardRemovedError, ReaderError

SCHEME = "pcsc://"
POLL_S = 0.05

_ABSENT = {scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_REMOVED_CARD}
_RETRY_CONNECT = _ABSENT | {
    scard.SCARD_W_UNPOWERED_CARD,
    scard.SCARD_W_UNRESPONSIVE_CARD,
    scard.SCARD_E_SHARING_VIOLATION,
}
_PROTOCOLS = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1


class Transport(Protocol):
    """What the card client needs from a transport (PC/SC here; a loopback in tests)."""

    name: str

    def transmit(self, apdu: bytes | bytearray) -> bytes: ...

    def transaction(self) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class ReaderUrl:
    """A parsed ``pcsc://`` URL."""

    reader: str | None = None
    """Reader name or unique prefix (None when chosen by index)."""
    index: int | None = None
    """Position in pcscd's reader list (None when chosen by name)."""
    params: dict[str, str] = field(default_factory=dict)
    """Query parameters, for the layer above."""

    def __str__(self) -> str:
        return f"{SCHEME}#{self.index}" if self.reader is None else f"{SCHEME}{self.reader}"


def parse_url(url: str) -> ReaderUrl:
    """Split ``pcsc://READER?k=v&...`` (``#N`` selects by index; ``?`` starts the query)."""
    if not url.startswith(SCHEME):
        raise ReaderError(f"{url!r}: expected pcsc://READER-NAME or pcsc://#N", code="HSM-URL")
    where, _, query = url[len(SCHEME) :].partition("?")
    params = dict(parse_qsl(query, keep_blank_values=True))
    if where.startswith("#"):
        try:
            index = int(where[1:])
        except ValueError:
            index = -1
        if index < 0:
            raise ReaderError(f"{url!r}: reader index must be #0, #1, ...", code="HSM-URL")
        return ReaderUrl(index=index, params=params)
    reader = unquote(where)
    if not reader:
        raise ReaderError(f"{url!r}: no reader named (pcsc://#0 is the first)", code="HSM-URL")
    return ReaderUrl(reader=reader, params=params)


def _message(hresult: int) -> str:
    return str(scard.SCardGetErrorMessage(hresult)).rstrip(". ")


def establish() -> Any:
    """A PC/SC context; ReaderError when pcscd is not running."""
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        raise ReaderError(
            f"PC/SC unavailable: {_message(hresult)} (is pcscd running?)", code="HSM-PCSC"
        )
    return context


def list_readers(context: Any = None) -> list[str]:
    """Reader names, in pcscd's order (empty when there is none)."""
    own = context is None
    ctx = establish() if own else context
    try:
        hresult, readers = scard.SCardListReaders(ctx, [])
    finally:
        if own:
            scard.SCardReleaseContext(ctx)
    if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
        return []
    if hresult != scard.SCARD_S_SUCCESS:
        raise ReaderError(f"cannot list readers: {_message(hresult)}", code="HSM-PCSC")
    return list(readers)


def resolve(where: ReaderUrl, readers: list[str]) -> str:
    """The reader name a URL designates among ``readers``."""
    if where.index is not None:
        if where.index < len(readers):
            return readers[where.index]
        raise ReaderError(
            f"no reader #{where.index} ({len(readers)} reader(s) present)", code="HSM-NO-READER"
        )
    if where.reader in readers:
        return where.reader
    matches = [r for r in readers if where.reader and r.startswith(where.reader)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(repr(r) for r in readers) or "none"
    raise ReaderError(f"no reader {where.reader!r} (readers: {known})", code="HSM-NO-READER")


class PcscTransport:
    """A shared connection to the card in one PC/SC reader."""

    def __init__(self, url: str | ReaderUrl, *, timeout: float = 5.0) -> None:
        where = parse_url(url) if isinstance(url, str) else url
        self._context = establish()
        self._card: Any = None
        self._lock = threading.RLock()
        try:
            self.name: str = resolve(where, list_readers(self._context))
            self._connect(timeout)
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            hresult, card, protocol = scard.SCardConnect(
                self._context, self.name, scard.SCARD_SHARE_SHARED, _PROTOCOLS
            )
            if hresult == scard.SCARD_S_SUCCESS:
                self._card, self._protocol = card, protocol
                return
            if hresult not in _RETRY_CONNECT or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        if hresult in _ABSENT:
            raise ReaderError(
                f"no card in reader {self.name!r} (waited {timeout:g} s)", code="HSM-NO-CARD"
            )
        raise ReaderError(f"cannot connect to {self.name!r}: {_message(hresult)}")

    @property
    def _pci(self) -> Any:
        return (
            scard.SCARD_PCI_T0 if self._protocol == scard.SCARD_PROTOCOL_T0 else scard.SCARD_PCI_T1
        )

    def transmit(self, apdu: bytes | bytearray) -> bytes:
        """Send one C-APDU, return the R-APDU (data and status word)."""
        with self._lock:
            if self._card is None:
                raise ReaderError(f"reader {self.name!r}: transport closed")
            command = list(apdu)
            try:
                hresult, response = scard.SCardTransmit(self._card, self._pci, command)
            finally:
                command[:] = [0] * len(command)  # the list may have carried a PSK or PIN
            if hresult != scard.SCARD_S_SUCCESS:
                raise self._failure(hresult, "transmit")
            if len(response) < 2:  # vpcd reports a card pulled mid-command as an empty answer
                raise self._failure(scard.SCARD_E_NOT_TRANSACTED, "transmit")
            return bytes(response)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Exclusive use of the card for a group of APDUs (reconnects after a reset)."""
        with self._lock:
            self._begin()
            try:
                yield
            finally:
                if self._card is not None:
                    scard.SCardEndTransaction(self._card, scard.SCARD_LEAVE_CARD)

    def _begin(self) -> None:
        if self._card is None:
            raise ReaderError(f"reader {self.name!r}: transport closed")
        hresult = scard.SCardBeginTransaction(self._card)
        if hresult == scard.SCARD_W_RESET_CARD:  # another application reset it: carry on
            hresult, self._protocol = scard.SCardReconnect(
                self._card, scard.SCARD_SHARE_SHARED, _PROTOCOLS, scard.SCARD_LEAVE_CARD
            )
            if hresult == scard.SCARD_S_SUCCESS:
                hresult = scard.SCardBeginTransaction(self._card)
        if hresult != scard.SCARD_S_SUCCESS:
            raise self._failure(hresult, "begin transaction")

    def _failure(self, hresult: int, what: str) -> ReaderError:
        if hresult in _ABSENT or not self._present():
            return CardRemovedError(f"card removed from reader {self.name!r} during {what}")
        return ReaderError(f"reader {self.name!r}: {what} failed: {_message(hresult)}")

    def _present(self, wait: float = 1.0) -> bool:
        """Is a card in the reader? Waits up to ``wait`` s for pcscd to notice a removal."""
        state = self._reader_state(0, scard.SCARD_STATE_UNAWARE)
        if state is None or not state & scard.SCARD_STATE_PRESENT:
            return False
        later = self._reader_state(int(wait * 1000), state)
        return later is None or bool(later & scard.SCARD_STATE_PRESENT)

    def _reader_state(self, timeout_ms: int, known: int) -> int | None:
        """The reader's event state once it differs from ``known`` (None on timeout)."""
        hresult, states = scard.SCardGetStatusChange(
            self._context, timeout_ms, [(self.name, known)]
        )
        if hresult != scard.SCARD_S_SUCCESS or not states:
            return None
        return int(states[0][1])

    def close(self) -> None:
        """Reset the card (no verified PIN outlives us), disconnect, release the context."""
        with self._lock:
            if self._card is not None:
                scard.SCardDisconnect(self._card, scard.SCARD_RESET_CARD)
                self._card = None
            if self._context is not None:
                scard.SCardReleaseContext(self._context)
                self._context = None

    def __enter__(self) -> PcscTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PcscTransport({self.name!r})"
