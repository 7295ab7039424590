"""What every SNMPv3 agent of the project sets up the same way, over pysnmp 7 (asyncio).

* :func:`serve`: the command responder on a bound UDP socket: the engine's transport, the
  default context's instrumentation (the agent's own, over pysnmp's for the SNMP engine's
  and USM's counters), the GET/GETNEXT/GETBULK (and, if writable, SET) responders.
* The fast path (:class:`FastTransport`): an authPriv GET or GETBULK (or, for an agent
  that takes SETs, a SET) for the default context is opened, answered and sealed by
  :mod:`appliance.snmp.fastpath` without pyasn1's coder, under the same rules: the user
  and its keys are the engine's USM users', the time window is the engine's, the values
  come from (or go to) the same instrumentation and VACM decides every variable as it
  does for pysnmp (the same ``acFun``, with the request's security name, level and
  context in the engine's execution context, where agents look up who is asking). A
  GETBULK is answered as pysnmp's responder answers it (RFC 3416 4.2.3: the non-repeaters'
  next instances, then one GETNEXT of the repeaters per repetition, at most
  :data:`BULK_MAX_BINDS` variable bindings), with one ``acFun`` object for the whole PDU as
  pysnmp passes it (an agent's instrumentation reads its node once per PDU).
  snmpInPkts counts these messages too. Everything else goes to pysnmp unchanged, and so
  does a request whose reading or writing raises: pysnmp runs it again and answers with
  its own error mapping (the agents' SETs are idempotent: a report recorded twice counts
  once, a registry change applied twice is the same change).
* :func:`add_notification_target`: one INFORM or trap receiver of a notifier engine.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp, context
from pysnmp.proto import rfc1902, rfc1905
from pysnmp.proto.secmod.rfc3826.priv.aes import Aes
from pysnmp.proto.secmod.rfc7860.auth.hmacsha2 import HmacSha2

from appliance.snmp import fastpath
from appliance.snmp.engines import add_user, master_key
from appliance.snmp.usm import AUTH, Credentials

log = logging.getLogger("qkdn.snmp")

REQUEST = "rfc3412.receiveMessage:request"
"""The execution point where pysnmp (and the agents' ``who``) find the request's sender."""
_GET_PDU, _SET_PDU = rfc1905.GetRequestPDU(), rfc1905.SetRequestPDU()
_BULK_PDU = rfc1905.GetBulkRequestPDU()
_PDUS = {fastpath.GET: _GET_PDU, fastpath.SET: _SET_PDU, fastpath.GETBULK: _BULK_PDU}
BULK_MAX_BINDS = cmdrsp.BulkCommandResponder.max_varbinds
"""Variable bindings in a GETBULK's response at most (pysnmp's responder's bound, 64)."""
INTEGERS = frozenset((0x02, 0x41, 0x42, 0x43, 0x46))
"""INTEGER, Counter32, Gauge32 (Unsigned32), TimeTicks, Counter64 (RFC 2578, RFC 3416)."""
STRINGS = frozenset((0x04, 0x40, 0x44))
"""OCTET STRING, IpAddress, Opaque."""
EMPTY = frozenset((0x05, 0x80, 0x81, 0x82))
"""NULL, noSuchObject, noSuchInstance, endOfMibView."""


def localised(creds: Credentials, engine_id: Any) -> fastpath.UserKeys:
    """A user's keys localised to ``engine_id`` (snmpEngineID), by pysnmp's USM services
    (from master keys: :func:`appliance.snmp.engines.master_key`)."""
    auth = HmacSha2(AUTH)
    key = auth.localize_key(master_key(creds.auth), engine_id)
    priv = Aes().localize_key(AUTH, master_key(creds.priv), engine_id)
    return fastpath.UserKeys(creds.user.encode(), bytes(key), bytes(priv))


def encoded(value: Any) -> tuple[int, bytes]:
    """A pysnmp value as (BER identifier octet, content octets)."""
    tag = value.tagSet[-1]
    ident = tag.tagClass | tag.tagFormat | tag.tagId
    if ident in INTEGERS:
        return ident, fastpath.integer(int(value))
    if ident in STRINGS:
        return ident, value.asOctets()
    if ident == 0x06:
        return ident, fastpath.oid_content(tuple(value))
    if ident in EMPTY:
        return ident, b""
    raise TypeError(f"no fast coding for {type(value).__name__} (tag {ident:#x})")


DECODED: dict[int, Any] = {
    0x02: rfc1902.Integer32,
    0x04: rfc1902.OctetString,
    0x40: rfc1902.IpAddress,
    0x41: rfc1902.Counter32,
    0x42: rfc1902.Unsigned32,
    0x43: rfc1902.TimeTicks,
    0x44: rfc1902.Opaque,
    0x46: rfc1902.Counter64,
}
"""The SMIv2 value types a SET may carry, by BER identifier octet (an OID value: pysnmp)."""


def decoded(tag: int, raw: bytes) -> Any:
    """A SET's value as pysnmp's type (KeyError for a type the fast path leaves alone)."""
    kind = DECODED[tag]
    if tag in INTEGERS:
        if not raw:
            raise ValueError("an INTEGER has one content octet at least")
        return kind(int.from_bytes(raw, "big", signed=True))
    return kind(raw)


class FastPath:
    """The fast path of one engine: opens a datagram, reads, answers (or returns None)."""

    def __init__(
        self,
        eng: engine.SnmpEngine,
        users: Sequence[Credentials],
        instrum: Any,
        *,
        writable: bool = False,
    ) -> None:
        builder = eng.get_mib_builder()
        framework: list[Any] = builder.import_symbols(
            "__SNMP-FRAMEWORK-MIB",
            "snmpEngineID",
            "snmpEngineMaxMessageSize",
            "snmpEngineBoots",
            "snmpEngineTime",
        )
        engine_id, max_size, self._boots, self._start = framework
        (self._in_pkts,) = builder.import_symbols("__SNMPv2-MIB", "snmpInPkts")
        eid = bytes(engine_id.syntax)
        self.engine = fastpath.Engine(
            eid,
            {u.user.encode(): localised(u, engine_id.syntax) for u in users},
            int(max_size.syntax),
        )
        self.eng = eng
        self.instrum, self.writable = instrum, writable
        self._names = {u.user.encode(): rfc1902.OctetString(u.user) for u in users}
        self._salt = secrets.randbits(64)
        self.answered = 0
        self.passed: Callable[[], None] | None = None
        """Told after each datagram left to pysnmp (which counts what it refuses)."""

    def clock(self) -> tuple[int, int]:
        """This engine's snmpEngineBoots and snmpEngineTime now."""
        return int(self._boots.syntax), int(time.time() - int(self._start.syntax))

    def answer(self, data: bytes, address: Any = None) -> bytes | None:
        """The sealed response to ``data`` from ``address``, or None: pysnmp's to take."""
        boots, now = self.clock()
        req = fastpath.open_request(data, self.engine, boots, now)
        if req is None or (req.pdu == fastpath.SET and not self.writable):
            return None
        observer = self.eng.observer
        observer.store_execution_context(
            self.eng,
            REQUEST,
            {
                "transportDomain": config.SNMP_UDP_DOMAIN,
                "transportAddress": address,
                "messageProcessingModel": 3,
                "securityModel": 3,
                "securityName": self._names[req.user.name],
                "securityLevel": 3,
                "contextName": b"",
                "contextEngineId": req.context_engine,
                "pdu": _PDUS[req.pdu],
            },
        )
        try:
            values = [(tuple(name), encoded(value)) for name, value in self._operate(req)]
            if not values:
                raise ValueError("a GETBULK of no repetition")  # pysnmp answers it
        except Exception as exc:  # pysnmp answers it (again), with its own error mapping
            log.debug("snmp: fast request left to pysnmp: %r", exc)
            return None
        finally:
            observer.clear_execution_context(self.eng, REQUEST)
        self._salt = (self._salt + 1) % 2**64
        salt = self._salt.to_bytes(fastpath.SALT, "big")
        reply = fastpath.response(req, self.engine, boots, now, salt, values)
        if len(reply) > min(req.max_size, self.engine.max_size):
            return None  # pysnmp answers tooBig
        self._in_pkts.syntax += 1
        self.answered += 1
        return reply

    def _operate(self, req: fastpath.Request) -> list[Any]:
        """The instrumentation's answer, under VACM as pysnmp's responders call it."""
        if req.pdu == fastpath.GET:
            binds = [(rfc1902.ObjectName(oid), rfc1902.Null()) for oid in req.oids]
            read: list[Any] = self.instrum.read_variables(
                *binds,
                snmpEngine=self.eng,
                acFun=cmdrsp.GetCommandResponder.verify_access,
                cbCtx=None,
            )
            return read
        if req.pdu == fastpath.GETBULK:
            return self._bulk(req)
        binds = [
            (rfc1902.ObjectName(oid), decoded(tag, raw))
            for oid, (tag, raw) in zip(req.oids, req.values, strict=True)
        ]
        written: list[Any] = self.instrum.write_variables(
            *binds,
            snmpEngine=self.eng,
            acFun=cmdrsp.SetCommandResponder.verify_access,
            cbCtx=None,
        )
        return written

    def _bulk(self, req: fastpath.Request) -> list[Any]:
        """A GETBULK's variable bindings, as pysnmp's BulkCommandResponder finds them."""
        context = {
            "snmpEngine": self.eng,
            "acFun": cmdrsp.BulkCommandResponder.verify_access,  # one object: one PDU
            "cbCtx": None,
        }
        names = [(rfc1902.ObjectName(oid), rfc1902.Null()) for oid in req.oids]
        n = min(req.non_repeaters, len(names))
        repeaters = names[n:]
        reps = min(req.max_repetitions, BULK_MAX_BINDS // len(repeaters)) if repeaters else 0
        out: list[Any] = list(self.instrum.read_next_variables(*names[:n], **context)) if n else []
        for _ in range(reps):
            repeaters = list(self.instrum.read_next_variables(*repeaters, **context))
            out += repeaters
        return out


class FastTransport(udp.UdpAsyncioTransport):  # type: ignore[misc]
    """pysnmp's UDP transport with the fast path in front of the engine."""

    fast: FastPath | None = None

    def datagram_received(self, datagram: bytes, address: Any) -> None:
        reply = self.fast.answer(datagram, address) if self.fast is not None else None
        if reply is None or self.transport is None:
            super().datagram_received(datagram, address)
            if self.fast is not None and self.fast.passed is not None:
                self.fast.passed()
        else:
            self.transport.sendto(reply, address)


@dataclass(frozen=True, slots=True)
class Served:
    default: Any
    """pysnmp's instrumentation of the default context (the engine's own counters)."""
    fast: FastPath


RESPONDERS = (
    cmdrsp.GetCommandResponder,
    cmdrsp.NextCommandResponder,
    cmdrsp.BulkCommandResponder,
)


class AccessCache:
    """VACM's decisions kept while an agent's views stay the same: by who asks, the kind
    of access and the OID's first :attr:`depth` sub-identifiers (the longest subtree of any
    view family without a mask: no decision depends on more). Bounded: beyond ``kept``
    decisions (OIDs outside every view) they are all forgotten. A walk asks for every
    instance, and pysnmp's VACM was a quarter to a third of a fast request's cost."""

    def __init__(self, kept: int, depth: int = 0) -> None:
        self.kept, self.depth = kept, depth
        self._known: dict[tuple[Any, str, tuple[int, ...]], bool] = {}

    def reset(self, depth: int) -> None:
        """The views changed: forget every decision; the new views' longest subtree."""
        self._known.clear()
        self.depth = depth

    def denied(
        self, who: Any, kind: str, oid: tuple[int, ...], i: int, ctx: dict[str, Any]
    ) -> bool:
        """True if ``oid`` is outside ``who``'s view for ``kind`` (read, write); pysnmp's
        VACM (the request's ``acFun``) asked once per key (raises on other ACM refusals)."""
        key = (who, kind, oid[: self.depth])
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= self.kept:
                self._known.clear()
            verdict = ctx["acFun"](kind, (rfc1902.ObjectName(oid), None), **{**ctx, "idx": i})
            known = self._known[key] = bool(verdict)
        return known


def serve(
    eng: engine.SnmpEngine,
    sock: Any,
    users: Sequence[Credentials],
    instrumentation: Callable[[Any], Any],
    *,
    writable: bool = False,
) -> Served:
    """Answer commands on ``sock`` (bound) with ``instrumentation(default)``, where
    ``default`` is pysnmp's own instrumentation. ``users`` are the engine's USM users
    (added by the caller, with its VACM); the fast path answers their GETs."""
    transport = FastTransport().open_server_mode(sock=sock)
    config.add_transport(eng, config.SNMP_UDP_DOMAIN, transport)
    ctx = context.SnmpContext(eng)
    default = ctx.get_mib_instrum(b"")
    ctx.unregister_context_name(b"")
    instrum = instrumentation(default)
    ctx.register_context_name(b"", instrum)
    for responder in (*RESPONDERS, cmdrsp.SetCommandResponder) if writable else RESPONDERS:
        responder(eng, ctx)
    transport.fast = FastPath(eng, users, instrum, writable=writable)
    return Served(default, transport.fast)


def next_of(
    theirs: Any, ours: tuple[tuple[int, ...], Any] | None, typed: Callable[[Any], Any]
) -> Any:
    """A GETNEXT's answer: the lesser of pysnmp's next variable binding (``theirs``: the
    engine's own counters) and the agent's (``ours``, an OID and a value for ``typed``)."""
    if ours is not None and (theirs[1] is rfc1905.endOfMibView or ours[0] < tuple(theirs[0])):
        return (rfc1902.ObjectName(ours[0]), typed(ours[1]))
    return theirs


def add_notification_target(
    notifier: engine.SnmpEngine,
    name: str,
    kind: str,
    creds: Credentials,
    address: tuple[str, int],
    *,
    timeout_s: float,
    retries: int,
) -> None:
    """A receiver ``name`` of ``kind`` ``inform`` or ``trap`` at ``address`` (host, port),
    reached as the SNMPv3 user ``creds`` (authPriv). The notifier needs a client transport
    (:func:`client_transport`)."""
    add_user(notifier, creds)
    config.add_target_parameters(notifier, name, creds.user, "authPriv")
    config.add_target_address(
        notifier,
        name,
        config.SNMP_UDP_DOMAIN,
        address,
        name,
        timeout=int(timeout_s * 100),
        retryCount=retries,
        tagList=name,
    )
    config.add_notification_target(notifier, name, name, name, kind)
    config.add_vacm_user(notifier, 3, creds.user, "authPriv", notifySubTree=(1, 3, 6, 1))


def client_transport(eng: engine.SnmpEngine) -> None:
    """A UDP client transport (any local port) for an engine that sends."""
    config.add_transport(eng, config.SNMP_UDP_DOMAIN, udp.UdpAsyncioTransport().open_client_mode())
