"""What every role engine stands on: numbering, continuations, timers and link keys.

An engine is driven by :meth:`EngineBase.handle` (event in, actions out, see
:mod:`appliance.kms.events`). Calls, reads and store operations carry a number the engine
chose; the continuation waiting for that number is kept here and run when the outcome
comes in. A number nobody waits for any more (the request failed or timed out meanwhile)
is a *late* input: its key material is erased and it changes nothing.

The link keys of the links an engine owns (:mod:`appliance.kms.linkend`) are used through
two recipes:

* :meth:`EngineBase.seal_for` seals a payload for a neighbour. Jobs for one link queue in
  order; when the link is short of key, one read (or, at a slave end out of granted keys,
  one grant request to the master) is in flight at a time, and a link that has not
  distilled enough yet is retried with a back-off until each job's patience runs out, so
  a relay runs at the pace of its slowest link instead of failing. ``LinkWanted`` (a route
  installed through this node towards a neighbour) starts that read, or grant, before
  any job needs it (:meth:`EngineBase.want_link`): one attempt, no retry.
* :meth:`EngineBase.open_from` opens a neighbour's message, reading the keys it names
  first when this end does not hold them; reads on one link are serialised so two messages
  never ask the module for one key.

Nothing here does I/O, reads a clock or logs; the engine never keeps key material longer
than its request needs, and erases it.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Hashable

import msgspec

from appliance.kms import messages as m
from appliance.kms.engines.config import EngineConfig
from appliance.kms.engines.states import GRANT, I, S
from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    KmsError,
    ProtocolError,
    StaleKey,
)
from appliance.kms.events import (
    Action,
    Answered,
    Call,
    CallFailed,
    CancelTimer,
    Input,
    LinkKeysRead,
    LinkWanted,
    Notice,
    PathFound,
    PskDerived,
    ReadLinkKeys,
    Received,
    Refuse,
    Reply,
    SetTimer,
    StoreDone,
    TimerFired,
    Validated,
)
from appliance.kms.linkend import GRANT_BATCH, WANTED_GRANT, LinkEnd, Role
from appliance.kms.relay import Direction, Hop, Mode, decode, open_gcm, open_otp, seal_gcm, seal_otp

RandomBytes = Callable[[int], bytes]
Then = Callable[[Input], list[Action]]
HOUSEKEEPING_S = 60.0
"""Period of the housekeeping timer: link ledger sweeps (and, at a UKMS, the stores)."""
RETRY_FIRST, RETRY_MAX = 0.01, 0.5
"""Back-off, in seconds, between reads of a link that has no key yet."""


def erase(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def erase_input(event: Input) -> None:
    """Erase the key material a late input carries (nobody will use it)."""
    if isinstance(event, LinkKeysRead):
        for _, material in event.keys:
            erase(material)
    elif isinstance(event, PskDerived) and event.key is not None:
        erase(event.key)
    elif isinstance(event, StoreDone) and isinstance(event.result, list):
        for key in event.result:
            erase(key.material)


class SealJob(msgspec.Struct, eq=False):
    """A payload to seal for a neighbour under link keys. The payload stays the owner's
    (it may be sealed again after a stale-key refusal); the owner erases it."""

    peer: int
    hop: Hop
    """The header; segments and counter are filled in on sealing."""
    payload: bytearray
    deadline: float
    then: Callable[[bytes], list[Action]]
    fail: Callable[[KmsError], list[Action]]


class OpenJob(msgspec.Struct, eq=False):
    """A neighbour's message to open once the link keys it names are here."""

    peer: int
    hop: Hop
    header: bytes
    body: bytes
    then: Callable[[Hop, bytearray], list[Action]]
    fail: Callable[[KmsError], list[Action]]
    deadline: float = 0.0
    """Until when a key not yet distilled at this end is waited for."""


class EngineBase:
    """Numbering, continuations, timers and the link keys of one engine."""

    def __init__(self, config: EngineConfig, rng: RandomBytes, nonce: RandomBytes) -> None:
        """``rng``: the PTG.3 generator (key material, channel nonces); ``nonce``: random
        identifiers that are not secret (key and request IDs, link epochs): ``os.urandom``
        in a node, a seeded source in a simulation."""
        self.config, self.rng, self.nonce = config, rng, nonce
        self.me, self.name, self.policy = config.node, config.name, config.policy
        self.links = {
            spec.peer: LinkEnd(spec.link, spec.role, nonce(16).hex()) for spec in config.links
        }
        self._peer_service = {spec.peer: spec.peer_service for spec in config.links}
        self._numbers = itertools.count(1)
        self._waiting: dict[int, Then] = {}
        self._timers: dict[Hashable, Callable[[], list[Action]]] = {}
        self._sendq: dict[int, deque[SealJob]] = {peer: deque() for peer in self.links}
        self._openq: dict[int, deque[OpenJob]] = {peer: deque() for peer in self.links}
        self._reading: set[int] = set()  # links with a send-side read or grant in flight
        self._wanted: set[int] = set()  # links to ready for sending before a job needs it
        self._opening: set[int] = set()  # links with a receive-side read in flight
        self._backoff: dict[int, float] = {}
        self.now = 0.0

    # -- the engine's one entry -----------------------------------------------------------
    def handle(self, event: Input, now: float) -> list[Action]:
        """The actions ``event`` calls for at time ``now``."""
        self.now = now
        if isinstance(event, Received):
            return self.on_received(event)
        if isinstance(event, TimerFired):
            fire = self._timers.pop(event.key, None)
            return fire() if fire is not None else []
        if isinstance(event, LinkWanted):
            return self.want_link(event.peer)
        number = _number_of(event)
        if number is None:
            return self.on_other(event)
        then = self._waiting.pop(number, None)
        if then is None:
            erase_input(event)
            return []
        return then(event)

    def start(self, now: float) -> list[Action]:
        """The actions of a fresh run: the housekeeping timer."""
        self.now = now
        return [self.every(HOUSEKEEPING_S, "housekeeping", self.housekeeping)]

    def on_received(self, event: Received) -> list[Action]:
        """A request from a node (each role engine answers its own endpoints)."""
        if isinstance(event.message, m.GrantRequest):
            return self._on_grant(event)
        return [Refuse(req=event.req, error=ProtocolError("no such endpoint at this service"))]

    def on_other(self, event: Input) -> list[Action]:
        """Inputs without a number (the UKMS's SAE calls)."""
        raise ProtocolError(f"{type(event).__name__} is not for a {self.config.service}")

    def housekeeping(self) -> list[Action]:
        swept = sum(link.housekeeping(self.now) for link in self.links.values())
        return [Notice(event="link keys swept", fields={"keys": swept})] if swept else []

    # -- numbering and timers -------------------------------------------------------------
    def number(self, then: Then) -> int:
        n = next(self._numbers)
        self._waiting[n] = then
        return n

    def call(self, to: tuple[int, str], message: m.Sendable, then: Then) -> Call:
        return Call(call=self.number(then), to=to, message=message)

    def timer(self, key: Hashable, at: float, fire: Callable[[], list[Action]]) -> SetTimer:
        self._timers[key] = fire
        return SetTimer(key=key, at=at)

    def cancel(self, key: Hashable) -> list[Action]:
        return [CancelTimer(key=key)] if self._timers.pop(key, None) is not None else []

    def every(self, period: float, key: Hashable, job: Callable[[], list[Action]]) -> SetTimer:
        def fire() -> list[Action]:
            return [*job(), self.every(period, key, job)]

        return self.timer(key, self.now + period, fire)

    # -- link keys: sealing -----------------------------------------------------------------
    def hop(self, peer: int, request_id: bytes, index: int, mode: Mode) -> Hop:
        """The header of a hop message to ``peer``; keys are filled in on sealing."""
        return Hop(
            request_id=request_id,
            hop=index,
            direction=Direction.TO_REQUESTER,
            link=self.links[peer].link,
            mode=mode,
            segments=(),
        )

    def seal_for(self, job: SealJob) -> list[Action]:
        """Seal at once when the link has the key, else queue the job behind the others."""
        queue = self._sendq[job.peer]
        if (
            not queue
            and self.links[job.peer].shortfall(job.hop.mode, len(job.payload), self.now) == 0
        ):
            return self._seal_now(job)
        queue.append(job)
        return self._pump(job.peer)

    def _seal_now(self, job: SealJob) -> list[Action]:
        segments, material, counter = self.links[job.peer].seal_material(
            job.hop.mode, len(job.payload)
        )
        hop = msgspec.structs.replace(job.hop, segments=segments, counter=counter)
        try:
            if hop.mode is Mode.OTP:
                sealed = seal_otp(hop, job.payload, material)  # erases the pad
            else:
                sealed = seal_gcm(hop, job.payload, material)
        except KmsError as exc:
            return job.fail(exc)
        finally:
            erase(material)
        return job.then(sealed)

    def want_link(self, peer: int) -> list[Action]:
        """Have the link key of the next message to ``peer`` (of the network's mode, one
        key's worth) at hand before a relay needs it: read now, or at a slave end out of
        granted keys, asked of the master first, exactly as the first message would. On a
        standby path this takes the first relay after a switch off the grant's round trip
        and reads. Nothing if the link is not ours, its key covers a message already, or a
        read is in flight; one attempt: a failure is left to the first message's retries."""
        if peer not in self.links:
            return []
        self._wanted.add(peer)
        return self._pump(peer)

    def _pump(self, peer: int) -> list[Action]:
        """Seal what the link's key covers, in order; ask for more when it runs short
        (with no job queued: for the wanted message, :meth:`want_link`)."""
        queue, link, out = self._sendq[peer], self.links[peer], []
        while (queue or peer in self._wanted) and peer not in self._reading:
            if queue:
                mode, size = queue[0].hop.mode, len(queue[0].payload)
            else:
                mode, size = self.policy.mode, self.policy.key_size // 8
            short = link.shortfall(mode, size, self.now)
            if short == 0:
                if not queue:
                    self._wanted.discard(peer)
                    break
                out += self._seal_now(queue.popleft())
                continue
            self._reading.add(peer)
            plan = link.send_read(short, self.now)
            if plan is None:  # a slave end with no granted key left: ask its master
                readying = not queue and mode is Mode.GCM  # a small first grant (LinkWanted)
                n = WANTED_GRANT if readying else GRANT_BATCH
                request = m.GrantRequest(link=link.link, n=n)
                to = (peer, self._peer_service[peer])
                out.append(self.call(to, request, functools.partial(self._granted, peer)))
            else:
                count, ids = plan
                then = functools.partial(self._send_keys, peer, mode, link.generation)
                ticket = self.number(then)
                out.append(ReadLinkKeys(ticket=ticket, link=link.link, count=count, ids=ids))
        return out

    def _send_keys(self, peer: int, mode: Mode, gen: int, event: Input) -> list[Action]:
        assert isinstance(event, LinkKeysRead)
        self._reading.discard(peer)
        link = self.links[peer]
        if gen != link.generation:  # read for a sending state dropped meanwhile: useless
            erase_input(event)
            return self._pump(peer)
        link.fed_for_sending(mode, list(event.keys), event.gone, self.now)
        if event.keys or event.gone:
            self._backoff.pop(peer, None)
            return self._pump(peer)
        return self._retry_later(peer)

    def _granted(self, peer: int, event: Input) -> list[Action]:
        self._reading.discard(peer)
        if isinstance(event, Answered) and isinstance(event.message, m.Grant):
            self.links[peer].accept_grant(
                list(event.message.key_ids), event.message.epoch, self.now
            )
            return self._pump(peer)
        return self._retry_later(peer)  # the master has no key to grant yet, or is away

    def _retry_later(self, peer: int) -> list[Action]:
        """Fail the jobs whose patience ran out; try the rest again after a back-off (a
        wanted link without a job is not tried again)."""
        self._wanted.discard(peer)
        queue, out = self._sendq[peer], []
        for job in [j for j in queue if j.deadline <= self.now]:
            queue.remove(job)
            out += job.fail(KeyUnavailable(f"{self.links[peer].link}: no link key in time"))
        if queue:
            pause = self._backoff.get(peer, RETRY_FIRST)
            self._backoff[peer] = min(pause * 2, RETRY_MAX)
            out.append(self.timer(("link", peer), self.now + pause, lambda: self._pump(peer)))
        return out

    # -- link keys: opening -----------------------------------------------------------------
    def open_from(
        self,
        peer: int,
        message: bytes,
        epoch: str | None,
        then: Callable[[Hop, bytearray], list[Action]],
        fail: Callable[[KmsError], list[Action]],
    ) -> list[Action]:
        """Open a neighbour's hop message; ``then(hop, payload)`` or ``fail(error)``."""
        link = self.links.get(peer)
        if link is None:
            return fail(ProtocolError("a hop message from a node that is not our neighbour"))
        try:
            link.check_epoch(epoch)
            hop, header, body = decode(message)
            if hop.link != link.link:
                raise IntegrityFailure("hop message names another link")
        except KmsError as exc:
            return fail(exc)
        job = OpenJob(peer, hop, header, body, then, fail, self.now + self.policy.patience)
        queue = self._openq[peer]
        queue.append(job)
        return self._open_next(peer) if len(queue) == 1 and peer not in self._opening else []

    def _open_next(self, peer: int) -> list[Action]:
        queue, link, out = self._openq[peer], self.links[peer], []
        while queue and peer not in self._opening:
            job = queue[0]
            try:
                missing = link.missing(job.hop)
            except KmsError as exc:
                queue.popleft()
                out += job.fail(exc)
                continue
            if missing:
                self._opening.add(peer)
                ticket = self.number(functools.partial(self._open_keys, peer))
                out.append(ReadLinkKeys(ticket=ticket, link=link.link, ids=tuple(missing)))
                break
            queue.popleft()
            out += self._open_now(link, job)
        return out

    def _open_keys(self, peer: int, event: Input) -> list[Action]:
        assert isinstance(event, LinkKeysRead)
        self._opening.discard(peer)
        link, queue = self.links[peer], self._openq[peer]
        job = queue[0]
        link.add_received(list(event.keys), self.now)
        if event.gone:
            queue.popleft()
            out = job.fail(StaleKey(f"{link.link}: a link key the message names is gone here"))
        elif link.missing(job.hop):  # not distilled at this end yet: wait, up to patience
            if self.now < job.deadline:
                retry = functools.partial(self._open_next, peer)
                return [self.timer(("open", peer), self.now + RETRY_MAX, retry)]
            queue.popleft()
            out = job.fail(KeyUnavailable(f"{link.link}: a link key is not distilled here yet"))
        else:
            queue.popleft()
            out = self._open_now(link, job)
        return out + self._open_next(peer)

    @staticmethod
    def _open_now(link: LinkEnd, job: OpenJob) -> list[Action]:
        try:
            material = link.open_material(job.hop)
            if job.hop.mode is Mode.OTP:
                payload = open_otp(job.header, job.body, material)  # erases the pad
            else:
                try:
                    payload = open_gcm(job.hop, job.header, job.body, material)
                finally:
                    erase(material)
        except KmsError as exc:
            return job.fail(exc)
        return job.then(job.hop, payload)

    # -- grants (the master end of a link) --------------------------------------------------
    def _on_grant(self, event: Received) -> list[Action]:
        request = event.message
        assert isinstance(request, m.GrantRequest)
        link = self.links.get(event.caller)
        if link is None or link.link != request.link or link.role is not Role.MASTER:
            error = ProtocolError("grant request from a node that is not this link's slave")
            return [Refuse(req=event.req, error=error)]

        grant = _Granting(S.READING)

        def granted(read: Input) -> list[Action]:
            assert isinstance(read, LinkKeysRead)
            if not read.keys:
                GRANT.advance(grant, I.REFUSED)
                error = KeyUnavailable(f"{link.link}: no key to grant yet")
                return [Refuse(req=event.req, error=error)]
            GRANT.advance(grant, I.READ)
            ids = link.grant(list(read.keys), self.now)
            assert link.epoch is not None  # a master's epoch is set for its whole run
            return [Reply(req=event.req, message=m.Grant(key_ids=ids, epoch=link.epoch))]

        ticket = self.number(granted)
        return [ReadLinkKeys(ticket=ticket, link=link.link, count=request.n)]


class _Granting(msgspec.Struct, eq=False, gc=False):
    """A master end's grant while its keys are read (the GRANT table)."""

    state: S


_CALL_OUTCOMES = (Answered, CallFailed)
_TICKETED = (LinkKeysRead, PskDerived, StoreDone, Validated, PathFound)


def _number_of(event: Input) -> int | None:
    if isinstance(event, _CALL_OUTCOMES):
        return event.call
    if isinstance(event, _TICKETED):
        return event.ticket
    return None


def answer_or_fail(
    ok: Callable[[m.Message], list[Action]], fail: Callable[[KmsError], list[Action]]
) -> Then:
    """A continuation for a call: ``ok(answer)`` or ``fail(error)``."""

    def then(event: Input) -> list[Action]:
        if isinstance(event, Answered):
            return ok(event.message)
        assert isinstance(event, CallFailed)
        return fail(event.error)

    return then
