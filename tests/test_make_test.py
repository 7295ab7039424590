"""``make test`` runs every gate of the project's standards, and the formatting check before
the tests (issue 13 item 26: it did not check formatting)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_checks_lint_format_and_types_before_the_tests():
    dry = subprocess.run(
        ["make", "--dry-run", "--always-make", "test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    steps = [line.strip() for line in dry.stdout.splitlines()]
    gates = ["ruff check .", "ruff format --check .", "bin/mypy", "-m pytest"]
    found = [next(i for i, s in enumerate(steps) if g in s) for g in gates]
    assert found == sorted(found), steps
