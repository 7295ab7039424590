"""What an engine knows of its node and its network: identity, links, policy.

Built from the topology alone (:meth:`EngineConfig.of`), so the node adapter and the
simulation make engines the same way. No paths, certificates or device URLs: those are
the adapter's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.config.topology import Topology
from appliance.kms.errors import ProtocolError
from appliance.kms.linkend import Role, role_of
from appliance.kms.relay import Mode

SERVICES = ("ukms", "akms", "ckms")


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How keys cross the network. ``mode`` is the network's relay mode; a contract's
    ``relay_mode`` in the topology overrides it for that user's keys."""

    mode: Mode = Mode.GCM
    key_size: int = 256
    max_key_per_request: int = 1024
    """Keys one enc_keys may ask for (ETSI 014's max_key_per_request); one CN key carries
    them all (an OTP CN key for 1024 keys of 256 bits is 32 KiB)."""
    stock_batch: int = 128
    """Keys per request when a UKMS refills a stock (the stock itself when smaller):
    every refill asks for a whole batch. Smaller batches wait less for the slowest link's
    keys; larger ones cost fewer relays per key."""
    stock: int = 0
    """KSA keys each UKMS keeps ready per SAE pair it serves as master (0: none): its
    refills start once half a batch or more is missing and go on, a whole batch each,
    until it holds at least this many again (so a pair drawn on lightly is not refilled
    for each few keys)."""
    stock_parallel: int = 2
    """Stock refill requests a UKMS keeps in flight at once (pairs take turns)."""
    patience: float = 10.0
    """Seconds a hop may wait for link keys still being distilled; a request waits up to
    twice this for its CN key (with the default, 20 s: a clean 503 before an SAE's usual
    30 s client timeout). Raise it for links running at their physical rates."""

    terms_from_akms: bool = False
    """A UKMS asks its AKMS for each pair's contract terms (ETSI 014 Status and request
    limits), as it does under the AAA device; else the network's limits apply."""

    @property
    def cn_timeout(self) -> float:
        return 2 * self.patience


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSpec:
    """One QKD link as seen from this node."""

    link: str
    peer: int
    role: Role
    peer_service: str
    """The service at the peer that owns the other end (grants are asked there)."""


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """One engine's view: its node, the links it owns, the network's node names."""

    node: int
    name: str
    service: str
    policy: Policy
    links: tuple[LinkSpec, ...]
    names: dict[int, str] = field(default_factory=dict)
    """Every node's name by ID (channel contexts, PSK peers, messages)."""
    roles: dict[int, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, topology: Topology, node: int, service: str, policy: Policy) -> EngineConfig:
        """The engine of ``service`` at ``node``: a UKMS owns its link to its AKMS; an AKMS
        owns the links to its user nodes; a CKMS owns the carrier links."""
        me = topology.node(node)
        if service not in SERVICES or service not in me.roles:
            raise ProtocolError(f"node {me.name} runs no {service}")
        links = []
        for link, peer in topology.neighbours(node):
            if service == "ckms" and "ukms" in peer.roles:
                continue
            if service == "akms" and "ukms" not in peer.roles:
                continue
            if service == "ukms":
                peer_service = "akms"
            elif service == "akms":
                peer_service = "ukms"
            else:
                peer_service = "ckms"
            role = role_of(node, link.a, link.b)
            links.append(LinkSpec(link=link.id, peer=peer.id, role=role, peer_service=peer_service))
        return cls(
            node=node,
            name=me.name,
            service=service,
            policy=policy,
            links=tuple(links),
            names={n.id: n.name for n in topology.spec.nodes},
            roles={n.id: n.roles for n in topology.spec.nodes},
        )
