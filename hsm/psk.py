"""Pre-shared-key sources: where an AKMS gets the PSK that bootstraps its channel to a peer.

The PSK never leaves its source. A source only *derives* session keys from it, with the
KDF below, for a context and fresh nonces chosen by the caller. Two sources holding the
same PSK derive the same key, whatever they are:

* ``file:PATH``: a provisioning file (hex PSK, mode 0600), until the smartcard is fitted;
* ``pcsc://READER?pin-file=PATH`` or ``pcsc://#N?pin-env=VAR``: a smartcard enrolled by
  ``qkdn card enroll``; the card runs the same KDF inside (:mod:`hsm.card` has the URL).

The KDF is NIST SP 800-108r1 in counter mode with CMAC-AES-256 as PRF: block i is
``CMAC(PSK, [i]_32 || "qkdn-psk-derive" || 0x00 || context || 0x00 || nonce || [L]_32)``
with L the output length in bits (a card applet computes exactly this).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFCMAC, CounterLocation, Mode

from appliance.files import read_bounded
from hsm.errors import PskError

LABEL = b"qkdn-psk-derive"
PSK_BYTES = 32
MAX_DERIVE_BYTES = 64


class PskSource(Protocol):
    """Derives session keys from a PSK it never reveals."""

    def derive(self, context: bytes, nonce: bytes, length: int = 32) -> bytearray: ...

    def close(self) -> None: ...


def kdf(psk: bytes | bytearray, context: bytes, nonce: bytes, length: int = 32) -> bytearray:
    """SP 800-108 counter-mode KDF with CMAC-AES-256 (see the module docstring)."""
    if len(psk) != PSK_BYTES:
        raise PskError(f"a PSK is {PSK_BYTES} bytes, got {len(psk)}")
    if not 0 < length <= MAX_DERIVE_BYTES:
        raise PskError(f"derive length must be 1..{MAX_DERIVE_BYTES} bytes, got {length}")
    derive = KBKDFCMAC(
        algorithm=algorithms.AES,
        mode=Mode.CounterMode,
        length=length,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=LABEL,
        context=bytes(context) + b"\0" + bytes(nonce),
        fixed=None,
    )
    return bytearray(derive.derive(bytes(psk)))


class FilePskSource:
    """A PSK from a provisioning file: 64 hex digits, readable by the owner only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            mode = path.stat().st_mode
            text = read_bounded(path, 4096).decode("ascii", "replace").strip()
        except OSError as exc:
            raise PskError(f"PSK file {path}: unreadable ({exc.strerror})") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PskError(f"PSK file {path}: readable by others (chmod 600 it)")
        try:
            psk = bytearray.fromhex(text)
        except ValueError:
            raise PskError(f"PSK file {path}: expected {2 * PSK_BYTES} hex digits") from None
        if len(psk) != PSK_BYTES:
            raise PskError(f"PSK file {path}: expected {2 * PSK_BYTES} hex digits")
        self._psk: bytearray | None = psk

    def derive(self, context: bytes, nonce: bytes, length: int = 32) -> bytearray:
        if self._psk is None:
            raise PskError(f"PSK file {self.path}: source closed")
        return kdf(self._psk, context, nonce, length)

    def close(self) -> None:
        if self._psk is not None:
            self._psk[:] = bytes(len(self._psk))
            self._psk = None

    def __repr__(self) -> str:
        return f"FilePskSource({str(self.path)!r})"


def write_psk_file(path: Path, psk: bytes | bytearray) -> None:
    """Write a provisioning file (mode 0600, created exclusively)."""
    if len(psk) != PSK_BYTES:
        raise PskError(f"a PSK is {PSK_BYTES} bytes, got {len(psk)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PskError(f"PSK file {path}: already exists (never overwrite a PSK)") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(bytes(psk).hex() + "\n")


def open_psk_source(url: str, *, base: Path | None = None) -> PskSource:
    """Open the PSK source a URL names: ``file:PATH`` (relative to ``base``) or ``pcsc://``."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        raw = unquote(parts.netloc + parts.path)
        path = Path(raw)
        if not path.is_absolute() and base is not None:
            path = base / path
        return FilePskSource(path)
    if parts.scheme == "pcsc":
        from hsm.card import open_card_psk_source  # here: file sources need no pyscard

        return open_card_psk_source(url, base=base)
    raise PskError(f"PSK source {url!r}: unknown scheme (expected file: or pcsc://)")
