"""The common SNMPv3 requests, coded without pyasn1: an authPriv GET, GETBULK or SET, its
response.

Every agent of the project answers far more authPriv GETs and GETBULKs (a manager's
polls, an AKMS's quota asks) than anything else, and pysnmp spends most of its time on
one in pyasn1's BER decoder and encoder (about 1.7 ms of CPU per GET here, 5 ms per
GETBULK of a node's 48 instances). This module is the sans-IO
core of the agents' fast path (:mod:`appliance.snmp.responder` is its adapter): it
checks and opens one kind of message, and codes the response, with the USM processing of
RFC 3414 and RFC 3826 done in full:

* :func:`open_request`: an SNMPv3 message (version 3, USM, flags auth + priv) addressed
  to this engine (msgAuthoritativeEngineID), from a known user, inside the time window
  (same boots, time within 150 s), whose HMAC-SHA-256-192 digest is right, whose scoped
  PDU decrypts (AES-128-CFB, IV = boots, time, salt) to a GetRequest-PDU, a
  GetBulkRequest-PDU or a SetRequest-PDU for this engine's default context with at most
  :data:`MAX_BINDS` variable bindings.
* :func:`response`: the Response-PDU in a message of the same msgID, encrypted under a
  fresh salt and authenticated, carrying this engine's boots and time.

Anything else returns None from :func:`open_request` and is left to pysnmp, which answers it
(or refuses, reports and counts it) as before: engine discovery, wrong digests, unknown
users, time-window reports, other PDU types, non-default contexts, malformed BER.

The requester's side (:mod:`appliance.snmp.requester` is its adapter, the AKMS's AAA client
its user), for an authoritative engine whose ID, boots and time are known:

* :func:`seal_request`: an authPriv, reportable GetRequest, GetBulkRequest or SetRequest
  for the engine's default context, encrypted under a fresh salt and authenticated.
* :func:`open_response`: the Response-PDU of the same msgID and request-id, checked (the
  engine ID, the user, boots and time not behind the requester's reckoning by more than
  the window, the digest over the whole message), decrypted. A message to discard gives
  None; a Report (no auth + priv, or a Report-PDU) raises :class:`Fallback`: the request
  is pysnmp's to make.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

DIGEST = 24
"""usmHMAC192SHA256AuthProtocol: the first 24 octets of HMAC-SHA-256 (RFC 7860)."""
SALT = 8
WINDOW_S = 150
"""RFC 3414 3.2.7: a message more than 150 s from this engine's time is not timely."""
GET, SET, RESPONSE, GETBULK = 0xA0, 0xA3, 0xA2, 0xA5
MAX_BINDS = {GET: 8, SET: 128, GETBULK: 8}
"""Variable bindings taken on the fast path: a GET's response to 8 bounded values fits any
request's msgMaxSize of at least :data:`MIN_MAX_SIZE`; a SET's (an echo) and a GETBULK's
(its repetitions) are checked against it."""
MAX_REPETITIONS = 2**31 - 1
MIN_MAX_SIZE = 4096
NULL = (0x05, b"")


class Malformed(Exception):
    """The bytes are not the message this module codes (pysnmp takes them)."""


@dataclass(frozen=True, slots=True)
class UserKeys:
    """A USM user's keys localised to this engine (RFC 3414 2.6)."""

    name: bytes
    auth: bytes
    priv: bytes


@dataclass(frozen=True, slots=True)
class Request:
    """An authenticated, decrypted GetRequest or SetRequest."""

    msg_id: int
    max_size: int
    """The requester's msgMaxSize: no response may be longer."""
    user: UserKeys
    context_engine: bytes
    pdu: int
    """:data:`GET`, :data:`GETBULK` or :data:`SET`."""
    request_id: int
    oids: list[tuple[int, ...]]
    values: list[tuple[int, bytes]]
    """Each binding's value: BER identifier octet and content octets (NULL in a GET)."""
    non_repeaters: int = 0
    max_repetitions: int = 0
    """A GETBULK's (RFC 3416 4.2.3); 0 in a GET or a SET."""


# -- BER (X.690), the subset SNMP uses --------------------------------------------------
def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start, end) of the TLV at ``pos``, which must lie before ``end``."""
    if pos + 2 > end:
        raise Malformed("truncated")
    tag, n = data[pos], data[pos + 1]
    pos += 2
    if n & 0x80:
        width = n & 0x7F
        if not 0 < width <= 3 or pos + width > end:
            raise Malformed("length")
        n = int.from_bytes(data[pos : pos + width], "big")
        pos += width
    if pos + n > end:
        raise Malformed("truncated")
    return tag, pos, pos + n


def _expect(data: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    got, start, stop = _tlv(data, pos, end)
    if got != tag:
        raise Malformed(f"tag {got:#x}, expected {tag:#x}")
    return start, stop


def _int(data: bytes, pos: int, end: int) -> tuple[int, int]:
    start, stop = _expect(data, pos, end, 0x02)
    if not 0 < stop - start <= 9:
        raise Malformed("integer")
    return int.from_bytes(data[start:stop], "big", signed=True), stop


def _octets(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    start, stop = _expect(data, pos, end, 0x04)
    return data[start:stop], stop


def decode_oid(raw: bytes) -> tuple[int, ...]:
    if not raw or raw[-1] & 0x80:
        raise Malformed("object identifier")
    subs: list[int] = []
    value = 0
    for octet in raw:
        value = (value << 7) | (octet & 0x7F)
        if not octet & 0x80:
            subs.append(value)
            value = 0
    first = subs[0]
    head = (0, first) if first < 40 else (1, first - 40) if first < 80 else (2, first - 80)
    return (*head, *subs[1:])


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + length(len(content)) + content


def integer(value: int) -> bytes:
    """The content octets of an INTEGER (also Counter32, Gauge32, Counter64, ...)."""
    width = (value.bit_length() + 8) // 8 if value >= 0 else ((-value - 1).bit_length() + 8) // 8
    return value.to_bytes(width, "big", signed=True)


def oid_content(oid: tuple[int, ...]) -> bytes:
    if len(oid) < 2:
        raise ValueError("an object identifier has two sub-identifiers at least")
    out = bytearray()
    for sub in (oid[0] * 40 + oid[1], *oid[2:]):
        chunk = [sub & 0x7F]
        sub >>= 7
        while sub:
            chunk.append(0x80 | (sub & 0x7F))
            sub >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


# -- USM -----------------------------------------------------------------------------------
def _cfb(key: bytes, boots: int, time: int, salt: bytes) -> Cipher[CFB]:
    """AES-128 in CFB128 mode (RFC 3826 3.1.2.1: IV = boots, time, salt)."""
    iv = boots.to_bytes(4, "big") + time.to_bytes(4, "big") + salt
    return Cipher(algorithms.AES(key[:16]), CFB(iv))


def _digest(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()[:DIGEST]


@dataclass(frozen=True, slots=True)
class Engine:
    """What the fast path needs of the authoritative engine."""

    engine_id: bytes
    users: dict[bytes, UserKeys]
    max_size: int


def open_request(data: bytes, engine: Engine, boots: int, now: int) -> Request | None:
    """The authPriv GetRequest or SetRequest in ``data``, checked; None for anything else."""
    try:
        return _open(data, engine, boots, now)
    except (Malformed, IndexError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Header:
    """An SNMPv3 message's outer sequence and msgGlobalData (RFC 3412)."""

    end: int
    version: int
    msg_id: int
    max_size: int
    flags: bytes
    model: int
    after: int
    """Where msgSecurityParameters starts."""


@dataclass(frozen=True, slots=True)
class _Usm:
    """The message's UsmSecurityParameters (RFC 3414 2.4), with where its digest lies."""

    engine_id: bytes
    boots: int
    time: int
    name: bytes
    digest_at: tuple[int, int]
    salt: bytes
    after: int
    """Where the (encrypted) scoped PDU starts."""


def _header(data: bytes) -> _Header | None:
    """The header of a whole message (None if octets follow it: the digest would not
    cover them)."""
    start, end = _expect(data, 0, len(data), 0x30)
    if end != len(data):
        return None
    version, pos = _int(data, start, end)
    hstart, hend = _expect(data, pos, end, 0x30)
    msg_id, p = _int(data, hstart, hend)
    max_size, p = _int(data, p, hend)
    flags, p = _octets(data, p, hend)
    model, p = _int(data, p, hend)
    return _Header(end, version, msg_id, max_size, flags, model, hend)


def _usm(data: bytes, head: _Header) -> _Usm:
    sstart, send = _expect(data, head.after, head.end, 0x04)  # msgSecurityParameters
    ustart, uend = _expect(data, sstart, send, 0x30)
    engine_id, p = _octets(data, ustart, uend)
    boots, p = _int(data, p, uend)
    time, p = _int(data, p, uend)
    name, p = _octets(data, p, uend)
    astart, aend = _expect(data, p, uend, 0x04)
    salt, p = _octets(data, aend, uend)
    return _Usm(engine_id, boots, time, name, (astart, aend), salt, send)


def _authentic_plain(data: bytes, head: _Header, usm: _Usm, user: UserKeys) -> bytes | None:
    """The decrypted scoped PDU if the message's digest is right (RFC 3414 3.2 and 3.1 of
    RFC 3826), else None; the caller checked the digest's and the salt's lengths."""
    astart, aend = usm.digest_at
    zeroed = data[:astart] + bytes(DIGEST) + data[aend : head.end]
    if not hmac.compare_digest(_digest(user.auth, zeroed), data[astart:aend]):
        return None
    encrypted, _p = _octets(data, usm.after, head.end)
    dec = _cfb(user.priv, usm.boots, usm.time, usm.salt).decryptor()
    return dec.update(encrypted) + dec.finalize()


def _open(data: bytes, engine: Engine, boots: int, now: int) -> Request | None:
    head = _header(data)
    if head is None:
        return None
    if head.version != 3 or head.model != 3 or len(head.flags) != 1:
        return None
    if head.flags[0] & 0x03 != 0x03 or head.max_size < MIN_MAX_SIZE or head.msg_id < 0:
        return None
    usm = _usm(data, head)
    user = engine.users.get(usm.name)
    digest = usm.digest_at[1] - usm.digest_at[0]
    if usm.engine_id != engine.engine_id or user is None or digest != DIGEST:
        return None
    if len(usm.salt) != SALT or usm.boots != boots or abs(now - usm.time) > WINDOW_S:
        return None
    plain = _authentic_plain(data, head, usm, user)
    return None if plain is None else _scoped(plain, head.msg_id, head.max_size, user, engine)


def _scoped(
    plain: bytes, msg_id: int, max_size: int, user: UserKeys, engine: Engine
) -> Request | None:
    start, end = _expect(plain, 0, len(plain), 0x30)  # padding after it is ignored
    context_engine, p = _octets(plain, start, end)
    context_name, p = _octets(plain, p, end)
    tag, pstart, pend = _tlv(plain, p, end)
    if tag not in MAX_BINDS or context_name or context_engine != engine.engine_id:
        return None
    request_id, p = _int(plain, pstart, pend)
    status, p = _int(plain, p, pend)
    index, p = _int(plain, p, pend)
    vstart, vend = _expect(plain, p, pend, 0x30)
    oids, values = [], []
    p = vstart
    while p < vend:
        bstart, bend = _expect(plain, p, vend, 0x30)
        ostart, ostop = _expect(plain, bstart, bend, 0x06)
        vtag, vstart_, vstop = _tlv(plain, ostop, bend)
        oids.append(decode_oid(plain[ostart:ostop]))
        values.append((vtag, plain[vstart_:vstop]))
        p = bend
    if not 0 < len(oids) <= MAX_BINDS[tag]:
        return None
    if tag == GETBULK:  # error-status and error-index are non-repeaters and max-repetitions
        if not (0 <= status <= len(oids) and 0 <= index <= MAX_REPETITIONS):
            return None
        return Request(
            msg_id, max_size, user, context_engine, tag, request_id, oids, values, status, index
        )
    if status or index:
        return None
    return Request(msg_id, max_size, user, context_engine, tag, request_id, oids, values)


def response(
    get: Request,
    engine: Engine,
    boots: int,
    now: int,
    salt: bytes,
    binds: list[tuple[tuple[int, ...], tuple[int, bytes]]],
    status: int = 0,
    index: int = 0,
) -> bytes:
    """The authPriv Response-PDU message for ``get``; values are (tag, content octets)."""
    pdu = _pdu(RESPONSE, get.request_id, binds, status, index)
    scoped = tlv(0x30, tlv(0x04, get.context_engine) + tlv(0x04, b"") + pdu)
    # auth + priv, not reportable (a response)
    return _seal(
        get.msg_id, engine.max_size, 0x03, get.user, engine.engine_id, boots, now, salt, scoped
    )


def _pdu(
    tag: int,
    request_id: int,
    binds: list[tuple[tuple[int, ...], tuple[int, bytes]]],
    status: int = 0,
    index: int = 0,
) -> bytes:
    varbinds = b"".join(
        tlv(0x30, tlv(0x06, oid_content(oid)) + tlv(vtag, content))
        for oid, (vtag, content) in binds
    )
    return tlv(
        tag,
        tlv(0x02, integer(request_id))
        + tlv(0x02, integer(status))
        + tlv(0x02, integer(index))
        + tlv(0x30, varbinds),
    )


def _seal(
    msg_id: int,
    max_size: int,
    flags: int,
    user: UserKeys,
    engine_id: bytes,
    boots: int,
    now: int,
    salt: bytes,
    scoped: bytes,
) -> bytes:
    """An SNMPv3 message: ``scoped`` encrypted, the whole message authenticated."""
    enc = _cfb(user.priv, boots, now, salt).encryptor()
    encrypted = enc.update(scoped) + enc.finalize()
    usm = tlv(
        0x30,
        tlv(0x04, engine_id)
        + tlv(0x02, integer(boots))
        + tlv(0x02, integer(now))
        + tlv(0x04, user.name)
        + tlv(0x04, bytes(DIGEST))
        + tlv(0x04, salt),
    )
    header = tlv(
        0x30,
        tlv(0x02, integer(msg_id))
        + tlv(0x02, integer(max_size))
        + tlv(0x04, bytes((flags,)))
        + tlv(0x02, b"\x03"),  # USM
    )
    head = tlv(0x02, b"\x03") + header + tlv(0x04, usm)
    body = head + tlv(0x04, encrypted)
    message = bytearray(tlv(0x30, body))
    at = len(message) - len(body) + len(head) - len(tlv(0x04, salt)) - DIGEST  # the digest
    message[at : at + DIGEST] = _digest(user.auth, bytes(message))
    return bytes(message)


# -- the requester's side ----------------------------------------------------------------
REPORT = 0xA8
REQUEST_MAX_SIZE = 65507
"""msgMaxSize of the requests sealed here (pysnmp's snmpEngineMaxMessageSize)."""
ERROR_STATUS = (
    "noError",
    "tooBig",
    "noSuchName",
    "badValue",
    "readOnly",
    "genErr",
    "noAccess",
    "wrongType",
    "wrongLength",
    "wrongEncoding",
    "wrongValue",
    "noCreation",
    "inconsistentValue",
    "resourceUnavailable",
    "commitFailed",
    "undoFailed",
    "authorizationError",
    "notWritable",
    "inconsistentName",
)
"""RFC 3416's error-status names, by value."""


class Fallback(Exception):
    """A reply to this request that this module does not take: a Report-PDU (unknown
    engine, not in time window, ...) or a message without auth + priv. pysnmp takes the
    request, and learns the engine again."""


@dataclass(frozen=True, slots=True)
class Peer:
    """An authoritative engine as a requester knows it, at the moment of sending."""

    engine_id: bytes
    boots: int
    time: int
    """The engine's snmpEngineTime as the requester reckons it now."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An authenticated, decrypted Response-PDU to one request."""

    boots: int
    time: int
    """The responding engine's boots and time (RFC 3414 3.2.7 b: the requester's clock)."""
    status: int
    index: int
    binds: list[tuple[tuple[int, ...], tuple[int, bytes]]]
    """Each binding's OID and value (BER identifier octet, content octets)."""


def seal_request(
    pdu: int,
    msg_id: int,
    request_id: int,
    user: UserKeys,
    peer: Peer,
    salt: bytes,
    binds: list[tuple[tuple[int, ...], tuple[int, bytes]]],
    bulk: tuple[int, int] = (0, 0),
) -> bytes:
    """An authPriv, reportable GetRequest (:data:`GET`), GetBulkRequest (:data:`GETBULK`:
    ``bulk`` is its non-repeaters and max-repetitions) or SetRequest (:data:`SET`) to
    ``peer``'s default context; ``user``'s keys are localised to ``peer.engine_id``."""
    if pdu not in MAX_BINDS:
        raise ValueError("a GetRequest, a GetBulkRequest or a SetRequest")
    if bulk != (0, 0) and pdu != GETBULK:
        raise ValueError("non-repeaters and max-repetitions are a GetBulkRequest's")
    scoped = tlv(
        0x30, tlv(0x04, peer.engine_id) + tlv(0x04, b"") + _pdu(pdu, request_id, binds, *bulk)
    )
    return _seal(
        msg_id, REQUEST_MAX_SIZE, 0x07, user, peer.engine_id, peer.boots, peer.time, salt, scoped
    )


def message_id(data: bytes) -> int | None:
    """The msgID of an SNMPv3 message (in clear in its header), or None."""
    try:
        start, end = _expect(data, 0, len(data), 0x30)
        version, pos = _int(data, start, end)
        hstart, hend = _expect(data, pos, end, 0x30)
        msg_id, _p = _int(data, hstart, hend)
    except (Malformed, IndexError, ValueError):
        return None
    return msg_id if version == 3 else None


def open_response(
    data: bytes, user: UserKeys, peer: Peer, msg_id: int, request_id: int
) -> Answer | None:
    """The Response-PDU in ``data`` to request (``msg_id``, ``request_id``) sent to
    ``peer``, checked as RFC 3414 3.2 says; None for a message to discard (another msgID,
    another engine, a wrong digest, an untimely or malformed message). Raises
    :class:`Fallback` for a reply this module does not take (a Report-PDU)."""
    try:
        return _open_response(data, user, peer, msg_id, request_id)
    except (Malformed, IndexError, ValueError):
        return None


def _open_response(
    data: bytes, user: UserKeys, peer: Peer, msg_id: int, request_id: int
) -> Answer | None:
    head = _header(data)
    if head is None:
        return None
    if head.version != 3 or head.model != 3 or head.msg_id != msg_id or len(head.flags) != 1:
        return None
    if head.flags[0] & 0x03 != 0x03:  # a Report: noAuth (unknownEngineID), authNoPriv (time)
        raise Fallback(f"a reply without auth + priv (flags {head.flags[0]:#x})")
    usm = _usm(data, head)
    digest = usm.digest_at[1] - usm.digest_at[0]
    if usm.engine_id != peer.engine_id or usm.name != user.name or digest != DIGEST:
        return None
    if len(usm.salt) != SALT or usm.boots < peer.boots:
        return None
    if usm.boots == peer.boots and usm.time < peer.time - WINDOW_S:
        return None  # RFC 3414 3.2.7 b: not in the time window
    plain = _authentic_plain(data, head, usm, user)
    return None if plain is None else _answer(plain, peer, request_id, usm.boots, usm.time)


def _answer(plain: bytes, peer: Peer, request_id: int, boots: int, now: int) -> Answer | None:
    start, end = _expect(plain, 0, len(plain), 0x30)
    context_engine, p = _octets(plain, start, end)
    context_name, p = _octets(plain, p, end)
    tag, pstart, pend = _tlv(plain, p, end)
    if tag == REPORT:
        raise Fallback("a Report-PDU")
    if tag != RESPONSE or context_name or context_engine != peer.engine_id:
        return None
    got_id, p = _int(plain, pstart, pend)
    status, p = _int(plain, p, pend)
    index, p = _int(plain, p, pend)
    vstart, vend = _expect(plain, p, pend, 0x30)
    if got_id != request_id:
        return None
    binds = []
    p = vstart
    while p < vend:
        bstart, bend = _expect(plain, p, vend, 0x30)
        ostart, ostop = _expect(plain, bstart, bend, 0x06)
        vtag, vstart_, vstop = _tlv(plain, ostop, bend)
        if vstop != bend:
            raise Malformed("octets after a value")
        binds.append((decode_oid(plain[ostart:ostop]), (vtag, plain[vstart_:vstop])))
        p = bend
    return Answer(boots, now, status, index, binds)
