"""Building a node image: root tree, squashfs, dm-verity tree, signed manifest, bundle.

Reproducible by construction: the tree is assembled from sorted inputs with fixed modes,
``mksquashfs`` runs with ``-all-root -mkfs-time T -all-time T`` where T is
SOURCE_DATE_EPOCH, and the verity salt and UUID are derived from the image's own hash,
so identical inputs give a byte-identical image and payload.

The tree (the appliance's ``/``):

- ``usr/lib/qkdn/site-packages``: the application, unpacked from a wheelhouse (the project
  and its pinned base dependencies, the node runtime: no extra, so no rich, tomli-w or
  matplotlib; see :func:`build_wheelhouse`); ``usr/lib/qkdn/bin/qkdn`` starts it with the
  system Python;
- ``etc/qkdn/node.toml``: the node's configuration (``render_node`` with appliance paths);
  ``etc/qkdn/pki``: the CA certificate, the node's certificate and its SAEs' certificates,
  whichever exist in ``--pki-dir`` (never a private key: those live in the node's token);
- the hardening profile of :mod:`images.hardening`.

This module refuses to put a shell, remote-access or debug tool into an image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import tomli_w

from appliance.config.render import RenderPlan, render_node
from appliance.config.topology import Node, Topology
from appliance.errors import UsageError
from appliance.files import MiB, read_bounded
from images import hardening
from images.bundle import envelope_bytes, write_bundle
from images.errors import BuildError, ImageUsageError
from images.manifest import (
    BLOCK,
    MAX_CHUNK,
    MAX_EPOCH,
    MAX_SECURITY_VERSION,
    TEXT,
    Manifest,
    Verity,
)
from images.signing import KeyPair

DEFAULT_CHUNK = 4 << 20
COMPATIBLE = "qkdn-appliance-x86_64"
MAX_CERT = MiB


@dataclass(frozen=True, kw_only=True)
class BuildSpec:
    topology: Topology
    node: Node
    wheelhouse: Path
    version: str
    security_version: int
    compatible: str = COMPATIBLE
    epoch: int = 0
    """SOURCE_DATE_EPOCH: every timestamp in the image."""
    pki_dir: Path | None = None
    host: str = "127.0.0.1"
    base_port: int = 20000
    client_nets: dict[str, list[str]] = field(default_factory=dict)
    chunk_size: int = DEFAULT_CHUNK
    extra_files: dict[str, bytes] = field(default_factory=dict)
    """Additional files (path in the image -> content); tests use it to plant a shell."""


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        package = {"mksquashfs": "squashfs-tools", "veritysetup": "cryptsetup-bin"}[name]
        raise BuildError(f"{name} not found (install the {package} package)")
    return path


def _write(root: Path, rel: str, data: bytes | str, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


# --- the tree ---------------------------------------------------------------------------


def node_document(spec: BuildSpec) -> dict[str, Any]:
    plan = _plan(spec)
    return render_node(spec.topology, spec.node, plan, float(spec.epoch))


def check_spec(spec: BuildSpec) -> None:
    """IMG-USAGE unless every value fits the port plan and what a device's manifest parser
    accepts (an image it would refuse as malformed must never be signed)."""
    try:
        _plan(spec).check()
    except UsageError as exc:
        raise ImageUsageError(exc.message) from exc
    for name, value, hi in (
        ("--security-version", spec.security_version, MAX_SECURITY_VERSION),
        ("--source-date-epoch", spec.epoch, MAX_EPOCH),
    ):
        if not 0 <= value <= hi:
            raise ImageUsageError(f"{name}: expected 0..{hi}, got {value}")
    if not BLOCK <= spec.chunk_size <= MAX_CHUNK or spec.chunk_size % BLOCK:
        raise ImageUsageError(
            f"--chunk-size: expected a multiple of {BLOCK} up to {MAX_CHUNK}, got {spec.chunk_size}"
        )
    for name, text in (("--version", spec.version), ("--compatible", spec.compatible)):
        if not TEXT.fullmatch(text):
            raise ImageUsageError(f"{name}: expected letters, digits and ._+:-, got {text!r}")


def _plan(spec: BuildSpec) -> RenderPlan:
    return RenderPlan(
        out=Path("/etc/qkdn"),
        host=spec.host,
        base_port=spec.base_port,
        data_root=Path("/var/lib/qkdn"),
        pki_dir=Path("/etc/qkdn/pki"),
    )


def assemble(spec: BuildSpec, root: Path) -> None:
    """Write the image's tree under ``root``."""
    doc = node_document(spec)
    _write(root, "etc/qkdn/node.toml", tomli_w.dumps(doc))
    _write(root, "etc/qkdn/image.toml", tomli_w.dumps(_identity(spec)))
    _pki(spec, root, doc)
    _profile(spec, root, doc)
    unpack_wheelhouse(spec.wheelhouse, root / "usr/lib/qkdn/site-packages")
    _write(root, "usr/lib/qkdn/bin/qkdn", LAUNCHER, 0o755)
    for rel, data in sorted(spec.extra_files.items()):
        _write(root, rel, data, 0o755)
    check_no_forbidden(root)
    _normalise(root)


LAUNCHER = """\
#!/usr/bin/python3 -S
# Starts the appliance CLI from the image's own site-packages (no shell involved).
import sys
sys.path.insert(0, "/usr/lib/qkdn/site-packages")
from appliance.cli import run
run()
"""


def _identity(spec: BuildSpec) -> dict[str, Any]:
    return {
        "compatible": spec.compatible,
        "node": spec.node.id,
        "node_name": spec.node.name,
        "role": spec.node.role,
        "version": spec.version,
        "security_version": spec.security_version,
        "source_date_epoch": spec.epoch,
    }


def _pki(spec: BuildSpec, root: Path, doc: dict[str, Any]) -> None:
    wanted = [doc["paths"]["ca_cert"], doc["paths"]["cert"]] + [
        s["cert"] for s in doc.get("saes", [])
    ]
    pki = root / "etc/qkdn/pki"
    pki.mkdir(parents=True, exist_ok=True)
    shipped = []
    for target in wanted:
        rel = PurePosixPath(target).relative_to("/etc/qkdn/pki")
        source = (spec.pki_dir / rel) if spec.pki_dir else None
        if source is not None and source.is_file():
            _write(root, f"etc/qkdn/pki/{rel}", _certificate(source))
            shipped.append(str(rel))
    note = "Certificates shipped in this image: " + (", ".join(shipped) or "none yet") + ".\n"
    note += "Expected: " + ", ".join(wanted) + ".\nPrivate keys never ship in an image.\n"
    _write(root, "etc/qkdn/pki/README", note)


def _certificate(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_CERT)
    except OSError as exc:
        raise ImageUsageError(f"cannot read certificate {path}: {exc.strerror}") from None


def _profile(spec: BuildSpec, root: Path, doc: dict[str, Any]) -> None:
    plan = _plan(spec)
    units = hardening.units(spec.node)
    for name, text in units.items():
        _write(root, f"etc/systemd/system/{name}", text)
        link = root / "etc/systemd/system/multi-user.target.wants" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"../{name}")
    inputs = hardening.input_rules(spec.topology, spec.node, plan, spec.client_nets)
    outputs = hardening.output_rules(spec.topology, spec.node, plan, doc)
    _write(root, "etc/nftables.conf", hardening.nftables(spec.node, inputs, outputs))
    _write(root, "etc/sysctl.d/90-qkdn-hardening.conf", hardening.sysctl())
    _write(root, "etc/fstab", hardening.FSTAB)
    _write(root, "etc/passwd", hardening.PASSWD)
    _write(root, "etc/group", hardening.GROUP)
    (root / "var/lib/qkdn").mkdir(parents=True, exist_ok=True)


def check_no_forbidden(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.name in hardening.FORBIDDEN_TOOLS and not path.is_dir():
            rel = path.relative_to(root)
            raise BuildError(
                f"refusing to build an image containing {rel} (no shell, remote "
                "access or debug tools in an appliance image)"
            )


def _normalise(root: Path) -> None:
    """Fixed modes (umask-independent): 0755 directories and executables, 0644 the rest."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        executable = path.is_dir() or mode & stat.S_IXUSR
        path.chmod(0o755 if executable else 0o644)


def unpack_wheelhouse(wheelhouse: Path, site: Path) -> None:
    """Unpack every wheel of ``wheelhouse`` (sorted) into ``site`` (a site-packages dir)."""
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not wheels:
        raise BuildError(f"no wheels in {wheelhouse} (build one with --cache-dir)")
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    _extract(zf, info, site, wheel.name)
        except zipfile.BadZipFile:
            raise BuildError(f"{wheel}: not a wheel (bad zip file)") from None


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, site: Path, wheel: str) -> None:
    name = PurePosixPath(info.filename)
    if info.is_dir():
        return
    if name.is_absolute() or ".." in name.parts:
        raise BuildError(f"{wheel}: unsafe path {info.filename}")
    parts = name.parts
    if parts[0].endswith(".data"):
        if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
            return  # scripts, headers and data files are not part of the appliance
        name = PurePosixPath(*parts[2:])
    dest = site / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(zf.read(info))
    dest.chmod(0o755 if (info.external_attr >> 16) & 0o111 else 0o644)


# --- squashfs, verity, manifest -----------------------------------------------------------


def mksquashfs(root: Path, out: Path, epoch: int) -> None:
    cmd = [
        _tool("mksquashfs"),
        str(root),
        str(out),
        "-noappend",
        "-all-root",
        "-no-xattrs",
        "-comp",
        "zstd",
        "-mkfs-time",
        str(epoch),
        "-all-time",
        str(epoch),
        "-quiet",
        "-no-progress",
    ]
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}  # not both
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise BuildError(f"mksquashfs failed: {proc.stderr.strip()[:300]}")
    size = out.stat().st_size
    if size % BLOCK:  # mksquashfs pads to 4 KiB already; keep the guarantee explicit
        with out.open("ab") as fh:
            fh.write(bytes(BLOCK - size % BLOCK))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def verity_format(image: Path, tree: Path, image_sha256: str) -> Verity:
    """Run ``veritysetup format``; salt and UUID come from the image hash (reproducible)."""
    salt = hashlib.sha256(b"qkdn-verity-salt\0" + bytes.fromhex(image_sha256)).hexdigest()
    vid = str(
        uuid.UUID(bytes=hashlib.sha256(b"qkdn-verity-uuid\0" + bytes.fromhex(salt)).digest()[:16])
    )
    root_file = tree.with_suffix(".roothash")
    cmd = [
        _tool("veritysetup"),
        "format",
        str(image),
        str(tree),
        f"--salt={salt}",
        f"--uuid={vid}",
        f"--root-hash-file={root_file}",
        "--hash=sha256",
        "--data-block-size=4096",
        "--hash-block-size=4096",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"veritysetup format failed: {proc.stderr.strip()[:300]}")
    size = image.stat().st_size
    return Verity(
        root_hash=root_file.read_text().strip(),
        salt=salt,
        uuid=vid,
        data_blocks=size // BLOCK,
        data_size=size,
        hash_offset=size,
    )


def _payload(image: Path, tree: Path, out: Path) -> None:
    with out.open("wb") as dst:
        for part in (image, tree):
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)


def _chunks(path: Path, chunk: int) -> list[str]:
    out = []
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            out.append(hashlib.sha256(block).hexdigest())
    return out


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    manifest: Manifest
    image: Path
    """The squashfs image itself, kept beside the bundle as ``BUNDLE.squashfs`` when asked."""


def build(
    spec: BuildSpec, key: KeyPair, ring: dict[str, Any], out: Path, keep_image: bool = False
) -> BuildResult:
    """Build, sign and write the bundle ``out``: whole or not at all (it is written beside
    ``out``, then renamed), and an unwritable ``out`` fails before anything is built."""
    check_spec(spec)
    staged = _stage(out)
    try:
        with tempfile.TemporaryDirectory(prefix="qkdn-image-") as tmp:
            work = Path(tmp)
            root = work / "root"
            old = os.umask(0o022)
            try:
                assemble(spec, root)
            finally:
                os.umask(old)
            image, tree, payload = work / "image.squashfs", work / "image.verity", work / "payload"
            mksquashfs(root, image, spec.epoch)
            image_sha = _sha256_file(image)
            verity = verity_format(image, tree, image_sha)
            _payload(image, tree, payload)
            manifest = _manifest(spec, image, image_sha, payload, verity)
            try:
                write_bundle(staged, envelope_bytes(manifest, key, ring), payload)
                staged.chmod(0o644)
                staged.replace(out)
            except OSError as exc:
                raise ImageUsageError(f"cannot write {out}: {exc.strerror}") from None
            kept = out.with_name(out.name + ".squashfs")
            if keep_image:
                shutil.copyfile(image, kept)
    finally:
        staged.unlink(missing_ok=True)
    return BuildResult(out, manifest, kept)


def _stage(out: Path) -> Path:
    """An empty private file beside ``out`` that the bundle is written into."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as exc:
        raise ImageUsageError(f"cannot write {out}: {exc.strerror}") from None
    os.close(fd)
    return Path(name)


def _manifest(
    spec: BuildSpec, image: Path, image_sha: str, payload: Path, verity: Verity
) -> Manifest:
    return Manifest(
        compatible=spec.compatible,
        role=spec.node.role,
        node=spec.node.id,
        node_name=spec.node.name,
        version=spec.version,
        security_version=spec.security_version,
        created=spec.epoch,
        image_size=image.stat().st_size,
        image_sha256=image_sha,
        payload_size=payload.stat().st_size,
        chunk_size=spec.chunk_size,
        chunks=tuple(_chunks(payload, spec.chunk_size)),
        verity=verity,
    )


# --- the application wheelhouse -------------------------------------------------------------

PROJECT_PARTS = ("pyproject.toml", "README.md", "appliance", "hal", "qrng", "hsm", "images")


def build_wheelhouse(project: Path, cache: Path) -> Path:
    """Wheels of the project and its pinned runtime dependencies, cached under ``cache``.

    The dependencies are keyed by the hash of ``constraints.txt`` and ``pyproject.toml`` and
    downloaded once; the project wheel is rebuilt from a copy of its sources every time, so
    that nothing is written inside the project tree.
    """
    constraints = project / "constraints.txt"
    key = hashlib.sha256(constraints.read_bytes() + (project / "pyproject.toml").read_bytes())
    deps = cache / f"deps-{key.hexdigest()[:16]}"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qkdn-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for part in PROJECT_PARTS:
            _copy_source(project / part, src / part)
        if not deps.is_dir():
            _atomic_dir(deps, lambda d: _dependency_wheels(d, constraints, src))
        # Content-addressed: builders of the same sources share it, others never touch it.
        house = cache / f"wheelhouse-{key.hexdigest()[:8]}-{_tree_digest(src)[:16]}"
        if not house.is_dir():
            _atomic_dir(house, lambda d: _project_wheels(d, deps, src))
    return house


def _dependency_wheels(out: Path, constraints: Path, src: Path) -> None:
    _pip(["wheel", "-q", "-c", str(constraints), "-w", str(out), str(src)])
    for wheel in out.glob("qkdn-*.whl"):
        wheel.unlink()


def _project_wheels(out: Path, deps: Path, src: Path) -> None:
    shutil.copytree(deps, out, dirs_exist_ok=True)
    _pip(["wheel", "-q", "--no-deps", "-w", str(out), str(src)])


def _atomic_dir(final: Path, fill: Callable[[Path], None]) -> None:
    """Fill a private directory, then rename it into place in one step. Concurrent builders
    (two CI jobs, two terminals) never see a half-built directory; a loser discards its copy."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tree_digest(root: Path) -> str:
    """SHA-256 over the relative paths and contents of every file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _copy_source(source: Path, dest: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    elif source.is_file():
        shutil.copyfile(source, dest)


def _pip(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BuildError(f"pip {args[0]} failed: {proc.stderr.strip()[-300:]}")
