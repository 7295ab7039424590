"""KSA key batches: their wire form, and their protection end to end between the access
nodes (under a CN key) and on the UKMS-AKMS links (under QKD link keys).

A batch is ``size || count || (key ID (16 bytes) || key)*``. Under a CN key it is sealed
once, and the CN key is erased. Key IDs are identifiers, not secrets (ETSI 014 hands them
to anyone who asks), so only the key bits are encrypted; the IDs travel in clear and are
authenticated. The sealed form is ``size || count || IDs || ciphertext || tag``:

* OTP mode: the CN key is ``count * size + 32`` bytes (XOR pad, one-time Poly1305 key), so
  a batch of 128 keys spends 97 % of the relayed pad on key bits;
* GCM mode: the CN key is 32 bytes, used for this one batch (so a zero nonce is safe).

The associated data binds the request ID and the clear header, so a batch cannot be
replayed into another request nor have its IDs swapped.
"""

from __future__ import annotations

from collections.abc import Sequence

from construct import Bytes, Int16ub, PrefixedArray, Struct, this
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

from appliance.kms import keyids
from appliance.kms.errors import IntegrityFailure, ProtocolError
from appliance.kms.relay import MAC_KEY_BYTES, TAG_BYTES, Mode, xor

BATCH = Struct(
    "size" / Int16ub,  # bytes per key
    "entries"
    / PrefixedArray(Int16ub, Struct("key_id" / Bytes(16), "key" / Bytes(this._root.size))),
)
CN_GCM_BYTES = 32


def encode_batch(keys: Sequence[tuple[str, bytes | bytearray]]) -> bytearray:
    """The wire form of a batch of keys of equal size (packed by hand on this hot path;
    it equals ``BATCH.build``, which a test checks)."""
    sizes = {len(k) for _, k in keys}
    if len(sizes) != 1 or len(keys) > 0xFFFF:
        raise ProtocolError("a KSA batch holds one or more keys of one size")
    try:
        raw_ids = b"".join(keyids.to_bytes(key_id) for key_id, _ in keys)
    except ValueError:
        raise ProtocolError("a KSA key ID is not a UUID") from None
    material = bytearray(b"".join(key for _, key in keys))
    try:
        return pack_batch(raw_ids, material, sizes.pop())
    finally:
        material[:] = bytes(len(material))


def pack_batch(raw_ids: bytes, material: bytes | bytearray | memoryview, size: int) -> bytearray:
    """A batch from 16-byte key IDs and the keys' bits, ``size`` bytes each, in order."""
    count = len(raw_ids) // 16
    if len(raw_ids) != 16 * count or len(material) != count * size or not 0 < count <= 0xFFFF:
        raise ProtocolError("a KSA batch holds one or more keys of one size")
    out = bytearray(size.to_bytes(2, "big") + count.to_bytes(2, "big"))
    for i in range(count):
        out += raw_ids[16 * i : 16 * i + 16]
        out += material[size * i : size * (i + 1)]
    return out


def decode_batch(data: bytes | bytearray) -> list[tuple[str, bytearray]]:
    """Parse a batch (by hand; equal to ``BATCH.parse``)."""
    if len(data) < 4:
        raise ProtocolError("malformed KSA batch")
    size, count = int.from_bytes(data[0:2], "big"), int.from_bytes(data[2:4], "big")
    if count == 0 or size == 0 or len(data) != 4 + count * (16 + size):
        raise ProtocolError("malformed KSA batch")
    step = 16 + size
    starts = range(4, 4 + count * step, step)
    text = b"".join(data[at : at + 16] for at in starts).hex()  # the IDs only, in one call
    return [
        (keyids.from_hex(text[32 * i : 32 * i + 32]), bytearray(data[at + 16 : at + step]))
        for i, at in enumerate(starts)
    ]


def cn_key_bytes(mode: Mode, count: int, key_bytes: int) -> int:
    """How long the CN key must be to protect ``count`` keys of ``key_bytes`` bytes."""
    return count * key_bytes + MAC_KEY_BYTES if mode is Mode.OTP else CN_GCM_BYTES


def seal_batch(mode: Mode, cn_key: bytearray, request_id: bytes, batch: bytearray) -> bytes:
    """Seal an encoded batch under a CN key (IDs in clear, key bits encrypted); the CN key
    and the batch are erased."""
    try:
        size = int.from_bytes(batch[0:2], "big")
        count = int.from_bytes(batch[2:4], "big")
        if len(batch) != 4 + count * (16 + size):
            raise ProtocolError("malformed KSA batch")
        entries = [batch[4 + i * (16 + size) : 4 + (i + 1) * (16 + size)] for i in range(count)]
        header = bytes(batch[:4]) + b"".join(bytes(e[:16]) for e in entries)
        secret = bytearray(b"".join(bytes(e[16:]) for e in entries))
        try:
            if mode is Mode.GCM:
                return header + AESGCM(bytes(cn_key)).encrypt(
                    bytes(12), bytes(secret), request_id + header
                )
            n = len(secret)
            if len(cn_key) != n + MAC_KEY_BYTES:
                raise ProtocolError("OTP CN key must be count * size + 32 bytes")
            ct = xor(secret, cn_key[:n])
            return header + ct + Poly1305.generate_tag(bytes(cn_key[n:]), request_id + header + ct)
        finally:
            secret[:] = bytes(len(secret))
    finally:
        cn_key[:] = bytes(len(cn_key))
        batch[:] = bytes(len(batch))


def open_batch(mode: Mode, cn_key: bytearray, request_id: bytes, sealed: bytes) -> bytearray:
    """Open a sealed batch into its encoded form; the CN key is erased; IntegrityFailure if
    anything (IDs included) was tampered with."""
    try:
        if len(sealed) < 4:
            raise IntegrityFailure("KSA batch too short")
        size, count = int.from_bytes(sealed[0:2], "big"), int.from_bytes(sealed[2:4], "big")
        head_len, n = 4 + 16 * count, count * size
        tag_len = TAG_BYTES if mode is Mode.OTP else 16
        if len(sealed) != head_len + n + tag_len:
            raise IntegrityFailure("KSA batch does not match its header")
        header, body = sealed[:head_len], sealed[head_len:]
        if mode is Mode.GCM:
            secret = bytearray(AESGCM(bytes(cn_key)).decrypt(bytes(12), body, request_id + header))
        else:
            if len(cn_key) != n + MAC_KEY_BYTES:
                raise IntegrityFailure("KSA batch does not match its CN key")
            Poly1305.verify_tag(bytes(cn_key[n:]), request_id + header + body[:n], body[n:])
            secret = bytearray(xor(body[:n], cn_key[:n]))
        out = bytearray(header[:4])
        for i in range(count):
            out += header[4 + 16 * i : 20 + 16 * i] + secret[i * size : (i + 1) * size]
        secret[:] = bytes(len(secret))
        return out
    except (InvalidTag, InvalidSignature):
        raise IntegrityFailure("KSA batch failed authentication") from None
    finally:
        cn_key[:] = bytes(len(cn_key))
