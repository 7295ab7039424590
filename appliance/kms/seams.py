"""The seams where the KMS engines meet the services that decide for them.

Three questions the engines ask and do not answer themselves (DESIGN: seams, not forks):

* **Which path** does a CN key take from one access node to the other? A
  :class:`PathProvider`: :class:`TopologyPaths` (shortest by length from the topology
  file), or under ``qkdn net up --controller`` the QKDN Controller's installed routes
  (:class:`appliance.control.paths.ControllerPaths`).
* **May** this user have these keys, and where is the slave's UKMS? A
  :class:`RequestValidator`: :class:`ContractValidator` (the topology's SAEs and
  contracts), or where the network runs the AAA device (the default when the topology has
  one) :class:`appliance.aaa.client.AaaValidator` (its contracts, quotas and accounting).
* **Which session** do keys belong to? A :class:`SessionRegistry`; today
  :class:`TopologySessions`: one ETSI 014 session per registered SAE pair. ETSI 004 key
  streams live in the same key store under sessions of their own (``004:KSID``,
  :func:`appliance.kms.storeops.stream_session`), opened only for a pair this registry
  serves (:mod:`appliance.kms.etsi004`).

An implementation may answer at once or return an awaitable; the engines never wait on it
themselves: they emit ``Validate`` / ``FindPath`` actions and take ``Validated`` /
``PathFound`` events (:mod:`appliance.kms.events`). The implementations here do no I/O;
the controller's and the AAA device's ask over the network.
"""

from __future__ import annotations

from collections.abc import Awaitable
from enum import StrEnum
from typing import Protocol

import msgspec

from appliance.config.topology import RoutePolicy, Sae, Topology
from appliance.kms.errors import KmsError
from appliance.kms.relay import Mode
from appliance.kms.routing import shortest_path

MAX_SIZE_BITS = 8192
"""The largest key size any contract may allow (the relay's KSA batch bound)."""


class Denial(StrEnum):
    """Why a request is refused, in the terms the SAE will be told (ETSI 014 status)."""

    LIMITS = "limits"
    """Outside the contract's size or count limits (400)."""
    UNAUTHORISED = "unauthorised"
    """Unknown pair, suspended user, outside the validity window (401)."""
    QUOTA = "quota"
    """Rate or quota exceeded (503)."""


DENIAL_CODES = {
    Denial.UNAUTHORISED: "KMS-DENIED",
    Denial.LIMITS: "KMS-DENIED-LIMITS",
    Denial.QUOTA: "KMS-DENIED-QUOTA",
}
"""The error code of each denial, so that the reason survives the UKMS <- AKMS answer."""


class Denied(KmsError):
    """The request validator refused the request. Its message is for the SAE: it names the
    contract's rule, never a node, link or route."""

    code = "KMS-DENIED"

    def __init__(self, message: str, *, why: Denial = Denial.UNAUTHORISED) -> None:
        super().__init__(message, code=DENIAL_CODES[why])
        self.why = why

    @classmethod
    def from_code(cls, code: str, message: str) -> Denied | None:
        """The denial a peer's error answer stands for (None: not a denial)."""
        for why, known in DENIAL_CODES.items():
            if code == known:
                return cls(message, why=why)
        return None


class ValidationQuery(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A user's request as the requesting AKMS sees it."""

    master: str
    slave: str
    number: int
    size: int
    """Bits per key."""
    ukms: int
    """The node ID of the UKMS that asks (the master SAE must be served there)."""
    req: int = 0
    """The asking AKMS's number for this request (a validator that accounts for requests
    hears how it ended under this number: ``completed(req, ok)``)."""
    refill: bool = False
    """Keys for a UKMS's stock, not an SAE's request: a validator that keeps quota only
    looks the pair up (a refused pair gets no stock) and charges and accounts nothing; the
    requests later served from the stock are validated one by one, as any request."""


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """Allowed (with where the slave is and how its keys cross), or denied with a reason."""

    denied: Denied | None = None
    mode: Mode = Mode.GCM
    """How the keys cross the network: the contract's relay mode, else the network's."""
    ukms_b: int = 0
    """The slave SAE's UKMS."""
    akms_b: int = 0
    """The AKMS that UKMS hangs off: whom the requesting AKMS asks for the keys."""
    route_policy: RoutePolicy = "balanced"
    """The contract's routing policy class, which its relay's path request carries."""


class RequestValidator(Protocol):
    def validate(self, query: ValidationQuery) -> Verdict | Awaitable[Verdict]: ...


class PathProvider(Protocol):
    def find(
        self, src: int, dst: int, route_policy: RoutePolicy = "balanced"
    ) -> tuple[int, ...] | Awaitable[tuple[int, ...]]:
        """Node IDs from CKMS ``src`` to CKMS ``dst`` for a contract of the
        ``route_policy`` class (NoRoute if there is none)."""
        ...


class SessionRegistry(Protocol):
    def session_014(self, master: str, slave: str) -> str | None:
        """The ETSI 014 session of a pair whose *master* is served here, or None."""
        ...

    def session_014_slave(self, slave: str, master: str) -> str | None:
        """The ETSI 014 session of a pair whose *slave* is served here, or None."""
        ...

    def master_pairs(self) -> list[tuple[str, str]]:
        """Every (master, slave) pair whose master is served here and whose keys cross the
        network (the stocked pairs)."""
        ...

    def pair_of(self, session: str) -> tuple[str, str] | None:
        """The (master, slave) of an ETSI 014 session whose master is served here, or None
        (so that a caller keeps session IDs only, not a pair object each)."""
        ...


def session_id(master: str, slave: str) -> str:
    """The ETSI 014 session of an SAE pair: the store's key for the pair's keys."""
    return f"014:{master}:{slave}"


# -- today's implementations -------------------------------------------------------------
class TopologyPaths:
    """Shortest paths by length over the topology's carrier nodes (cached: the topology is
    fixed while a node runs)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._cache: dict[tuple[int, int], tuple[int, ...]] = {}

    def find(self, src: int, dst: int, route_policy: RoutePolicy = "balanced") -> tuple[int, ...]:
        """The topology's path (one for every class: the policy needs the controller)."""
        path = self._cache.get((src, dst))
        if path is None:
            path = self._cache[(src, dst)] = tuple(shortest_path(self.topology, src, dst))
        return path


class ContractValidator:
    """The topology's SAE directory and contracts: both SAEs registered to one user, the
    master served by the asking UKMS, the request within the network's limits."""

    def __init__(self, topology: Topology, *, mode: Mode, max_keys: int) -> None:
        self.topology, self.mode, self.max_keys = topology, mode, max_keys
        self.saes = {s.id: s for s in topology.spec.saes}
        self.contracts = {c.id: c for c in topology.spec.contracts}
        self._akms: dict[int, int] = {}

    def validate(self, query: ValidationQuery) -> Verdict:
        m, s = self.saes.get(query.master), self.saes.get(query.slave)
        if m is None or s is None or m.node != query.ukms or m.user != s.user or m.id == s.id:
            return Verdict(denied=Denied("no contract covers this SAE pair from this user node"))
        if not (0 < query.number <= self.max_keys and query.size % 8 == 0):
            return _limits("request outside the contract's limits")
        if not 0 < query.size <= MAX_SIZE_BITS:
            return _limits("request outside the contract's limits")
        contract = self.contracts.get(m.contract)
        return Verdict(
            mode=self.mode_of(m),
            ukms_b=s.node,
            akms_b=self.akms_of(s.node),
            route_policy=(contract.route_policy if contract else None) or "balanced",
        )

    def mode_of(self, sae: Sae) -> Mode:
        contract = self.contracts.get(sae.contract)
        if contract is not None and contract.relay_mode is not None:
            return Mode[contract.relay_mode.upper()]
        return self.mode

    def akms_of(self, ukms: int) -> int:
        """The AKMS a UKMS hangs off (its neighbour with the akms role)."""
        found = self._akms.get(ukms)
        if found is None:
            nbs = self.topology.neighbours(ukms)
            found = self._akms[ukms] = next(p.id for _, p in nbs if "akms" in p.roles)
        return found


def _limits(message: str) -> Verdict:
    return Verdict(denied=Denied(message, why=Denial.LIMITS))


def _access_nodes(topology: Topology) -> dict[int, int]:
    """The access node (AKMS) each UKMS hangs off."""
    return {
        ukms.id: next((p.id for _, p in topology.neighbours(ukms.id) if "akms" in p.roles), 0)
        for ukms in topology.nodes_with("ukms")
    }


class TopologySessions:
    """One ETSI 014 session per SAE pair of a user, as the topology registers them."""

    def __init__(self, topology: Topology, node: int) -> None:
        self.node = node
        self.saes = {s.id: s for s in topology.spec.saes}
        by_user: dict[str, list[Sae]] = {}
        for sae in topology.spec.saes:
            by_user.setdefault(sae.user, []).append(sae)
        access = _access_nodes(topology)
        self._pairs = [  # only pairs whose keys cross the network: a stock for any other
            (m.id, s.id)  # could never fill, and its refills would retry for ever
            for saes in by_user.values()
            for m in saes
            if m.node == node
            for s in saes
            if s.id != m.id and access.get(s.node) != access.get(m.node)
        ]

    def session_014(self, master: str, slave: str) -> str | None:
        m, s = self.saes.get(master), self.saes.get(slave)
        if m is None or s is None or m.node != self.node or m.user != s.user or m.id == s.id:
            return None
        return session_id(master, slave)

    def session_014_slave(self, slave: str, master: str) -> str | None:
        m, s = self.saes.get(master), self.saes.get(slave)
        if m is None or s is None or s.node != self.node or m.user != s.user or m.id == s.id:
            return None
        return session_id(master, slave)

    def master_pairs(self) -> list[tuple[str, str]]:
        """The pairs whose master is served here and whose slave sits behind another
        access node (the pairs keys can be made for ahead of demand)."""
        return list(self._pairs)

    def pair_of(self, session: str) -> tuple[str, str] | None:
        kind, _, rest = session.partition(":")
        master, _, slave = rest.partition(":")
        if kind != "014" or self.session_014(master, slave) != session:
            return None
        return master, slave
