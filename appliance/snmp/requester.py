"""A command generator's fast path over asyncio UDP: the adapter of the requester's side
of :mod:`appliance.snmp.fastpath`.

A :class:`Requester` sends authPriv GetRequests, GetBulkRequests (and GETBULK walks,
:meth:`Requester.walk`) and SetRequests to one agent and opens their responses without
pyasn1, once it knows the agent's engine: its snmpEngineID, boots and time are learnt
from pysnmp, which talks to the agent first (engine discovery, time synchronisation, the
first request). :meth:`Requester.watch` observes the messages a pysnmp engine's USM
takes in; :meth:`Requester.learnt`, called when pysnmp has accepted a response
(authenticated: it passed pysnmp's digest check), keeps that message's engine ID, boots
and time, and localises the user's keys to that engine ID. An engine that talks to many
agents at once (a manager's poller) tells each agent's requester instead, at the moment
pysnmp accepts a response from the agent's address (:class:`Learner`). From then on the
requester reckons the engine's time itself (RFC 3414 2.3: the time learnt plus the time
elapsed since), and each authenticated response refreshes it.

A request is sent again after ``timeout_s`` (a new msgID and salt, the same request-id),
``retries`` times; an answer to any of its tries is taken. A datagram that is not the
answer (another msgID, a wrong digest, an untimely or malformed message) is discarded and
counted, as USM discards it. A Report-PDU (the agent no longer knows the engine ID:
restarted; or the request was not in the time window) raises
:class:`~appliance.snmp.fastpath.Fallback` and forgets the engine, as does a request left
unanswered (:class:`Unanswered`): the caller's next request goes to pysnmp, which
discovers the engine again.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pysnmp.proto import rfc1902, rfc1905

from appliance.snmp import fastpath
from appliance.snmp.responder import decoded, localised
from appliance.snmp.usm import Credentials

SEEN = "rfc3414.processIncomingMsg"
"""pysnmp's execution point where USM has read an incoming message's security parameters."""
MISSING = {
    0x05: rfc1902.Null(""),
    0x80: rfc1905.noSuchObject,
    0x81: rfc1905.noSuchInstance,
    0x82: rfc1905.endOfMibView,
}


END_OF_MIB_VIEW = 0x82
WALK_LIMIT = 10_000
"""Instances of one walk at most."""


class Unanswered(Exception):
    """No answer to any try of a request."""


def pysnmp_value(tag: int, raw: bytes) -> Any:
    """A response's value (BER identifier octet, content octets) as pysnmp's type."""
    if tag in MISSING:
        return MISSING[tag]
    if tag == 0x06:
        return rfc1902.ObjectIdentifier(fastpath.decode_oid(raw))
    return decoded(tag, raw)


@dataclass(slots=True)
class Known:
    """The agent's engine as last learnt: its time was ``time`` at ``at`` (monotonic)."""

    keys: fastpath.UserKeys
    engine_id: bytes
    boots: int
    time: int
    at: float

    def peer(self, now: float) -> fastpath.Peer:
        return fastpath.Peer(self.engine_id, self.boots, self.time + int(now - self.at))


@dataclass(slots=True)
class Waiting:
    """One request in flight: its tries by msgID, and the future of its answer."""

    request_id: int
    keys: fastpath.UserKeys
    future: asyncio.Future[fastpath.Answer]
    tries: dict[int, fastpath.Peer] = field(default_factory=dict)


class Requester(asyncio.DatagramProtocol):
    """authPriv GETs and SETs from ``creds`` to the agent at ``address`` (host, port)."""

    def __init__(
        self, address: tuple[str, int], creds: Credentials, *, timeout_s: float, retries: int
    ) -> None:
        self.address, self.creds = address, creds
        self.timeout_s, self.retries = timeout_s, retries
        self.known: Known | None = None
        self._seen: tuple[bytes, int, int, float] | None = None
        self._keys: dict[bytes, fastpath.UserKeys] = {}
        self._msg_ids = itertools.count(secrets.randbelow(2**31))
        self._request_ids = itertools.count(secrets.randbelow(2**31))
        self._salt = secrets.randbits(64)
        self._waiting: dict[int, Waiting] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self.answered = self.discarded = self.fallbacks = 0

    # -- learning the engine from pysnmp ----------------------------------------------------
    def watch(self, eng: Any) -> None:
        """Observe the messages pysnmp engine ``eng`` takes in (before it checks them)."""
        eng.observer.register_observer(self._observed, SEEN)

    def _observed(self, _eng: Any, _point: str, variables: dict[str, Any], _ctx: Any) -> None:
        engine_id = variables["securityEngineId"]
        boots, now = variables["snmpEngineBoots"], variables["snmpEngineTime"]
        self._seen = (bytes(engine_id), int(boots), int(now), time.monotonic())

    def learnt(self) -> None:
        """pysnmp has just accepted a response: its message's engine is the agent's."""
        if self._seen is not None:
            self.learn(*self._seen)

    def learn(self, engine_id: bytes, boots: int, now: int, at: float) -> None:
        """The agent's engine is ``engine_id``; its boots and time were ``boots`` and
        ``now`` at ``at`` (monotonic)."""
        keys = self._keys.get(engine_id)
        if keys is None:
            keys = localised(self.creds, rfc1902.OctetString(engine_id))
            self._keys = {engine_id: keys}
        self.known = Known(keys, engine_id, boots, now, at)

    def forget(self) -> None:
        self.known = None

    # -- requests -----------------------------------------------------------------------
    async def request(
        self,
        pdu: int,
        binds: list[tuple[tuple[int, ...], tuple[int, bytes]]],
        bulk: tuple[int, int] = (0, 0),
    ) -> fastpath.Answer:
        """The agent's authenticated answer to a GET, GETBULK or SET (:data:`fastpath.GET`,
        ``GETBULK``: ``bulk`` is its non-repeaters and max-repetitions; ``SET``) of
        ``binds``; raises Fallback, Unanswered (the engine is then forgotten)."""
        known = self.known
        if known is None:
            raise fastpath.Fallback("the agent's engine is not known")
        transport = await self._open()
        loop = asyncio.get_running_loop()
        wait = Waiting(next(self._request_ids) % 2**31, known.keys, loop.create_future())
        try:
            for _ in range(self.retries + 1):
                msg_id = next(self._msg_ids) % 2**31
                wait.tries[msg_id] = peer = known.peer(time.monotonic())
                self._waiting[msg_id] = wait
                self._salt = (self._salt + 1) % 2**64
                salt = self._salt.to_bytes(fastpath.SALT, "big")
                transport.sendto(
                    fastpath.seal_request(
                        pdu, msg_id, wait.request_id, known.keys, peer, salt, binds, bulk
                    )
                )
                done, _ = await asyncio.wait({wait.future}, timeout=self.timeout_s)
                if done:
                    return self._took(known, wait.future.result())
        except fastpath.Fallback:
            self.fallbacks += 1
            self.forget()
            raise
        finally:
            for msg_id in wait.tries:
                self._waiting.pop(msg_id, None)
            if not wait.future.done():
                wait.future.cancel()
        self.forget()
        raise Unanswered(f"no response after {self.retries + 1} tries")

    async def walk(
        self, root: tuple[int, ...], repetitions: int, limit: int = WALK_LIMIT
    ) -> list[tuple[tuple[int, ...], tuple[int, bytes]]]:
        """The instances under ``root`` (OID and BER value), by GETBULKs of
        ``repetitions``, as pysnmp's non-lexicographic walk finds them: until an instance
        outside ``root``, endOfMibView, or an OID not after the last; raises Fallback
        (the first GETBULK's answer is an error: pysnmp's to walk), Unanswered, and
        ValueError for a walk longer than ``limit`` instances."""
        out: list[tuple[tuple[int, ...], tuple[int, bytes]]] = []
        last = root
        while True:
            answer = await self.request(fastpath.GETBULK, [(last, fastpath.NULL)], (0, repetitions))
            if answer.status:
                raise fastpath.Fallback(f"error-status {answer.status} in a walk")
            for oid, value in answer.binds:
                if value[0] == END_OF_MIB_VIEW or oid[: len(root)] != root or oid <= last:
                    return out
                out.append((oid, value))
                last = oid
            if not answer.binds:
                return out
            if len(out) > limit:
                raise ValueError(f"a walk of more than {limit} instances")

    def _took(self, known: Known, answer: fastpath.Answer) -> fastpath.Answer:
        """RFC 3414 3.2.7 b: a later boots or time from the agent is the requester's clock."""
        self.answered += 1
        if (answer.boots, answer.time) > (known.boots, known.peer(time.monotonic()).time):
            self.known = Known(
                known.keys, known.engine_id, answer.boots, answer.time, time.monotonic()
            )
        return answer

    async def _open(self) -> asyncio.DatagramTransport:
        if self._transport is None or self._transport.is_closing():
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: self, remote_addr=self.address
            )
        return self._transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        msg_id = fastpath.message_id(data)
        wait = self._waiting.get(msg_id) if msg_id is not None else None
        if wait is None or wait.future.done() or msg_id is None:
            self.discarded += 1
            return
        try:
            answer = fastpath.open_response(
                data, wait.keys, wait.tries[msg_id], msg_id, wait.request_id
            )
        except fastpath.Fallback as exc:
            wait.future.set_exception(exc)
            return
        if answer is None:
            self.discarded += 1
        else:
            wait.future.set_result(answer)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error (port unreachable): the request times out, as pysnmp's would."""

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


ACCEPTED = "rfc3412.prepareDataElements:response"
"""pysnmp's execution point where a response (authenticated, decrypted, the answer to one
of its requests) has been accepted: its sender's address and engine ID."""


class Learner:
    """Tells the requester of an agent's address what pysnmp engine ``eng`` learns of the
    agent's engine, from each response it accepts from that address. Both execution
    points belong to one incoming message, in one call: the boots and time (USM's) are the
    message's, whatever other agents answer meanwhile."""

    def __init__(self, eng: Any, requesters: dict[tuple[str, int], Requester]) -> None:
        self.requesters = requesters
        self._seen: tuple[bytes, int, int, float] | None = None
        eng.observer.register_observer(self._usm, SEEN)
        eng.observer.register_observer(self._accepted, ACCEPTED)

    def _usm(self, _eng: Any, _point: str, variables: dict[str, Any], _ctx: Any) -> None:
        engine_id = variables["securityEngineId"]
        boots, now = variables["snmpEngineBoots"], variables["snmpEngineTime"]
        self._seen = (bytes(engine_id), int(boots), int(now), time.monotonic())

    def _accepted(self, _eng: Any, _point: str, variables: dict[str, Any], _ctx: Any) -> None:
        seen, self._seen = self._seen, None
        address = variables.get("transportAddress")
        requester = self.requesters.get(tuple(address)) if address is not None else None
        if requester is None or seen is None:
            return
        if seen[0] == bytes(variables.get("securityEngineId") or b""):
            requester.learn(*seen)
