"""The one loader of the official test vectors in ``tests/vectors/`` (see its README.md).

Every file a test reads is listed in ``tests/vectors/SHA256SUMS`` and checked against it when
first read: a missing, unlisted or changed file raises :class:`VectorError`, so the test
(or the collection of its module) fails. Vectors are never skipped.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

VECTORS = Path(__file__).resolve().parent / "vectors"
MANIFEST = "SHA256SUMS"


class VectorError(Exception):
    """An official vector file is missing, unlisted or not the published bytes."""


def manifest(root: Path = VECTORS) -> dict[str, str]:
    """Relative path -> SHA-256 (hex) of every vector file, from ``root/SHA256SUMS``."""
    path = root / MANIFEST
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise VectorError(f"vector manifest {path} unreadable: {exc.strerror or exc}") from exc
    entries = {}
    for number, line in enumerate(lines, 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise VectorError(f"{path}:{number}: expected '<sha256>  <path>'")
        entries[name] = digest
    return entries


def vector_file(name: str, root: Path = VECTORS) -> Path:
    """The vector file ``name`` (relative to ``root``), present and as listed in the manifest."""
    return _checked(root, name)


def vector_files(folder: str, suffix: str, root: Path = VECTORS) -> list[Path]:
    """Every listed vector file under ``folder`` ending in ``suffix``, each checked, sorted."""
    names = sorted(n for n in manifest(root) if n.startswith(f"{folder}/") and n.endswith(suffix))
    if not names:
        raise VectorError(f"no {suffix} vectors under {root / folder} in {root / MANIFEST}")
    return [_checked(root, name) for name in names]


@functools.cache
def _checked(root: Path, name: str) -> Path:
    expected = manifest(root).get(name)
    if expected is None:
        raise VectorError(f"{name} is not an official vector file (not in {root / MANIFEST})")
    path = root / name
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise VectorError(f"vector file {path} missing: {exc.strerror or exc}") from exc
    if digest != expected:
        raise VectorError(f"vector file {path} changed: SHA-256 {digest}, listed {expected}")
    return path


@dataclass
class CavpCase:
    """One COUNT of a CAVP response file: its section headers and its fields in order."""

    section: dict[str, str]
    fields: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> bytes:
        """The single hex field ``name`` as bytes."""
        (value,) = self.all(name)
        return value

    def all(self, name: str) -> list[bytes]:
        """Every occurrence of a repeated field (AdditionalInput, EntropyInputPR), in order."""
        return [bytes.fromhex(v) for k, v in self.fields if k == name]


def read_cavp(path: Path) -> list[CavpCase]:
    """Parse a CAVP ``.rsp`` file. ``[X]`` headers open a section; ``[K = V]`` set its params."""
    cases: list[CavpCase] = []
    section: dict[str, str] = {}
    in_header = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if not in_header:
                section, in_header = {}, True
            key, _, value = (part.strip() for part in line[1:-1].partition("="))
            section[key] = value or "yes"
            continue
        in_header = False
        key, _, value = (part.strip() for part in line.partition("="))
        if key == "COUNT":
            cases.append(CavpCase(dict(section)))
        else:
            cases[-1].fields.append((key, value))
    return cases
