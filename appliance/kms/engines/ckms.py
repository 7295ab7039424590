"""The CKMS engine: CN keys relayed hop by hop along their paths, without I/O.

A CN key enters a CKMS either from its own access node's AKMS at the start of a path
(``RelayLocal``: the responding AKMS B hands it over with the path) or from the previous
hop (``RelayItem``, sealed under that link's keys). The CKMS opens it, checks it is on
its path, answers the previous hop at once, and seals it again for the next hop (the
chain is pipelined, not nested). At the end of the path it hands the key to its own AKMS
(``CnLocal``); the first CN key of a pair to arrive over another path than the last one
(a protection switch, a route moved) is logged there once (``relays arrive over a new
path``, :class:`Arrivals`): when the first relay on a new path succeeded. A hop that
cannot forward sends ``RelayAbort`` back along the path to its start, whose access node
tells the requesting AKMS (``CnAbort``): the request fails at once instead of waiting for
a key that will not come.

The life of one CN key at one hop is the ``RELAY`` table of :mod:`states`. A CN key is
erased as soon as the next hop has accepted it, or the relay failed; it is never logged.
"""

from __future__ import annotations

import msgspec

from appliance.kms import messages as m
from appliance.kms.engines.base import EngineBase, RandomBytes, SealJob, answer_or_fail, erase
from appliance.kms.engines.config import EngineConfig
from appliance.kms.engines.states import RELAY, I, S
from appliance.kms.errors import IntegrityFailure, KmsError, ProtocolError, Resync
from appliance.kms.events import (
    Action,
    Alarm,
    Answered,
    CallFailed,
    Input,
    Notice,
    Received,
    Refuse,
    Reply,
)
from appliance.kms.relay import Direction, Hop, Mode


class Relayed(msgspec.Struct, eq=False, gc=False):
    """One CN key passing through this node."""

    state: S
    req: int | None
    """The request to answer when this hop is done (a hand-over or the last hop), or None
    once the previous hop has been answered."""
    path: tuple[int, ...]
    index: int
    """Our position on the path."""
    request_id: bytes = b""
    cn_key: bytearray | None = None
    mode: Mode = Mode.GCM
    resealed: bool = False
    sealed_gen: int = -1
    """The generation of the next hop's sending state the CN key was last sealed under."""


class Arrivals:
    """The path the last CN key of each (source, destination) pair arrived over, at the
    path's end: :meth:`changed` says when a pair's keys first come over another path.
    Bounded: past :data:`MAX_PAIRS` pairs the oldest is forgotten."""

    MAX_PAIRS = 4096

    def __init__(self) -> None:
        self._last: dict[tuple[int, int], tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self._last)

    def changed(self, path: tuple[int, ...]) -> bool:
        """Record a CN key delivered over ``path``; True if the pair's last came over
        another path (not for a pair's first key: no path changed)."""
        pair = (path[0], path[-1])
        last = self._last.pop(pair, None)
        self._last[pair] = path
        if len(self._last) > self.MAX_PAIRS:
            del self._last[next(iter(self._last))]
        return last is not None and last != path


class CkmsEngine(EngineBase):
    """The relay service of a node."""

    def __init__(self, config: EngineConfig, rng: RandomBytes, nonce: RandomBytes) -> None:
        super().__init__(config, rng, nonce)
        self.arrivals = Arrivals()

    def on_received(self, event: Received) -> list[Action]:
        message = event.message
        if isinstance(message, m.RelayItem):
            return self._on_item(event, message)
        if isinstance(message, m.RelayLocal):
            return self._on_local(event, message)
        if isinstance(message, m.RelayAbort):
            return self._on_abort(event, message)
        return super().on_received(event)

    # -- a CN key arrives -----------------------------------------------------------------
    def _on_item(self, event: Received, item: m.RelayItem) -> list[Action]:
        path, index = tuple(item.path), item.index
        if not 0 < index < len(path) or path[index] != self.me or path[index - 1] != event.caller:
            return [Refuse(req=event.req, error=ProtocolError("relay message off its path"))]
        relayed = Relayed(S.OPENING, event.req, path, index)
        return self.open_from(
            event.caller,
            item.message,
            item.epoch,
            lambda hop, key: self._opened(relayed, hop, key),
            lambda exc: self._failed(relayed, exc),
        )

    def _opened(self, r: Relayed, hop: Hop, cn_key: bytearray) -> list[Action]:
        if hop.hop != r.index - 1 or hop.direction is not Direction.TO_REQUESTER:
            erase(cn_key)
            return self._failed(r, IntegrityFailure("hop number or direction off the path"))
        r.request_id, r.mode, r.cn_key = hop.request_id, hop.mode, cn_key
        if r.index == len(r.path) - 1:  # we are the requesting access node: hand it over
            RELAY.advance(r, I.OPENED_LAST)
            handover = m.CnLocal(request_id=hop.request_id, cn_key=cn_key)
            r.cn_key = None  # it is our AKMS's now (erased there, or by the adapter if sent)
            then = answer_or_fail(lambda _: self._delivered(r), lambda e: self._failed(r, e))
            return [self.call((self.me, "akms"), handover, then)]
        RELAY.advance(r, I.OPENED)
        answer, r.req = Reply(req=r.req or 0, message=m.Ok()), None
        return [answer, *self._forward(r)]

    def _on_local(self, event: Received, local: m.RelayLocal) -> list[Action]:
        path, index = tuple(local.path), local.index
        if event.caller != self.me or not 0 <= index < len(path) - 1 or path[index] != self.me:
            erase(local.cn_key)
            error = ProtocolError("a local hand-over comes from this node, on its path")
            return [Refuse(req=event.req, error=error)]
        r = Relayed(S.SEALING, event.req, path, index, local.request_id, local.cn_key)
        r.mode = Mode[local.mode]
        return self._forward(r)

    # -- on to the next hop -----------------------------------------------------------------
    def _forward(self, r: Relayed) -> list[Action]:
        nxt = r.path[r.index + 1]
        if nxt not in self.links or r.cn_key is None:
            return self._failed(r, ProtocolError("the next hop is not our neighbour"))
        job = SealJob(
            peer=nxt,
            hop=self.hop(nxt, r.request_id, r.index, r.mode),
            payload=r.cn_key,
            deadline=self.now + self.policy.patience,
            then=lambda sealed: self._sealed(r, nxt, sealed),
            fail=lambda exc: self._failed(r, exc),
        )
        return self.seal_for(job)

    def _sealed(self, r: Relayed, nxt: int, sealed: bytes) -> list[Action]:
        RELAY.advance(r, I.SEALED)
        r.sealed_gen = self.links[nxt].generation
        item = m.RelayItem(
            path=list(r.path), index=r.index + 1, message=sealed, epoch=self.links[nxt].epoch
        )
        return [self.call((nxt, "ckms"), item, lambda e: self._sent(r, nxt, e))]

    def _sent(self, r: Relayed, nxt: int, event: Input) -> list[Action]:
        if isinstance(event, Answered):
            return self._accepted(r)
        assert isinstance(event, CallFailed)
        error = event.error
        if isinstance(error, Resync) and not r.resealed:  # the next hop restarted
            r.resealed = True
            link = self.links[nxt]
            if link.generation == r.sealed_gen:  # else another refusal renewed it already
                link.drop_sending()
            RELAY.advance(r, I.STALE)
            return self._forward(r)
        return self._failed(r, error)

    # -- endings ----------------------------------------------------------------------------
    def _accepted(self, r: Relayed) -> list[Action]:
        RELAY.advance(r, I.ACCEPTED)
        if r.cn_key is not None:
            erase(r.cn_key)
        return [Reply(req=r.req, message=m.Ok())] if r.req is not None else []

    def _delivered(self, r: Relayed) -> list[Action]:
        """The CN key reached its path's end: logged if the first over a new path."""
        out = self._accepted(r)
        if self.arrivals.changed(r.path):
            fields = {"src": r.path[0], "dst": r.path[-1], "path": "-".join(map(str, r.path))}
            out.append(Notice(event="relays arrive over a new path", fields=fields))
        return out

    def _failed(self, r: Relayed, error: KmsError) -> list[Action]:
        """A hop that cannot go on: refuse whoever still waits, else abort back."""
        if r.state not in (S.DONE, S.FAILED):
            RELAY.advance(r, I.REFUSED)
        if r.cn_key is not None:
            erase(r.cn_key)
        out: list[Action] = []
        if isinstance(error, IntegrityFailure):
            out.append(Alarm(code=error.code, reason=error.message))
        if r.req is not None:
            return [*out, Refuse(req=r.req, error=error)]
        fields = {"request": r.request_id.hex(), "error": error.code}
        out.append(Notice(event="relay failed; aborting the request", fields=fields, warning=True))
        return out + self._abort_back(r.request_id, r.path, r.index)

    def _abort_back(self, request_id: bytes, path: tuple[int, ...], index: int) -> list[Action]:
        """One step of an abort towards the path's start; from there, to the requester."""
        abort: m.Message
        if index == 0:
            to, abort = (path[-1], "akms"), m.CnAbort(request_id=request_id)
        else:
            to = (path[index - 1], "ckms")
            abort = m.RelayAbort(request_id=request_id, path=list(path), index=index - 1)
        return [self.call(to, abort, self._abort_sent)]

    def _abort_sent(self, event: Input) -> list[Action]:
        if not isinstance(event, CallFailed):
            return []
        fields = {"error": event.error.code}
        return [Notice(event="abort not delivered", fields=fields, warning=True)]

    def _on_abort(self, event: Received, abort: m.RelayAbort) -> list[Action]:
        path, index = tuple(abort.path), abort.index
        if not 0 <= index < len(path) - 1 or path[index] != self.me:
            return [Refuse(req=event.req, error=ProtocolError("relay abort off its path"))]
        if path[index + 1] != event.caller:
            return [Refuse(req=event.req, error=ProtocolError("relay abort off its path"))]
        reply = Reply(req=event.req, message=m.Ok())
        return [reply, *self._abort_back(abort.request_id, path, index)]
