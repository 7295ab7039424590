"""The repository stands alone, and its docs name what exists.

Every file path, package and module the README and ``docs/*.md`` name (in backticks or as
a link) is in the repository; no tracked file points outside it to the design folder the
project grew up beside (the official test vectors and their loader excepted: they move
into the repository on their own).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
PACKAGES = ("appliance", "hal", "qrng", "hsm", "images")
PATH = re.compile(r"^(?:\.\./)*[A-Za-z_][\w./-]*(?:/|\.(?:py|md|toml|txt|sh))$")
DOTTED = re.compile(rf"\b(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+")


def tracked() -> list[str]:
    """Files of the repository: tracked, or new and not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [p for p in out.stdout.split("\0") if p]


def named_paths(text: str) -> set[str]:
    spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)#\s]+)\)", text)
    return {s for s in spans if PATH.match(s) and "://" not in s}


def named_modules(text: str) -> set[str]:
    return {m for span in re.findall(r"`([^`\n]+)`", text) for m in DOTTED.findall(span)}


def resolves(dotted: str) -> bool:
    """A module, or an attribute of one (``hal.clock.Clock``, ``hal.open_qkdm``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc):
    files = tracked()
    dirs = {str(Path(f).parent) + "/" for f in files} | {
        "/".join(f.split("/")[:i]) + "/" for f in files for i in range(1, f.count("/") + 1)
    }
    known = set(files) | dirs
    missing = [
        p
        for p in sorted(named_paths(doc.read_text()))
        if os.path.relpath(os.path.normpath(doc.parent / p), ROOT) not in known  # a link
        and p not in known  # from the root
        and not any(k.endswith("/" + p) for k in known)  # in the package the text is about
    ]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_module_a_doc_names_exists(doc):
    missing = sorted(m for m in named_modules(doc.read_text()) if not resolves(m))
    assert not missing, f"{doc.name} names modules that do not exist: {missing}"


def test_no_tracked_file_points_outside_the_repository():
    outside = re.compile(r"\.\./" + "shared" + r"|\bshared/(?:DESIGN|STYLE|PITFALLS|reference)")
    vectors = ("tests/vectors.py", "tests/vectors/")  # moved by the vector work
    offenders = []
    for rel in tracked():
        if rel.startswith(vectors):
            continue
        try:
            text = (ROOT / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary data, or deleted in the work tree
        offenders += [
            f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if outside.search(line)
        ]
    assert not offenders, f"files that depend on a folder beside the repository: {offenders}"
