"""The network topology file: nodes, QKD links, users, contracts and SAEs.

A topology is the operator's single description of a QKD network (see
``appliance/topologies/demoquandt.toml`` for a commented example). Loading checks, in
order: TOML syntax, the shape of every table (unknown keys are errors), then the
references and rules between tables (links between existing KMS nodes, roles that may
share a node, SAEs attached to user nodes, contracts of the right user) and, last, that
every pair of SAEs that may exchange keys (two SAEs of one user) has a path: each user
node links to an access node, and the two access nodes are joined through carrier
(CKMS) nodes. Numbers are finite (no ``inf`` or ``nan``) and bounded. Units are the
operator's: kb/s for key rates, percent for QBER, km for lengths.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from appliance.config.schema import Lean, Strict, load_model, read_toml
from appliance.errors import ConfigError

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Pct = Annotated[float, Field(ge=0.0, le=50.0)]
RoutePolicy = Literal["balanced", "fewest-hops", "most-key"]
"""A contract's routing policy class (the QKDN Controller's weights per class)."""
MAX_SKR_KBPS = 1_000_000.0
"""1 Gb/s: far above any QKD link, and far below where derived rates stop being finite."""
Rate = Annotated[float, Field(ge=0.0, le=MAX_SKR_KBPS)]

ROLES = ("ukms", "akms", "ckms", "controller", "manager", "aaa")
KMS_ROLES = frozenset({"ukms", "akms", "ckms"})
ALLOWED_COMBINATIONS = {
    frozenset({"ukms"}): "user node",
    frozenset({"akms", "ckms"}): "access node",
    frozenset({"ckms"}): "carrier node",
    frozenset({"controller"}): "data centre",
    frozenset({"manager"}): "data centre",
    frozenset({"controller", "manager"}): "data centre",
    frozenset({"aaa"}): "data centre",
}
"""Roles that may run on one node. The AKMS only ever pairs with a CKMS (demarcation);
the AAA stays apart from the controller (access/carrier separation); a UKMS is on the
customer's premises and shares nothing with the operator's roles."""


class Network(Strict):
    name: Name
    description: str = ""
    key_size: int = Field(256, ge=64, le=65536, multiple_of=8)
    """Bits per QKDM key on every link unless a link says otherwise."""


class Emulator(Strict):
    """Parameters of the emulated QKDM pair of a link (see hal.emulated.driver)."""

    skr_std_kbps: Rate = 0.0
    qber_std_pct: float = Field(0.0, ge=0.0, le=50.0)
    tau_s: float = Field(300.0, ge=0.0, le=1e9)
    epoch_s: float = Field(1.0, ge=0.001, le=3600.0)
    buffer_keys: int = Field(100_000, ge=1, le=10_000_000)
    qber_abort_pct: float = Field(11.0, gt=0.0, le=50.0)
    skr_max_kbps: Rate | None = None


class LinkDefaults(Strict):
    """Values used by every link that does not give its own."""

    skr_kbps: Rate = 10.0
    qber_pct: Pct = 1.0
    kind: Literal["vendor", "simulated"] = "simulated"
    emulator: Emulator = Emulator()


class Node(Strict):
    id: int = Field(ge=1, le=999)
    name: Name
    site: str = Field(min_length=1)
    role: str
    virtual: bool = False
    """A node that exists only to offer an alternative path in fault tests."""

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(self.role.split("+"))

    @property
    def is_kms(self) -> bool:
        return bool(self.roles & KMS_ROLES)


class Link(Strict):
    a: int
    b: int
    length_km: float = Field(gt=0.0, le=10_000.0)
    skr_kbps: Rate | None = None
    qber_pct: Pct | None = None
    kind: Literal["vendor", "simulated"] | None = None
    key_size: int | None = Field(None, ge=64, le=65536, multiple_of=8)
    emulator: Emulator | None = None

    @property
    def id(self) -> str:
        lo, hi = sorted((self.a, self.b))
        return f"link-{lo}-{hi}"


class UserEntry(Strict):
    id: Name
    name: str = Field(min_length=1)


class ContractEntry(Strict):
    id: Name
    user: Name
    max_key_size: int = Field(256, ge=64, le=65536, multiple_of=8)
    keys_per_day: int = Field(1_000_000, ge=1, le=2**53)
    valid_from: dt.date | None = None
    valid_until: dt.date | None = None
    relay_mode: Literal["otp", "gcm"] | None = None
    """How this user's keys cross the network; unset: the network's policy."""
    route_policy: RoutePolicy | None = None
    """The routing policy class of its relays' paths (the QKDN Controller's weights);
    unset: balanced. Only the class leaves the access node, never the contract."""


class SaeEntry(Strict):
    id: Name
    node: int
    user: Name
    contract: Name


# The customer tables may hold tens of thousands of rows: each row is checked as the
# model above and kept as the lean record below (see schema.Lean).
@dataclass(frozen=True, slots=True)
class User(Lean):
    entry = UserEntry
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Contract(Lean):
    entry = ContractEntry
    id: str
    user: str
    max_key_size: int = 256
    keys_per_day: int = 1_000_000
    valid_from: dt.date | None = None
    valid_until: dt.date | None = None
    relay_mode: Literal["otp", "gcm"] | None = None
    route_policy: RoutePolicy | None = None


@dataclass(frozen=True, slots=True)
class Sae(Lean):
    entry = SaeEntry
    id: str
    node: int
    user: str
    contract: str


class TopologyFile(Strict):
    network: Network
    link_defaults: LinkDefaults = LinkDefaults()
    nodes: list[Node] = Field(min_length=1)
    links: list[Link] = Field(default_factory=list)
    users: list[User] = Field(default_factory=list)
    contracts: list[Contract] = Field(default_factory=list)
    saes: list[Sae] = Field(default_factory=list)


class ResolvedLink(Strict):
    """A link with every default filled in, in the units the emulator takes."""

    id: str
    a: int
    b: int
    length_km: float
    skr_kbps: float
    qber_pct: float
    kind: Literal["vendor", "simulated"]
    key_size: int
    emulator: Emulator


class Topology:
    """A validated topology: the file's content plus lookups and resolved links."""

    def __init__(self, spec: TopologyFile, source: str) -> None:
        self.spec, self.source = spec, source
        self.nodes = {n.id: n for n in spec.nodes}
        self.links = [_resolve(spec, link) for link in spec.links]

    @property
    def name(self) -> str:
        return self.spec.network.name

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def neighbours(self, node_id: int) -> list[tuple[ResolvedLink, Node]]:
        """Links at a node, each with the node at the other end."""
        out = []
        for link in self.links:
            if node_id in (link.a, link.b):
                out.append((link, self.nodes[link.b if link.a == node_id else link.a]))
        return out

    def nodes_with(self, role: str) -> list[Node]:
        return [n for n in self.spec.nodes if role in n.roles]


def _resolve(spec: TopologyFile, link: Link) -> ResolvedLink:
    d = spec.link_defaults
    return ResolvedLink(
        id=link.id,
        a=link.a,
        b=link.b,
        length_km=link.length_km,
        skr_kbps=d.skr_kbps if link.skr_kbps is None else link.skr_kbps,
        qber_pct=d.qber_pct if link.qber_pct is None else link.qber_pct,
        kind=link.kind or d.kind,
        key_size=link.key_size or spec.network.key_size,
        emulator=_merge(d.emulator, link.emulator),
    )


def _merge(defaults: Emulator, own: Emulator | None) -> Emulator:
    """The link's own emulator keys over the defaults' (only keys the link wrote)."""
    if own is None:
        return defaults
    return defaults.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})


SHIPPED = resources.files("appliance") / "topologies"


def shipped_topologies() -> list[str]:
    """Names of the topologies shipped with the package (``demoquandt``, ...)."""
    return sorted(p.name[:-5] for p in SHIPPED.iterdir() if p.name.endswith(".toml"))


def resolve_path(name_or_path: str) -> Path:
    """A file path as given, or the path of a shipped topology by name."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists() or "/" in name_or_path:
        return path
    if name_or_path in shipped_topologies():
        return Path(str(SHIPPED / f"{name_or_path}.toml"))
    known = ", ".join(shipped_topologies())
    raise ConfigError(
        name_or_path, "", f"no such file or shipped topology (shipped: {known})", code="CFG-FILE"
    )


def load_topology(name_or_path: str) -> Topology:
    """Read, validate and cross-check a topology file or a shipped topology name."""
    path = resolve_path(name_or_path)
    spec = load_model(TopologyFile, read_toml(path), str(path))
    _check(spec, str(path))
    return Topology(spec, str(path))


# -- cross-checks ---------------------------------------------------------------------
def _check(spec: TopologyFile, file: str) -> None:
    _check_nodes(spec, file)
    _check_links(spec, file)
    _check_customers(spec, file)
    _check_routes(spec, file)


def _unique(items: list[str], file: str, what: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item in seen:
            raise ConfigError(file, f"{what}[{i}]", f"duplicate {item!r}", code="CFG-REF")
        seen.add(item)


def _check_nodes(spec: TopologyFile, file: str) -> None:
    _unique([str(n.id) for n in spec.nodes], file, "nodes")
    _unique([n.name for n in spec.nodes], file, "nodes")
    for i, node in enumerate(spec.nodes):
        key = f"nodes[{i}] ({node.id}).role"
        unknown = sorted(node.roles - set(ROLES))
        if unknown or not node.role:
            raise ConfigError(
                file,
                key,
                f"unknown role {', '.join(unknown) or node.role!r} "
                f"(expected {', '.join(ROLES)}, joined with '+')",
                code="CFG-ROLE",
            )
        if node.roles not in ALLOWED_COMBINATIONS:
            allowed = ", ".join("+".join(sorted(c)) for c in ALLOWED_COMBINATIONS)
            raise ConfigError(
                file,
                key,
                f"roles {node.role!r} cannot be colocated (allowed: {allowed})",
                code="CFG-ROLE",
            )


def _check_links(spec: TopologyFile, file: str) -> None:
    nodes = {n.id: n for n in spec.nodes}
    seen: set[str] = set()
    for i, link in enumerate(spec.links):
        key = f"links[{i}] ({link.a}-{link.b})"
        for end in ("a", "b"):
            node_id = getattr(link, end)
            if node_id not in nodes:
                raise ConfigError(file, f"{key}.{end}", f"unknown node {node_id}", code="CFG-REF")
            if not nodes[node_id].is_kms:
                raise ConfigError(
                    file,
                    f"{key}.{end}",
                    f"node {node_id} ({nodes[node_id].role}) "
                    "has no KMS; QKD links join ukms, akms+ckms or ckms nodes",
                    code="CFG-REF",
                )
        if link.a == link.b:
            raise ConfigError(file, key, "a link needs two different nodes", code="CFG-REF")
        if link.id in seen:
            raise ConfigError(
                file, key, f"duplicate link between {link.a} and {link.b}", code="CFG-REF"
            )
        seen.add(link.id)
        _check_emulation(_resolve(spec, link), file, key)
        roles = {end: nodes[getattr(link, end)].roles for end in ("a", "b")}
        if any("ukms" in r for r in roles.values()) and not any(
            "akms" in r for r in roles.values()
        ):
            raise ConfigError(
                file,
                key,
                "a user node (ukms) links only to an access node (akms+ckms)",
                code="CFG-REF",
            )


def _check_emulation(link: ResolvedLink, file: str, key: str) -> None:
    emu = link.emulator
    if link.qber_pct >= emu.qber_abort_pct:
        raise ConfigError(
            file,
            f"{key}.qber_pct",
            f"expected a QBER below the abort threshold "
            f"{emu.qber_abort_pct} %, got {link.qber_pct}",
        )
    if emu.skr_max_kbps is not None and emu.skr_max_kbps < link.skr_kbps:
        raise ConfigError(
            file,
            f"{key}.emulator.skr_max_kbps",
            f"expected at least skr_kbps ({link.skr_kbps}), got {emu.skr_max_kbps}",
        )


def _check_customers(spec: TopologyFile, file: str) -> None:
    nodes = {n.id: n for n in spec.nodes}
    users = {u.id for u in spec.users}
    contracts = {c.id: c for c in spec.contracts}
    _unique([u.id for u in spec.users], file, "users")
    _unique([c.id for c in spec.contracts], file, "contracts")
    _unique([s.id for s in spec.saes], file, "saes")
    for i, c in enumerate(spec.contracts):
        if c.user not in users:
            raise ConfigError(
                file, f"contracts[{i}] ({c.id}).user", f"unknown user {c.user!r}", code="CFG-REF"
            )
        if c.valid_from and c.valid_until and c.valid_until < c.valid_from:
            raise ConfigError(
                file,
                f"contracts[{i}] ({c.id}).valid_until",
                "expected a date on or after valid_from",
            )
    for i, sae in enumerate(spec.saes):
        key = f"saes[{i}] ({sae.id})"
        if sae.node not in nodes or "ukms" not in nodes[sae.node].roles:
            raise ConfigError(
                file,
                f"{key}.node",
                f"expected the id of a ukms node, got {sae.node}",
                code="CFG-REF",
            )
        if sae.user not in users:
            raise ConfigError(file, f"{key}.user", f"unknown user {sae.user!r}", code="CFG-REF")
        contract = contracts.get(sae.contract)
        if contract is None or contract.user != sae.user:
            raise ConfigError(
                file,
                f"{key}.contract",
                f"expected a contract of user {sae.user!r}, got {sae.contract!r}",
                code="CFG-REF",
            )


def _check_routes(spec: TopologyFile, file: str) -> None:
    """Every two SAEs of one user reach each other: user node -> access node -> carrier
    nodes -> access node -> user node, as the KMS routes a key request. Linear in the
    number of SAEs (SAEs are grouped by user, access nodes looked up once per node)."""
    nodes = {n.id: n for n in spec.nodes}
    area = _carrier_areas(spec, nodes)
    by_user: dict[str, list[Sae]] = {}
    for sae in sorted(spec.saes, key=lambda s: s.id):
        by_user.setdefault(sae.user, []).append(sae)
    access: dict[int, int] = {}
    for saes in by_user.values():
        for i, a in enumerate(saes):
            for b in saes[i + 1 :]:
                if a.node == b.node:
                    continue
                ends = []
                for sae in (a, b):
                    if sae.node not in access:
                        access[sae.node] = _access_node(spec, nodes, sae, file)
                    ends.append(access[sae.node])
                if area[ends[0]] != area[ends[1]]:
                    raise ConfigError(
                        file,
                        f"saes {a.id} and {b.id}",
                        f"no path between their access nodes {ends[0]} and {ends[1]} through "
                        "carrier (ckms) nodes: their key requests could never be served",
                        code="CFG-ROUTE",
                    )


def _access_node(spec: TopologyFile, nodes: dict[int, Node], sae: Sae, file: str) -> int:
    """The access node an SAE's user node hangs off (the first linked one, as the KMS)."""
    for link in spec.links:
        if sae.node in (link.a, link.b):
            peer = link.b if link.a == sae.node else link.a
            if "akms" in nodes[peer].roles:
                return peer
    raise ConfigError(
        file,
        f"saes ({sae.id}).node",
        f"user node {sae.node} has no link to an access node (akms+ckms)",
        code="CFG-ROUTE",
    )


def _carrier_areas(spec: TopologyFile, nodes: dict[int, Node]) -> dict[int, int]:
    """For every CKMS node, the smallest node id joined to it by links between CKMS nodes."""
    area = {n: n for n, node in nodes.items() if "ckms" in node.roles}

    def root(n: int) -> int:
        while area[n] != n:
            n = area[n]
        return n

    for link in spec.links:
        if link.a in area and link.b in area:
            low, high = sorted((root(link.a), root(link.b)))
            area[high] = low
    return {n: root(n) for n in area}
