"""Shared output helpers for qkdn subcommands: rich consoles and JSON documents.

rich belongs to the ``provisioning`` extra, not to the node runtime: it is imported only when
a console is asked for, so JSON output and ``qkdn node run`` work without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console


def console() -> Console:
    """The console for human-readable output (stdout)."""
    from rich.console import Console

    wide = None if sys.stdout.isatty() else 160  # files and pipes get full-width tables
    return Console(highlight=False, width=wide)


def print_json(doc: Any) -> None:
    """A JSON document on stdout, for scripts."""
    json.dump(doc, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def write_json(path: Path, doc: Any) -> None:
    """A JSON document in a file; an unwritable path is a usage error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, default=str) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
