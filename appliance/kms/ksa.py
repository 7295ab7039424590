"""KSA key batches: their wire form, and their protection end to end between the access
nodes (under a CN key) and on the UKMS-AKMS links (under QKD link keys).

A batch is ``count || size || (key ID (16 bytes) || key)*``. Under a CN key it is sealed
once and the CN key is erased:

* OTP mode: the CN key is ``len(batch) + 32`` bytes; XOR pad plus one-time Poly1305 key;
* GCM mode: the CN key is 32 bytes, used for this one batch (so a zero nonce is safe).

The associated data binds the request ID, so a batch cannot be replayed into another
request.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from construct import Bytes, ConstructError, Int16ub, PrefixedArray, Struct, this
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

from appliance.kms.errors import IntegrityFailure, ProtocolError
from appliance.kms.relay import MAC_KEY_BYTES, TAG_BYTES, Mode

BATCH = Struct(
    "size" / Int16ub,  # bytes per key
    "entries"
    / PrefixedArray(Int16ub, Struct("key_id" / Bytes(16), "key" / Bytes(this._root.size))),
)
CN_GCM_BYTES = 32


def encode_batch(keys: Sequence[tuple[str, bytes | bytearray]]) -> bytearray:
    """The wire form of a batch of keys of equal size."""
    sizes = {len(k) for _, k in keys}
    if len(sizes) != 1:
        raise ProtocolError("a KSA batch holds one or more keys of one size")
    return bytearray(
        BATCH.build(
            {
                "size": sizes.pop(),
                "entries": [
                    {"key_id": uuid.UUID(key_id).bytes, "key": bytes(key)} for key_id, key in keys
                ],
            }
        )
    )


def decode_batch(data: bytes | bytearray) -> list[tuple[str, bytearray]]:
    try:
        parsed = BATCH.parse(bytes(data))
    except ConstructError:
        raise ProtocolError("malformed KSA batch") from None
    return [(str(uuid.UUID(bytes=k.key_id)), bytearray(k.key)) for k in parsed.entries]


def cn_key_bytes(mode: Mode, batch_len: int) -> int:
    """How long the CN key must be to protect a batch of ``batch_len`` bytes."""
    return batch_len + MAC_KEY_BYTES if mode is Mode.OTP else CN_GCM_BYTES


def batch_len(count: int, key_bytes: int) -> int:
    return 2 + 2 + count * (16 + key_bytes)


def seal_batch(mode: Mode, cn_key: bytearray, request_id: bytes, batch: bytearray) -> bytes:
    """Encrypt a batch under a CN key; both are erased."""
    try:
        if mode is Mode.GCM:
            return AESGCM(bytes(cn_key)).encrypt(bytes(12), bytes(batch), request_id)
        n = len(batch)
        if len(cn_key) != n + MAC_KEY_BYTES:
            raise ProtocolError("OTP CN key must be len(batch) + 32 bytes")
        ct = bytes(a ^ b for a, b in zip(batch, cn_key[:n], strict=True))
        return ct + Poly1305.generate_tag(bytes(cn_key[n:]), request_id + ct)
    finally:
        cn_key[:] = bytes(len(cn_key))
        batch[:] = bytes(len(batch))


def open_batch(mode: Mode, cn_key: bytearray, request_id: bytes, sealed: bytes) -> bytearray:
    """Decrypt a batch; the CN key is erased; IntegrityFailure if it was tampered with."""
    try:
        if mode is Mode.GCM:
            return bytearray(AESGCM(bytes(cn_key)).decrypt(bytes(12), sealed, request_id))
        n = len(sealed) - TAG_BYTES
        if n < 0 or len(cn_key) != n + MAC_KEY_BYTES:
            raise IntegrityFailure("KSA batch does not match its CN key")
        Poly1305.verify_tag(bytes(cn_key[n:]), request_id + sealed[:n], sealed[n:])
        return bytearray(a ^ b for a, b in zip(sealed[:n], cn_key[:n], strict=True))
    except InvalidTag:
        raise IntegrityFailure("KSA batch failed authentication") from None
    finally:
        cn_key[:] = bytes(len(cn_key))
