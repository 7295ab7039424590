"""QKDN-MIB read as data: ``appliance/snmp/mibs/QKDN-MIB.txt`` is the single source of truth.

Every OID, syntax, access and enumeration the node agent serves and the manager reads
comes from the module text (:mod:`appliance.snmp.smi`).
"""

from __future__ import annotations

from functools import cache

from appliance.snmp.smi import ENTERPRISE_ARC, MibObject, load_module, module_text

MODULE = "QKDN-MIB"
QKDN_ARC = (*ENTERPRISE_ARC, 1)
"""QKDN-MIB's arc: the enterprise arc's first child."""


@cache
def load() -> dict[str, MibObject]:
    """Every named node of QKDN-MIB, by name."""
    return load_module(module_text(MODULE))


def oid(name: str) -> tuple[int, ...]:
    return load()[name].oid


def name_of(oid_: tuple[int, ...]) -> str | None:
    """The name of the MIB node ``oid_`` is (exactly), or None."""
    return _by_oid().get(oid_)


@cache
def _by_oid() -> dict[tuple[int, ...], str]:
    return {o.oid: o.name for o in load().values()}


def enum(name: str, value: int) -> str:
    """The label of ``value`` in an enumerated object (``str(value)`` if unknown)."""
    labels = {v: k for k, v in load()[name].enums.items()}
    return labels.get(value, str(value))
