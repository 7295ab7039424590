"""The KMS engines do no I/O: no module they run imports asyncio, socket, ssl, sqlite3,
time or random, directly or through the project's modules they import.

The imports are read from the source with :mod:`ast` (nothing is imported to check them):
every module under ``appliance/kms/engines/``, then every first-party module those import
(``appliance.kms.events``, ``fsm``, ``seams``, ``linkend``, ``relay``, ``ksa``, ...,
``appliance.config.topology``) and so on, with the packages whose ``__init__`` an import
runs. ``random`` is refused too: key material comes from the injected PTG.3 generator.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import appliance

ROOT = Path(appliance.__file__).resolve().parents[1]
FORBIDDEN = frozenset({"asyncio", "socket", "ssl", "sqlite3", "time", "random"})
FIRST_PARTY = frozenset({"appliance", "hal", "hsm", "qrng", "images"})
ENGINES = "appliance.kms.engines"
ALSO = ("appliance.config.topology",)
"""Modules the engines must be able to import without I/O although they are not under
``engines/`` (the topology, which EngineConfig is built from)."""


@dataclass(frozen=True)
class Found:
    module: str
    line: int
    imported: str
    via: tuple[str, ...]
    """How the module is reached from an engine module."""

    def __str__(self) -> str:
        chain = " -> ".join(self.via)
        return f"{self.module} (line {self.line}) imports {self.imported}  [reached: {chain}]"


def source_of(module: str, root: Path) -> Path | None:
    """The file of a first-party module or package under ``root``, or None."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(module: str, path: Path, root: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (anywhere in it, TYPE_CHECKING blocks and function
    bodies included), with its line; ``from p import name`` counts ``p.name`` when that is
    a module of its own; ``__import__("x")`` and ``import_module("x")`` count ``x``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.append((node.lineno, base))
            for alias in node.names:
                if source_of(f"{base}.{alias.name}", root) is not None:
                    found.append((node.lineno, f"{base}.{alias.name}"))
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            arg = node.args[0]
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            found.append((node.lineno, arg.value))
    return found


def _dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
    return (
        name in ("__import__", "import_module")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def with_packages(module: str) -> list[str]:
    """The module and every package an import of it runs first (``a``, ``a.b``, ...)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def engine_modules(root: Path, package: str = ENGINES) -> list[str]:
    folder = root.joinpath(*package.split("."))
    modules = sorted(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.name != "__init__.py")
    return [package, *modules]


def scan(starts: list[str], root: Path) -> tuple[list[Found], dict[str, tuple[str, ...]]]:
    """Forbidden imports of ``starts`` and of every first-party module they reach; and
    every module visited, with the chain that reached it."""
    reached: dict[str, tuple[str, ...]] = {}
    queue: deque[tuple[str, tuple[str, ...]]] = deque()
    for start in starts:
        for module in with_packages(start):
            queue.append((module, (module,)))
    found: list[Found] = []
    while queue:
        module, via = queue.popleft()
        if module in reached:
            continue
        path = source_of(module, root)
        if path is None:
            continue
        reached[module] = via
        for line, imported in imports_of(module, path, root):
            top = imported.split(".")[0]
            if top in FORBIDDEN:
                found.append(Found(module, line, imported, via))
            elif top in FIRST_PARTY:
                for target in with_packages(imported):
                    if target not in reached:
                        queue.append((target, (*via, target)))
    return found, reached


def test_the_engines_import_nothing_that_does_io_or_draws_randomness():
    found, _ = scan(engine_modules(ROOT) + list(ALSO), ROOT)
    assert not found, "engine imports that do I/O or draw randomness:\n" + "\n".join(
        str(f) for f in found
    )


def test_the_scan_reaches_every_module_the_engines_run():
    """The check is not vacuous: it read the engines and what they stand on."""
    _, reached = scan(engine_modules(ROOT) + list(ALSO), ROOT)
    expected = {
        "appliance",
        "appliance.errors",
        "appliance.config",
        "appliance.config.topology",
        "appliance.config.schema",
        "appliance.kms",
        "appliance.kms.errors",
        "appliance.kms.events",
        "appliance.kms.fsm",
        "appliance.kms.seams",
        "appliance.kms.linkend",
        "appliance.kms.relay",
        "appliance.kms.ksa",
        "appliance.kms.channel",
        "appliance.kms.keyids",
        "appliance.kms.messages",
        "appliance.kms.storeops",
        "appliance.kms.routing",
        "appliance.kms.engines",
        "appliance.kms.engines.akms",
        "appliance.kms.engines.base",
        "appliance.kms.engines.ckms",
        "appliance.kms.engines.config",
        "appliance.kms.engines.states",
        "appliance.kms.engines.ukms",
    }
    assert expected <= reached.keys(), sorted(expected - reached.keys())
    # and none of the adapters' modules: they may do I/O, the engines must not need them
    adapters = {"appliance.kms.node", "appliance.kms.store", "appliance.kms.shards"}
    assert not adapters & reached.keys(), {m: reached[m] for m in adapters & reached.keys()}


# -- the checker itself can fail ----------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_scan_names_a_direct_and_an_indirect_forbidden_import(tmp_path):
    _tree(
        tmp_path,
        {
            "appliance/__init__.py": "",
            "appliance/kms/__init__.py": "",
            "appliance/kms/helper.py": "import os\nfrom time import monotonic\n",
            "appliance/kms/engines/__init__.py": "",
            "appliance/kms/engines/one.py": "from appliance.kms import helper\n",
            "appliance/kms/engines/two.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio\n"
            ),
            "appliance/kms/engines/three.py": "from . import one\nx = __import__('random')\n",
        },
    )
    found, _ = scan(engine_modules(tmp_path), tmp_path)
    got = {(f.module, f.imported) for f in found}
    assert got == {
        ("appliance.kms.helper", "time"),
        ("appliance.kms.engines.two", "asyncio"),
        ("appliance.kms.engines.three", "random"),
    }
    helper = next(f for f in found if f.module == "appliance.kms.helper")
    assert helper.line == 2
    assert helper.via[-2:] == ("appliance.kms.engines.one", "appliance.kms.helper")
    assert "appliance.kms.helper (line 2) imports time" in str(helper)


def test_the_scan_follows_a_package_init_an_import_runs(tmp_path):
    _tree(
        tmp_path,
        {
            "appliance/__init__.py": "",
            "appliance/kms/__init__.py": "import socket\n",
            "appliance/kms/engines/__init__.py": "",
            "appliance/kms/engines/one.py": "",
        },
    )
    found, _ = scan(engine_modules(tmp_path), tmp_path)
    assert [(f.module, f.imported) for f in found] == [("appliance.kms", "socket")]
