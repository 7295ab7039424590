"""The AAA device of a network started by ``qkdn net up --aaa``: its folder, made ready.

``<net>/aaa/`` holds what ``qkdn aaa run`` serves and what each access node needs to talk
to it:

* ``registry.db``, seeded from the topology's users, SAEs and contracts (entries already
  there are kept: an operator's change survives a restart of the network);
* ``dc.pem`` / ``dc.pub.pem``: the data centre's Ed25519 key pair that signs the
  accounting's daily heads (made once);
* ``aaa.toml``: the agent's configuration, listening on the topology's AAA node's SNMP
  address, with an operator and one SNMPv3 user per AKMS (fresh random passphrases at
  every start, mode 0600), each AKMS's INFORM address being its AKMS port over UDP;
* ``akms-<id>.toml``: each AKMS's side of the same (``qkdn node run --aaa``).

Only user and access nodes enter the registry (:mod:`appliance.aaa.seed`): AAA never
learns carrier nodes, links or routes.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.aaa.errors import AaaError
from appliance.aaa.registry import Registry
from appliance.aaa.seed import attachments, seed
from appliance.config.topology import Topology

OPERATOR = "aaa-operator"


def aaa_dir(net_dir: Path) -> Path:
    return net_dir / "aaa"


def akms_file(net_dir: Path, akms: int) -> Path:
    return aaa_dir(net_dir) / f"akms-{akms}.toml"


def prepare(net_dir: Path, topo: Topology, configs: dict[str, Any]) -> dict[int, Path]:
    """Make ``<net>/aaa`` ready; return each AKMS's link file by AKMS node ID."""
    providers = topo.nodes_with("aaa")
    if not providers:
        raise AaaError(
            f"topology {topo.name} declares no node with the aaa role", code="AAA-TOPOLOGY"
        )
    listen = configs[providers[0].name].listen["snmp"]
    folder = aaa_dir(net_dir)
    folder.mkdir(mode=0o700, exist_ok=True)
    registry = Registry(folder / "registry.db")
    try:
        seed(registry, topo)
    finally:
        registry.close()
    _signing_key(folder)
    akms_ids = sorted(set(attachments(topo).values()))
    by_id = {cfg.node.id: cfg for cfg in configs.values()}
    users = {n: (f"akms-{n}", _secret(), _secret()) for n in akms_ids}
    lines = [
        f'listen = "{listen}"',
        'registry = "registry.db"',
        'accounting = "accounting.db"',
        'signing_key = "dc.pem"',
        "",
        "[operator]",
        f'user = "{OPERATOR}"',
        f'auth = "{_secret()}"',
        f'priv = "{_secret()}"',
    ]
    out = {}
    for n, (user, auth, priv) in users.items():
        inform = by_id[n].listen["akms"]
        lines += [
            "",
            "[[akms]]",
            f"id = {n}",
            f'user = "{user}"',
            f'auth = "{auth}"',
            f'priv = "{priv}"',
            f'inform = "{inform}"',
        ]
        out[n] = akms_file(net_dir, n)
        _private(
            out[n],
            [
                f'aaa = "{listen}"',
                f'user = "{user}"',
                f'auth = "{auth}"',
                f'priv = "{priv}"',
                f'inform = "{inform}"',
            ],
        )
    _private(folder / "aaa.toml", lines)
    return out


def _secret() -> str:
    """An SNMPv3 passphrase (32 URL-safe characters: inside the agent's 8..64)."""
    return secrets.token_urlsafe(24)


def _private(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _signing_key(folder: Path) -> None:
    """The data centre's Ed25519 key pair, made once."""
    private = folder / "dc.pem"
    if private.exists():
        return
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (folder / "dc.pub.pem").write_bytes(public)
