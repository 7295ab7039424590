"""``qkdn image``: the operator's workflow end to end through the command line.

The module is not registered in ``appliance/cli/__init__.py`` yet, so these tests attach it
to a fresh parser and format errors the way ``qkdn`` does.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from appliance import cli
from appliance.cli import image
from images.errors import ImageError
from tests.images.conftest import fake_wheel
from tests.images.helpers import flip, mutate


def qkdn(capsys, *argv: str) -> tuple[int, str, str]:
    parser = cli.Parser(prog="qkdn")
    sub = parser.add_subparsers(dest="command", parser_class=cli.Parser)
    image.register(sub)
    try:
        args = parser.parse_args(list(argv))
        status = args.func(args)
    except SystemExit as exc:
        status = int(exc.code or 0)
    except ImageError as exc:  # what PROJECT_ERRORS will do once ImageError is registered
        print(f"qkdn: error [{exc.code}]: {exc}", file=__import__("sys").stderr)
        status = 1
    out, err = capsys.readouterr()
    return status, out, err


def test_operator_workflow(capsys, tmp_path: Path):
    k = tmp_path / "keys"
    k.mkdir()
    ok = lambda *a: qkdn(capsys, *a)  # noqa: E731
    for name in ("root", "release"):
        assert ok("image", "key", "generate", "--out", str(k / name))[0] == 0
    assert stat.S_IMODE((k / "root.key").stat().st_mode) == 0o600
    ring = str(k / "keyring.json")
    assert ok("image", "key", "init", "--root", str(k / "root.key"), "--out", ring)[0] == 0
    assert (
        ok(
            "image",
            "key",
            "certify",
            ring,
            "--root",
            str(k / "root.key"),
            "--signer",
            str(k / "release.pub"),
            "--purpose",
            "release",
        )[0]
        == 0
    )
    disk, bundle = str(tmp_path / "disk.img"), tmp_path / "ckms-5.qkdnb"
    assert (
        ok(
            "image",
            "init-target",
            disk,
            "--size",
            "16M",
            "--slot-size",
            "6M",
            "--keyring",
            ring,
            "--node",
            "5",
        )[0]
        == 0
    )
    status, out, err = ok(
        "image",
        "build",
        "--role",
        "ckms",
        "--node",
        "5",
        "--topology",
        "demoquandt",
        "--key",
        str(k / "release.key"),
        "--keyring",
        ring,
        "--out",
        str(bundle),
        "--wheelhouse",
        str(fake_wheel(tmp_path / "w")),
        "--security-version",
        "4",
        "--version",
        "4.0.0",
        "--chunk-size",
        "64K",
        "--json",
    )
    assert status == 0, err
    assert json.loads(out)["security_version"] == 4
    status, out, _ = ok("image", "inspect", str(bundle), "--keyring", ring, "--json")
    verity = json.loads(out)["manifest"]["verity"]
    assert status == 0 and {"root_hash", "salt", "data_size", "hash_offset"} <= set(verity)
    status, out, err = ok("image", "flash", str(bundle), "--target", disk)
    assert status == 0 and "slot a" in out, err
    status, out, err = ok("image", "boot", "--target", disk)
    assert status == 0 and "health check passed" in out, out + err
    assert ok("image", "commit", "--target", disk)[0] == 0
    status, out, _ = ok("image", "status", "--target", disk, "--json")
    doc = json.loads(out)
    assert doc["slots"]["a"]["state"] == "good" and doc["floor"] == 4
    assert ok("image", "status", "--target", disk)[0] == 0

    bad = mutate(bundle, tmp_path / "bad.qkdnb", payload_change=lambda p: flip(p, 7))
    status, _, err = ok("image", "flash", str(bad), "--target", disk)
    assert status == 1 and err.count("\n") == 1 and "[IMG-TAMPERED]" in err


@pytest.mark.parametrize(
    "argv, code",
    [
        (["image", "status", "--target", "/nonexistent/disk.img"], "IMG-TARGET"),
        (["image", "inspect", "/nonexistent.qkdnb"], "IMG-USAGE"),
        (["image", "key", "init", "--root", "/nonexistent.key", "--out", "x"], "IMG-KEY"),
    ],
)
def test_errors_are_one_line_with_a_code(capsys, argv, code):
    status, _, err = qkdn(capsys, *argv)
    assert status == 1 and err.count("\n") == 1 and f"[{code}]" in err


def test_help_teaches_the_workflow(capsys):
    status, out, _ = qkdn(capsys, "image", "--help")
    assert status == 0 and "qkdn image flash" in out and "ML-DSA-65" in out


def test_key_generate_never_overwrites_without_force(capsys, tmp_path: Path):
    """Issue 13 item 20: a root key was lost to a second ``key generate --out``."""
    prefix = tmp_path / "root"
    assert qkdn(capsys, "image", "key", "generate", "--out", str(prefix))[0] == 0
    key, pub = prefix.with_suffix(".key"), prefix.with_suffix(".pub")
    before = key.read_bytes(), pub.read_bytes()
    status, _, err = qkdn(capsys, "image", "key", "generate", "--out", str(prefix))
    assert status == 1 and err == (
        f"qkdn: error [IMG-USAGE]: {key} exists; pass --force to overwrite it\n"
    )
    assert (key.read_bytes(), pub.read_bytes()) == before
    key.unlink()  # a lone public key is not replaced either
    status, _, err = qkdn(capsys, "image", "key", "generate", "--out", str(prefix))
    assert status == 1 and f"{pub} exists" in err and not key.exists()
    status, _, _ = qkdn(capsys, "image", "key", "generate", "--out", str(prefix), "--force")
    assert status == 0 and pub.read_bytes() != before[1]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_key_revoke_needs_the_current_root(capsys, tmp_path: Path):
    """Issue 13 item 21: revoking with a key that is not the root broke the keyring."""
    for name in ("root", "other", "release"):
        assert qkdn(capsys, "image", "key", "generate", "--out", str(tmp_path / name))[0] == 0
    ring = tmp_path / "ring.json"
    assert (
        qkdn(
            capsys, "image", "key", "init", "--root", str(tmp_path / "root.key"), "--out", str(ring)
        )[0]
        == 0
    )
    before = ring.read_bytes()
    key_id = "0" * 32
    status, _, err = qkdn(
        capsys,
        "image",
        "key",
        "revoke",
        str(ring),
        "--root",
        str(tmp_path / "other.key"),
        "--key-id",
        key_id,
    )
    assert status == 1 and err == (
        "qkdn: error [IMG-KEY]: revoke: the root key is not the keyring's current root\n"
    )
    assert ring.read_bytes() == before
    status, _, err = qkdn(
        capsys,
        "image",
        "key",
        "revoke",
        str(ring),
        "--root",
        str(tmp_path / "root.key"),
        "--key-id",
        key_id,
    )
    assert status == 0, err
    assert json.loads(ring.read_text())["revocations"]["body"]["revoked"] == [key_id]
