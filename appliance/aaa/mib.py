"""QKDN-AAA-MIB read as data: the MIB text in ``mib/`` is the single source of truth.

The agent and the client take every OID, syntax, access and enumeration from the module
text, parsed by the project's shared SMIv2 reader (:mod:`appliance.snmp.smi`, which also
holds the RFC 2578 and RFC 2580 module texts it imports). net-snmp loads it with both
folders on its path (``snmptranslate -M +:appliance/snmp/mibs:appliance/aaa/mib -m
QKDN-AAA-MIB -Tp``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from appliance.snmp.smi import (
    ENTERPRISE,
    ENTERPRISE_ARC,
    MAX_STRING,
    MibObject,
    decode_index,
    encode_index,
    load_module,
    module_text,
)

__all__ = [
    "AAA_ARC",
    "ENTERPRISE",
    "ENTERPRISE_ARC",
    "MAX_STRING",
    "MODULE",
    "MibObject",
    "decode_index",
    "encode_index",
    "load",
    "oid",
]

AAA_ARC = (*ENTERPRISE_ARC, 2)
"""QKDN-AAA-MIB; ``ENTERPRISE_ARC + (1,)`` is QKDN-MIB (:mod:`appliance.mgmt.mib`)."""
MODULE = "QKDN-AAA-MIB"


@cache
def load(path: Path | None = None) -> dict[str, MibObject]:
    """Every named node of QKDN-AAA-MIB, by name (``enterprises`` from SNMPv2-SMI)."""
    if path is not None:
        return load_module(path.read_text(encoding="ascii"))
    return load_module(module_text(MODULE, resources.files("appliance.aaa") / "mib"))


def oid(name: str) -> tuple[int, ...]:
    return load()[name].oid
