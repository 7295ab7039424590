"""The signed manifest of an image bundle, and its strict parser.

The manifest is canonical JSON (``qkdn-manifest-1``). It names what the image is for
(``compatible``, ``role``, ``node``), which release it is (``version``, and a monotonic
``security_version`` that anti-rollback compares with the device's floor), and what the
payload is: the squashfs image (``image.size``, ``image.sha256``, as ``sha256sum`` prints),
the dm-verity hash tree appended after it (``verity``: root hash, salt, data size and
blocks, hash offset, so ``veritysetup verify`` can be run on the payload by hand), and a
SHA-256 per ``chunk_size`` bytes of the whole payload (image + tree), which flashing
checks in parallel before writing and again when it reads the slot back.

This module parses only bytes whose signature has already been verified, and still never
trusts them: every field is type- and range-checked, and a problem is IMG-MALFORMED.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from images.errors import BundleRejected
from images.signing import canonical

FORMAT = "qkdn-manifest-1"
BLOCK = 4096
MAX_PAYLOAD = 1 << 40
MAX_SECURITY_VERSION = 1 << 32
MAX_CHUNK = 1 << 30
MAX_EPOCH = (1 << 32) - 1
"""The latest SOURCE_DATE_EPOCH an image can have: squashfs keeps 32-bit timestamps."""
HEX64 = re.compile(r"^[0-9a-f]{64}$")
TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True, kw_only=True)
class Verity:
    """dm-verity parameters of the payload (hash tree appended at ``hash_offset``)."""

    root_hash: str
    salt: str
    uuid: str
    hash_algorithm: str = "sha256"
    data_block_size: int = BLOCK
    hash_block_size: int = BLOCK
    data_blocks: int
    data_size: int
    hash_offset: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    compatible: str
    """Which devices may install this image (matched exactly against the device policy)."""
    role: str
    node: int
    node_name: str
    version: str
    security_version: int
    """Anti-rollback counter: refused when below the device's floor."""
    created: int
    """SOURCE_DATE_EPOCH of the build (informational; never compared with a clock)."""
    image_size: int
    image_sha256: str
    payload_size: int
    chunk_size: int
    chunks: tuple[str, ...]
    verity: Verity

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["chunks"] = list(self.chunks)
        return {"format": FORMAT, **doc}

    def encode(self) -> bytes:
        return canonical(self.to_json())


def _malformed(why: str) -> BundleRejected:
    return BundleRejected(f"manifest is malformed: {why}", code="IMG-MALFORMED")


def _int(doc: dict[str, Any], key: str, lo: int = 0, hi: int = MAX_PAYLOAD) -> int:
    value = doc.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise _malformed(f"'{key}' must be an integer in {lo}..{hi}")
    return value


def _str(doc: dict[str, Any], key: str, pattern: re.Pattern[str] = TEXT) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _malformed(f"'{key}' is missing or not of the expected form")
    return value


def _exact_keys(doc: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or set(doc) != keys:
        raise _malformed(f"{where} must have exactly the keys {', '.join(sorted(keys))}")
    return doc


def parse_manifest(data: bytes) -> Manifest:
    """Parse and check verified manifest bytes; IMG-MALFORMED on any problem."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _malformed("not JSON") from None
    fields = {f for f in Manifest.__dataclass_fields__} | {"format"}
    doc = _exact_keys(doc, fields, "the manifest")
    if doc["format"] != FORMAT:
        raise _malformed(f"format must be {FORMAT}")
    verity = _parse_verity(doc["verity"])
    manifest = Manifest(
        compatible=_str(doc, "compatible"),
        role=_str(doc, "role"),
        node=_int(doc, "node", 1, 999),
        node_name=_str(doc, "node_name"),
        version=_str(doc, "version"),
        security_version=_int(doc, "security_version", 0, MAX_SECURITY_VERSION),
        created=_int(doc, "created", 0, 2**40),
        image_size=_int(doc, "image_size", BLOCK),
        image_sha256=_str(doc, "image_sha256", HEX64),
        payload_size=_int(doc, "payload_size", BLOCK),
        chunk_size=_int(doc, "chunk_size", BLOCK, MAX_CHUNK),
        chunks=_chunks(doc["chunks"]),
        verity=verity,
    )
    _check_sizes(manifest)
    return manifest


def _chunks(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(c, str) and HEX64.fullmatch(c) for c in value
    ):
        raise _malformed("'chunks' must be a list of SHA-256 hex digests")
    return tuple(value)


def _parse_verity(value: Any) -> Verity:
    doc = _exact_keys(value, set(Verity.__dataclass_fields__), "'verity'")
    if doc["hash_algorithm"] != "sha256":
        raise _malformed("verity hash_algorithm must be sha256")
    salt = _str(doc, "salt", HEX64)
    return Verity(
        root_hash=_str(doc, "root_hash", HEX64),
        salt=salt,
        uuid=_str(doc, "uuid", UUID),
        data_block_size=_int(doc, "data_block_size", BLOCK, BLOCK),
        hash_block_size=_int(doc, "hash_block_size", BLOCK, BLOCK),
        data_blocks=_int(doc, "data_blocks", 1),
        data_size=_int(doc, "data_size", BLOCK),
        hash_offset=_int(doc, "hash_offset", BLOCK),
    )


def _check_sizes(m: Manifest) -> None:
    v = m.verity
    if m.image_size % BLOCK or m.chunk_size % BLOCK:
        raise _malformed("image_size and chunk_size must be multiples of 4096")
    if not v.data_size == v.hash_offset == m.image_size == v.data_blocks * BLOCK:
        raise _malformed("verity data size, hash offset and image size disagree")
    if m.payload_size <= m.image_size:
        raise _malformed("payload_size must exceed image_size (the hash tree follows the image)")
    if len(m.chunks) != -(-m.payload_size // m.chunk_size):
        raise _malformed("the number of chunk digests does not match payload_size")
