"""Fixtures for the image tests: throwaway hybrid keys, a keyring, fake applications,
small node images built once per session, and fresh target disks.

The fake application is a wheel holding ``appliance.cli.main`` that passes (or fails) the
self-test the emulated bootloader runs from the slot; the real wheelhouse is exercised by
``test_build.py::test_real_wheelhouse_build`` only.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.config.topology import load_topology
from images import keyring as kr
from images.build import BuildSpec, build
from images.policy import DevicePolicy
from images.signing import KeyPair
from images.target import Target, init_target

EPOCH = 1_700_000_000
CHUNK = 64 << 10


def seeded(tag: str) -> Any:
    """A deterministic 'random' source so test keys are stable (never for real keys)."""
    import hashlib

    counter = [0]

    def rand(n: int) -> bytes:
        counter[0] += 1
        return hashlib.sha256(f"{tag}/{counter[0]}".encode()).digest()[:n]

    return rand


@dataclass
class Keys:
    root: KeyPair
    root2: KeyPair
    release: KeyPair
    dev: KeyPair
    stranger: KeyPair
    ring: dict[str, Any]
    """root -> release (release) + dev (dev); no rotation."""


@pytest.fixture(scope="session")
def keys() -> Keys:
    root = KeyPair.generate("root-1", seeded("root1"))
    release = KeyPair.generate("release-1", seeded("rel"))
    dev = KeyPair.generate("dev-1", seeded("dev"))
    ring = kr.new_keyring(root)
    ring = kr.certify(ring, root, release.public, "release")
    ring = kr.certify(ring, root, dev.public, "dev")
    return Keys(
        root=root,
        root2=KeyPair.generate("root-2", seeded("root2")),
        release=release,
        dev=dev,
        stranger=KeyPair.generate("stranger", seeded("x")),
        ring=ring,
    )


def fake_wheel(directory: Path, healthy: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "qkdnfake-1.0-py3-none-any.whl"
    status = 0 if healthy else 1
    main = (
        "def main(argv):\n"
        f"    print('{{\"passed\": {str(healthy).lower()}}}')\n"
        f"    return {status}\n"
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("appliance/__init__.py", "")
        zf.writestr("appliance/cli/__init__.py", main)
        zf.writestr("qkdnfake-1.0.dist-info/METADATA", "Name: qkdnfake\nVersion: 1.0\n")
    return directory


@pytest.fixture(scope="session")
def topo() -> Any:
    return load_topology("demoquandt")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, keys: Keys, topo: Any) -> dict[str, Path]:
    """Bundles for node 2 (akms+ckms): v1 (sv 1), v2 (sv 2), a failing v3 (sv 2), v2 dev-signed."""
    base = tmp_path_factory.mktemp("images")
    good = fake_wheel(base / "good")
    bad = fake_wheel(base / "bad", healthy=False)
    node = topo.node(2)
    out = {}
    for name, version, sv, house, key in (
        ("v1", "1.0.0", 1, good, keys.release),
        ("v2", "2.0.0", 2, good, keys.release),
        ("v3bad", "3.0.0", 2, bad, keys.release),
        ("v2dev", "2.0.1", 2, good, keys.dev),
    ):
        spec = BuildSpec(
            topology=topo,
            node=node,
            wheelhouse=house,
            version=version,
            security_version=sv,
            epoch=EPOCH,
            chunk_size=CHUNK,
        )
        out[name] = build(spec, key, keys.ring, base / f"{name}.qkdnb").bundle
    return out


def policy_for(keys: Keys, **changes: Any) -> DevicePolicy:
    base: dict[str, Any] = {
        "compatible": "qkdn-appliance-x86_64",
        "anchor": keys.root.public,
        "node": 2,
        "attempts": 3,
    }
    return DevicePolicy(**{**base, **changes})


@pytest.fixture
def make_target(tmp_path: Path, keys: Keys) -> Any:
    """A fresh 16 MiB target (slots of 6 MiB) with the release-only policy of node 2."""

    def make(name: str = "disk.img", **changes: Any) -> Target:
        path = tmp_path / name
        return init_target(path, 16 << 20, policy_for(keys, **changes), slot_size=6 << 20)

    return make


def copy_disk(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
