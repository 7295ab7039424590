"""A whole network on one machine: its PKI, and its KMS nodes built from rendered configs.

Used by ``qkdn net up`` (one OS process per node) and by in-process tests and benches
(every node in one event loop): the same configuration files, certificates and code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

import hal
from appliance.config.node import NodeConfig, load_node_config
from appliance.config.topology import Topology
from appliance.kms.node import KmsNode, Policy
from appliance.kms.seams import PathProvider, RequestValidator
from appliance.pki import CertificateAuthority, write_pair
from hsm.psk import PSK_BYTES, write_psk_file

RandomBytes = Callable[[int], bytes]
KMS_ROLES = {"ukms", "akms", "ckms"}


def make_pki(topo: Topology, configs: dict[str, NodeConfig], rng: RandomBytes) -> None:
    """One CA, a certificate per node and per SAE, at the paths the configs name."""
    any_cfg = next(iter(configs.values()))
    ca = CertificateAuthority.create(topo.name, rng)
    ca_path = Path(any_cfg.paths.ca_cert)
    ca_path.parent.mkdir(parents=True, exist_ok=True)
    ca_path.write_bytes(ca.cert.public_bytes(Encoding.PEM))
    for cfg in configs.values():
        host = cfg.plan.host
        cert, key = ca.issue(cfg.node.name, rng, server=True, hosts=(host, cfg.node.name))
        write_pair(cert, key, Path(cfg.paths.cert), Path(cfg.paths.key))
        for sae in cfg.saes:
            cert, key = ca.issue(sae.id, rng, server=False)
            write_pair(cert, key, Path(sae.cert), Path(sae.cert).with_suffix(".key"))


def provision_psks(configs: dict[str, NodeConfig], rng: RandomBytes) -> list[Path]:
    """Write the PSK provisioning files the configs name (``file:`` sources), each once:
    both access nodes of a pair name the same file. Smartcard sources are enrolled with
    ``qkdn card enroll`` instead. Returns the files created."""
    created = []
    for cfg in configs.values():
        for url in cfg.psk.values():
            if not url.startswith("file:"):
                continue
            path = Path(url.removeprefix("file:"))
            if not path.exists():
                psk = bytearray(rng(PSK_BYTES))
                try:
                    write_psk_file(path, psk)
                finally:
                    psk[:] = bytes(len(psk))
                created.append(path)
    return created


def load_configs(out: Path) -> dict[str, NodeConfig]:
    """Every node configuration under a rendered network directory, by node name."""
    return {p.stem: load_node_config(p) for p in sorted((out / "nodes").glob("*.toml"))}


def is_kms(cfg: NodeConfig) -> bool:
    return bool(set(cfg.node.role.split("+")) & KMS_ROLES)


def build_node(
    cfg: NodeConfig,
    topo: Topology,
    rng: RandomBytes,
    *,
    clock: hal.Clock | None = None,
    policy: Policy | None = None,
    only: str | None = None,
    validator: RequestValidator | None = None,
    paths: PathProvider | None = None,
    sdn: bool = False,
) -> KmsNode:
    """A KMS node with its QKDM ends opened from the config's device URLs (``only``: one
    service of an access node, with the links that service owns; ``sdn``: serve the SDN
    agent for the QKDN Controller)."""
    qkdms = {
        nb.link: hal.open_qkdm(nb.qkdm, clock=clock)
        for nb in cfg.neighbours
        if only is None or (only == "akms") == ("ukms" in nb.role.split("+"))
    }
    return KmsNode(
        cfg, topo, rng, qkdms, policy or Policy(), only=only, validator=validator, paths=paths,
        sdn=sdn,
    )  # fmt: skip
