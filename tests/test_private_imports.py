"""No module of the package imports another module's private names (issue 12: ``_field``,
``_unb64`` and ``_body`` were imported across the KMS modules). A name that starts with one
underscore is its module's own; what others need is public, or it is not needed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def private_imports(source: str) -> list[str]:
    """``module:name`` for each ``from module import _name`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.module or '.'}:{alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "appliance").rglob("*.py"))
        for name in private_imports(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, offenders


def test_the_scan_finds_a_private_import():
    assert private_imports("from appliance.kms.relay import _field, public\n") == [
        "appliance.kms.relay:_field"
    ]
    assert private_imports("from __future__ import annotations\nimport os\n") == []
