"""Deterministic key bits and key IDs for both ends of an emulated QKD link.

Both ends hold the same per-link secret. From it, HKDF derives independent sub-keys, so
that each end computes the *same* key bits under the *same* key IDs without talking:

* key *i* is bytes ``[i*n, (i+1)*n)`` of the AES-256-CTR keystream under the stream key;
* its ID is ``AES-256(id key, "QKDN-EMU" || i)`` shaped as a version-4 UUID. Shaping
  overwrites 6 ciphertext bits, so decoding tries the 64 possible values in one ECB call
  and keeps the one whose plaintext carries the tag: O(1), no table of issued IDs.

Key bytes are written straight into a ``bytearray`` (``update_into``) so the caller can
erase them; they never pass through an immutable ``bytes`` object here.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_TAG = b"QKDN-EMU"
_ZEROS = bytes(4096)
# The 6 bits that UUID shaping overwrites, in all 64 combinations (bits 4-7 of byte 6,
# bits 6-7 of byte 8).
_HIDDEN_6 = ((np.arange(64) & 0x0F) << 4).astype(np.uint8)
_HIDDEN_8 = ((np.arange(64) >> 4) << 6).astype(np.uint8)


def derive(secret: bytes, link: str, purpose: str) -> bytes:
    """A 32-byte sub-key of the link secret for one purpose (key stream, IDs, noise)."""
    info = f"qkdn/emulated-link/v1/{purpose}/{link}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def secret_from_seed(seed: str) -> bytes:
    """A link secret from a public seed: reproducible runs and tests only, never production."""
    return hashlib.sha256(b"qkdn/emulated-link/seed\0" + seed.encode()).digest()


class KeyStream:
    """Key *i* of ``key_bytes`` bytes, read at random access from an AES-256-CTR keystream."""

    def __init__(self, stream_key: bytes, key_bytes: int) -> None:
        self._key = stream_key
        self._n = key_bytes

    def key(self, index: int) -> bytearray:
        """The bytes of key ``index``, in a fresh bytearray owned by the caller."""
        offset = index * self._n
        block, skip = divmod(offset, 16)
        total = skip + self._n
        enc = Cipher(algorithms.AES(self._key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
        buf = bytearray(total + 15)
        done = 0
        while done < total:
            chunk = min(total - done, len(_ZEROS))
            done += enc.update_into(_ZEROS[:chunk], memoryview(buf)[done:])
        out = buf[skip:total]
        buf[:] = bytes(len(buf))
        return out

    def keys(self, first: int, count: int) -> list[bytearray]:
        """Keys ``first`` .. ``first + count - 1``, each in a fresh bytearray, from one
        cipher context and one keystream run (the same bytes as :meth:`key` for each)."""
        if count <= 0:
            return []
        n = self._n
        block, skip = divmod(first * n, 16)
        total = skip + count * n
        enc = Cipher(algorithms.AES(self._key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
        buf = bytearray(total + 15)
        view = memoryview(buf)
        done = 0
        while done < total:
            chunk = min(total - done, len(_ZEROS))
            done += enc.update_into(_ZEROS[:chunk], view[done:])
        out = [buf[skip + i * n : skip + (i + 1) * n] for i in range(count)]
        view.release()
        buf[:] = bytes(len(buf))
        return out


class KeyIdCodec:
    """Maps key indexes to UUID key IDs and back, under a per-link key (not thread-safe)."""

    def __init__(self, id_key: bytes) -> None:
        cipher = Cipher(algorithms.AES(id_key), modes.ECB())
        # ECB is stateless per block, so one open context serves every call.
        self._enc, self._dec = cipher.encryptor(), cipher.decryptor()

    def encode(self, index: int) -> str:
        """The UUID string of key ``index``."""
        block = bytearray(self._enc.update(_TAG + index.to_bytes(8, "big")))
        block[6] = (block[6] & 0x0F) | 0x40
        block[8] = (block[8] & 0x3F) | 0x80
        return str(uuid.UUID(bytes=bytes(block)))

    def encode_run(self, first: int, count: int) -> list[str]:
        """The UUID strings of keys ``first`` .. ``first + count - 1``, in one cipher call."""
        plain = b"".join(_TAG + i.to_bytes(8, "big") for i in range(first, first + count))
        blocks = self._enc.update(plain)
        ids = []
        for at in range(0, len(blocks), 16):
            block = bytearray(blocks[at : at + 16])
            block[6] = (block[6] & 0x0F) | 0x40
            block[8] = (block[8] & 0x3F) | 0x80
            ids.append(str(uuid.UUID(bytes=bytes(block))))
        return ids

    def decode(self, key_id: str) -> int | None:
        """The index behind ``key_id``, or None if no key of this link has that ID."""
        try:
            raw = uuid.UUID(key_id).bytes
        except (ValueError, AttributeError, TypeError):
            return None
        if raw[6] >> 4 != 4 or raw[8] >> 6 != 2:
            return None
        candidates = np.frombuffer(raw * 64, dtype=np.uint8).reshape(64, 16).copy()
        candidates[:, 6] = (candidates[:, 6] & 0x0F) | _HIDDEN_6
        candidates[:, 8] = (candidates[:, 8] & 0x3F) | _HIDDEN_8
        plain = self._dec.update(candidates.tobytes())
        at = plain.find(_TAG)
        while at >= 0 and at % 16:
            at = plain.find(_TAG, at + 1)
        return None if at < 0 else int.from_bytes(plain[at + 8 : at + 16], "big")
