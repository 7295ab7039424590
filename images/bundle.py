"""The bundle file: a signed envelope followed by the payload, and its verification.

Layout::

    "QKDNBDL1"                      8 bytes magic
    envelope length L               4 bytes, big-endian, at most 1 MiB
    envelope                        L bytes of canonical JSON, see below
    zero padding                    to the next multiple of 4096
    payload                         squashfs image, then its dm-verity hash tree

The envelope is ``{"format": "qkdn-bundle-1", "manifest": TEXT, "signer": KEY_ID,
"sig": {"ed25519": HEX, "mldsa65": HEX}, "keyring": KEYRING}``; ``sig`` signs the manifest
text (purpose ``manifest``). Order of checks, and the rule of this module: nothing beyond
the envelope is parsed before both signatures verify through the keyring chain to the
device's anchor, and the payload is hashed in full before the caller may write anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from images import keyring as kr
from images.errors import BuildError, BundleRejected, ImageUsageError
from images.manifest import Manifest, parse_manifest
from images.mapping import map_region
from images.policy import DevicePolicy
from images.signing import KeyPair, Signature, canonical, verify

MAGIC = b"QKDNBDL1"
FORMAT = "qkdn-bundle-1"
MAX_ENVELOPE = 1 << 20
ALIGN = 4096
HASH_WORKERS = 2


def _reject(code: str, message: str) -> BundleRejected:
    return BundleRejected(message, code=code)


def payload_offset(envelope_len: int) -> int:
    return -(-(len(MAGIC) + 4 + envelope_len) // ALIGN) * ALIGN


def envelope_bytes(manifest: Manifest, key: KeyPair, ring: dict[str, Any]) -> bytes:
    text = manifest.encode()
    sig = key.sign("manifest", text)
    doc = {
        "format": FORMAT,
        "manifest": text.decode(),
        "signer": key.public.key_id,
        "sig": sig.to_json(),
        "keyring": ring,
    }
    return canonical(doc)


def write_bundle(out: Path, envelope: bytes, payload: Path) -> None:
    """Write header, envelope, padding and the payload file into ``out``."""
    if len(envelope) > MAX_ENVELOPE:  # a device would refuse the bundle as malformed
        raise BuildError(
            f"the signed envelope is {len(envelope)} bytes, over the {MAX_ENVELOPE} a device "
            "reads (a keyring with fewer certificates makes it smaller)"
        )
    head = MAGIC + struct.pack(">I", len(envelope)) + envelope
    head += b"\0" * (payload_offset(len(envelope)) - len(head))
    with out.open("wb") as dst, payload.open("rb") as src:
        dst.write(head)
        while block := src.read(1 << 22):
            dst.write(block)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose manifest signature verified; the payload is not yet checked."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signer: str
    purpose: str
    offset: int
    trust: kr.Trust


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (never waits on a FIFO)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageUsageError(f"{path}: a bundle is a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_envelope(path: Path) -> tuple[dict[str, Any], int]:
    """The envelope (as JSON) and the payload offset; IMG-MALFORMED / IMG-TRUNCATED."""
    try:
        with _open_regular(path) as fh:
            head = fh.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 and MAGIC.startswith(head[: len(MAGIC)]) and head:
                raise _reject("IMG-TRUNCATED", f"{path}: bundle is truncated (in the header)")
            if head[: len(MAGIC)] != MAGIC:
                raise _reject("IMG-MALFORMED", f"{path}: not a qkdn image bundle (bad magic)")
            (length,) = struct.unpack(">I", head[len(MAGIC) :])
            if length > MAX_ENVELOPE:
                raise _reject("IMG-MALFORMED", f"{path}: envelope length {length} is too large")
            raw = fh.read(length)
    except OSError as exc:
        raise ImageUsageError(f"cannot read bundle {path}: {exc.strerror}") from None
    if len(raw) < length:
        raise _reject("IMG-TRUNCATED", f"{path}: bundle is truncated (in the envelope)")
    return _parse_envelope(raw, path), payload_offset(length)


def _parse_envelope(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _reject("IMG-MALFORMED", f"{path}: envelope is not JSON") from None
    keys = {"format", "manifest", "signer", "sig", "keyring"}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not keys <= set(doc):
        raise _reject("IMG-MALFORMED", f"{path}: envelope is not a {FORMAT} envelope")
    if not isinstance(doc["manifest"], str) or not isinstance(doc["signer"], str):
        raise _reject("IMG-MALFORMED", f"{path}: envelope manifest/signer must be strings")
    if not isinstance(doc["keyring"], dict):
        raise _reject("IMG-MALFORMED", f"{path}: envelope keyring must be an object")
    return doc


def verify_bundle(path: Path, policy: DevicePolicy, revoked: frozenset[str]) -> VerifiedBundle:
    """Check the envelope's signatures against the device's anchor, then parse the manifest."""
    env, offset = read_envelope(path)
    trust = kr.evaluate(env["keyring"], policy.anchor, policy.revoked | revoked)
    signer_id = env["signer"]
    if signer_id in trust.revoked:
        raise _reject("IMG-REVOKED", f"the bundle is signed by revoked key {signer_id}")
    signer = trust.signers.get(signer_id)
    if signer is None:
        raise _reject("IMG-SIGNATURE", f"signer {signer_id} is not certified by the current root")
    if signer.purpose == "dev" and not policy.accept_dev:
        raise _reject(
            "IMG-DEV-KEY",
            f"signed by development key {signer_id}; this device accepts release keys only",
        )
    text = env["manifest"].encode()
    sig = Signature.from_json(env["sig"])
    if not sig.ed25519 or not sig.mldsa65:
        missing = "Ed25519" if not sig.ed25519 else "ML-DSA-65"
        raise _reject("IMG-SIGNATURE", f"the {missing} signature of the manifest is missing")
    if not verify(signer.key, "manifest", text, sig):
        raise _reject(
            "IMG-SIGNATURE",
            "the manifest signature does not verify (tampered manifest or wrong key)",
        )
    manifest = parse_manifest(text)
    _check_length(path, offset, manifest)
    return VerifiedBundle(path, manifest, text, signer_id, signer.purpose, offset, trust)


def _check_length(path: Path, offset: int, manifest: Manifest) -> None:
    size = path.stat().st_size
    expected = offset + manifest.payload_size
    if size < expected:
        raise _reject("IMG-TRUNCATED", f"{path}: bundle is truncated ({size} of {expected} bytes)")
    if size > expected:
        raise _reject(
            "IMG-MALFORMED", f"{path}: {size - expected} unexpected bytes after the payload"
        )


def check_for_device(
    bundle: VerifiedBundle, policy: DevicePolicy, floor: int, slot_size: int
) -> None:
    """Compatible string, node, anti-rollback floor, and the slot size."""
    m = bundle.manifest
    if m.compatible != policy.compatible:
        raise _reject(
            "IMG-COMPATIBLE", f"image is for {m.compatible!r}, this device is {policy.compatible!r}"
        )
    if policy.node is not None and m.node != policy.node:
        raise _reject(
            "IMG-COMPATIBLE", f"image is for node {m.node}, this device is node {policy.node}"
        )
    if m.security_version < floor:
        raise _reject(
            "IMG-DOWNGRADE",
            f"security version {m.security_version} is below the device floor {floor}",
        )
    if m.payload_size > slot_size:
        raise _reject(
            "IMG-TOO-LARGE",
            f"payload of {m.payload_size} bytes does not fit the {slot_size}-byte slot",
        )


@contextmanager
def mapped(path: Path, offset: int, size: int) -> Iterator[memoryview]:
    """A read-only memory map of ``size`` bytes at ``offset`` of the file at ``path``."""
    with path.open("rb") as fh, map_region(fh.fileno(), offset, size) as part:
        yield part


def chunk_digests(
    read: Callable[[int, int], bytes | memoryview], size: int, chunk: int
) -> list[str]:
    """SHA-256 of every ``chunk`` bytes, on HASH_WORKERS threads (hashlib drops the GIL)."""

    def one(start: int) -> str:
        return hashlib.sha256(read(start, min(chunk, size - start))).hexdigest()

    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        return list(pool.map(one, range(0, size, chunk)))


def check_payload(bundle: VerifiedBundle) -> None:
    """Hash the whole payload against the signed chunk digests; IMG-TAMPERED on a mismatch."""
    m = bundle.manifest
    with mapped(bundle.path, bundle.offset, m.payload_size) as view:
        got = chunk_digests(lambda s, n: view[s : s + n], m.payload_size, m.chunk_size)
    bad = [i for i, (a, b) in enumerate(zip(got, m.chunks, strict=True)) if a != b]
    if bad:
        raise _reject(
            "IMG-TAMPERED",
            f"payload chunk {bad[0]} (offset {bad[0] * m.chunk_size}) "
            "does not match the signed manifest",
        )
