"""What ``pip install qkdn`` installs: the base dependencies of pyproject.toml, transitively.

Read from pyproject.toml and the installed distributions' metadata. :func:`make_base_site`
lays that install out as a site directory of symlinks, for tests that run the project as a
base install (``python -S`` with the directory as the only ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("appliance", "hal", "qrng", "hsm", "images")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def dist_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Distributions the requirements pull in, transitively (markers other than extras are
    taken as true: the result may hold a little more than one platform needs)."""
    seen: set[str] = set()
    todo = [dist_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen or name == "qkdn":
            continue
        seen.add(name)
        todo += [dist_name(r) for r in md.requires(name) or [] if "extra ==" not in r]
    return seen


BASE = _closure(PYPROJECT["dependencies"])


def _top_level(dist: str) -> set[str]:
    files = md.distribution(dist).files or []
    tops = {f.parts[0] for f in files if len(f.parts) > 1 or f.suffix in (".py", ".so")}
    return {t for t in tops if t != ".." and not t.endswith((".dist-info", ".data"))}


def make_base_site(site: Path) -> Path:
    """Fill ``site`` with the project and its base dependencies only (symlinks)."""
    for package in PROJECT_PACKAGES:
        (site / package).symlink_to(ROOT / package)
    for dist in sorted(BASE):
        for top in _top_level(dist):
            if not (site / top).exists():
                (site / top).symlink_to(Path(str(md.distribution(dist).locate_file(top))))
    return site
