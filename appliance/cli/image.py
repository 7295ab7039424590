"""``qkdn image``: build, sign, inspect and flash appliance images; emulate the bootloader.

The operator's workflow: generate keys and a keyring once; ``build`` a signed bundle per
node; ``init-target`` (bench) or provision a device with its policy; ``flash`` the bundle
into the inactive slot; ``boot`` (the emulated bootloader) runs the new slot's health
check; ``commit`` keeps it, and an image that keeps failing is rolled back on its own.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from appliance.cli import args as types
from appliance.cli.output import console, print_json
from appliance.config.topology import load_topology
from images.errors import ImageUsageError
from images.manifest import BLOCK, MAX_CHUNK, MAX_EPOCH, MAX_SECURITY_VERSION, TEXT

HELP = """\
Signed, hardened appliance images on A/B slots with boot counting, rollback and
anti-rollback. Bundles are signed with Ed25519 and ML-DSA-65; both must verify.

workflow:
  qkdn image key generate --out keys/root          root key pair (keys/root.key, .pub)
  qkdn image key generate --out keys/release
  qkdn image key init --root keys/root.key --out keys/keyring.json
  qkdn image key certify keys/keyring.json --root keys/root.key \\
        --signer keys/release.pub --purpose release
  qkdn image build --role ckms --node 5 --topology demoquandt \\
        --key keys/release.key --keyring keys/keyring.json --out ckms-5.qkdnb
  qkdn image init-target disk.img --size 512M --keyring keys/keyring.json --node 5
  qkdn image flash ckms-5.qkdnb --target disk.img
  qkdn image boot --target disk.img && qkdn image commit --target disk.img
  qkdn image status --target disk.img
"""
CACHE_ENV = "QKDN_IMAGE_CACHE"
MAX_DISK = 1 << 44
"""16 TiB: the largest target disk image (and slot) ``init-target`` creates."""
MAX_NODE_ID, MAX_ATTEMPTS = 999, 255
EPOCH = types.integer(0, MAX_EPOCH)
TOKEN = types.matching(TEXT, "at most 128 letters, digits and ._+:- (a letter or digit first)")
"""Versions and compatible strings, as a device's manifest parser takes them."""
DISK_SIZE = types.size(1, MAX_DISK)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "image",
        help="build, sign, flash and boot appliance images",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", parser_class=type(p))
    isub.required = True
    _register_build(isub)
    _register_device(isub)
    _register_keys(isub)


def _register_build(isub: Any) -> None:
    b = isub.add_parser(
        "build",
        help="build and sign a node's image bundle",
        description="Build a reproducible squashfs root for one node (application, node "
        "configuration and certificates, hardening profile), its dm-verity tree, and a "
        "bundle whose manifest is signed with Ed25519 and ML-DSA-65.",
        epilog="example: qkdn image build --role ckms --node 5 --topology demoquandt "
        "--key release.key --keyring keyring.json --out ckms-5.qkdnb",
    )
    b.add_argument("--role", required=True, help="the node's role (must match the topology)")
    b.add_argument("--node", required=True, help="node id or name")
    b.add_argument("--topology", required=True, type=types.topology, metavar="TOPOLOGY")
    b.add_argument("--out", required=True, type=types.path, metavar="FILE")
    b.add_argument("--key", required=True, type=types.path, help="signing key (.key)")
    b.add_argument("--keyring", required=True, type=types.path, help="keyring certifying the key")
    b.add_argument(
        "--version",
        default="0.1.0",
        type=TOKEN,
        help="image version (default: %(default)s)",
    )
    b.add_argument(
        "--security-version",
        type=types.integer(0, MAX_SECURITY_VERSION),
        default=0,
        metavar="N",
        help=f"anti-rollback counter, 0..{MAX_SECURITY_VERSION} (default: %(default)s)",
    )
    b.add_argument("--compatible", type=TOKEN, default="qkdn-appliance-x86_64")
    b.add_argument(
        "--wheelhouse",
        type=types.path,
        metavar="DIR",
        help="use these wheels as the application (default: build the project's)",
    )
    b.add_argument(
        "--cache-dir",
        type=types.path,
        metavar="DIR",
        help=f"where the wheelhouse is cached (default: ${CACHE_ENV} or ~/.cache/qkdn-images)",
    )
    b.add_argument("--pki-dir", type=types.path, metavar="DIR", help="certificates to ship")
    b.add_argument(
        "--source-date-epoch",
        type=EPOCH,
        metavar="T",
        help=f"timestamp of every file, 0..{MAX_EPOCH} (default: $SOURCE_DATE_EPOCH, else 0)",
    )
    b.add_argument(
        "--host", type=types.host, default="127.0.0.1", help="address plan as in topology render"
    )
    b.add_argument("--base-port", type=types.base_port, default=20000)
    b.add_argument(
        "--sae-net",
        action="append",
        type=types.cidr,
        default=[],
        metavar="CIDR",
        help="networks allowed to reach the ETSI 014 and 004 ports (repeatable)",
    )
    b.add_argument(
        "--admin-net",
        action="append",
        type=types.cidr,
        default=[],
        metavar="CIDR",
        help="networks allowed to reach a manager node's web port (repeatable)",
    )
    b.add_argument(
        "--chunk-size",
        type=types.size(BLOCK, MAX_CHUNK, multiple_of=BLOCK),
        default="4M",
        help="digest/write unit, a multiple of 4K (default: %(default)s)",
    )
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_build)


def _register_device(isub: Any) -> None:
    f = isub.add_parser(
        "flash",
        help="verify a bundle and write it to the inactive slot",
        description="Verify the bundle against the target's policy, write the "
        "inactive slot, read it back, and mark it trial with N boot attempts.",
    )
    f.add_argument("bundle", type=types.path, metavar="BUNDLE")
    f.add_argument("--target", required=True, type=types.path, metavar="DISK")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_flash)

    bt = isub.add_parser(
        "boot",
        help="emulated bootloader: pick a slot, count, health-check",
        description="Pick the slot to boot (rolling back a trial slot with no "
        "attempts left), count the attempt, verify the slot's content, and run "
        "the health check: the node configuration and the node's self-tests "
        "from the slot's own application, then --health-hook if given.",
    )
    bt.add_argument("--target", required=True, type=types.path, metavar="DISK")
    bt.add_argument(
        "--health-hook",
        metavar="CMD",
        help="extra health check command; exit 0 passes (env: QKDN_SLOT, "
        "QKDN_SLOT_OFFSET, QKDN_TARGET, QKDN_IMAGE_VERSION)",
    )
    bt.add_argument(
        "--no-selftest",
        action="store_true",
        help="skip the self-tests from the slot (configuration check and hook only)",
    )
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=cmd_boot)

    c = isub.add_parser("commit", help="mark the booted trial slot good")
    c.add_argument("--target", required=True, type=types.path, metavar="DISK")
    c.set_defaults(func=cmd_commit)

    s = isub.add_parser("status", help="slots, versions, states and the last rollback")
    s.add_argument("--target", required=True, type=types.path, metavar="DISK")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    i = isub.add_parser(
        "inspect",
        help="verify a bundle and print its manifest",
        description="Verify the bundle (signatures, keyring chain, payload) and "
        "print the manifest with the verity parameters for veritysetup verify.",
    )
    i.add_argument("bundle", type=types.path, metavar="BUNDLE")
    i.add_argument("--keyring", type=types.path, help="trust the first root of this keyring")
    i.add_argument("--target", type=types.path, metavar="DISK", help="trust this device's policy")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    t = isub.add_parser(
        "init-target",
        help="create an empty target disk (bench use)",
        description="Create a GPT disk image with a boot area, slots A and B "
        "and a data partition, and store the device policy in it.",
        epilog="example: qkdn image init-target disk.img --size 512M "
        "--keyring keyring.json --node 5",
    )
    t.add_argument("disk", type=types.path, metavar="DISK")
    t.add_argument("--size", required=True, type=DISK_SIZE, help="disk size: 64M, 2G, ...")
    t.add_argument(
        "--slot-size", type=DISK_SIZE, help="size of each slot (default: fills the disk)"
    )
    t.add_argument(
        "--keyring", required=True, type=types.path, help="its current root is the anchor"
    )
    t.add_argument("--compatible", type=TOKEN, default="qkdn-appliance-x86_64")
    t.add_argument(
        "--node",
        type=types.integer(1, MAX_NODE_ID),
        help="accept only images built for this node id",
    )
    t.add_argument(
        "--floor",
        type=types.integer(0, MAX_SECURITY_VERSION),
        default=0,
        help="initial security-version floor",
    )
    t.add_argument(
        "--attempts",
        type=types.integer(1, MAX_ATTEMPTS),
        default=3,
        help=f"boot attempts of a new image, 1..{MAX_ATTEMPTS}",
    )
    t.add_argument("--accept-dev", action="store_true", help="accept development-signed images")
    t.add_argument("--force", action="store_true", help="overwrite an existing DISK")
    t.set_defaults(func=cmd_init_target)


def _register_keys(isub: Any) -> None:
    k = isub.add_parser("key", help="signing keys and the keyring")
    ks = k.add_subparsers(dest="key_command", metavar="ACTION", parser_class=type(k))
    ks.required = True
    g = ks.add_parser("generate", help="a new Ed25519 + ML-DSA-65 key pair")
    g.add_argument(
        "--out",
        required=True,
        type=types.path,
        metavar="PREFIX",
        help="writes PREFIX.key (mode 0600) and PREFIX.pub",
    )
    g.add_argument("--name", help="label (default: the file name)")
    g.add_argument(
        "--force", action="store_true", help="overwrite an existing PREFIX.key and PREFIX.pub"
    )
    g.set_defaults(func=cmd_key_generate)
    i = ks.add_parser("init", help="a new keyring with one root")
    i.add_argument("--root", required=True, type=types.path)
    i.add_argument("--out", required=True, type=types.path)
    i.set_defaults(func=cmd_key_init)
    c = ks.add_parser("certify", help="certify a signing key with the current root")
    c.add_argument("keyring", type=types.path)
    c.add_argument("--root", required=True, type=types.path)
    c.add_argument("--signer", required=True, type=types.path, help="the signing key's .pub")
    c.add_argument("--purpose", required=True, choices=["dev", "release"])
    c.set_defaults(func=cmd_key_certify)
    r = ks.add_parser("rotate", help="replace the root; the old root signs the new one")
    r.add_argument("keyring", type=types.path)
    r.add_argument("--old-root", required=True, type=types.path)
    r.add_argument("--new-root", required=True, type=types.path)
    r.set_defaults(func=cmd_key_rotate)
    v = ks.add_parser("revoke", help="add a key id to the signed revocation list")
    v.add_argument("keyring", type=types.path)
    v.add_argument("--root", required=True, type=types.path, help="the keyring's current root")
    v.add_argument("--key-id", required=True, type=types.key_id, help="32 hex digits")
    v.set_defaults(func=cmd_key_revoke)


# --- build ---------------------------------------------------------------------------------


def _node(topo: Any, text: str) -> Any:
    for n in topo.spec.nodes:
        if str(n.id) == text or n.name == text:
            return n
    raise ImageUsageError(f"--node: no node {text!r} in topology {topo.name}")


def _env_epoch() -> int:
    text = os.environ.get("SOURCE_DATE_EPOCH", "0")
    try:
        return EPOCH(text)
    except argparse.ArgumentTypeError as exc:
        raise ImageUsageError(f"$SOURCE_DATE_EPOCH: {exc}") from None


def _wheelhouse(args: argparse.Namespace) -> Path:
    from images.build import build_wheelhouse

    if args.wheelhouse is not None:
        return Path(args.wheelhouse)
    cache = args.cache_dir or Path(os.environ.get(CACHE_ENV, Path.home() / ".cache/qkdn-images"))
    cache.mkdir(parents=True, exist_ok=True)
    return build_wheelhouse(Path(__file__).resolve().parents[2], cache)


def cmd_build(args: argparse.Namespace) -> int:
    from images import keyring as kr
    from images.build import BuildSpec, build
    from images.signing import KeyPair

    topo = load_topology(args.topology)
    node = _node(topo, args.node)
    if args.role != node.role:
        raise ImageUsageError(f"--role {args.role}: node {node.id} ({node.name}) is {node.role}")
    key, ring = KeyPair.load(args.key), kr.load_keyring(args.keyring)
    epoch = args.source_date_epoch
    if epoch is None:
        epoch = _env_epoch()
    start = time.perf_counter()
    spec = BuildSpec(
        topology=topo,
        node=node,
        wheelhouse=_wheelhouse(args),
        version=args.version,
        security_version=args.security_version,
        compatible=args.compatible,
        epoch=epoch,
        pki_dir=args.pki_dir,
        host=args.host,
        base_port=args.base_port,
        client_nets={"etsi014": args.sae_net, "etsi004": args.sae_net, "web": args.admin_net},
        chunk_size=args.chunk_size,
    )
    result = build(spec, key, ring, args.out)
    elapsed = time.perf_counter() - start
    m = result.manifest
    if args.json:
        print_json({"bundle": str(args.out), "seconds": round(elapsed, 2), **m.to_json()})
    else:
        console().print(
            f"built {args.out}: {node.name} ({m.role}) {m.version}, security "
            f"version {m.security_version}, {m.payload_size} bytes in {elapsed:.1f} s"
        )
    return 0


# --- device --------------------------------------------------------------------------------


def _open_target(path: Path) -> Any:
    from images.target import Target

    return Target(path)


def cmd_flash(args: argparse.Namespace) -> int:
    from images.install import flash

    target = _open_target(args.target)
    out = console()
    start = time.perf_counter()
    try:
        with Progress(
            TextColumn("flashing"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=out,
            transient=True,
            disable=not out.is_terminal,
        ) as bar:
            task = bar.add_task("flash", total=None)
            result = flash(
                args.bundle,
                target,
                lambda done, total: bar.update(task, completed=done, total=total),
            )
    finally:
        target.close()
    elapsed = time.perf_counter() - start
    if args.json:
        print_json({**asdict(result), "seconds": round(elapsed, 3)})
    else:
        out.print(
            f"flashed {result.version} (security version {result.security_version}) into "
            f"slot {result.slot}: {result.bytes} bytes in {elapsed:.2f} s; trial with "
            f"{result.attempts} boot attempts"
        )
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    from images.boot import boot, default_health

    target = _open_target(args.target)
    try:
        result = boot(target, default_health(args.health_hook, selftest=not args.no_selftest))
    finally:
        target.close()
    if args.json:
        print_json(asdict(result))
        return 0 if result.healthy else 1
    out = console()
    if result.rollback is not None:
        rb = result.rollback
        out.print(f"rolled back from slot {rb.slot} ({rb.version}): {rb.reason}")
    health = "passed" if result.healthy else f"FAILED: {result.reason}"
    left = f", {result.attempts_left} attempts left" if result.state == "trial" else ""
    out.print(
        f"booted slot {result.slot} ({result.version}, {result.state}{left}); health check {health}"
    )
    return 0 if result.healthy else 1


def cmd_commit(args: argparse.Namespace) -> int:
    from images.boot import commit

    target = _open_target(args.target)
    try:
        state = commit(target)
    finally:
        target.close()
    slot = state.booted
    console().print(
        f"slot {slot} ({state.slots[slot].version}) is good; security-version floor {state.floor}"
    )
    return 0


def status_doc(target: Any) -> dict[str, Any]:
    state, policy = target.state(), target.policy()
    slots = {name: {**asdict(s), "size": target.slot_size(name)} for name, s in state.slots.items()}
    return {
        "target": str(target.path),
        "compatible": policy.compatible,
        "node": policy.node,
        "accept_dev": policy.accept_dev,
        "primary": state.primary,
        "booted": state.booted,
        "floor": state.floor,
        "slots": slots,
        "revoked": list(state.revoked),
        "last_rollback": None if state.last_rollback is None else asdict(state.last_rollback),
    }


def cmd_status(args: argparse.Namespace) -> int:
    target = _open_target(args.target)
    try:
        doc = status_doc(target)
    finally:
        target.close()
    if args.json:
        print_json(doc)
        return 0
    table = Table(title=f"{args.target}: {doc['compatible']}, floor {doc['floor']}")
    for col in ("slot", "state", "version", "security", "attempts", "health", ""):
        table.add_column(col)
    for name, s in doc["slots"].items():
        marks = [
            m
            for m, on in (("primary", doc["primary"] == name), ("booted", doc["booted"] == name))
            if on
        ]
        table.add_row(
            name,
            s["state"],
            s["version"] or "-",
            str(s["security_version"]),
            str(s["attempts"]),
            s["health"] or "-",
            ", ".join(marks),
        )
    out = console()
    out.print(table)
    rb = doc["last_rollback"]
    out.print(
        "last rollback: "
        + (
            "none"
            if rb is None
            else f"slot {rb['slot']} ({rb['version']}) -> {rb['to'] or 'none'}: {rb['reason']}"
        )
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from images import keyring as kr
    from images.bundle import check_payload, verify_bundle
    from images.policy import DevicePolicy
    from images.signing import PublicKey

    if (args.keyring is None) == (args.target is None):
        raise ImageUsageError("inspect: give exactly one of --keyring and --target to trust")
    revoked: frozenset[str] = frozenset()
    if args.target is not None:
        target = _open_target(args.target)
        policy, revoked = target.policy(), frozenset(target.state().revoked)
        target.close()
    else:
        ring = kr.load_keyring(args.keyring)
        anchor = PublicKey.from_json(ring["roots"][0]["body"]["key"], str(args.keyring))
        policy = DevicePolicy(compatible="", anchor=anchor, accept_dev=True)
    vb = verify_bundle(args.bundle, policy, revoked)
    check_payload(vb)
    doc = {
        "bundle": str(args.bundle),
        "payload_offset": vb.offset,
        "signer": vb.signer,
        "signer_purpose": vb.purpose,
        "manifest": vb.manifest.to_json(),
    }
    if args.json:
        print_json(doc)
    else:
        m = vb.manifest
        console().print(
            f"{args.bundle}: verified ({vb.purpose} key {vb.signer}); {m.node_name} "
            f"({m.role}) {m.version}, security version {m.security_version}, verity "
            f"root {m.verity.root_hash}"
        )
    return 0


def cmd_init_target(args: argparse.Namespace) -> int:
    from images import keyring as kr
    from images.policy import DevicePolicy
    from images.target import init_target

    ring = kr.load_keyring(args.keyring)
    revoked = (ring.get("revocations") or {"body": {"revoked": []}})["body"]["revoked"]
    policy = DevicePolicy(
        compatible=args.compatible,
        anchor=kr.current_root(ring),
        node=args.node,
        accept_dev=args.accept_dev,
        revoked=frozenset(revoked),
        floor=args.floor,
        attempts=args.attempts,
    )
    target = init_target(args.disk, args.size, policy, slot_size=args.slot_size, force=args.force)
    sizes = target.slot_size("a")
    target.close()
    console().print(f"created {args.disk}: slots of {sizes} bytes, policy {args.compatible}")
    return 0


# --- keys ----------------------------------------------------------------------------------


def cmd_key_generate(args: argparse.Namespace) -> int:
    from images.signing import KeyPair

    key = KeyPair.generate(args.name or args.out.name)
    key.save(args.out.with_suffix(".key"), overwrite=args.force)
    console().print(f"wrote {args.out.with_suffix('.key')} and .pub (key id {key.public.key_id})")
    return 0


def _update(path: Path, change: Any) -> int:
    from images import keyring as kr

    kr.save_keyring(path, change(kr.load_keyring(path)))
    console().print(f"updated {path}")
    return 0


def cmd_key_init(args: argparse.Namespace) -> int:
    from images import keyring as kr
    from images.signing import KeyPair

    kr.save_keyring(args.out, kr.new_keyring(KeyPair.load(args.root)))
    console().print(f"wrote {args.out}")
    return 0


def cmd_key_certify(args: argparse.Namespace) -> int:
    from images import keyring as kr
    from images.signing import KeyPair, load_public

    root, signer = KeyPair.load(args.root), load_public(args.signer)
    return _update(args.keyring, lambda ring: kr.certify(ring, root, signer, args.purpose))


def cmd_key_rotate(args: argparse.Namespace) -> int:
    from images import keyring as kr
    from images.signing import KeyPair

    old, new = KeyPair.load(args.old_root), KeyPair.load(args.new_root)
    return _update(args.keyring, lambda ring: kr.rotate(ring, old, new))


def cmd_key_revoke(args: argparse.Namespace) -> int:
    from images import keyring as kr
    from images.signing import KeyPair

    root = KeyPair.load(args.root)
    return _update(args.keyring, lambda ring: kr.revoke(ring, root, args.key_id))
