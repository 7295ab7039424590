"""The one loader of official test vectors in ``../shared/vectors`` (see its README.md).

Tests skip with a clear reason when the folder is absent; they never pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"


def vectors_dir(*parts: str) -> Path:
    """A folder under ../shared/vectors, or skip the test if it is not there."""
    path = VECTORS.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"official vectors not found at {path}")
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
