"""Refusal vectors: every bad bundle gets its own code, and the target is left untouched.

Each vector is made here from a good bundle (``conftest.images``) by the mutation named in
its id; the target disk's SHA-256 is compared before and after the refused flash.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from images import keyring as kr
from images.build import BuildSpec, build
from images.errors import BundleRejected
from images.install import flash
from images.target import Target, init_target
from tests.images.conftest import CHUNK, EPOCH, Keys, policy_for
from tests.images.helpers import digest, flip, manifest_of, mutate, resign


def _tamper_manifest(env: dict[str, Any]) -> dict[str, Any]:
    m = manifest_of(env)
    m["security_version"] = 99
    from images.signing import canonical

    return {**env, "manifest": canonical(m).decode()}


def _drop(half: str) -> Any:
    return lambda env: {**env, "sig": {k: v for k, v in env["sig"].items() if k != half}}


def _swap_half(keys: Keys, half: str) -> Any:
    def change(env: dict[str, Any]) -> dict[str, Any]:
        forged = resign(env, keys.stranger)["sig"]
        return {**env, "sig": {**env["sig"], half: forged[half]}}

    return change


def _revoked_ring(keys: Keys) -> Any:
    ring = kr.revoke(keys.ring, keys.root, keys.release.public.key_id)
    return lambda env: {**env, "keyring": ring}


def _foreign_ring(keys: Keys) -> Any:
    ring = kr.certify(kr.new_keyring(keys.root2), keys.root2, keys.release.public, "release")
    return lambda env: {**env, "keyring": ring}


VECTORS: list[tuple[str, str, Any]] = [
    # id, expected code, how to make the bundle from v2 (keys -> kwargs for mutate)
    ("tampered-image-byte", "IMG-TAMPERED", lambda k: {"payload_change": lambda p: flip(p, 100)}),
    (
        "tampered-hash-tree",
        "IMG-TAMPERED",
        lambda k: {"payload_change": lambda p: flip(p, len(p) - 1)},
    ),
    ("tampered-manifest", "IMG-SIGNATURE", lambda k: {"env_change": _tamper_manifest}),
    (
        "wrong-signature",
        "IMG-SIGNATURE",
        lambda k: {"env_change": lambda e: resign(e, k.stranger, claim=k.release.public.key_id)},
    ),
    (
        "uncertified-signer",
        "IMG-SIGNATURE",
        lambda k: {"env_change": lambda e: resign(e, k.stranger)},
    ),
    ("ed25519-missing", "IMG-SIGNATURE", lambda k: {"env_change": _drop("ed25519")}),
    ("mldsa65-missing", "IMG-SIGNATURE", lambda k: {"env_change": _drop("mldsa65")}),
    ("ed25519-forged", "IMG-SIGNATURE", lambda k: {"env_change": _swap_half(k, "ed25519")}),
    ("mldsa65-forged", "IMG-SIGNATURE", lambda k: {"env_change": _swap_half(k, "mldsa65")}),
    ("revoked-key", "IMG-REVOKED", lambda k: {"env_change": _revoked_ring(k)}),
    ("foreign-root", "IMG-SIGNATURE", lambda k: {"env_change": _foreign_ring(k)}),
    ("truncated-payload", "IMG-TRUNCATED", lambda k: {"payload_change": lambda p: p[:-10]}),
    ("bad-magic", "IMG-MALFORMED", None),
    ("truncated-envelope", "IMG-TRUNCATED", None),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    """An initialised target; refusals are tried against copies of it."""
    path = tmp_path_factory.mktemp("refusals") / "disk.img"
    target = init_target(path, 16 << 20, policy_for(keys), slot_size=6 << 20)
    target.close()
    return path


def _refused(bundle: Path, disk: Path) -> BundleRejected:
    before = digest(disk)
    target = Target(disk)
    with pytest.raises(BundleRejected) as info:
        flash(bundle, target)
    target.close()
    assert digest(disk) == before, "a refused bundle changed the target"
    return info.value


@pytest.mark.parametrize("name, code, make", VECTORS, ids=[v[0] for v in VECTORS])
def test_refusal_vector(name, code, make, images, keys, pristine, tmp_path):
    disk = Path(shutil.copyfile(pristine, tmp_path / "disk.img"))
    bad = tmp_path / f"{name}.qkdnb"
    if name == "bad-magic":
        bad.write_bytes(b"NOTABNDL" + images["v2"].read_bytes()[8:])
    elif name == "truncated-envelope":
        bad.write_bytes(images["v2"].read_bytes()[:200])
    else:
        mutate(images["v2"], bad, **make(keys))
    err = _refused(bad, disk)
    assert err.code == code, err.message
    assert "\n" not in err.message


def test_device_revocation_survives_a_stripped_keyring(images, keys, tmp_path):
    """A device provisioned with a revocation refuses the key even if the bundle omits it."""
    disk = tmp_path / "disk.img"
    policy = policy_for(keys, revoked=frozenset({keys.release.public.key_id}))
    init_target(disk, 16 << 20, policy, slot_size=6 << 20).close()
    assert _refused(images["v2"], disk).code == "IMG-REVOKED"


@pytest.mark.parametrize(
    "change, code",
    [
        ({"compatible": "qkdn-appliance-arm64"}, "IMG-COMPATIBLE"),
        ({"node": 14}, "IMG-COMPATIBLE"),
        ({"floor": 3}, "IMG-DOWNGRADE"),
        ({"accept_dev": False}, "IMG-DEV-KEY"),
    ],
)
def test_device_policy_refusals(change, code, images, keys, tmp_path):
    disk = tmp_path / "disk.img"
    init_target(disk, 16 << 20, policy_for(keys, **change), slot_size=6 << 20).close()
    bundle = images["v2dev"] if code == "IMG-DEV-KEY" else images["v2"]
    assert _refused(bundle, disk).code == code


def test_bundle_larger_than_slot(keys, topo, tmp_path):
    blob = os.urandom(3 << 20)  # incompressible, so the image outgrows a 1 MiB slot
    from tests.images.conftest import fake_wheel

    spec = BuildSpec(
        topology=topo,
        node=topo.node(2),
        wheelhouse=fake_wheel(tmp_path / "w"),
        version="9",
        security_version=9,
        epoch=EPOCH,
        chunk_size=CHUNK,
        extra_files={"usr/lib/qkdn/blob.bin": blob},
    )
    bundle = build(spec, keys.release, keys.ring, tmp_path / "big.qkdnb").bundle
    disk = tmp_path / "disk.img"
    init_target(disk, 8 << 20, policy_for(keys), slot_size=1 << 20).close()
    assert _refused(bundle, disk).code == "IMG-TOO-LARGE"
