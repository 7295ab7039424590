"""A CKMS node's telemetry as typed values, its JSON_IETF document, and gNMI path selection.

The document follows ETSI GS QKD 015 V2.1.1 (module ``etsi-qkd-sdn-node``, namespace
``urn:etsi:qkd:yang:etsi-qkd-node``) and our augment ``qkdn-control`` (key availability
per link, relay counters, node health), in RFC 7951 JSON: top-level and augmented members
are module-qualified, identities are written ``"etsi-qkd-node-types:ACTIVE"``, 64-bit
integers and decimal64 values are strings. The YANG text is in ``yang/``.

IDs. 015 names nodes and links by UUID. A node's UUID carries its topology ID in its last
twelve digits (:func:`node_uuid`, :func:`node_of`); a physical link's UUID is a name-based
UUID of its topology ID; an installed route is a VIRT link whose UUID is a name-based UUID
of its (source, destination) and slot, with ``qkdl_local`` the source, ``qkdl_remote`` the
destination, and ``virt_prev_hop`` / ``virt_next_hop`` the neighbours on the path at this
node. A route has two slots (1:1 protection): the path in use (``qkdl_status`` ACTIVE) and
its pre-installed disjoint backup (PASSIVE); slot 0's UUID is the route's plain one.

No I/O here: the agent (:mod:`agent`) serves what :func:`document` builds.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from appliance.control.errors import PathError

SDN = "etsi-qkd-sdn-node"
TYPES = "etsi-qkd-node-types"
AUGMENT = "qkdn-control"
MODELS = ((SDN, "ETSI ISG QKD", "2022-01-30"), (TYPES, "ETSI ISG QKD", "2022-01-30"))
AUGMENT_MODEL = (AUGMENT, "qkdn appliance", "2026-12-03")
MAX_PATH_ELEMS = 12
MAX_NAME = 64
MAX_KEYS = 4
SLOTS = (0, 1)
"""A route's two slots: its path in use and its backup (1:1 protection)."""
_NODE_PREFIX = "00000000-0000-4000-8000-"
_UUID_NS = uuid.UUID("6b0f1c52-3a44-5d0e-9c1a-0a5d2c1e7f00")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")


class LinkStatus(StrEnum):
    """015 ``link-status-types``."""

    ACTIVE = "ACTIVE"
    PASSIVE = "PASSIVE"
    PENDING = "PENDING"
    OFF = "OFF"


class Health(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"


@dataclass(frozen=True, slots=True, kw_only=True)
class PhysLink:
    """One physical QKD link at this node."""

    link: str
    """The topology's link ID."""
    peer: int
    status: LinkStatus
    skr: int
    """Secret key rate, bit/s."""
    eskr: int
    """Effective secret key rate after relay consumption, bit/s."""
    qber: float
    available_bits: int
    """Key bits stored for this link (key availability)."""
    rate_bps: int
    """Rate of change of ``available_bits``, bit/s."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """A path the controller installed through this node: a 015 VIRT link."""

    src: int
    dst: int
    prev_hop: int | None
    next_hop: int | None
    slot: int = 0
    """0 or 1: a route's path in use and its backup sit in the two slots, in either."""
    active: bool = True
    """In use (ACTIVE), or the standby backup (PASSIVE)."""
    explicit: tuple[int, ...] = ()
    """At the head end only: the whole path, source to destination (our augment's
    ``explicit_route``), which the head end's CKMS sends relays along."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeTelemetry:
    node: int
    version: str = "qkdn"
    links: tuple[PhysLink, ...] = ()
    routes: tuple[Route, ...] = ()
    relayed: int = 0
    batches: int = 0
    uptime_s: int = 0
    modules_down: int = 0
    health: Health = Health.OK


def node_uuid(node: int) -> str:
    """The 015 UUID of topology node ``node`` (0..999999999999)."""
    return f"{_NODE_PREFIX}{node:012d}"


def node_of(value: str) -> int:
    """The topology node ID a node UUID stands for (PathError if it is not one of ours)."""
    digits = value[len(_NODE_PREFIX) :]
    if not value.startswith(_NODE_PREFIX) or len(digits) != 12 or not digits.isdigit():
        raise PathError(f"not a qkdn node UUID: {value[:40]!r}", code="CTL-BAD-UUID")
    return int(digits)


def link_uuid(link: str) -> str:
    return str(uuid.uuid5(_UUID_NS, f"link:{link}"))


def route_uuid(src: int, dst: int, slot: int = 0) -> str:
    """The VIRT link UUID of a route's slot (0: the path in use when first installed)."""
    name = f"route:{src}:{dst}" if slot == 0 else f"route:{src}:{dst}:{slot}"
    return str(uuid.uuid5(_UUID_NS, name))


def slot_of(src: int, dst: int, route_id: str) -> int | None:
    """Which slot of route (src, dst) ``route_id`` names, or None."""
    return next((s for s in SLOTS if route_uuid(src, dst, s) == route_id), None)


def document(t: NodeTelemetry) -> dict[str, Any]:
    """The node's JSON_IETF document (RFC 7951), rooted at ``etsi-qkd-sdn-node:qkd_node``."""
    status = "OPERATING" if t.health is Health.OK else "DOWN"
    links = [_phys(t.node, link) for link in t.links] + [_virt(r) for r in t.routes]
    return {
        f"{SDN}:qkd_node": {
            "qkdn_id": node_uuid(t.node),
            "qkdn_status": f"{TYPES}:{status}",
            "qkdn_version": t.version,
            "qkdn_capabilities": {
                "link_stats_support": True,
                "application_stats_support": False,
                "key_relay_mode_enable": True,
            },
            "qkd_links": {"qkd_link": links},
            f"{AUGMENT}:relay_counters": {"relayed": str(t.relayed), "batches": str(t.batches)},
            f"{AUGMENT}:node_health": {
                "status": t.health.value,
                "uptime_s": str(t.uptime_s),
                "modules_down": t.modules_down,
            },
        }
    }


def _phys(node: int, link: PhysLink) -> dict[str, Any]:
    return {
        "qkdl_id": link_uuid(link.link),
        "qkdl_status": f"{TYPES}:{link.status.value}",
        "qkdl_local": {"qkdn_id": node_uuid(node)},
        "qkdl_remote": {"qkdn_id": node_uuid(link.peer)},
        "qkdl_type": f"{TYPES}:PHYS",
        "qkdl_performance": {
            "skr": min(link.skr, 0xFFFFFFFF),
            "eskr": min(link.eskr, 0xFFFFFFFF),
            "phys_perf": [{"perf_type": f"{TYPES}:QBER", "value": f"{link.qber:.3f}"}],
        },
        f"{AUGMENT}:key_store": {
            "available_bits": str(max(link.available_bits, 0)),
            "rate_bps": str(link.rate_bps),
        },
    }


def _virt(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {
        "qkdl_id": route_uuid(route.src, route.dst, route.slot),
        "qkdl_status": f"{TYPES}:{'ACTIVE' if route.active else 'PASSIVE'}",
        "qkdl_local": {"qkdn_id": node_uuid(route.src)},
        "qkdl_remote": {"qkdn_id": node_uuid(route.dst)},
        "qkdl_type": f"{TYPES}:VIRT",
    }
    if route.prev_hop is not None:
        out["virt_prev_hop"] = node_uuid(route.prev_hop)
    if route.next_hop is not None:
        out["virt_next_hop"] = [node_uuid(route.next_hop)]
    if route.explicit:
        out[f"{AUGMENT}:explicit_route"] = [node_uuid(n) for n in route.explicit]
    return out


# -- gNMI paths ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Elem:
    """One element of a gNMI path: a node name (module prefix removed) and list keys."""

    name: str
    keys: tuple[tuple[str, str], ...] = field(default=())


def elems(raw: list[tuple[str, dict[str, str]]]) -> tuple[Elem, ...]:
    """Checked path elements from (name, keys) pairs (PathError if malformed or too big)."""
    if len(raw) > MAX_PATH_ELEMS:
        raise PathError(f"path longer than {MAX_PATH_ELEMS} elements", code="CTL-PATH-BAD")
    out = []
    for name, keys in raw:
        if len(keys) > MAX_KEYS:
            raise PathError(f"more than {MAX_KEYS} keys on one element", code="CTL-PATH-BAD")
        for text in (name, *keys, *keys.values()):
            if len(text) > MAX_NAME or not text.isprintable():
                raise PathError(
                    "path element or key too long or not printable", code="CTL-PATH-BAD"
                )
        if not _NAME.fullmatch(name):
            raise PathError(f"bad path element {name!r}", code="CTL-PATH-BAD")
        out.append(Elem(name.rpartition(":")[2], tuple(sorted(keys.items()))))
    return tuple(out)


def select(doc: dict[str, Any], path: tuple[Elem, ...]) -> Any:
    """The value at ``path`` in a :func:`document` (the whole document for an empty path).
    A list element without keys selects the whole list, and only as the last element."""
    here: Any = doc
    for i, elem in enumerate(path):
        if not isinstance(here, dict):
            raise _not_found(path, i)
        value = _member(here, elem.name)
        if value is None:
            raise _not_found(path, i)
        if isinstance(value, list):
            if not elem.keys:
                if i != len(path) - 1:
                    raise PathError("a list without keys may only end a path", code="CTL-PATH-BAD")
                return value
            value = _entry(value, elem.keys)
            if value is None:
                raise _not_found(path, i)
        elif elem.keys:
            raise PathError(f"{elem.name} is not a list: no keys", code="CTL-PATH-BAD")
        here = value
    return here


def _member(obj: dict[str, Any], name: str) -> Any:
    for qualified in (name, f"{SDN}:{name}", f"{AUGMENT}:{name}"):
        if qualified in obj:
            return obj[qualified]
    return None


def _entry(entries: list[Any], keys: tuple[tuple[str, str], ...]) -> Any:
    for entry in entries:
        if isinstance(entry, dict) and all(_key_matches(entry.get(k), v) for k, v in keys):
            return entry
    return None


def _key_matches(value: Any, want: str) -> bool:
    """A key's value against a path key; identities match with or without their module."""
    if not isinstance(value, str):
        return value is not None and str(value) == want
    return value == want or value.rpartition(":")[2] == want.rpartition(":")[2]


def _not_found(path: tuple[Elem, ...], i: int) -> PathError:
    shown = "/".join(e.name for e in path[: i + 1])
    return PathError(f"no such node: /{shown}", code="CTL-PATH-NOT-FOUND")


def route_value(route: Route) -> bytes:
    """The JSON_IETF value of a Set that installs ``route`` at a node."""
    doc = document(NodeTelemetry(node=route.src, routes=(route,)))
    (entry,) = doc[f"{SDN}:qkd_node"]["qkd_links"]["qkd_link"]
    return json.dumps(entry, separators=(",", ":")).encode()
