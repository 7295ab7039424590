"""The image keyring: root keys with rotation, certified signing keys, a revocation list.

Format (JSON, ``qkdn-keyring-1``); every statement is ``{"body": {...}, "sig": {...}}`` with
the hybrid signature (:mod:`images.signing`) of ``canonical(body)`` for purpose ``body.type``:

- ``roots``: a chain. The first is ``{"type": "root", "serial": 1, "key": PUB,
  "previous": null}`` (unsigned: a device pins it, or a later root, as its trust anchor).
  Each later root names the previous root's key id and is signed by the previous root.
- ``signers``: ``{"type": "signer", "purpose": "dev" | "release", "key": PUB, "root": ID}``,
  signed by root ``ID``. Only signers certified by the newest root of the chain count, so a
  rotation retires every certificate of the old root.
- ``revocations``: ``{"type": "revocations", "serial": N, "revoked": [key ids]}`` signed by a
  root of the chain, or null.

Verification needs no wall clock: trust follows the chain from the device's anchor, and
freshness comes from serials and the device's own revocation list, not from dates.
This module never trusts a key that it cannot chain to the caller's anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from images.errors import BundleRejected, KeyFileError
from images.signing import (
    MAX_KEYRING_FILE,
    KeyPair,
    PublicKey,
    Signature,
    canonical,
    load_json,
    save_json,
    verify,
)

FORMAT = "qkdn-keyring-1"
PURPOSES = ("dev", "release")


def _statement(key: KeyPair | None, body: dict[str, Any]) -> dict[str, Any]:
    sig = None if key is None else key.sign(body["type"], canonical(body)).to_json()
    return {"body": body, "sig": sig}


def new_keyring(root: KeyPair) -> dict[str, Any]:
    """A keyring whose only root is ``root``."""
    body = {"type": "root", "serial": 1, "key": root.public.to_json(), "previous": None}
    return {"format": FORMAT, "roots": [_statement(None, body)], "signers": [], "revocations": None}


def rotate(ring: dict[str, Any], old: KeyPair, new: KeyPair) -> dict[str, Any]:
    """Append ``new`` as the next root, signed by the current root ``old``."""
    current = _roots(ring)[-1]
    if current.key_id != old.public.key_id:
        raise KeyFileError("rotate: the old root key is not the keyring's current root")
    body = {
        "type": "root",
        "serial": len(ring["roots"]) + 1,
        "key": new.public.to_json(),
        "previous": old.public.key_id,
    }
    return {**ring, "roots": [*ring["roots"], _statement(old, body)]}


def certify(ring: dict[str, Any], root: KeyPair, signer: PublicKey, purpose: str) -> dict[str, Any]:
    """Add a signing key for ``purpose`` (dev or release), certified by the current root."""
    if purpose not in PURPOSES:
        raise KeyFileError(f"certify: purpose must be dev or release, got {purpose!r}")
    if _roots(ring)[-1].key_id != root.public.key_id:
        raise KeyFileError("certify: the root key is not the keyring's current root")
    body = {
        "type": "signer",
        "purpose": purpose,
        "key": signer.to_json(),
        "root": root.public.key_id,
    }
    return {**ring, "signers": [*ring["signers"], _statement(root, body)]}


def revoke(ring: dict[str, Any], root: KeyPair, key_id: str) -> dict[str, Any]:
    """A new revocation list (serial + 1) adding ``key_id``, signed by the current root."""
    if _roots(ring)[-1].key_id != root.public.key_id:
        raise KeyFileError("revoke: the root key is not the keyring's current root")
    old = ring.get("revocations") or {"body": {"serial": 0, "revoked": []}}
    revoked = sorted({*old["body"]["revoked"], key_id})
    body = {"type": "revocations", "serial": old["body"]["serial"] + 1, "revoked": revoked}
    return {**ring, "revocations": _statement(root, body)}


def _roots(ring: dict[str, Any]) -> list[PublicKey]:
    return [PublicKey.from_json(r["body"]["key"], "keyring root") for r in ring["roots"]]


def load_keyring(path: Path) -> dict[str, Any]:
    """A keyring file whose shape the operations here rely on (IMG-KEY otherwise)."""
    ring = load_json(path, "keyring", MAX_KEYRING_FILE)
    if not isinstance(ring, dict) or ring.get("format") != FORMAT:
        raise KeyFileError(f"{path}: not a {FORMAT} keyring")
    try:
        _check_shape(ring)
    except (KeyError, TypeError, IndexError, KeyFileError):
        raise KeyFileError(f"{path}: a malformed {FORMAT} keyring") from None
    return ring


def _check_shape(ring: dict[str, Any]) -> None:
    if not _roots(ring) or not isinstance(ring["signers"], list):
        raise KeyFileError("roots, signers")
    for st in ring["signers"]:
        PublicKey.from_json(st["body"]["key"])
    revs = ring.get("revocations")
    if revs is not None:
        body = revs["body"]
        ids = body["revoked"]
        if type(body["serial"]) is not int or not isinstance(ids, list):
            raise KeyFileError("revocations")
        if not all(isinstance(i, str) for i in ids):
            raise KeyFileError("revocations")


def save_keyring(path: Path, ring: dict[str, Any]) -> None:
    save_json(path, ring)


def current_root(ring: dict[str, Any]) -> PublicKey:
    """The newest root of a keyring (what a newly provisioned device pins)."""
    try:
        return _roots(ring)[-1]
    except (KeyError, TypeError, IndexError):
        raise KeyFileError("keyring has no valid root") from None


@dataclass(frozen=True)
class Signer:
    key: PublicKey
    purpose: str


@dataclass(frozen=True)
class Trust:
    """What a keyring proves, starting from a device's anchor."""

    root: PublicKey
    signers: dict[str, Signer]
    revoked: frozenset[str]
    revocation_serial: int


def _reject(code: str, message: str) -> BundleRejected:
    return BundleRejected(message, code=code)


def evaluate(ring: Any, anchor: PublicKey, device_revoked: frozenset[str]) -> Trust:
    """Walk the root chain from ``anchor`` and collect the current root's signers.

    Anything malformed or unsigned in the part of the chain that matters is IMG-SIGNATURE.
    """
    try:
        return _evaluate(ring, anchor, device_revoked)
    except (KeyError, TypeError, AttributeError, KeyFileError):
        raise _reject("IMG-SIGNATURE", "the bundle's keyring is malformed") from None


def _evaluate(ring: Any, anchor: PublicKey, device_revoked: frozenset[str]) -> Trust:
    if ring.get("format") != FORMAT:
        raise KeyFileError("format")
    chain = _chain(ring["roots"], anchor)
    revoked, serial = _revocations(ring.get("revocations"), chain, device_revoked)
    root = chain[-1]
    if root.key_id in revoked:
        raise _reject("IMG-REVOKED", f"the current root key {root.key_id} is revoked")
    signers = {}
    for st in ring["signers"]:
        body = st["body"]
        if body["type"] != "signer" or body["root"] != root.key_id:
            continue  # certified by a retired root, or not a certificate
        if body["purpose"] in PURPOSES and _signed_by(root, st):
            key = PublicKey.from_json(body["key"], "signer key")
            signers[key.key_id] = Signer(key, body["purpose"])
    return Trust(root, signers, revoked, serial)


def _signed_by(key: PublicKey, st: dict[str, Any]) -> bool:
    body = st["body"]
    return verify(key, body["type"], canonical(body), Signature.from_json(st["sig"]))


def _chain(roots: list[dict[str, Any]], anchor: PublicKey) -> list[PublicKey]:
    keys = [PublicKey.from_json(r["body"]["key"], "root") for r in roots]
    ids = [k.key_id for k in keys]
    if anchor.key_id not in ids:
        raise _reject("IMG-SIGNATURE", "the bundle's keyring does not chain to the device's root")
    start = ids.index(anchor.key_id)
    chain = [anchor]
    for st, key in zip(roots[start + 1 :], keys[start + 1 :], strict=True):
        prev = chain[-1]
        if st["body"].get("previous") != prev.key_id or not _signed_by(prev, st):
            raise _reject(
                "IMG-SIGNATURE", f"root rotation to {key.key_id} is not signed by {prev.key_id}"
            )
        chain.append(key)
    return chain


def _revocations(
    st: Any, chain: list[PublicKey], device_revoked: frozenset[str]
) -> tuple[frozenset[str], int]:
    if st is None:
        return device_revoked, 0
    body = st["body"]
    if body["type"] != "revocations" or not any(_signed_by(k, st) for k in chain):
        raise _reject("IMG-SIGNATURE", "the revocation list is not signed by a trusted root")
    ids = body["revoked"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise KeyFileError("revoked")
    serial = body["serial"]
    if not isinstance(serial, int):
        raise KeyFileError("serial")
    return device_revoked | frozenset(ids), serial
