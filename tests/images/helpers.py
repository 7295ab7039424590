"""Helpers that take bundles apart and put them back together (to make refusal vectors)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from images.bundle import MAGIC, payload_offset, read_envelope
from images.signing import KeyPair, canonical


def parts(bundle: Path) -> tuple[dict[str, Any], bytes]:
    env, off = read_envelope(bundle)
    return env, bundle.read_bytes()[off:]


def assemble(dst: Path, env: dict[str, Any], payload: bytes) -> Path:
    raw = canonical(env)
    head = MAGIC + struct.pack(">I", len(raw)) + raw
    dst.write_bytes(head + b"\0" * (payload_offset(len(raw)) - len(head)) + payload)
    return dst


def mutate(
    src: Path,
    dst: Path,
    env_change: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    payload_change: Callable[[bytes], bytes] | None = None,
) -> Path:
    env, payload = parts(src)
    env = env_change(env) if env_change else env
    payload = payload_change(payload) if payload_change else payload
    return assemble(dst, env, payload)


def resign(
    env: dict[str, Any],
    key: KeyPair,
    manifest: dict[str, Any] | None = None,
    claim: str | None = None,
) -> dict[str, Any]:
    """Sign (a changed) manifest with ``key``; ``claim`` overrides the signer id."""
    text = canonical(manifest) if manifest is not None else env["manifest"].encode()
    sig = key.sign("manifest", text).to_json()
    return {**env, "manifest": text.decode(), "sig": sig, "signer": claim or key.public.key_id}


def manifest_of(env: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(env["manifest"])
    return doc


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
