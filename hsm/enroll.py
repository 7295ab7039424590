"""The enrollment ceremony: one PSK from the PTG.3 generator onto the two cards of an AKMS pair,
and the signed audit record that says it happened.

:func:`enroll_pair` is the recipe behind ``qkdn card enroll``:

1. both cards answer, are blank, and are two different cards; the transport (factory)
   admin PIN opens both before anything is written;
2. the PSK is drawn from the node's PTG.3 generator (:class:`qrng.ptg3.Ptg3Generator`, the
   only source of keys; the type is required so nothing else can be passed);
3. each card gets its own PIN, admin PIN and PUK, then the PSK in slot 1, which ends its
   personalisation (PUT KEY is refused from then on);
4. the station computes the key check value and a test session key for a fresh nonce,
   then zeroises the PSK (the generator's output buffer included);
5. each card derives the same two values with its new PIN; any difference stops the
   ceremony;
6. the audit record (who, when, where, which cards, KCV; never the key) is signed.

Audit record: a JSON object; ``signature`` holds ``alg`` (``Ed25519``), ``public_key``
(raw 32 bytes, base64), ``key_id`` (first 16 hex digits of its SHA-256) and ``value``
(base64), computed over the canonical JSON of the other members: keys sorted, no spaces,
ASCII only (``json.dumps(doc, sort_keys=True, separators=(",", ":"))``). Verify it with
``qkdn card audit-verify FILE --public-key station.pub.pem``, or by hand (record N of the
log; ``tests/hsm/test_card_cli.py`` runs this)::

    sed -n Np enroll.jsonl > rec.json
    jq -cS 'del(.signature)' rec.json | tr -d '\\n' > body
    jq -r .signature.value rec.json | base64 -d > sig
    openssl pkeyutl -verify -pubin -inkey station.pub.pem -rawin -in body -sigfile sig

The station's signing key is an Ed25519 private key in PEM (PKCS#8):
``openssl genpkey -algorithm ed25519 -out station.pem`` and
``openssl pkey -in station.pem -pubout -out station.pub.pem``.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.files import KiB, MiB, read_bounded
from hsm.applet import Lifecycle, Ref, pin_block
from hsm.card import DEFAULT_SLOT, KCV_CONTEXT, MAX_PIN_FILE, Card, CardInfo, read_pin_file
from hsm.errors import EnrollmentError, HsmError
from hsm.psk import PSK_BYTES, kdf

if TYPE_CHECKING:
    from qrng.ptg3 import Ptg3Generator

CHECK_CONTEXT = b"qkdn-enroll-check"
RECORD_TYPE = "qkdn-card-enrollment"
SECRET_NAMES = ("pin", "admin-pin", "puk")
MAX_KEY_FILE = 64 * KiB
MAX_AUDIT_FILE = 64 * MiB
"""An audit log grows by one record (about 2 KiB) per enrollment."""


def _wipe(*buffers: bytearray) -> None:
    for buf in buffers:
        buf[:] = bytes(len(buf))


def scrub_bytes(data: bytes) -> None:
    """Overwrite a freshly made ``bytes`` object in place (CPython only, else a no-op).

    ``bytes`` are immutable, so the generator's output would otherwise linger in freed
    memory. Only for objects nobody else holds: the generator's fresh return value.
    """
    if sys.implementation.name != "cpython" or type(data) is not bytes or len(data) < 2:
        return
    offset = sys.getsizeof(data) - len(data) - 1  # start of ob_sval (the NUL follows)
    ctypes.memset(id(data) + offset, 0, len(data))


@dataclass(kw_only=True)
class CardSecrets:
    """The three secrets one card gets at enrollment."""

    pin: bytearray
    """User PIN (the AKMS presents it to derive)."""
    admin_pin: bytearray
    """Admin PIN (lock, terminate)."""
    puk: bytearray
    """PUK (unblocks the user PIN)."""

    def __post_init__(self) -> None:
        for name, value in zip(SECRET_NAMES, (self.pin, self.admin_pin, self.puk), strict=True):
            try:
                _wipe(pin_block(value))  # checks the format before any card is touched
            except HsmError as exc:
                raise HsmError(f"{name}: {exc.message}", code=exc.code) from None
        if self.pin == self.admin_pin or self.pin == self.puk:
            raise HsmError(
                "the PIN must differ from the admin PIN and the PUK", code="HSM-PIN-FORMAT"
            )

    @classmethod
    def from_file(cls, path: Path) -> CardSecrets:
        """``pin=...``, ``admin-pin=...`` and ``puk=...`` lines in a file only its owner reads."""
        raw = read_pin_file_all(path)
        found: dict[str, bytearray] = {}
        try:
            for line in raw.split(b"\n"):
                name, sep, value = bytes(line).strip().partition(b"=")
                if not sep and not name:
                    continue
                key = name.strip().decode("ascii", "replace")
                if not sep or key not in SECRET_NAMES or key in found:
                    raise HsmError(
                        f"PIN file {path}: expected one line each of {', '.join(SECRET_NAMES)} "
                        "as name=value",
                        code="HSM-PIN-FILE",
                    )
                found[key] = bytearray(value.strip())
        finally:
            _wipe(raw)
        if set(found) != set(SECRET_NAMES):
            missing = ", ".join(n for n in SECRET_NAMES if n not in found)
            raise HsmError(f"PIN file {path}: missing {missing}", code="HSM-PIN-FILE")
        return cls(pin=found["pin"], admin_pin=found["admin-pin"], puk=found["puk"])

    def wipe(self) -> None:
        _wipe(self.pin, self.admin_pin, self.puk)


def read_pin_file_all(path: Path) -> bytearray:
    """A whole secrets file (owner-only, like a PIN file)."""
    first = read_pin_file(path)  # checks the mode, readability and size
    _wipe(first)
    try:
        return bytearray(read_bounded(path, MAX_PIN_FILE))
    except OSError as exc:
        raise HsmError(
            f"PIN file {path}: unreadable ({exc.strerror})", code="HSM-PIN-FILE"
        ) from None


@dataclass(kw_only=True)
class Enrollee:
    """One side of the pair: the node name, its card and the secrets it gets."""

    role: str
    """``a`` or ``b``."""
    node: str
    """The AKMS this card is for."""
    card: Card
    """The blank card."""
    secrets: CardSecrets
    """Its PIN, admin PIN and PUK."""
    info: CardInfo | None = None
    """Filled in during the ceremony."""


def kcv(psk: bytes | bytearray) -> str:
    """Key check value: 6 hex digits, the first 3 bytes of ``kdf(psk, "qkdn-kcv", "")``."""
    check = kdf(psk, KCV_CONTEXT, b"")
    try:
        return check[:3].hex().upper()
    finally:
        _wipe(check)


def enroll_pair(
    a: Enrollee,
    b: Enrollee,
    *,
    generator: Ptg3Generator,
    transport_admin_pin: bytearray,
    signer: Ed25519PrivateKey,
    operator: str,
    station: str,
    now: datetime,
    rng_url: str = "",
) -> dict[str, Any]:
    """Run the ceremony (see the module docstring); return the signed audit record."""
    for side in (a, b):
        side.info = _blank_card(side)
    assert a.info is not None and b.info is not None
    if a.info.serial == b.info.serial or a.card.reader == b.card.reader:
        raise EnrollmentError(f"cards A and B are the same card ({a.info.serial})")
    for side in (a, b):
        _open_admin(side, transport_admin_pin)
    drawn = generator.random_bytes(PSK_BYTES)
    psk = bytearray(drawn)
    scrub_bytes(drawn)
    del drawn
    try:
        _write(a, psk, transport_admin_pin, other=None)
        _write(b, psk, transport_admin_pin, other=a)
        nonce = generator.random_bytes(16)
        station_kcv, expected = kcv(psk), kdf(psk, CHECK_CONTEXT, nonce)
    finally:
        _wipe(psk)  # zeroised: from here on only the two cards hold it
    try:
        for side in (a, b):
            _check(side, nonce, expected, station_kcv)
    finally:
        _wipe(expected)
    record = {
        "type": RECORD_TYPE,
        "version": 1,
        "time": now.astimezone(UTC).isoformat(timespec="seconds"),
        "operator": operator,
        "station": station,
        "rng": f"PTG.3 {rng_url}".strip(),
        "pair": {"a": a.node, "b": b.node},
        "cards": {
            s.role: {"serial": s.info.serial, "reader": s.card.reader} for s in (a, b) if s.info
        },
        "slot": DEFAULT_SLOT,
        "kcv": station_kcv,
        "kcv_method": "first 3 bytes of SP 800-108 CMAC-AES-256 KDF(PSK, 'qkdn-kcv', nonce='')",
        "check": "both cards derived the station's test key for a fresh nonce",
    }
    return sign_record(record, signer)


def _blank_card(side: Enrollee) -> CardInfo:
    info = side.card.info()
    if info.lifecycle != Lifecycle.BLANK:
        raise EnrollmentError(
            f"card {side.role.upper()} ({info.serial} in {info.reader!r}) is "
            f"{info.lifecycle.name.lower()}: only blank cards can be enrolled"
        )
    return info


def _open_admin(side: Enrollee, transport_admin_pin: bytearray) -> None:
    try:
        side.card.check_pin(transport_admin_pin, Ref.ADMIN_PIN)
    except HsmError as exc:
        raise EnrollmentError(
            f"card {side.role.upper()}: the transport admin PIN does not open it "
            f"({exc.message}); nothing was written",
            code=exc.code,
        ) from None


def _write(
    side: Enrollee, psk: bytearray, transport_admin_pin: bytearray, *, other: Enrollee | None
) -> None:
    s = side.secrets
    try:
        side.card.personalise(
            transport_admin_pin=transport_admin_pin,
            psk=psk,
            pin=s.pin,
            admin_pin=s.admin_pin,
            puk=s.puk,
        )
    except HsmError as exc:
        left = ""
        if other is not None and other.info is not None:
            left = (
                f"; card {other.role.upper()} ({other.info.serial}) now holds a PSK no other "
                "card has: terminate it (qkdn card terminate) and start again with two blank cards"
            )
        raise EnrollmentError(
            f"writing card {side.role.upper()} failed: {exc.message}{left}", code=exc.code
        ) from None


def _check(side: Enrollee, nonce: bytes, expected: bytearray, station_kcv: str) -> None:
    pin = side.secrets.pin
    key = side.card.derive(pin, CHECK_CONTEXT, nonce)
    check = side.card.derive(pin, KCV_CONTEXT, b"")
    try:
        same = hmac.compare_digest(key, expected) and check[:3].hex().upper() == station_kcv
    finally:
        _wipe(key, check)
    if not same:
        raise EnrollmentError(
            f"card {side.role.upper()} does not derive the station's test key: terminate both "
            "cards and start again"
        )


# -- signed audit records ---------------------------------------------------------------


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, ASCII."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw public key."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def sign_record(record: dict[str, Any], signer: Ed25519PrivateKey) -> dict[str, Any]:
    """``record`` plus its ``signature`` member."""
    body = {k: v for k, v in record.items() if k != "signature"}
    public = signer.public_key()
    return {
        **body,
        "signature": {
            "alg": "Ed25519",
            "public_key": base64.b64encode(_raw(public)).decode(),
            "key_id": key_id(public),
            "value": base64.b64encode(signer.sign(canonical(body))).decode(),
        },
    }


def verify_record(doc: dict[str, Any], trusted: Ed25519PublicKey) -> dict[str, Any]:
    """The record without its signature if ``trusted`` signed it; HsmError otherwise."""
    sig = doc.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "Ed25519":
        raise HsmError("audit record: no Ed25519 signature", code="HSM-AUDIT")
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        trusted.verify(base64.b64decode(str(sig.get("value")), validate=True), canonical(body))
    except (InvalidSignature, ValueError):
        raise HsmError(
            f"audit record: signature does not verify with key {key_id(trusted)}", code="HSM-AUDIT"
        ) from None
    return body


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(read_bounded(path, MAX_KEY_FILE), password=None)
    except (OSError, ValueError, TypeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else exc
        raise HsmError(f"signing key {path}: unreadable ({why})", code="HSM-AUDIT-KEY") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise HsmError(f"signing key {path}: not an Ed25519 key", code="HSM-AUDIT-KEY")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key (PEM, or the public half of a private key PEM)."""
    try:
        data = read_bounded(path, MAX_KEY_FILE)
    except OSError as exc:
        raise HsmError(
            f"public key {path}: unreadable ({exc.strerror})", code="HSM-AUDIT-KEY"
        ) from None
    try:
        key: object = serialization.load_pem_public_key(data)
    except ValueError:
        key = load_signing_key(path).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise HsmError(f"public key {path}: not an Ed25519 key", code="HSM-AUDIT-KEY")
    return key


def append_record(path: Path, doc: dict[str, Any]) -> None:
    """Append one record as a JSON line, flushed to disk."""
    line = (json.dumps(doc, sort_keys=True) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise HsmError(f"audit log {path}: {exc.strerror}", code="HSM-AUDIT") from None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of an audit log (JSON lines) or of a single-record JSON file."""
    try:
        text = read_bounded(path, MAX_AUDIT_FILE).decode("utf-8")
    except OSError as exc:
        raise HsmError(f"audit log {path}: {exc.strerror}", code="HSM-AUDIT") from None
    except UnicodeDecodeError:
        raise HsmError(f"audit log {path}: not UTF-8 text", code="HSM-AUDIT") from None
    try:
        whole = json.loads(text)
        docs = [whole] if isinstance(whole, dict) else whole
    except (ValueError, RecursionError):
        try:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (ValueError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep"
            raise HsmError(f"audit log {path}: not JSON ({why})", code="HSM-AUDIT") from None
    if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
        raise HsmError(f"audit log {path}: expected JSON objects (records)", code="HSM-AUDIT")
    return docs
