"""QKDN-MIB's instances over one reading of a node: GET and GETNEXT without SNMP.

Sans-IO: a :class:`NodeReading` (what :mod:`appliance.mgmt.nodestate` read from the node a
moment ago) becomes a sorted table of ``OID -> (syntax, value)``; :mod:`appliance.mgmt.agent`
takes one reading per PDU, so every GET answers the node's current state. The reading
holds states, rates and counts only: never a key or a key ID.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from appliance.mgmt import mib
from appliance.snmp.smi import encode_index

Oid = tuple[int, ...]
Value = tuple[str, int | bytes]
U32 = 2**32 - 1
U64 = 2**64 - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkReading:
    """One QKD link at this node's end."""

    peer: int
    """The node at the other end (the table's index)."""
    name: str
    state: str
    """``up``, ``down``, ``abort`` or ``unknown`` (the module does not answer)."""
    skr: int = 0
    """bit/s."""
    qber_ppm: int = 0
    level: int = 0
    """Keys in the module's buffer."""
    capacity: int = 0
    key_size: int = 0
    produced: int = 0
    consumed: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeReading:
    """A node's state at one moment, as QKDN-MIB shows it."""

    id: int
    name: str
    role: str
    """``ukms``, ``akms``, ``ckms`` or ``akmsCkms`` (QKDN-MIB's labels)."""
    software: str
    slot: str = "none"
    rollback: str = ""
    """Set while the node runs the slot an image rollback fell back to
    (:mod:`appliance.mgmt.image`)."""
    uptime: int = 0
    links: tuple[LinkReading, ...] = ()
    requests: int = 0
    relays: int = 0
    integrity: int = 0
    tkey_p50_us: int = 0
    tkey_p99_us: int = 0
    tkey_requests: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    rng_health: str = "healthy"
    rng_bytes: int = 0
    rng_requests: int = 0
    rng_reseeds: int = 0
    card: str = "notUsed"
    """``present``, ``absent`` or ``notUsed``."""
    card_locked: bool = False
    card_sources: int = 0
    keystore: str = "none"
    """``pkcs11``, ``file`` or ``none``."""
    keystore_open: bool = False


def _enum(name: str, label: str) -> Value:
    return ("INTEGER", mib.load()[name].enums[label])


def _scalars(r: NodeReading) -> Iterator[tuple[str, Value]]:
    yield "qkdnNodeId", ("Unsigned32", r.id)
    yield "qkdnNodeName", ("OCTET STRING", r.name.encode()[:64])
    yield "qkdnNodeRole", _enum("qkdnNodeRole", r.role)
    yield "qkdnNodeSoftware", ("OCTET STRING", r.software.encode()[:64])
    yield "qkdnNodeImageSlot", _enum("qkdnNodeImageSlot", r.slot)
    yield "qkdnNodeUptime", ("Unsigned32", min(r.uptime, U32))
    yield "qkdnKmsRequests", ("Counter64", min(r.requests, U64))
    yield "qkdnKmsRelays", ("Counter64", min(r.relays, U64))
    yield "qkdnKmsIntegrityAlarms", ("Counter64", min(r.integrity, U64))
    yield "qkdnKmsTkeyP50", ("Gauge32", min(r.tkey_p50_us, U32))
    yield "qkdnKmsTkeyP99", ("Gauge32", min(r.tkey_p99_us, U32))
    yield "qkdnKmsTkeyRequests", ("Counter64", min(r.tkey_requests, U64))
    yield "qkdnRngHealth", _enum("qkdnRngHealth", r.rng_health)
    yield "qkdnRngBytes", ("Counter64", min(r.rng_bytes, U64))
    yield "qkdnRngRequests", ("Counter64", min(r.rng_requests, U64))
    yield "qkdnRngReseeds", ("Counter64", min(r.rng_reseeds, U64))
    yield "qkdnCardPresent", _enum("qkdnCardPresent", r.card)
    yield "qkdnCardLocked", _enum("qkdnCardLocked", "true" if r.card_locked else "false")
    yield "qkdnCardSources", ("Unsigned32", r.card_sources)
    yield "qkdnKeystoreKind", _enum("qkdnKeystoreKind", r.keystore)
    yield "qkdnKeystoreState", _enum("qkdnKeystoreState", "open" if r.keystore_open else "closed")


def _link_columns(link: LinkReading) -> Iterator[tuple[str, Value]]:
    yield "qkdnLinkName", ("OCTET STRING", link.name.encode()[:32])
    yield "qkdnLinkState", _enum("qkdnLinkState", link.state)
    yield "qkdnLinkSkr", ("Gauge32", min(link.skr, U32))
    yield "qkdnLinkQber", ("Gauge32", min(link.qber_ppm, 500_000))
    yield "qkdnLinkKeyLevel", ("Gauge32", min(link.level, U32))
    yield "qkdnLinkKeyCapacity", ("Gauge32", min(link.capacity, U32))
    yield "qkdnLinkKeySize", ("Unsigned32", min(link.key_size, 65536))
    yield "qkdnLinkKeysProduced", ("Counter64", min(link.produced, U64))
    yield "qkdnLinkKeysConsumed", ("Counter64", min(link.consumed, U64))


def instances(r: NodeReading) -> dict[Oid, Value]:
    """Every instance of QKDN-MIB for this reading."""
    m = mib.load()
    out: dict[Oid, Value] = {(*m[n].oid, 0): v for n, v in _scalars(r)}
    for link in r.links:
        for name, value in _link_columns(link):
            out[(*m[name].oid, link.peer)] = value
    code_kind = [m["qkdnFailureCode"]]
    for code, count in r.failures.items():
        index = encode_index(code_kind, [code.encode("ascii", "replace")[:32]])
        out[(*m["qkdnFailureCount"].oid, *index)] = ("Counter64", min(count, U64))
    return out


def instance_count(links: int) -> int:
    """How many instances a node with ``links`` links and no failure rows serves."""
    rows = tuple(LinkReading(peer=i + 1, name="", state="up") for i in range(links))
    return len(instances(NodeReading(id=1, name="", role="ckms", software="", links=rows)))


class Snapshot:
    """One reading's instances, sorted for GETNEXT."""

    def __init__(self, reading: NodeReading) -> None:
        self.values = instances(reading)
        self.oids = sorted(self.values)

    def get(self, oid: Oid) -> Value | None:
        return self.values.get(oid)

    def next(self, oid: Oid) -> tuple[Oid, Value] | None:
        """The first instance after ``oid``, or None past the last."""
        i = bisect.bisect_right(self.oids, oid)
        if i == len(self.oids):
            return None
        found = self.oids[i]
        return found, self.values[found]
