"""Benchmark of appliance images (issue 7): build time, and flash speed against dd.

Sections:
  build   build one real node image (project wheel + pinned dependencies from a cached
          wheelhouse, mksquashfs, veritysetup, hybrid signature); seconds, image size;
  flash   flash a bundle of --size MiB (incompressible payload, so the slot write is real)
          into a fresh target file, against `dd bs=4M conv=notrunc` of the same payload to the
          same slot offset, both with and without a final fsync. Medians over --repeats; the
          order of the contenders rotates, and each starts on a synced file system.
Flashing does strictly more than dd: it hashes the whole payload before writing (so a bad
bundle writes nothing), reads every chunk back and hashes it, and updates the boot state.
Usage: python bench/image_flash.py [--section build|flash ...] [--size MiB] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.config.topology import load_topology
from images import keyring as kr
from images.build import BuildSpec, build, build_wheelhouse
from images.install import flash
from images.policy import DevicePolicy
from images.signing import KeyPair
from images.target import init_target

PROJECT = Path(__file__).resolve().parents[1]


def keys() -> tuple[KeyPair, dict[str, Any]]:
    root, rel = KeyPair.generate("bench-root"), KeyPair.generate("bench-release")
    return rel, kr.certify(kr.new_keyring(root), root, rel.public, "release")


def bench_build(work: Path, cache: Path) -> dict[str, Any]:
    rel, ring = keys()
    topo = load_topology("demoquandt")
    start = time.perf_counter()
    house = build_wheelhouse(PROJECT, cache)
    wheels = time.perf_counter() - start
    spec = BuildSpec(
        topology=topo,
        node=topo.node(5),
        wheelhouse=house,
        version="0.1.0",
        security_version=1,
        epoch=1_700_000_000,
    )
    start = time.perf_counter()
    result = build(spec, rel, ring, work / "real.qkdnb")
    image = time.perf_counter() - start
    return {
        "wheelhouse_s": round(wheels, 2),
        "image_s": round(image, 2),
        "total_s": round(wheels + image, 2),
        "payload_bytes": result.manifest.payload_size,
    }


def big_bundle(work: Path, size_mib: int) -> tuple[Path, KeyPair, dict[str, Any]]:
    rel, ring = keys()
    topo = load_topology("demoquandt")
    house = work / "wh"
    house.mkdir()
    import zipfile

    with zipfile.ZipFile(house / "fake-1-py3-none-any.whl", "w") as zf:
        zf.writestr("fake/__init__.py", "")
    spec = BuildSpec(
        topology=topo,
        node=topo.node(5),
        wheelhouse=house,
        version="1",
        security_version=1,
        epoch=0,
        extra_files={"usr/lib/qkdn/blob": os.urandom(size_mib << 20)},
    )
    return build(spec, rel, ring, work / "big.qkdnb").bundle, rel, ring


def dd(bundle: Path, disk: Path, offset: int, payload_at: int, fsync: bool) -> float:
    cmd = [
        "dd",
        f"if={bundle}",
        f"of={disk}",
        "bs=4M",
        "conv=notrunc" + (",fsync" if fsync else ""),
        f"skip={payload_at}",
        f"seek={offset}",
        "iflag=skip_bytes",
        "oflag=seek_bytes",
        "status=none",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def bench_flash(work: Path, size_mib: int, repeats: int) -> dict[str, Any]:
    from images.bundle import read_envelope

    bundle, _, ring = big_bundle(work, size_mib)
    _, payload_at = read_envelope(bundle)
    payload = bundle.stat().st_size - payload_at
    root = kr.current_root(ring)
    policy = DevicePolicy(compatible="qkdn-appliance-x86_64", anchor=root)
    disk_size = (2 * (size_mib + 8) + 8) << 20
    times: dict[str, list[float]] = {"flash": [], "dd": [], "dd_fsync": []}
    bundle.read_bytes()  # warm the page cache for both contenders
    names = ["flash", "dd", "dd_fsync"]
    for rep in range(repeats):
        # Every contender writes into a freshly created target, so all pay block allocation.
        # The order rotates, so that none always follows the same predecessor (deleting a
        # synced 270 MB file leaves the file system work to do), and each starts after a
        # sync, so that none pays for what the previous one or the setup left unwritten.
        for name in names[rep % 3 :] + names[: rep % 3]:
            disk = work / f"{name}.img"
            disk.unlink(missing_ok=True)
            target = init_target(disk, disk_size, policy, slot_size=(size_mib + 8) << 20)
            slot = target.layout["a"].start
            os.sync()
            start = time.perf_counter()
            if name == "flash":
                flash(bundle, target)
                times[name].append(time.perf_counter() - start)
            else:
                times[name].append(dd(bundle, disk, slot, payload_at, fsync=name == "dd_fsync"))
            target.close()
            disk.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    mbps = {k: round(payload / v / 1e6, 1) for k, v in med.items()}
    return {
        "payload_bytes": payload,
        "MB_per_s": mbps,
        "flash_vs_dd_fsync": round(med["dd_fsync"] / med["flash"], 2),
        "flash_vs_dd_no_fsync": round(med["dd"] / med["flash"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", action="append", choices=["build", "flash"])
    ap.add_argument("--size", type=int, default=256, help="flash payload in MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("QKDN_IMAGE_CACHE", Path.home() / ".cache/qkdn-images")),
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sections = args.section or ["build", "flash"]
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qkdn-bench-", dir=Path.home()) as tmp:
        work = Path(tmp)
        if "build" in sections:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
            report["build"] = bench_build(work, args.cache_dir)
            print("build:", report["build"])
        if "flash" in sections:
            report["flash"] = bench_flash(work, args.size, args.repeats)
            print("flash:", report["flash"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
