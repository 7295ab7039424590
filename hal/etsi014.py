"""ETSI GS QKD 014 v1.1.1, SAE side, sans-IO: requests out, HTTP answers in, keys or errors.

The KMS is the SAE of a vendor QKD module that acts as a KME. This module builds the three
requests (``status``, ``enc_keys``, ``dec_keys``) and parses what comes back, strictly:
every key ID must be a UUID, every key canonical padded Base64 of exactly the announced
size, and a reply that is not the JSON the standard describes is a ProtocolError. Unknown
members are ignored, as the standard's extension fields require. Non-200 answers become
typed errors. It never opens a socket, and never puts key material into a message.

Which requests may be retried is decided here too (:attr:`Request.retry_unknown_outcome`):
``status`` always; ``dec_keys`` after a lost answer as well, because a KME hands a key out
once at most, so a retry cannot duplicate it; ``enc_keys`` never after it was sent, since
a second call would draw a second key while the first may already be issued.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from hal.errors import (
    DeviceUnavailable,
    HalError,
    KeyNotFound,
    KeyNotYetAvailable,
    LinkDownError,
    NoKeyAvailable,
    ProtocolError,
    TrustError,
)
from hal.qkdm import LinkState, QkdKey

MAX_BODY = 1 << 20
"""Largest answer body read from a KME (a bound against a misbehaving peer)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """One HTTP request to a KME."""

    method: str
    """``GET`` or ``POST``."""
    path: str
    """Absolute path, SAE IDs percent-encoded."""
    body: bytes | None
    """JSON body, or None."""
    retry_unknown_outcome: bool
    """Safe to resend when the answer was lost after the request went out."""


@dataclass(frozen=True, kw_only=True, slots=True)
class KmeStatus:
    """The Status object of ETSI 014 (section 6.1), plus the vendor's extension."""

    source_kme: str
    """``source_KME_ID``."""
    target_kme: str
    """``target_KME_ID``."""
    master_sae: str
    """``master_SAE_ID``."""
    slave_sae: str
    """``slave_SAE_ID``."""
    key_size: int
    """Default key size, bits."""
    stored_key_count: int
    """Keys the KME holds for this pair."""
    max_key_count: int
    """Capacity."""
    max_key_per_request: int
    """Most keys one enc_keys call may ask for."""
    max_key_size: int
    """Largest key size, bits."""
    min_key_size: int
    """Smallest key size, bits."""
    max_sae_id_count: int
    """Additional slave SAEs allowed per request."""
    extension: dict[str, Any]
    """``status_extension`` (vendor data: here link state, SKR, QBER), or {}."""

    def link_state(self) -> LinkState:
        """The link state from the extension; a KME that answers without one is up."""
        raw = self.extension.get("link_state", "up")
        try:
            return LinkState(raw)
        except ValueError:
            return LinkState.DOWN


def _sae(sae: str) -> str:
    return quote(sae, safe="")


def status_request(peer_sae: str) -> Request:
    """``GET /api/v1/keys/{slave_SAE_ID}/status``."""
    return Request(
        method="GET",
        path=f"/api/v1/keys/{_sae(peer_sae)}/status",
        body=None,
        retry_unknown_outcome=True,
    )


def enc_keys_request(peer_sae: str, number: int = 1, size: int | None = None) -> Request:
    """``POST /api/v1/keys/{slave_SAE_ID}/enc_keys`` for ``number`` keys of ``size`` bits."""
    doc: dict[str, Any] = {"number": number}
    if size is not None:
        doc["size"] = size
    return Request(
        method="POST",
        path=f"/api/v1/keys/{_sae(peer_sae)}/enc_keys",
        body=json.dumps(doc).encode(),
        retry_unknown_outcome=False,
    )


def dec_keys_request(peer_sae: str, key_ids: list[str]) -> Request:
    """``POST /api/v1/keys/{master_SAE_ID}/dec_keys`` for the given key IDs."""
    doc = {"key_IDs": [{"key_ID": k} for k in key_ids]}
    return Request(
        method="POST",
        path=f"/api/v1/keys/{_sae(peer_sae)}/dec_keys",
        body=json.dumps(doc).encode(),
        retry_unknown_outcome=True,
    )


# -- parsing ----------------------------------------------------------------------------
def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(f"KME {what}: body is not JSON ({len(body)} bytes)") from None


def _int(doc: dict[str, Any], name: str, what: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"KME {what}: {name} must be a non-negative integer")
    return value


def _str(doc: dict[str, Any], name: str, what: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"KME {what}: {name} must be a string")
    return value


def parse_status(body: bytes) -> KmeStatus:
    """A 200 answer to ``status``; all 11 fields present and consistent."""
    doc = _json(body, "status")
    if not isinstance(doc, dict):
        raise ProtocolError("KME status: expected a JSON object")
    ext = doc.get("status_extension") or {}
    status = KmeStatus(
        source_kme=_str(doc, "source_KME_ID", "status"),
        target_kme=_str(doc, "target_KME_ID", "status"),
        master_sae=_str(doc, "master_SAE_ID", "status"),
        slave_sae=_str(doc, "slave_SAE_ID", "status"),
        key_size=_int(doc, "key_size", "status"),
        stored_key_count=_int(doc, "stored_key_count", "status"),
        max_key_count=_int(doc, "max_key_count", "status"),
        max_key_per_request=_int(doc, "max_key_per_request", "status"),
        max_key_size=_int(doc, "max_key_size", "status"),
        min_key_size=_int(doc, "min_key_size", "status"),
        max_sae_id_count=_int(doc, "max_SAE_ID_count", "status"),
        extension=ext if isinstance(ext, dict) else {},
    )
    if not (status.min_key_size <= status.key_size <= status.max_key_size) or (
        status.stored_key_count > status.max_key_count
    ):
        raise ProtocolError("KME status: inconsistent sizes or counts")
    return status


def _key(item: Any, i: int, size_bits: int | None) -> QkdKey:
    if not isinstance(item, dict):
        raise ProtocolError(f"KME keys[{i}]: expected an object")
    key_id, text = item.get("key_ID"), item.get("key")
    if not isinstance(key_id, str) or not isinstance(text, str):
        raise ProtocolError(f"KME keys[{i}]: key_ID and key must be strings")
    try:
        canonical = str(uuid.UUID(key_id))
        material = bytearray(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise ProtocolError(f"KME keys[{i}]: malformed key ID or Base64 key") from None
    if len(key_id) != 36 or canonical != key_id.lower():
        _wipe(material)
        raise ProtocolError(f"KME keys[{i}]: key_ID is not a 36-character UUID")
    if base64.b64encode(material).decode() != text or not material:
        _wipe(material)
        raise ProtocolError(f"KME keys[{i}]: key is not canonical padded Base64")
    if size_bits is not None and len(material) * 8 != size_bits:
        got = len(material) * 8
        _wipe(material)
        raise ProtocolError(f"KME keys[{i}]: {got}-bit key, expected {size_bits}; discarded")
    return QkdKey(key_id=canonical, material=material)


def parse_keys(body: bytes, *, number: int, size_bits: int | None) -> list[QkdKey]:
    """A 200 answer to ``enc_keys``/``dec_keys``: exactly ``number`` whole keys, or an error.

    On any error, keys already decoded from the same answer are erased: a partial answer
    is never returned."""
    doc = _json(body, "keys")
    keys_doc = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys_doc, list) or len(keys_doc) != number:
        raise ProtocolError(f"KME keys: expected a keys array of {number} key(s)")
    keys: list[QkdKey] = []
    try:
        for i, item in enumerate(keys_doc):
            keys.append(_key(item, i, size_bits))
    except HalError:
        for key in keys:
            key.erase()
        raise
    if len({k.key_id for k in keys}) != len(keys):
        for key in keys:
            key.erase()
        raise ProtocolError("KME keys: the same key ID twice in one answer")
    return keys


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


_HAL_CODES: dict[str, type[HalError]] = {
    cls.code: cls
    for cls in (NoKeyAvailable, KeyNotFound, KeyNotYetAvailable, LinkDownError, DeviceUnavailable)
}
_WORDS: list[tuple[tuple[str, ...], type[HalError]]] = [
    (("not yet",), KeyNotYetAvailable),
    (("not found", "unknown key", "already"), KeyNotFound),
    (("not enough", "no key", "insufficient", "exhausted", "no more key"), NoKeyAvailable),
    (("link down", "link is down"), LinkDownError),
]


def error_for(http_status: int, body: bytes, where: str) -> HalError:
    """The typed error a non-200 answer stands for (errors are JSON per the standard)."""
    message, code = _error_message(body)
    text = f"{where}: KME answered {http_status}: {message}"
    if http_status in (401, 403):
        return TrustError(text)
    if code in _HAL_CODES:
        return _HAL_CODES[code](text)
    if http_status == 503:
        return DeviceUnavailable(text)
    if http_status == 400:
        lowered = message.lower()
        for words, cls in _WORDS:
            if any(w in lowered for w in words):
                return cls(text)
    return ProtocolError(text)


def _error_message(body: bytes) -> tuple[str, str | None]:
    """(message, machine code from ``details`` if any); tolerant: this is already an error."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return f"(no JSON error body, {len(body)} bytes)", None
    if not isinstance(doc, dict):
        return "(error body is not a JSON object)", None
    message = doc.get("message")
    message = message[:200] if isinstance(message, str) else "(no message)"
    code = None
    details = doc.get("details")
    if isinstance(details, list):
        for item in details:
            if isinstance(item, dict) and isinstance(item.get("hal_code"), str):
                code = item["hal_code"]
    return message, code


def finite_or_none(value: Any) -> float | None:
    """A JSON number from the status extension as a float; None if absent or not finite."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
