"""Values and files that enter the image tooling are checked where they enter (issue 13).

A build refuses what a device would refuse as malformed (so such an image is never
signed) and port plans whose ports do not fit; targets and bundles are regular files or
block devices (a FIFO never blocks a command); keyrings are checked for shape when loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from images import keyring as kr
from images.build import BuildSpec, build
from images.bundle import MAX_ENVELOPE, read_envelope, write_bundle
from images.errors import BuildError, BundleRejected, ImageUsageError, KeyFileError, TargetError
from images.manifest import parse_manifest
from images.signing import save_json
from images.target import Target, init_target
from tests.images.conftest import EPOCH, Keys, fake_wheel, policy_for


@pytest.fixture
def spec(topo: Any, tmp_path: Path) -> BuildSpec:
    return BuildSpec(
        topology=topo,
        node=topo.node(5),
        wheelhouse=fake_wheel(tmp_path / "wheels"),
        version="1.0.0",
        security_version=1,
        epoch=EPOCH,
    )


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"base_port": 70000}, "--base-port: expected 1024..55536"),
        ({"base_port": 56537}, "--base-port"),  # base + 8000 + 999 > 65535
        ({"host": "not a host"}, "--host"),
        ({"security_version": -1}, "--security-version: expected 0..4294967296, got -1"),
        ({"security_version": 2**32 + 1}, "--security-version"),
        ({"epoch": -1}, "--source-date-epoch"),
        ({"epoch": 2**32}, "--source-date-epoch"),
        ({"chunk_size": 1000}, "--chunk-size"),
        ({"chunk_size": 2**31}, "--chunk-size"),
        ({"version": "1.0\n"}, "--version"),
        ({"version": ""}, "--version"),
        ({"compatible": "a b"}, "--compatible"),
    ],
)
def test_build_refuses_what_a_device_could_not_take(
    spec: BuildSpec, keys: Keys, tmp_path: Path, change: dict[str, Any], fragment: str
) -> None:
    """Item 17 and 19: ``--base-port 70000`` signed an image naming port 72005, and
    ``--security-version -1`` was accepted. Refused before anything is built or written."""
    out = tmp_path / "b.qkdnb"
    with pytest.raises(ImageUsageError) as info:
        build(dataclasses.replace(spec, **change), keys.release, keys.ring, out)
    assert fragment in info.value.message
    assert list(tmp_path.iterdir()) == [tmp_path / "wheels"]  # no bundle, no staging file


def test_unwritable_bundle_fails_before_building(spec: BuildSpec, keys: Keys, tmp_path: Path):
    """Item 18: a read-only (here: impossible) output path was an [INTERNAL] error after
    the whole build; it is now IMG-USAGE before mksquashfs runs."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ImageUsageError, match=r"cannot write .*file/b\.qkdnb: Not a directory"):
        build(spec, keys.release, keys.ring, blocker / "b.qkdnb")


def test_envelope_over_what_a_device_reads_is_refused(tmp_path: Path):
    payload = tmp_path / "payload"
    payload.write_bytes(b"\0" * 4096)
    with pytest.raises(BuildError, match="over the 1048576 a device reads"):
        write_bundle(tmp_path / "b", b"x" * (MAX_ENVELOPE + 1), payload)


def test_fifos_and_directories_are_refused_at_once(tmp_path: Path):
    """Item 16: opening a FIFO that nobody writes blocked ``image flash`` and friends."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageUsageError, match="a bundle is a regular file"):
        read_envelope(fifo)
    for path in (fifo, tmp_path, Path("/dev/zero")):
        with pytest.raises(TargetError, match="a disk image file or a block device"):
            Target(path)


def test_target_in_an_unusable_place_is_a_target_error(keys: Keys, tmp_path: Path):
    """Item 18: ``image init-target`` into a directory or under a file was [INTERNAL]."""
    (tmp_path / "file").write_text("")
    policy = policy_for(keys)
    for disk in (tmp_path / "dir", tmp_path / "file" / "disk.img"):
        if disk.name == "dir":
            disk.mkdir()
        with pytest.raises(TargetError, match="cannot create target"):
            init_target(disk, 64 << 20, policy, force=True)


def test_manifest_text_fields_match_in_full(images: dict[str, Path]):
    """``$`` matched before a final newline: a version "1.0.0\\n" passed the parser."""
    env, _ = read_envelope(images["v1"])
    doc = json.loads(env["manifest"])
    doc["version"] += "\n"
    with pytest.raises(BundleRejected) as info:
        parse_manifest(json.dumps(doc).encode())
    assert info.value.code == "IMG-MALFORMED"


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.pop("roots"),
        lambda r: r.update(roots=[]),
        lambda r: r.update(roots="x"),
        lambda r: r.update(signers={"a": 1}),
        lambda r: r.update(signers=[{"body": {"key": 5}}]),
        lambda r: r.update(revocations={"body": {"serial": "1", "revoked": []}}),
        lambda r: r.update(revocations={"body": {"serial": 1, "revoked": "ab"}}),
        lambda r: r.update(revocations={"body": {"serial": 1, "revoked": [1]}}),
        lambda r: r.update(revocations=[]),
    ],
)
def test_malformed_keyrings_are_refused_when_loaded(keys: Keys, tmp_path: Path, change) -> None:
    """A keyring of the right format with a broken inside was an [INTERNAL] KeyError or
    TypeError in certify, rotate or revoke."""
    ring = json.loads(json.dumps(keys.ring))
    change(ring)
    path = tmp_path / "ring.json"
    save_json(path, ring)
    with pytest.raises(KeyFileError, match="a malformed qkdn-keyring-1 keyring"):
        kr.load_keyring(path)


def test_oversized_keyring_is_refused(tmp_path: Path):
    path = tmp_path / "ring.json"
    path.write_text('{"format": "qkdn-keyring-1", "pad": "' + "x" * (1 << 20) + '"}')
    with pytest.raises(KeyFileError, match="larger than 1 MiB"):
        kr.load_keyring(path)
