"""The configuration of one node, as ``qkdn topology render`` writes it.

One TOML file per node: its identity and role, where it listens, who its neighbours are
(with the URL of the QKD module on each link), where its certificates and data live, and
the addresses of the data-centre roles the topology declares (no process serves those yet,
and no node calls them). Node processes load it with :func:`load_node_config`, which
checks every address (a real host, a port in 1..65535) and the port plan (every
port derived from it fits) before a node binds anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from appliance.config.addresses import check_host, check_host_port
from appliance.config.render import MAX_BASE_PORT, MIN_BASE_PORT
from appliance.config.schema import Strict, load_model, read_toml
from appliance.config.topology import Name
from appliance.errors import ConfigError


def _bare_host(text: str) -> str:
    if check_host(text) != text:
        raise ValueError("a host without brackets (the port plan adds them)")
    return text


HostPort = Annotated[str, AfterValidator(check_host_port)]
"""``host:port`` with a port in 1..65535; an IPv6 host in brackets."""
Host = Annotated[str, AfterValidator(_bare_host)]


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
    address: HostPort
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

    host: Host
    base_port: int = Field(ge=MIN_BASE_PORT, le=MAX_BASE_PORT)


TlsVersion = Literal["1.2", "1.3"]


def _both_tls_versions() -> list[TlsVersion]:
    return ["1.2", "1.3"]


class Etsi014Edge(Strict):
    """The ETSI 014 server of a UKMS (the SAE edge)."""

    tls_versions: list[TlsVersion] = Field(
        default_factory=_both_tls_versions, min_length=1, max_length=2
    )
    """TLS versions SAEs may use (014 asks for "1.2 or higher"); TLS 1.2 with forward-secret
    AEAD suites only."""


class NodeConfig(Strict):
    node: NodeIdentity
    paths: NodePaths
    plan: PortPlan
    devices: Devices
    listen: dict[str, HostPort] = Field(default_factory=dict)
    services: dict[str, HostPort] = Field(default_factory=dict)
    """host:port of the data-centre roles (controller, manager, aaa) this node would use;
    rendered from the topology, read by nothing yet."""
    etsi014: Etsi014Edge = Field(default_factory=Etsi014Edge)
    neighbours: list[Neighbour] = Field(default_factory=list)
    saes: list[SaeEntry] = Field(default_factory=list)
    psk: dict[str, str] = Field(default_factory=dict)
    """AKMS only: for each peer AKMS (by name), the PSK source of the channel to it:
    ``file:PATH`` (a provisioning file) or ``pcsc://READER?...`` (a smartcard)."""


def load_node_config(path: Path, *, keep_saes: bool = True) -> NodeConfig:
    """Read and validate one node configuration file.

    ``keep_saes=False`` (the node runtime, which finds its SAEs in the topology): the SAE
    entries are checked one by one as strictly, then dropped, so a UKMS serving 10,000
    SAEs does not hold 10,000 entries it never reads (their certificates' paths are for
    provisioning and ``qkdn net status``)."""
    data = read_toml(path)
    if keep_saes:
        return load_model(NodeConfig, data, str(path))
    saes = data.pop("saes", [])
    config = load_model(NodeConfig, data, str(path))
    if not isinstance(saes, list):
        raise ConfigError(str(path), "saes", f"expected a list (got {type(saes).__name__})")
    for i, entry in enumerate(saes):
        try:
            load_model(SaeEntry, entry, str(path))
        except ConfigError as exc:
            label = entry.get("id") if isinstance(entry, dict) else None
            where = f"saes[{i}]" + (f" ({label})" if isinstance(label, str) else "")
            key = f"{where}.{exc.key}" if exc.key else where
            raise ConfigError(str(path), key, exc.problem, code=exc.code) from None
    return config
