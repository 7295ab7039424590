"""Seed the registry from a topology file's users, SAEs and contracts.

What the topology says today becomes registry entries: each user (its name as the
customer), each UKMS attached to the AKMS it links to, each SAE at its UKMS, each contract
with every ordered pair of two SAEs under it. Limits the topology does not give are
derived: bits per day = keys per day x max key size, a month = 31 days. Entries already in
the registry are kept as they are (an operator's change survives a later seeding). Only
user and access nodes are read from the topology: carrier nodes, links and routes never
enter the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.aaa.registry import MAX_COUNT, Contract, Registry, Sae, User
from appliance.config.topology import Topology

DAYS_PER_MONTH = 31
KEYS_PER_REQUEST = 128
MAX_RATE = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Seeded:
    users: int
    saes: int
    contracts: int
    attachments: int


def attachments(topology: Topology) -> dict[int, int]:
    """UKMS -> the AKMS it links to (its neighbour with the akms role)."""
    out = {}
    for node in topology.nodes_with("ukms"):
        akms = [p.id for _, p in topology.neighbours(node.id) if "akms" in p.roles]
        if akms:
            out[node.id] = akms[0]
    return out


def seed(registry: Registry, topology: Topology) -> Seeded:
    """Add what the registry lacks; return how many entries of each kind were added."""
    have = registry.snapshot()
    spec = topology.spec
    users = [User(id=u.id, customer=u.name[:128]) for u in spec.users if u.id not in have.users]
    for user in users:
        registry.add_user(user)
    links = {u: a for u, a in attachments(topology).items() if have.ukms.get(u) != a}
    for ukms, akms in links.items():
        registry.attach(ukms, akms)
    saes = [Sae(id=s.id, user=s.user, ukms=s.node) for s in spec.saes if s.id not in have.saes]
    for sae in saes:
        registry.add_sae(sae)
    added = 0
    for c in spec.contracts:
        if c.id in have.contracts:
            continue
        members = [s.id for s in spec.saes if s.contract == c.id]
        pairs = tuple((m, s) for m in members for s in members if m != s)
        registry.add_contract(
            Contract(
                id=c.id,
                user=c.user,
                max_key_size=min(c.max_key_size, 8192),
                keys_per_request=KEYS_PER_REQUEST,
                keys_per_day=c.keys_per_day,
                bits_per_day=min(c.keys_per_day * c.max_key_size, MAX_COUNT),
                keys_per_month=min(c.keys_per_day * DAYS_PER_MONTH, MAX_COUNT),
                bits_per_month=min(c.keys_per_day * c.max_key_size * DAYS_PER_MONTH, MAX_COUNT),
                max_rate=MAX_RATE,
                valid_from=c.valid_from,
                valid_until=c.valid_until,
                relay_mode=c.relay_mode or "gcm",
                route_policy=c.route_policy or "balanced",
                pairs=pairs,
            )
        )
        added += 1
    return Seeded(users=len(users), saes=len(saes), contracts=added, attachments=len(links))
