"""SNMP engines that are cheap to start: what a node pays for its agent at start-up.

A pysnmp 7 engine loads a dozen MIB modules (Python files under ``pysnmp/smi/mibs``) when
it is made, and pysnmp's MIB source compiles each from its text every time: its reader
looks for bytecode beside the source in a layout Python has not written since 3.2 (and
would misread today's 16-octet header), so it never finds any. And pysnmp turns each
pass phrase into a key (RFC 3414 A.2.1: a hash over one megabyte of the phrase repeated)
in 16,384 Python calls of 64 octets.

* :func:`new_engine`: an engine whose MIB builder reads those modules from the bytecode
  Python cached beside them (``__pycache__``, checked against the source's size and time
  as the import system checks it; the text is compiled when it is missing or stale).
* :func:`master_key`: the same RFC 3414 master key, in one hash call over the megabyte.
  :func:`add_user` hands pysnmp master keys (``USM_KEY_TYPE_MASTER``), so it localises
  them without hashing the phrases again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
from types import CodeType
from typing import Any

from pysnmp.entity import config, engine
from pysnmp.proto import rfc1902
from pysnmp.proto.rfc3412 import MsgAndPduDispatcher
from pysnmp.smi import builder, instrum

from appliance.snmp.usm import AUTH, PRIV, Credentials

MEGABYTE = 1_048_576
"""RFC 3414 A.2.1: the pass phrase repeated to one megabyte is hashed."""
CACHED = ".py (cached)"
"""The suffix :class:`CachedMibSource` reads for a module found in the cache."""


def master_key(passphrase: str) -> bytes:
    """The SHA-256 master key of a pass phrase (RFC 3414 A.2.1, as RFC 7860 uses it for
    HMAC-SHA-256 and RFC 3826 for AES under it)."""
    raw = bytes(rfc1902.OctetString(passphrase).asOctets())  # as pysnmp takes the phrase
    if not raw:
        raise ValueError("an empty pass phrase has no key")
    return hashlib.sha256((raw * (MEGABYTE // len(raw) + 1))[:MEGABYTE]).digest()


def add_user(eng: engine.SnmpEngine, creds: Credentials, **options: Any) -> None:
    """``creds`` as a USM user of ``eng`` (authPriv, :data:`AUTH`, :data:`PRIV`)."""
    config.add_v3_user(
        eng,
        creds.user,
        AUTH,
        master_key(creds.auth),
        PRIV,
        master_key(creds.priv),
        authKeyType=config.USM_KEY_TYPE_MASTER,
        privKeyType=config.USM_KEY_TYPE_MASTER,
        **options,
    )


class CachedMibSource(builder.DirMibSource):  # type: ignore[misc]
    """pysnmp's directory MIB source, pointing its builder at Python's own bytecode cache
    (the builder runs the file it is given, :func:`runpy.run_path`, which takes bytecode)."""

    def read(self, f: str) -> tuple[CodeType, str]:
        path = os.path.join(super().full_path(), f + ".py")
        code = cached_code(path)
        if code is None:
            got: tuple[CodeType, str] = super().read(f)
            return got
        return code, CACHED

    def full_path(self, f: str = "", sfx: str = "") -> str:
        if sfx == CACHED:
            return importlib.util.cache_from_source(os.path.join(super().full_path(), f + ".py"))
        path: str = super().full_path(f, sfx)
        return path


def cached_code(path: str) -> CodeType | None:
    """The code object in the import system's cache of ``path`` if it is current."""
    try:
        source = os.stat(path)
        with open(importlib.util.cache_from_source(path), "rb") as fh:
            data = fh.read()
    except (OSError, NotImplementedError):
        return None
    magic, flags = data[:4], int.from_bytes(data[4:8], "little")
    mtime, size = int.from_bytes(data[8:12], "little"), int.from_bytes(data[12:16], "little")
    if magic != importlib.util.MAGIC_NUMBER or flags != 0:
        return None  # another Python's, or a hash-checked cache: compile the text
    if mtime != int(source.st_mtime) & 0xFFFFFFFF or size != source.st_size & 0xFFFFFFFF:
        return None
    try:
        code = marshal.loads(data[16:])
    except (EOFError, ValueError, TypeError):
        return None
    return code if isinstance(code, CodeType) else None


def new_engine(engine_id: bytes) -> engine.SnmpEngine:
    """An SNMP engine of ID ``engine_id`` whose MIB modules come from the bytecode cache."""
    mibs = builder.MibBuilder()
    sources = [
        CachedMibSource(s.full_path()) if type(s) is builder.DirMibSource else s
        for s in mibs.get_mib_sources()
    ]
    mibs.set_mib_sources(*sources)
    dispatcher = MsgAndPduDispatcher(instrum.MibInstrumController(mibs))
    return engine.SnmpEngine(snmpEngineID=rfc1902.OctetString(engine_id), msgAndPduDsp=dispatcher)
