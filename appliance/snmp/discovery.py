"""Whether an SNMPv3 agent answers: engine discovery (RFC 3414 4), without keys.

A requester that knows no engine sends an unauthenticated, reportable GetRequest with an
empty msgAuthoritativeEngineID; an agent whose USM is set up answers with a Report that
carries its snmpEngineID (and counts usmStatsUnknownEngineIDs). ``qkdn net up`` takes that
answer as an agent's readiness: its socket is served by its engine, under its own ID.

Sans-IO :func:`request` and :func:`engine_of`; :func:`answering` is the UDP adapter.
"""

from __future__ import annotations

import secrets
import socket
import time

from appliance.snmp.fastpath import integer, tlv
from appliance.snmp.usm import host_port

REPORT = 0xA8
MAX_REPLY = 65535


def _int(n: int) -> bytes:
    return tlv(0x02, integer(n))


def request(msg_id: int) -> bytes:
    """The discovery message: version 3, flags reportable only, USM with empty fields."""
    header = tlv(0x30, _int(msg_id) + _int(65507) + tlv(0x04, b"\x04") + _int(3))
    usm = tlv(0x30, tlv(0x04, b"") + _int(0) + _int(0) + 3 * tlv(0x04, b""))
    pdu = tlv(0xA0, _int(msg_id) + _int(0) + _int(0) + tlv(0x30, b""))
    scoped = tlv(0x30, tlv(0x04, b"") + tlv(0x04, b"") + pdu)
    return tlv(0x30, _int(3) + header + tlv(0x04, usm) + scoped)


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the BER element at ``pos`` (definite lengths)."""
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        n = first & 0x7F
        if not 0 < n <= 4:
            raise ValueError("unsupported BER length")
        size = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    else:
        size = first
    if pos + size > len(data):
        raise ValueError("truncated BER element")
    return tag, pos, pos + size


def engine_of(data: bytes, msg_id: int) -> bytes | None:
    """The msgAuthoritativeEngineID of a plain Report answering ``msg_id``, else None."""
    try:
        tag, start, _end = _tlv(data, 0)
        _t, _s, pos = _tlv(data, start)  # msgVersion
        _t, hstart, hend = _tlv(data, pos)  # msgGlobalData
        _t, istart, iend = _tlv(data, hstart)
        if tag != 0x30 or int.from_bytes(data[istart:iend], "big") != msg_id:
            return None
        _t, sstart, send = _tlv(data, hend)  # msgSecurityParameters
        _t, ustart, _uend = _tlv(data, sstart)
        _t, estart, eend = _tlv(data, ustart)
        engine = data[estart:eend]
        _t, cstart, _cend = _tlv(data, send)  # a plain scoped PDU
        _t, _s, pos = _tlv(data, cstart)
        _t, _s, pos = _tlv(data, pos)
        pdu, _s, _e = _tlv(data, pos)
    except (IndexError, ValueError):
        return None
    return engine if pdu == REPORT and engine else None


def answering(agents: dict[str, str], timeout_s: float) -> dict[str, bytes]:
    """The agents (name: ``host:port``, IPv4) that answer discovery within ``timeout_s``,
    probed at once from one socket, with the engine ID each answered with."""
    ids = {name: secrets.randbelow(2**31 - 1) for name in agents}
    by_id = {msg_id: name for name, msg_id in ids.items()}
    got: dict[str, bytes] = {}
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name, address in agents.items():
            s.sendto(request(ids[name]), host_port(address))
        while len(got) < len(agents) and (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data = s.recv(MAX_REPLY)
            except TimeoutError:
                break
            except ConnectionRefusedError:  # an ICMP error of an earlier probe
                continue
            for msg_id, name in by_id.items():
                engine = engine_of(data, msg_id)
                if engine is not None:
                    got[name] = engine
    return got
