"""SMIv2 module texts read as data: the shared reader of the project's MIBs.

The agents and clients take every OID, syntax, access and enumeration from the module
text (``mibs/QKDN-MIB.txt`` here, ``appliance/aaa/mib/QKDN-AAA-MIB.txt``), parsed by this
small reader for the SMIv2 constructs those modules use; it is not a general MIB
compiler (pysmi would need SNMPv2-SMI from the web). ``mibs/SNMPv2-SMI.txt`` and
``mibs/SNMPv2-CONF.txt`` are the RFC 2578 and RFC 2580 module texts: they resolve
``enterprises`` here and let smilint and net-snmp load the modules
(``snmptranslate -M +:appliance/snmp/mibs -m QKDN-MIB -Tp``).

Index encoding follows RFC 2578 section 7.7: an Unsigned32 is one sub-identifier; an
OCTET STRING of variable size is its length followed by one sub-identifier per octet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

ENTERPRISE = 32473
"""RFC 5612's enterprise number for documentation and examples: the project's arc.
Change it here (and in the modules' MODULE-IDENTITY) once an operator registers its own."""
ENTERPRISE_ARC = (1, 3, 6, 1, 4, 1, ENTERPRISE)
MIB_DIR = Path(__file__).parent / "mibs"
"""SNMPv2-SMI, SNMPv2-CONF and QKDN-MIB, for net-snmp's and smilint's search paths."""
MAX_STRING = 128

_COMMENT = re.compile(r"--.*?(?:--|$)", re.MULTILINE)
_STRING = re.compile(r'"[^"]*"', re.DOTALL)
_OID_ASSIGN = re.compile(
    r"(?<![\w-])([a-z][\w-]*)\s+OBJECT IDENTIFIER\s*::=\s*\{\s*([a-z][\w-]*)\s+(\d+)\s*\}"
)
_MACRO = re.compile(
    r"(?<![\w-])([a-z][\w-]*)\s+(OBJECT-TYPE|MODULE-IDENTITY|NOTIFICATION-TYPE|OBJECT-GROUP|"
    r"NOTIFICATION-GROUP|MODULE-COMPLIANCE)\b(.*?)::=\s*\{\s*([a-z][\w-]*)((?:\s+\d+)+)\s*\}",
    re.DOTALL,
)
_SYNTAX = re.compile(r"\bSYNTAX\s+(.*?)\s+(?:UNITS|MAX-ACCESS)\b", re.DOTALL)
_ACCESS = re.compile(r"\bMAX-ACCESS\s+([\w-]+)")
_INDEX = re.compile(r"\bINDEX\s*\{([^}]*)\}")
_ENUM = re.compile(r"([a-z][\w-]*)\s*\(\s*(\d+)\s*\)")
_RANGE = re.compile(r"\(\s*(?:SIZE\s*\()?\s*([\d\s.|]+?)\s*\)?\s*\)")


@dataclass(frozen=True, slots=True)
class MibObject:
    """One named node of the module."""

    name: str
    oid: tuple[int, ...]
    macro: str
    """OBJECT-TYPE, NOTIFICATION-TYPE, OBJECT IDENTIFIER, ..."""
    syntax: str = ""
    """Base syntax: Unsigned32, Counter64, OCTET STRING, INTEGER, SEQUENCE OF, or a row type."""
    access: str = ""
    enums: dict[str, int] = field(default_factory=dict)
    index: tuple[str, ...] = ()
    lo: int = 0
    hi: int = 0
    """Value range (INTEGER, Unsigned32) or size range (OCTET STRING), inclusive."""

    def __hash__(self) -> int:
        return hash(self.oid)


def _strip(text: str) -> str:
    text = _STRING.sub(lambda m: '"' + " " * (len(m.group(0)) - 2) + '"', text)
    return _COMMENT.sub("", text)


def _parents(text: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, parent, sub in _OID_ASSIGN.findall(text):
        out[name] = (parent, (int(sub),))
    for m in _MACRO.finditer(text):
        out[m.group(1)] = (m.group(4), tuple(int(x) for x in m.group(5).split()))
    return out


def _resolve(name: str, parents: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    if name == "iso":
        return (1,)
    parent, subs = parents[name]
    return _resolve(parent, parents) + subs


def _range(syntax: str) -> tuple[int, int]:
    m = _RANGE.search(syntax)
    if syntax.startswith("Counter64"):
        return 0, 2**64 - 1
    if m is None:
        return (0, MAX_STRING) if syntax.startswith("OCTET") else (0, 2**32 - 1)
    bounds = [int(x) for x in re.findall(r"\d+", m.group(1))]
    return min(bounds), max(bounds)


def _base(syntax: str) -> str:
    for base in (
        "SEQUENCE OF",
        "OCTET STRING",
        "INTEGER",
        "Unsigned32",
        "Gauge32",
        "Counter64",
    ):
        if syntax.startswith(base):
            return base
    return syntax.split()[0]


def load_module(text: str) -> dict[str, MibObject]:
    """Every named node of an SMIv2 module's text, by name (``enterprises`` from
    SNMPv2-SMI)."""
    smi = _strip(_smi_text())
    text = _strip(text)
    parents = _parents(smi)
    parents.update(_parents(text))
    out = {}
    for name, _parent, _sub in _OID_ASSIGN.findall(text):
        out[name] = MibObject(name, _resolve(name, parents), "OBJECT IDENTIFIER")
    for m in _MACRO.finditer(text):
        out[m.group(1)] = _object(m, parents)
    return out


def module_text(name: str, folder: Traversable | None = None) -> str:
    """The text of module ``name`` (``mibs/NAME.txt`` unless another folder is named)."""
    where = folder or resources.files("appliance.snmp") / "mibs"
    return (where / f"{name}.txt").read_text(encoding="ascii")


def _smi_text() -> str:
    return module_text("SNMPv2-SMI")


def _object(m: re.Match[str], parents: dict[str, tuple[str, tuple[int, ...]]]) -> MibObject:
    name, macro, body = m.group(1), m.group(2), m.group(3)
    syntax = access = ""
    enums: dict[str, int] = {}
    index: tuple[str, ...] = ()
    lo = hi = 0
    if macro == "OBJECT-TYPE":
        syntax = " ".join(_SYNTAX.search(body).group(1).split())  # type: ignore[union-attr]
        access = _ACCESS.search(body).group(1)  # type: ignore[union-attr]
        if syntax.startswith("INTEGER") and "{" in syntax:
            enums = {k: int(v) for k, v in _ENUM.findall(syntax)}
            lo, hi = min(enums.values()), max(enums.values())
        else:
            lo, hi = _range(syntax)
        found = _INDEX.search(body)
        if found:
            index = tuple(x.strip() for x in found.group(1).split(","))
        syntax = _base(syntax)
    return MibObject(name, _resolve(name, parents), macro, syntax, access, enums, index, lo, hi)


# -- index encoding (RFC 2578 section 7.7) ---------------------------------------------
def encode_index(kinds: list[MibObject], values: list[int | bytes]) -> tuple[int, ...]:
    out: list[int] = []
    for _kind, value in zip(kinds, values, strict=True):
        if isinstance(value, bytes):
            out += [len(value), *value]
        else:
            out.append(value)
    return tuple(out)


def decode_index(kinds: list[MibObject], suffix: tuple[int, ...]) -> list[int | bytes] | None:
    """The index values in ``suffix``, or None if it does not encode a valid index
    (wrong length, values out of the index objects' ranges)."""
    values: list[int | bytes] = []
    pos = 0
    for kind in kinds:
        if pos >= len(suffix):
            return None
        if kind.syntax == "OCTET STRING":
            n = suffix[pos]
            chunk = suffix[pos + 1 : pos + 1 + n]
            if not kind.lo <= n <= kind.hi or len(chunk) != n or any(c > 255 for c in chunk):
                return None
            values.append(bytes(chunk))
            pos += 1 + n
        else:
            if not kind.lo <= suffix[pos] <= kind.hi:
                return None
            values.append(suffix[pos])
            pos += 1
    return values if pos == len(suffix) else None
