"""The official vectors are in the repository, and the loader fails (never skips) when one is
missing, unlisted or changed (issue 13 item 22: when they were read from a folder beside
the repository, a clone without it skipped every vector test and the suite still passed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.vectors import MANIFEST, VECTORS, VectorError, manifest, vector_file, vector_files

ROOT = Path(__file__).resolve().parents[1]
NOT_VECTORS = {MANIFEST, "README.md", ".gitattributes"}


def test_the_vectors_live_in_the_repository_and_all_are_listed():
    assert VECTORS.is_relative_to(ROOT) and VECTORS.is_dir()
    on_disk = {
        p.relative_to(VECTORS).as_posix() for p in VECTORS.rglob("*") if p.is_file()
    } - NOT_VECTORS
    listed = manifest()
    assert set(listed) == on_disk and len(listed) == 34
    for name in listed:
        assert vector_file(name).is_file()


def small_set(tmp_path: Path) -> Path:
    """A vector root of two files and their manifest."""
    (tmp_path / "set").mkdir()
    files = {"set/a.rsp": b"COUNT = 0\r\n", "set/b.rsp": b"COUNT = 1\r\n"}
    lines = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (tmp_path / MANIFEST).write_text("".join(lines))
    return tmp_path


def test_the_loader_reads_listed_files(tmp_path):
    root = small_set(tmp_path)
    assert vector_file("set/a.rsp", root) == root / "set" / "a.rsp"
    assert [p.name for p in vector_files("set", ".rsp", root)] == ["a.rsp", "b.rsp"]


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda root: (root / "set" / "b.rsp").unlink(), "missing"),
        (lambda root: (root / "set" / "b.rsp").write_bytes(b"COUNT = 1\n"), "changed"),
        (lambda root: (root / MANIFEST).unlink(), "manifest"),
        (lambda root: (root / MANIFEST).write_text("not a manifest\n"), "expected"),
    ],
    ids=["missing file", "changed file", "missing manifest", "bad manifest"],
)
def test_the_loader_fails_on_a_damaged_set(tmp_path, damage, fragment):
    root = small_set(tmp_path)
    damage(root)
    with pytest.raises(VectorError, match=fragment):
        vector_files("set", ".rsp", root)


def test_the_loader_refuses_unlisted_and_absent_vectors(tmp_path):
    root = small_set(tmp_path)
    (root / "set" / "c.rsp").write_bytes(b"COUNT = 2\r\n")
    with pytest.raises(VectorError, match="not an official vector file"):
        vector_file("set/c.rsp", root)
    with pytest.raises(VectorError, match=r"no \.res vectors"):
        vector_files("set", ".res", root)
