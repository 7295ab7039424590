"""The AKMS engine: KSA keys made between the two access nodes, without I/O.

**AKMS A** (the requesting access node) takes a UKMS's ``KsaRequest``, asks the request
validator (the topology's contracts today, AAA later) who the slave is and how the keys
cross, and asks **AKMS B** (``CnRequest``) over their channel. AKMS B draws the keys and a
CN key from the PTG.3 generator in one request, asks the path provider for the path back,
hands the CN key to its own CKMS to relay (``RelayLocal``) and, side by side, delivers the
slave's copies to UKMS B under that link's keys (``Deliver``); it then answers with the
keys sealed under the CN key. AKMS A waits for both that answer and the CN key (handed
over by its own CKMS at the end of the relay, ``CnLocal``), opens the batch and seals it
for UKMS A under their link's keys. A ``KsaRequest`` marked ``refill`` fills a UKMS's
stock: the validator only looks the pair up (``ValidationQuery.refill``). A request the
UKMS serves from that stock comes as a ``KsaStocked``: AKMS A asks the validator and
answers its verdict (``Ok`` or the denial), nothing else (table ``AKMS_STOCKED``).

**A relay that fails on its way** (a hop aborts it back: ``CnAbort``; or AKMS B could not
start it: a refusal for want of key or a peer unreachable) is tried once more
(:data:`RELAY_ATTEMPTS`), before the request's first deadline: AKMS A asks again under a
*new request ID*, so AKMS B draws fresh keys and a fresh CN key and asks the path provider
again (under the QKDN Controller, the path after a protection switch). Nothing of the
failed attempt is used: its CN key never arrived, a late hand-over or answer under the
old ID is refused or ignored, and the slave's copies it left at UKMS B carry key IDs the
master never learns. A 004 stream's request is not retried (its key IDs derive from the
stream: the same IDs may not be delivered twice).

**The channel** between the two access nodes (:mod:`appliance.kms.channel`) is opened from
their pre-shared key (``ChannelOpen``, then a ``DerivePsk`` at each end) and re-keyed at
once, and every ``REKEY_AFTER`` requests, with a key relayed over the QKDN like any KSA
key. The requests that waited for the channel to open do not wait for its first re-key:
they go under the PSK-derived key, their relays side by side with the re-key's (a cold
channel puts no relay of its own before the request's); if that re-key fails,
they fail with it and the channel closes. Every ``CnRequest`` and its answer travel in a
``Tagged`` envelope.

Tables: ``AKMS_A``, ``AKMS_STOCKED``, ``REKEY``, ``CHANNEL``, ``AKMS_B``, ``CALLEE_OPEN``
(:mod:`states`).
Keys, CN keys and channel keys are erased once used and never logged.
"""

from __future__ import annotations

import functools
import hmac
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import msgspec

from appliance.kms import channel, keyids, ksa
from appliance.kms import messages as m
from appliance.kms.channel import CalleeChannel, CallerChannel
from appliance.kms.engines.base import EngineBase, RandomBytes, SealJob, answer_or_fail, erase
from appliance.kms.engines.config import EngineConfig
from appliance.kms.engines.states import (
    AKMS_A,
    AKMS_B,
    AKMS_STOCKED,
    CALLEE_OPEN,
    CHANNEL,
    REKEY,
    I,
    S,
)
from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    KmsError,
    ProtocolError,
    ReplayDetected,
    Resync,
    UnknownChannel,
)
from appliance.kms.events import (
    Action,
    Alarm,
    Answered,
    CallFailed,
    DerivePsk,
    FindPath,
    Input,
    Notice,
    PathFound,
    PskDerived,
    Received,
    Refuse,
    Reply,
    Validate,
    Validated,
)
from appliance.kms.fsm import Table
from appliance.kms.linkend import Role
from appliance.kms.relay import Mode
from appliance.kms.seams import Denial, Denied, ValidationQuery, Verdict

CALLER_CHANNELS = 4
"""Open channels a callee keeps per calling access node (older ones are closed)."""
SEEN_REQUESTS = 100_000
"""Request IDs AKMS B remembers, to refuse a request replayed or delivered twice (the
channel tag proves who sent a request, not that it is new)."""
CN_PATH = "/v1/cn"
"""The path the channel tags bind (the endpoint of ``CnRequest``)."""
RELAY_ATTEMPTS = 2
"""Attempts of one user request at relaying its CN key (the first and one retry)."""


class Asking(msgspec.Struct, eq=False):
    """AKMS A: one request for keys from AKMS B (a user's, or a channel re-key)."""

    state: S
    table: Table[S, I]
    request_id: bytes
    peer: int
    """AKMS B."""
    request: m.CnRequest | None = None
    req: int | None = None
    """The UKMS request to answer (None for a re-key)."""
    ukms: int = 0
    mode: Mode = Mode.GCM
    chan: CallerChannel | None = None
    sealed: bytes | None = None
    """AKMS B's answer: the batch under the CN key."""
    cn_key: bytearray | None = None
    batch: bytearray | None = None
    reopened: bool = False
    then: Callable[[bytearray | KmsError], list[Action]] | None = None
    """A re-key's continuation: the new channel key, or why there is none."""
    local: list[m.SlaveAt] = msgspec.field(default_factory=list)
    """Additional slaves behind this access node: their copies are delivered from here."""
    deliveries: int = 0
    """Of those, copies not yet stored at their UKMSs."""
    attempts: int = 1
    deadline: float = 0.0
    """When the CN key must have come (the first attempt's deadline binds every retry)."""


class OutChannel(msgspec.Struct, eq=False):
    """The caller's end of the channel to one peer AKMS, while it opens and once open."""

    state: S
    peer: int
    nonce: bytes = b""
    chan: CallerChannel | None = None
    waiting: list[Callable[[CallerChannel | KmsError], list[Action]]] = msgspec.field(
        default_factory=list
    )
    rekeying: bool = False


class Answering(msgspec.Struct, eq=False):
    """AKMS B: one request from AKMS A being answered."""

    state: S
    req: int
    caller: int
    request: m.CnRequest
    chan: CalleeChannel
    epoch: int
    mode: Mode
    batch: bytearray
    cn_key: bytearray
    error: KmsError | None = None
    deliveries: int = 0
    """Slaves' copies not yet stored at their UKMSs."""


class AkmsEngine(EngineBase):
    """The AKMS services of a node (both sides, and the channel)."""

    def __init__(self, config: EngineConfig, rng: RandomBytes, nonce: RandomBytes) -> None:
        super().__init__(config, rng, nonce)
        self._asking: dict[bytes, Asking] = {}
        self._out: dict[int, OutChannel] = {}
        self._in: dict[int, dict[str, CalleeChannel]] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def on_received(self, event: Received) -> list[Action]:
        msg = event.message
        if isinstance(msg, m.KsaRequest):
            return self._on_ksa(event, msg)
        if isinstance(msg, m.KsaStocked):
            return self._on_stocked(event, msg)
        if isinstance(msg, m.Tagged):
            return self._on_cn(event, msg)
        if isinstance(msg, m.CnLocal):
            return self._on_cn_key(event, msg)
        if isinstance(msg, m.CnAbort):
            return self._on_cn_abort(event, msg)
        if isinstance(msg, m.ChannelOpen):
            return self._on_channel_open(event, msg)
        return super().on_received(event)

    def close(self) -> None:
        """Erase every channel key (the node stops)."""
        for out in self._out.values():
            if out.state is S.OPEN:
                CHANNEL.advance(out, I.CLOSED)
            if out.chan is not None:
                out.chan.close()
        for chans in self._in.values():
            for chan in chans.values():
                chan.close()

    # -- AKMS A: a user's request ---------------------------------------------------------
    def _on_ksa(self, event: Received, request: m.KsaRequest) -> list[Action]:
        link = self.links.get(event.caller)
        if link is None:
            return [Refuse(req=event.req, error=ProtocolError("a KSA request from no user node"))]
        if link.role is Role.SLAVE:
            link.seen_master_epoch(request.epoch)
        elif request.fresh:  # the UKMS restarted: it can no longer read what we sent with
            link.drop_sending()
        a = Asking(S.VALIDATING, AKMS_A, keyids.new_raw(1, self.nonce), 0, req=event.req)
        a.ukms = event.caller
        slaves = [request.slave, *request.also]  # each one checked against the contract
        verdicts: list[Verdict | None] = [None] * len(slaves)
        out: list[Action] = []
        for i, slave in enumerate(slaves):
            query = ValidationQuery(
                master=request.master,
                slave=slave,
                number=request.number,
                size=request.size,
                ukms=event.caller,
                req=event.req,
                refill=request.refill,
            )
            then = functools.partial(self._verdict, a, request, verdicts, i)
            out.append(Validate(ticket=self.number(then), query=query))
        return out

    def _on_stocked(self, event: Received, request: m.KsaStocked) -> list[Action]:
        """A request UKMS A serves from its stock: the validator's verdict is the answer
        (a validator that accounts commits the report before the ``Ok`` leaves)."""
        if event.caller not in self.links:
            error = ProtocolError("a stocked request from no user node")
            return [Refuse(req=event.req, error=error)]
        query = ValidationQuery(
            master=request.master,
            slave=request.slave,
            number=request.number,
            size=request.size,
            ukms=event.caller,
            req=event.req,
        )
        stocked = _Stocked(S.VALIDATING)
        then = functools.partial(self._stocked_verdict, stocked, event.req)
        return [Validate(ticket=self.number(then), query=query)]

    def _stocked_verdict(self, stocked: _Stocked, req: int, event: Input) -> list[Action]:
        assert isinstance(event, Validated)
        denied = event.verdict.denied
        if denied is not None:
            AKMS_STOCKED.advance(stocked, I.REFUSED)
            return [Refuse(req=req, error=denied)]
        AKMS_STOCKED.advance(stocked, I.VALID)
        return [Reply(req=req, message=m.Ok())]

    def _verdict(
        self,
        a: Asking,
        request: m.KsaRequest,
        verdicts: list[Verdict | None],
        i: int,
        event: Input,
    ) -> list[Action]:
        """One slave's verdict; once all are in, the request goes on or is refused."""
        assert isinstance(event, Validated)
        verdicts[i] = event.verdict
        if any(v is None for v in verdicts) or a.state is not S.VALIDATING:
            return []
        done = [v for v in verdicts if v is not None]
        denied = next((v.denied for v in done if v.denied is not None), None)
        if denied is None and not _can_share(done, self.me):
            denied = Denied(
                "the slave SAEs of one request must be served through the access point of "
                "the first slave or of the master, each at a user node of its own",
                why=Denial.LIMITS,
            )
        if denied is not None:
            return self._a_failed(a, denied)
        extra = [
            m.SlaveAt(slave=s, ukms=v.ukms_b) for s, v in zip(request.also, done[1:], strict=True)
        ]
        a.local = [x for x, v in zip(extra, done[1:], strict=True) if v.akms_b == self.me]
        remote = [x for x in extra if x not in a.local]
        return self._validated(a, request, done[0], remote)

    def _validated(
        self, a: Asking, request: m.KsaRequest, verdict: Verdict, extra: list[m.SlaveAt]
    ) -> list[Action]:
        AKMS_A.advance(a, I.VALID)
        a.peer, a.mode = verdict.akms_b, verdict.mode
        a.request = m.CnRequest(
            request_id=a.request_id,
            purpose="ksa",
            mode=_wire_mode(verdict.mode),
            master=request.master,
            slave=request.slave,
            number=request.number,
            size=request.size,
            ukms_b=verdict.ukms_b,
            deliver_to=self.me,
            stream=request.stream,
            also=extra,
            route_policy=verdict.route_policy,
        )
        self._asking[a.request_id] = a
        a.deadline = self.now + self.policy.cn_timeout
        timeout = self.timer(("cn", a.request_id), a.deadline, lambda: self._timeout(a))
        return [timeout, *self._with_channel(a.peer, lambda c: self._ask(a, c))]

    def _retry(self, a: Asking, error: KmsError) -> list[Action] | None:
        """Ask again under a new request ID if the relay failed and the request may be
        retried (module docstring); None if it may not."""
        retryable = isinstance(error, KeyUnavailable) or error.code == "KMS-UNREACHABLE"
        if (
            not retryable
            or a.table is not AKMS_A
            or a.state not in (S.ASKING, S.HAVE_ANSWER)
            or a.attempts >= RELAY_ATTEMPTS
            or a.request is None
            or a.request.stream is not None
            or self.now >= a.deadline
        ):
            return None
        AKMS_A.advance(a, I.RETRY)
        out = self.cancel(("cn", a.request_id))
        self._asking.pop(a.request_id, None)
        a.attempts += 1
        a.sealed = None  # the failed attempt's answer: under a CN key that never came
        a.request_id = keyids.new_raw(1, self.nonce)
        a.request = msgspec.structs.replace(a.request, request_id=a.request_id)
        self._asking[a.request_id] = a
        out.append(self.timer(("cn", a.request_id), a.deadline, lambda: self._timeout(a)))
        note = {"error": error.code, "attempt": a.attempts}
        out.append(Notice(event="relay failed; asking again with a fresh CN key", fields=note))
        return out + self._with_channel(a.peer, lambda c: self._ask(a, c))

    def _ask(self, a: Asking, chan: CallerChannel | KmsError) -> list[Action]:
        """Send the CnRequest on the open channel (or fail: no channel)."""
        if a.state in (S.DONE, S.FAILED):
            return []
        if isinstance(chan, KmsError):  # the channel's failure raised its own alarm
            return self._a_failed(a, chan, alarm=False)
        if a.table is AKMS_A:
            AKMS_A.advance(a, I.CHANNEL_READY)
        a.chan = chan
        assert a.request is not None
        body = m.encode(a.request)
        tagged = _tagged(chan.tag_request(CN_PATH, body), body)
        rid = a.request_id
        return [self.call((a.peer, "akms"), tagged, lambda e: self._answered(a, rid, e))]

    def _answered(self, a: Asking, rid: bytes, event: Input) -> list[Action]:
        if a.state in (S.DONE, S.FAILED) or rid != a.request_id:
            return []  # over, or the answer to an attempt given up (ciphertext only)
        if isinstance(event, CallFailed):
            reopen = a.table is AKMS_A and a.state is S.ASKING and not a.reopened
            if isinstance(event.error, UnknownChannel) and reopen:
                a.reopened = True  # AKMS B restarted and lost the channel: open it again, once
                self._drop_channel(a.peer, a.chan)
                AKMS_A.advance(a, I.REOPEN)
                return self._with_channel(a.peer, lambda c: self._ask(a, c))
            again = self._retry(a, event.error)
            return again if again is not None else self._a_failed(a, event.error)
        assert isinstance(event, Answered) and a.chan is not None
        try:
            answer = m.decode(_checked(a.chan, event.message), m.CnAnswer)
        except KmsError as exc:
            return self._a_failed(a, exc)
        a.sealed = answer.batch
        a.table.advance(a, I.ANSWER)
        return self._a_both(a)

    def _on_cn_key(self, event: Received, local: m.CnLocal) -> list[Action]:
        """Our CKMS hands over a CN key that arrived for one of our requests."""
        a = self._asking.get(local.request_id)
        if event.caller != self.me or a is None or a.state not in (S.ASKING, S.HAVE_ANSWER):
            erase(local.cn_key)
            error = ProtocolError("no request of ours is waiting for this CN key")
            return [Refuse(req=event.req, error=error)]
        a.cn_key = local.cn_key
        a.table.advance(a, I.CN_KEY)
        return [Reply(req=event.req, message=m.Ok()), *self._a_both(a)]

    def _on_cn_abort(self, event: Received, abort: m.CnAbort) -> list[Action]:
        """The CN key of one of our requests was lost on its way: fail it now."""
        if "akms" not in self.config.roles.get(event.caller, frozenset()):
            return [Refuse(req=event.req, error=ProtocolError("only an access node aborts"))]
        a = self._asking.get(abort.request_id)
        out: list[Action] = [Reply(req=event.req, message=m.Ok())]
        if a is not None:
            error = KeyUnavailable("the CN key was lost on its way")
            again = self._retry(a, error)
            out += again if again is not None else self._a_failed(a, error)
        return out

    def _timeout(self, a: Asking) -> list[Action]:
        return self._a_failed(a, KeyUnavailable("the CN key did not arrive in time"))

    def _a_both(self, a: Asking) -> list[Action]:
        """Once both the answer and the CN key are here: open the batch."""
        if a.state not in (S.SEALING, S.OPENING) or a.cn_key is None or a.sealed is None:
            return []
        self._asking.pop(a.request_id, None)
        out = self.cancel(("cn", a.request_id))
        try:
            a.batch = ksa.open_batch(a.mode, a.cn_key, a.request_id, a.sealed)  # erases CN key
        except KmsError as exc:
            return out + self._a_failed(a, exc)
        if a.table is REKEY:
            return out + self._rekeyed(a)
        if a.local:
            return out + self._deliver_here(a)
        return out + self._seal_for_ukms(a)

    def _deliver_here(self, a: Asking) -> list[Action]:
        """Additional slaves behind this access node: their copies go to their UKMSs from
        here, side by side, before the master's UKMS gets the keys."""
        assert a.request is not None and a.request.master is not None and a.batch is not None
        a.deliveries, out = len(a.local), []
        done = functools.partial(self._delivered_here, a)
        for x in a.local:
            copy = bytearray(a.batch)
            out += self._copy_to(
                x.ukms, a.request.master, x.slave, copy, a.request_id, a.mode, None, done
            )
        return out

    def _delivered_here(self, a: Asking, error: KmsError | None) -> list[Action]:
        if a.state is not S.SEALING:  # failed meanwhile
            return []
        if error is not None:
            return self._a_failed(a, error)
        a.deliveries -= 1
        return self._seal_for_ukms(a) if a.deliveries == 0 else []

    def _seal_for_ukms(self, a: Asking) -> list[Action]:
        """The keys, sealed for the master's UKMS under our link's keys."""
        assert a.batch is not None
        job = SealJob(
            peer=a.ukms,
            hop=self.hop(a.ukms, a.request_id, 0, a.mode),
            payload=a.batch,
            deadline=self.now + self.policy.patience,
            then=lambda sealed: self._a_sealed(a, sealed),
            fail=lambda exc: self._a_failed(a, exc),
        )
        return self.seal_for(job)

    def _a_sealed(self, a: Asking, sealed: bytes) -> list[Action]:
        AKMS_A.advance(a, I.SEALED)
        assert a.req is not None and a.batch is not None
        erase(a.batch)
        answer = m.KsaAnswer(sealed=sealed, epoch=self.links[a.ukms].epoch)
        return [Reply(req=a.req, message=answer)]

    def _a_failed(self, a: Asking, error: KmsError, *, alarm: bool = True) -> list[Action]:
        if a.state in (S.DONE, S.FAILED):
            return []
        a.table.advance(a, I.REFUSED)
        self._asking.pop(a.request_id, None)
        for buf in (a.cn_key, a.batch):
            if buf is not None:
                erase(buf)
        out = self.cancel(("cn", a.request_id))
        if alarm and isinstance(error, IntegrityFailure):
            out.append(Alarm(code=error.code, reason=error.message))
        if a.then is not None:
            return out + a.then(error)
        if a.req is not None:
            out.append(Refuse(req=a.req, error=error))
        return out

    # -- the channel, caller's end --------------------------------------------------------
    def _with_channel(
        self, peer: int, then: Callable[[CallerChannel | KmsError], list[Action]]
    ) -> list[Action]:
        """``then(channel)`` once the channel to ``peer`` is open (opening it if need be)."""
        out = self._out.get(peer)
        if out is not None and out.state is S.OPEN and out.chan is not None:
            extra = self._rekey_later(out) if out.chan.needs_rekey() else []
            return [*extra, *then(out.chan)]
        if out is not None and out.state is S.REKEYING and out.chan is not None:
            return then(out.chan)  # under the PSK-derived key while the first re-key runs
        if out is not None:
            out.waiting.append(then)
            return []
        out = self._out[peer] = OutChannel(
            S.ASKING, peer, self.rng(channel.NONCE_BYTES), waiting=[then]
        )
        request = m.ChannelOpen(nonce=out.nonce)
        done = answer_or_fail(lambda msg: self._opened(out, msg), lambda e: self._ch_failed(out, e))
        return [self.call((peer, "akms"), request, done)]

    def _opened(self, out: OutChannel, answer: m.Message) -> list[Action]:
        if not isinstance(answer, m.ChannelOpened):
            return self._ch_failed(out, ProtocolError("channel open answered with another message"))
        CHANNEL.advance(out, I.ANSWER)
        name = self.config.names[out.peer]
        context = channel.context(self.name, name, answer.channel_id)
        ticket = self.number(lambda e: self._derived(out, answer, e))
        return [
            DerivePsk(ticket=ticket, peer=name, context=context, nonces=out.nonce + answer.nonce)
        ]

    def _derived(self, out: OutChannel, answer: m.ChannelOpened, event: Input) -> list[Action]:
        assert isinstance(event, PskDerived)
        if event.key is None:
            return self._ch_failed(out, event.error or KeyUnavailable("no PSK-derived key"))
        expected = channel.confirmation(event.key, out.nonce, answer.nonce)
        if not hmac.compare_digest(answer.confirm, expected):
            erase(event.key)
            name = self.config.names[out.peer]
            return self._ch_failed(out, IntegrityFailure(f"the AKMS {name} does not hold our PSK"))
        CHANNEL.advance(out, I.DERIVED)
        chan = out.chan = CallerChannel(answer.channel_id, event.key)
        waiting, out.waiting = out.waiting, []
        actions: list[Action] = []
        for then in waiting:  # the requests first: their relays and the re-key's side by side
            actions += then(chan)
        return actions + self._rekey(out, lambda key: self._first_rekey(out, chan, key))

    def _first_rekey(
        self, out: OutChannel, chan: CallerChannel, key: bytearray | KmsError
    ) -> list[Action]:
        """The first re-key's end. If it failed, the channel closes, and so do the
        requests sent under its PSK-derived key meanwhile (a clean failure, as if they
        had waited for it); the next request opens a new channel."""
        if isinstance(key, KmsError):
            sent = [a for a in self._asking.values() if a.chan is chan and a.table is AKMS_A]
            actions = self._ch_failed(out, key)
            for a in sent:
                actions += self._a_failed(a, key, alarm=False)  # the channel raised its alarm
            return actions
        chan.rekey(key)
        CHANNEL.advance(out, I.REKEYED)
        return []

    def _rekey_later(self, out: OutChannel) -> list[Action]:
        """A re-key in the background while requests go on under the current key."""
        if out.rekeying:
            return []
        out.rekeying = True

        def done(key: bytearray | KmsError) -> list[Action]:
            out.rekeying = False
            if isinstance(key, KmsError) or out.chan is None or out.state is not S.OPEN:
                if not isinstance(key, KmsError):
                    erase(key)
                return []
            out.chan.rekey(key)
            CHANNEL.advance(out, I.REKEYED)
            return []

        return self._rekey(out, done)

    def _rekey(
        self, out: OutChannel, then: Callable[[bytearray | KmsError], list[Action]]
    ) -> list[Action]:
        """Ask AKMS B for one channel key, relayed over the QKDN like any KSA key."""
        assert out.chan is not None
        request_id = keyids.new_raw(1, self.nonce)
        a = Asking(S.ASKING, REKEY, request_id, out.peer, mode=self.policy.mode, then=then)
        a.request = m.CnRequest(
            request_id=request_id,
            purpose="channel",
            mode=_wire_mode(self.policy.mode),
            number=1,
            size=channel.KEY_BYTES * 8,
            deliver_to=self.me,
        )
        self._asking[request_id] = a
        timeout = self.timer(
            ("cn", request_id), self.now + self.policy.cn_timeout, lambda: self._timeout(a)
        )
        return [timeout, *self._ask(a, out.chan)]

    def _rekeyed(self, a: Asking) -> list[Action]:
        REKEY.advance(a, I.OPENED)
        assert a.batch is not None and a.then is not None
        try:
            ((_, key),) = ksa.decode_batch(a.batch)
        except (KmsError, ValueError) as exc:
            erase(a.batch)
            error = (
                exc if isinstance(exc, KmsError) else ProtocolError("a re-key batch holds one key")
            )
            return a.then(error)
        erase(a.batch)
        return a.then(key)

    def _ch_failed(self, out: OutChannel, error: KmsError) -> list[Action]:
        if out.state not in (S.DONE, S.FAILED):
            CHANNEL.advance(out, I.REFUSED)
        if self._out.get(out.peer) is out:
            del self._out[out.peer]
        if out.chan is not None:
            out.chan.close()
        actions: list[Action] = []
        if isinstance(error, IntegrityFailure):
            actions.append(Alarm(code=error.code, reason=error.message))
        waiting, out.waiting = out.waiting, []
        for then in waiting:
            actions += then(error)
        return actions

    def _drop_channel(self, peer: int, chan: CallerChannel | None) -> None:
        out = self._out.get(peer)
        if out is not None and out.chan is chan and out.state is S.OPEN:
            CHANNEL.advance(out, I.CLOSED)
            del self._out[peer]
            if out.chan is not None:
                out.chan.close()

    # -- the channel, callee's end --------------------------------------------------------
    def _on_channel_open(self, event: Received, request: m.ChannelOpen) -> list[Action]:
        name = self.config.names.get(event.caller, "")
        if "akms" not in self.config.roles.get(event.caller, frozenset()):
            return [
                Refuse(req=event.req, error=ProtocolError("only an access node opens a channel"))
            ]
        channel_id, nonce_b = self.rng(8).hex(), self.rng(channel.NONCE_BYTES)
        opening = _Opening(S.DERIVING)
        context = channel.context(name, self.name, channel_id)
        ticket = self.number(
            lambda e: self._callee_derived(opening, event, request.nonce, channel_id, nonce_b, e)
        )
        return [
            DerivePsk(ticket=ticket, peer=name, context=context, nonces=request.nonce + nonce_b)
        ]

    def _callee_derived(
        self,
        opening: _Opening,
        event: Received,
        nonce_a: bytes,
        channel_id: str,
        nonce_b: bytes,
        derived: Input,
    ) -> list[Action]:
        assert isinstance(derived, PskDerived)
        if derived.key is None:
            CALLEE_OPEN.advance(opening, I.REFUSED)
            error = derived.error or KeyUnavailable("no PSK-derived key")
            return [Refuse(req=event.req, error=error)]
        CALLEE_OPEN.advance(opening, I.DERIVED)
        chans = self._in.setdefault(event.caller, {})
        while len(chans) >= CALLER_CHANNELS:
            chans.pop(next(iter(chans))).close()
        chans[channel_id] = CalleeChannel(channel_id, {0: derived.key})
        confirm = channel.confirmation(derived.key, nonce_a, nonce_b)
        answer = m.ChannelOpened(channel_id=channel_id, nonce=nonce_b, confirm=confirm)
        return [Reply(req=event.req, message=answer)]

    # -- AKMS B: answering a request --------------------------------------------------------
    def _on_cn(self, event: Received, tagged: m.Tagged) -> list[Action]:
        chan = self._in.get(event.caller, {}).get(tagged.channel_id)
        try:
            if chan is None:
                raise UnknownChannel("no such channel here; open the channel again")
            epoch = chan.verify_request(CN_PATH, tagged.body, _header(tagged))
            request = m.decode(tagged.body, m.CnRequest)
            self._check_cn(event.caller, request)
            self._first_time(request.request_id)
        except KmsError as exc:
            out: list[Action] = [Refuse(req=event.req, error=exc)]
            if isinstance(exc, IntegrityFailure):
                out.insert(0, Alarm(code=exc.code, reason=exc.message))
            return out
        mode = Mode[request.mode]
        width = request.size // 8
        n = request.number
        # one PTG.3 request (one reseed) for the keys and the CN key that carries them
        drawn = bytearray(self.rng(n * width + ksa.cn_key_bytes(mode, n, width)))
        tag = request.stream  # a 004 stream's chunks: IDs from (KSID, index), not random
        ids = keyids.stream_raw(tag.ksid, tag.first, n) if tag else keyids.batch_raw(n, self.nonce)
        batch = ksa.pack_batch(ids, memoryview(drawn)[: n * width], width)
        cn_key = drawn[n * width :]
        erase(drawn)
        b = Answering(S.PATHING, event.req, event.caller, request, chan, epoch, mode, batch, cn_key)
        ticket = self.number(lambda e: self._b_path(b, e))
        find = FindPath(
            ticket=ticket, src=self.me, dst=request.deliver_to, route_policy=request.route_policy
        )
        return [find]

    def _first_time(self, request_id: bytes) -> None:
        """Refuse a request seen before: a replay would draw keys, spend link keys, and
        (for a re-key) replace the channel key the caller already holds."""
        if request_id in self._seen:
            raise ReplayDetected("a CN request seen before")
        self._seen[request_id] = None
        if len(self._seen) > SEEN_REQUESTS:
            self._seen.popitem(last=False)

    def _check_cn(self, caller: int, request: m.CnRequest) -> None:
        channel_key = (request.number, request.size) == (1, channel.KEY_BYTES * 8)
        if (
            request.deliver_to != caller
            or request.number > self.policy.max_key_per_request
            or (request.purpose == "channel" and not channel_key)
            or (request.purpose == "ksa" and request.ukms_b not in self.links)
            or any(extra.ukms not in self.links for extra in request.also)
        ):
            raise ProtocolError("malformed CN request")

    def _b_path(self, b: Answering, event: Input) -> list[Action]:
        assert isinstance(event, PathFound)
        if event.error is not None or not event.path:
            return self._b_failed(b, event.error or ProtocolError("no path"))
        AKMS_B.advance(b, I.PATH)
        r = b.request
        local = m.RelayLocal(
            request_id=r.request_id,
            path=list(event.path),
            index=0,
            cn_key=bytearray(b.cn_key),
            mode=_wire_mode(b.mode),
        )
        relayed = answer_or_fail(
            lambda _: self._b_step(b, I.RELAYED), lambda e: self._b_failed(b, e)
        )
        out: list[Action] = [self.call((self.me, "ckms"), local, relayed)]
        if r.purpose == "channel":
            b.chan.add_next(b.epoch, bytearray(b.batch[20 : 20 + channel.KEY_BYTES]))
            return out + self._b_step(b, I.DELIVERED)
        assert r.ukms_b is not None and r.slave is not None  # purpose ksa
        slaves = [(r.ukms_b, r.slave), *((x.ukms, x.slave) for x in r.also)]
        b.deliveries = len(slaves)
        for ukms, slave in slaves:  # each slave's copies to its own UKMS, side by side
            out += self._deliver(b, ukms, slave, bytearray(b.batch))
        return out

    def _deliver(self, b: Answering, ukms_b: int, slave: str, copy: bytearray) -> list[Action]:
        """One slave's copies of the keys, to its UKMS (AKMS B)."""
        master = b.request.master
        assert master is not None  # purpose ksa

        def done(error: KmsError | None) -> list[Action]:
            if error is not None:
                return self._b_failed(b, error)
            b.deliveries -= 1
            return self._b_step(b, I.DELIVERED) if b.deliveries == 0 else []

        r = b.request
        return self._copy_to(ukms_b, master, slave, copy, r.request_id, b.mode, r.stream, done)

    def _copy_to(
        self,
        ukms: int,
        master: str,
        slave: str,
        copy: bytearray,
        request_id: bytes,
        mode: Mode,
        stream: m.StreamTag | None,
        done: Callable[[KmsError | None], list[Action]],
        *,
        resealed: bool = False,
    ) -> list[Action]:
        """A slave's copies of keys, to its UKMS under our link keys: ``done(None)`` once
        stored there, ``done(error)`` if not; ``copy`` is erased either way. A UKMS that
        restarted (``Resync``) gets them sealed once more, with link keys it can read."""
        sealed_gen = [-1]  # the link's sending generation the copy was sealed under

        def sealed(message: bytes) -> list[Action]:
            sealed_gen[0] = self.links[ukms].generation
            deliver = m.Deliver(
                master=master,
                slave=slave,
                sealed=message,
                epoch=self.links[ukms].epoch,
                stream=stream,
            )
            return [self.call((ukms, "ukms"), deliver, answered)]

        def answered(event: Input) -> list[Action]:
            if isinstance(event, Answered):
                erase(copy)
                return done(None)
            assert isinstance(event, CallFailed)
            if isinstance(event.error, Resync) and not resealed:  # the UKMS restarted
                link = self.links[ukms]
                if link.generation == sealed_gen[0]:  # else another refusal renewed it
                    link.drop_sending()
                again = (ukms, master, slave, copy, request_id, mode, stream, done)
                return self._copy_to(*again, resealed=True)
            erase(copy)
            return done(event.error)

        def failed(exc: KmsError) -> list[Action]:
            erase(copy)
            return done(exc)

        job = SealJob(
            peer=ukms,
            hop=self.hop(ukms, request_id, 0, mode),
            payload=copy,
            deadline=self.now + self.policy.patience,
            then=sealed,
            fail=failed,
        )
        return self.seal_for(job)

    def _b_step(self, b: Answering, step: I) -> list[Action]:
        if b.state in (S.DONE, S.FAILED):
            return []
        if AKMS_B.next(b.state, step) is S.DONE and b.epoch not in b.chan.keys:
            # the channel was closed meanwhile (its caller opened newer ones): no answer
            # can be tagged; the caller opens the channel again
            return self._b_failed(b, UnknownChannel("the channel closed while answering"))
        if AKMS_B.advance(b, step) is not S.DONE:
            return []
        sealed = ksa.seal_batch(b.mode, b.cn_key, b.request.request_id, b.batch)  # erases both
        body = m.encode(m.CnAnswer(batch=sealed))
        header = b.chan.tag_response(b.epoch, CN_PATH, body)
        return [Reply(req=b.req, message=_tagged(header, body))]

    def _b_failed(self, b: Answering, error: KmsError) -> list[Action]:
        if b.state in (S.DONE, S.FAILED):
            return []
        AKMS_B.advance(b, I.REFUSED)
        erase(b.cn_key)
        erase(b.batch)
        return [Refuse(req=b.req, error=error)]


class _Opening(msgspec.Struct, eq=False, gc=False):
    state: S


class _Stocked(msgspec.Struct, eq=False, gc=False):
    """AKMS A: a request served from its UKMS's stock, being validated."""

    state: S


def _can_share(verdicts: list[Verdict], me: int) -> bool:
    """Whether the slaves of one request can share its keys. The keys are made at the
    first slave's access node and cross the network once, to the master's (``me``): every
    slave's copies leave from one of the two, so each slave's UKMS must hang off one of
    them (the first slave's across the network), with one relay mode. And each slave's UKMS
    must be its own: a UKMS's store holds a key ID once (one session per key)."""
    first = verdicts[0]
    ends = (first.akms_b, me)
    fits = all(
        v.akms_b in ends and (v.mode, v.route_policy) == (first.mode, first.route_policy)
        for v in verdicts
    )
    crosses = len(verdicts) == 1 or first.akms_b != me
    return fits and crosses and len({v.ukms_b for v in verdicts}) == len(verdicts)


def _wire_mode(mode: Mode) -> Literal["OTP", "GCM"]:
    return "OTP" if mode is Mode.OTP else "GCM"


def _tagged(header: str, body: bytes) -> m.Tagged:
    channel_id, epoch, tag = channel.parse_header(header)
    return m.Tagged(channel_id=channel_id, epoch=epoch, tag=tag, body=body)


def _header(tagged: m.Tagged) -> str:
    return f"{tagged.channel_id};{tagged.epoch};{tagged.tag}"


def _checked(chan: CallerChannel, answer: m.Message) -> bytes:
    """The body of a tagged answer whose tag checks out under our channel key."""
    if not isinstance(answer, m.Tagged):
        raise ProtocolError("a CN request answered without a channel tag")
    chan.check_response(CN_PATH, answer.body, _header(answer))
    return answer.body
