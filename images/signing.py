"""Hybrid signatures: every statement is signed with Ed25519 **and** ML-DSA-65.

An appliance that guards quantum-safe keys needs a quantum-safe firmware signature, and
keeping Ed25519 beside ML-DSA-65 means a flaw in either scheme alone does not break trust:
:func:`verify` accepts a signature only when both halves verify.

Signed bytes are ``b"qkdn-image-v1\\0" + purpose + b"\\0" + body``, and ML-DSA additionally
gets the purpose as its context string, so a signature made for one purpose (a manifest, a
rotation, a certificate, a revocation list) never verifies as another.

File formats (JSON, one object):
- private key ``*.key`` (mode 0600): ``{"format": "qkdn-image-key-1", "name": ..,
  "ed25519": hex seed (32 bytes), "mldsa65": hex seed (32 bytes)}``;
- public key ``*.pub``: ``{"format": "qkdn-image-pub-1", "name": .., "ed25519": hex (32 bytes),
  "mldsa65": hex (1952 bytes)}``. A key id is the first 16 bytes of
  SHA-256(ed25519 public || mldsa65 public), in hex.

This module never writes a private key with a mode other than 0600 and never prints one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from appliance.files import KiB, MiB, read_bounded
from images.errors import ImageUsageError, KeyFileError

DOMAIN = b"qkdn-image-v1\0"
ED_PUB_LEN, ML_PUB_LEN, SEED_LEN = 32, 1952, 32
ED_SIG_LEN, ML_SIG_LEN = 64, 3309
MAX_KEY_FILE = 64 * KiB
MAX_KEYRING_FILE = MiB
"""A keyring travels in every bundle's envelope, which a device reads up to 1 MiB."""


def canonical(doc: Any) -> bytes:
    """The one byte encoding of a JSON document that gets signed and hashed."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _message(purpose: str, body: bytes) -> bytes:
    return DOMAIN + purpose.encode() + b"\0" + body


def _hex(doc: dict[str, Any], key: str, size: int, what: str) -> bytes:
    value = doc.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise KeyFileError(f"{what}: '{key}' must be {size} bytes in hex")
    return raw


@dataclass(frozen=True)
class PublicKey:
    """The public half of a hybrid key pair."""

    name: str
    ed25519: bytes
    mldsa65: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.ed25519 + self.mldsa65).hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "qkdn-image-pub-1",
            "name": self.name,
            "ed25519": self.ed25519.hex(),
            "mldsa65": self.mldsa65.hex(),
        }

    @classmethod
    def from_json(cls, doc: Any, what: str = "public key") -> PublicKey:
        if not isinstance(doc, dict) or doc.get("format") != "qkdn-image-pub-1":
            raise KeyFileError(f"{what}: not a qkdn-image-pub-1 public key")
        name = doc.get("name")
        if not isinstance(name, str):
            raise KeyFileError(f"{what}: 'name' must be a string")
        return cls(
            name, _hex(doc, "ed25519", ED_PUB_LEN, what), _hex(doc, "mldsa65", ML_PUB_LEN, what)
        )


@dataclass(frozen=True)
class Signature:
    """Both halves of a hybrid signature; either may be absent in a damaged bundle."""

    ed25519: bytes
    mldsa65: bytes

    def to_json(self) -> dict[str, str]:
        return {"ed25519": self.ed25519.hex(), "mldsa65": self.mldsa65.hex()}

    @classmethod
    def from_json(cls, doc: Any) -> Signature:
        """Lenient on purpose: a missing or malformed half becomes empty and fails verify()."""
        doc = doc if isinstance(doc, dict) else {}
        return cls(_soft_hex(doc.get("ed25519")), _soft_hex(doc.get("mldsa65")))


def _soft_hex(value: Any) -> bytes:
    try:
        return bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""


class KeyPair:
    """A hybrid signing key, from two 32-byte seeds."""

    def __init__(self, name: str, ed_seed: bytes, ml_seed: bytes) -> None:
        self.name = name
        self._ed_seed, self._ml_seed = ed_seed, ml_seed
        self._ed = ed25519.Ed25519PrivateKey.from_private_bytes(ed_seed)
        self._ml = mldsa.MLDSA65PrivateKey.from_seed_bytes(ml_seed)
        self.public = PublicKey(
            name, self._ed.public_key().public_bytes_raw(), self._ml.public_key().public_bytes_raw()
        )

    @classmethod
    def generate(cls, name: str, random: Any = os.urandom) -> KeyPair:
        """A new key pair; ``random(n)`` supplies the seeds (injected for tests)."""
        return cls(name, random(SEED_LEN), random(SEED_LEN))

    def sign(self, purpose: str, body: bytes) -> Signature:
        msg = _message(purpose, body)
        return Signature(self._ed.sign(msg), self._ml.sign(msg, purpose.encode()))

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the private key with mode 0600, then the public key beside it (``.pub``).

        An existing key or public key is never replaced unless ``overwrite`` (IMG-USAGE)."""
        pub = path.with_suffix(".pub")
        for existing in (path, pub):
            if not overwrite and (existing.exists() or existing.is_symlink()):
                raise ImageUsageError(f"{existing} exists; pass --force to overwrite it")
        doc = {
            "format": "qkdn-image-key-1",
            "name": self.name,
            "ed25519": self._ed_seed.hex(),
            "mldsa65": self._ml_seed.hex(),
        }
        try:
            replace = os.O_TRUNC if overwrite else os.O_EXCL  # no race with another writer
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | replace, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(doc) + "\n")
            save_json(pub, self.public.to_json())
        except OSError as exc:
            raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None

    @classmethod
    def load(cls, path: Path) -> KeyPair:
        doc = load_json(path, "private key")
        if not isinstance(doc, dict) or doc.get("format") != "qkdn-image-key-1":
            raise KeyFileError(f"{path}: not a qkdn-image-key-1 private key")
        name = doc.get("name")
        if not isinstance(name, str):
            raise KeyFileError(f"{path}: 'name' must be a string")
        what = str(path)
        return cls(name, _hex(doc, "ed25519", SEED_LEN, what), _hex(doc, "mldsa65", SEED_LEN, what))


def verify(key: PublicKey, purpose: str, body: bytes, sig: Signature) -> bool:
    """True only when both the Ed25519 and the ML-DSA-65 signature verify."""
    msg = _message(purpose, body)
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key.ed25519).verify(sig.ed25519, msg)
        mldsa.MLDSA65PublicKey.from_public_bytes(key.mldsa65).verify(
            sig.mldsa65, msg, purpose.encode()
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def load_json(path: Path, what: str, limit: int = MAX_KEY_FILE) -> Any:
    """A JSON document from a file of at most ``limit`` bytes (IMG-KEY otherwise)."""
    try:
        return json.loads(read_bounded(path, limit).decode("utf-8"))
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise KeyFileError(f"{path}: {what} is not JSON") from None


def save_json(path: Path, doc: Any) -> None:
    try:
        path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from None


def load_public(path: Path) -> PublicKey:
    return PublicKey.from_json(load_json(path, "public key"), str(path))
