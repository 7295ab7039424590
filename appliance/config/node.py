"""The configuration of one node, as ``qkdn topology render`` writes it.

One TOML file per node: its identity and role, where it listens, who its neighbours are
(with the URL of the QKD module on each link), where its certificates and data live, and
the addresses of the data-centre roles the topology declares (no process serves those
yet, and no node calls them). Node processes load it with :func:`load_node_config`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from appliance.config.schema import Strict, load_model, read_toml
from appliance.config.topology import Name


class NodeIdentity(Strict):
    id: int
    name: Name
    site: str
    role: str
    network: Name
    topology: str
    """Path of the network's topology file (routing, SAE directory)."""
    virtual: bool = False


class Devices(Strict):
    qrng: str
    """URL of the node's noise source (one PTG.3 generator per node)."""
    keystore: str | None = None
    """RFC 7512 URL of the PKCS#11 token holding the key-encryption key of the node's key
    stores (``pkcs11:token=...;object=...?pin-source=file:...``); unset: a key file in the
    data directory."""


class NodePaths(Strict):
    data_dir: str
    ca_cert: str
    cert: str
    key: str


class Neighbour(Strict):
    node: int
    name: Name
    role: str
    address: str
    """host:port of the neighbour's KMS service that this node talks to."""
    link: str
    length_km: float
    qkdm: str
    """Device URL of this node's end of the QKD link."""


class SaeEntry(Strict):
    id: Name
    user: Name
    contract: Name
    cert: str


class PortPlan(Strict):
    """How every node's service addresses were assigned (see appliance.config.render)."""

    host: str
    base_port: int


class NodeConfig(Strict):
    node: NodeIdentity
    paths: NodePaths
    plan: PortPlan
    devices: Devices
    listen: dict[str, str] = Field(default_factory=dict)
    services: dict[str, str] = Field(default_factory=dict)
    """host:port of the data-centre roles (controller, manager, aaa) this node would use;
    rendered from the topology, read by nothing yet."""
    neighbours: list[Neighbour] = Field(default_factory=list)
    saes: list[SaeEntry] = Field(default_factory=list)
    psk: dict[str, str] = Field(default_factory=dict)
    """AKMS only: for each peer AKMS (by name), the PSK source of the channel to it:
    ``file:PATH`` (a provisioning file) or ``pcsc://READER?...`` (a smartcard)."""


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate one node configuration file."""
    return load_model(NodeConfig, read_toml(path), str(path))
