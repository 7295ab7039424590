"""The UKMS engine: the keys of the SAEs served at a user node, without I/O.

* **enc_keys** (the master SAE): from the pair's stock when it holds enough keys of the
  usual size, else made through the network: a ``KsaRequest`` to our AKMS, whose answer
  (the keys sealed under our link's keys) is opened here.
* **dec_keys** (the slave SAE): the named keys are taken from the store, *pending*: they
  stay in the store, fetchable by nobody, until the answer has been handed to the SAE's
  connection (``SaeAnswerWritten``), then they are released. An answer that never left
  (the connection was gone) restores them for the slave; a crash in between leaves them
  pending, and the store lets the same slave take them again for a bounded window
  (:mod:`appliance.kms.store`). No crash loses a key.
* **Deliveries**: the slave's copies of new keys arrive from AKMS B (``Deliver``) under
  our link's keys and are stored for dec_keys.
* **The stock** ("keys may be buffered in advance"): for each pair whose master is served
  here, ``policy.stock`` keys made ahead and kept in the store (on disk, not in
  memory). A pair is short once half a batch or more is missing from its stock (a batch
  is ``stock_batch``, or the stock itself when smaller); short pairs queue for a refill
  and take turns (first short, first served; a refilled pair not yet full goes to the
  back), ``stock_parallel`` at a time, until the stock is full again; a refill always
  asks for a whole batch. So a stock filled holds at least ``policy.stock`` and at most a
  batch less one beyond, a busy pair costs one relay per batch, not per key, and a pair
  drawn on lightly costs no relay until it is short. A failed refill sends its pair to
  the back of the queue and pauses every refill for a back-off (one timer for the engine,
  never one per pair). Keys are taken from the store a lease at a time (deleted at once,
  so never handed out twice) and served from memory; leases are kept for at most
  ``MAX_LEASED`` pairs. A lease is sized by demand: a pair's first takes what its requests
  ask plus ``LEASE_FIRST`` ahead, each lease after it twice as many ahead, up to
  ``LEASE``; a lease given back (the least recently used pair) starts its pair small
  again. So a pair drawn a few times takes a few keys out of the store (and gives few
  back), and a busy pair a whole ``LEASE`` at a time.

  What a pair costs here is bounded by what it does, not by how many pairs there are: an
  idle pair with a full stock is one count in :attr:`UkmsEngine._levels` (keys in its
  stock, as the store last told) and nothing else: no timer, no object (but, for the
  ``MAX_GROWN`` pairs leased last, the size of its next lease). A pair gets a
  :class:`Stock` (its lease, its waiting requests) only while it leases, waits or
  refills, and loses it when it settles.

  **Under AAA** (``policy.terms_from_akms``: the contracts live at the AKMS) a refill
  (``KsaRequest.refill``) is charged to nobody, and a request served from the stock is
  allowed by our AKMS before its keys leave: the keys are taken from the lease first, a
  ``KsaStocked`` goes to the AKMS, which validates it against the contract like any request
  and commits its accounting before it answers ``Ok``; then the keys go to the SAE. A
  refusal (or an AKMS that cannot be reached) puts them back at the front of the lease
  and the SAE gets the denial's ETSI 014 status. So a stocked key is billed once, when the
  request that carried it is answered, and a refused request is billed nothing.

Tables: ``UKMS_ENC``, ``REFILL``, ``UKMS_DEC``, ``DELIVERY`` (:mod:`states`). Key
material is erased once handed on; nothing is logged.
"""

from __future__ import annotations

import functools
from collections import OrderedDict, deque
from collections.abc import Callable

import msgspec

from appliance.kms import keyids, ksa
from appliance.kms import messages as m
from appliance.kms.engines.base import EngineBase, RandomBytes, answer_or_fail, erase
from appliance.kms.engines.config import EngineConfig
from appliance.kms.engines.states import DELIVERY, REFILL, UKMS_DEC, UKMS_ENC, I, S
from appliance.kms.errors import IntegrityFailure, KeyUnavailable, KmsError, ProtocolError
from appliance.kms.events import (
    Action,
    Alarm,
    Housekeep,
    Input,
    KeyBits,
    Levels,
    Received,
    Refuse,
    Reply,
    SaeAnswerWritten,
    SaeDecKeys,
    SaeEncKeys,
    SaeKeys,
    SaeRefused,
    StoreDone,
    StoreOp,
    StoreRequest,
)
from appliance.kms.relay import Hop
from appliance.kms.seams import SessionRegistry
from appliance.kms.storeops import (
    DST004,
    Put,
    Release,
    Restore,
    StoredKey,
    Take,
    TakeOldest,
    stream_session,
)

LEASE = 64
"""The most keys a lease takes from a pair's stock ahead of demand, beyond the requests
waiting."""
LEASE_FIRST = 4
"""Keys a pair's first lease takes ahead of demand; each next lease of the pair takes twice
as many ahead, up to ``LEASE``."""
MAX_LEASED = 256
"""Pairs whose leased keys are kept in memory at once (the least recently used give
theirs back to the store)."""
MAX_GROWN = 4 * MAX_LEASED
"""Pairs whose next lease size is remembered (the least recently leased start again at
``LEASE_FIRST``)."""
STOCK = "stock"
KSA = "ksa"
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
"""Seconds the refills pause after a failed one (doubling while they keep failing)."""
REFILL_PAUSE = "refill-pause"
"""The key of the engine's one refill back-off timer."""


class Enc(msgspec.Struct, eq=False, gc=False):
    """A master SAE's enc_keys."""

    state: S
    req: int
    session: str
    master: str
    slave: str
    number: int
    size: int
    stream: m.StreamTag | None = None
    also: tuple[str, ...] = ()


class Refill(msgspec.Struct, eq=False, gc=False):
    state: S
    session: str
    number: int


class Dec(msgspec.Struct, eq=False, gc=False):
    state: S
    req: int
    session: str
    key_ids: tuple[str, ...] = ()


class Delivery(msgspec.Struct, eq=False, gc=False):
    state: S
    req: int


class Stock(msgspec.Struct, eq=False):
    """What an active pair holds in memory: keys leased, requests waiting for a lease,
    whether a lease or a refill is under way (an idle pair has none of this)."""

    leased: deque[StoredKey] = msgspec.field(default_factory=deque)
    leasing: bool = False
    waiting: list[Enc] = msgspec.field(default_factory=list)
    refilling: bool = False

    def idle(self) -> bool:
        return not (self.leased or self.leasing or self.waiting or self.refilling)


class UkmsEngine(EngineBase):
    """The UKMS services of a node."""

    def __init__(
        self,
        config: EngineConfig,
        rng: RandomBytes,
        nonce: RandomBytes,
        sessions: SessionRegistry,
    ) -> None:
        super().__init__(config, rng, nonce)
        if len(self.links) != 1:
            raise ProtocolError(f"UKMS {self.name} must hang off exactly one AKMS")
        self.akms = next(iter(self.links))
        self.sessions = sessions
        self._levels: dict[str, int] = {}  # stocked session -> keys in its stock (store)
        self._stocks: dict[str, Stock] = {}  # the active pairs only
        self._leased: OrderedDict[str, None] = OrderedDict()  # sessions with a lease, LRU
        self._ahead: OrderedDict[str, int] = OrderedDict()  # next lease's keys ahead, LRU
        self._short: deque[str] = deque()  # sessions queued for a refill, in turn
        self._queued: set[str] = set()  # the same sessions, to look up
        self._refills = 0
        self._refill_backoff = BACKOFF_FIRST
        self._dec: dict[int, Dec] = {}
        self._fresh = True  # no answer of our AKMS opened yet in this run
        if self.policy.stock > 0:
            for master, slave in sessions.master_pairs():
                session = sessions.session_014(master, slave)
                if session is not None:
                    self._levels[session] = 0

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        out = super().start(now)
        if self._levels:
            out.append(self.store(Levels(kind=STOCK), self._levels_read))
        return out

    def stop(self) -> list[Action]:
        """Give the leased keys back to the stock (a graceful stop keeps them)."""
        out: list[Action] = []
        for session in list(self._leased):
            out += self._give_back(session)
        return out

    def housekeeping(self) -> list[Action]:
        return [*super().housekeeping(), self.store(Housekeep(), lambda _: [])]

    def stored(self, master: str, slave: str) -> int:
        """Keys ready for a pair (ETSI 014 Status): in its stock and leased."""
        session = self.sessions.session_014(master, slave) or ""
        if session not in self._levels:
            return 0
        return self._levels[session] + self._leased_count(session)

    def leased(self, master: str, slave: str) -> int:
        """Keys of a pair's lease in memory (what :meth:`from_lease_now` may serve)."""
        session = self.sessions.session_014(master, slave)
        return self._leased_count(session) if session is not None else 0

    def _leased_count(self, session: str) -> int:
        stock = self._stocks.get(session)
        return len(stock.leased) if stock is not None else 0

    def _active(self, session: str) -> Stock:
        """The pair's in-memory part, made when it becomes active."""
        stock = self._stocks.get(session)
        if stock is None:
            stock = self._stocks[session] = Stock()
        return stock

    def _settle(self, session: str) -> None:
        """Forget the in-memory part of a pair that has become idle again."""
        stock = self._stocks.get(session)
        if stock is not None and stock.idle():
            del self._stocks[session]

    def store(self, op: StoreRequest, then: Callable[[Input], list[Action]]) -> StoreOp:
        return StoreOp(ticket=self.number(then), op=op)

    # -- inputs -------------------------------------------------------------------------------
    def on_received(self, event: Received) -> list[Action]:
        if isinstance(event.message, m.Deliver):
            return self._on_deliver(event, event.message)
        return super().on_received(event)

    def on_other(self, event: Input) -> list[Action]:
        if isinstance(event, SaeEncKeys):
            return self._enc_keys(event)
        if isinstance(event, SaeDecKeys):
            return self._dec_keys(event)
        if isinstance(event, SaeAnswerWritten):
            return self._written(event)
        return super().on_other(event)

    # -- enc_keys -------------------------------------------------------------------------------
    def _enc_keys(self, event: SaeEncKeys) -> list[Action]:
        session = self.sessions.session_014(event.master, event.slave)
        if session is None:
            error = KeyUnavailable("not a pair served as master here")
            return [SaeRefused(req=event.req, error=error)]
        for extra in event.also:
            if self.sessions.session_014(event.master, extra) is None:
                error = KeyUnavailable("an additional slave is not paired with the master here")
                return [SaeRefused(req=event.req, error=error)]
        enc = Enc(S.ASKING, event.req, session, event.master, event.slave, event.number, event.size)
        enc.stream, enc.also = event.stream, event.also
        shared = enc.stream is not None or bool(enc.also)  # never from the pair's stock
        if session in self._levels and event.size == self.policy.key_size and not shared:
            enc.state = S.LEASING
            stock = self._stocks.get(session)
            leased = len(stock.leased) if stock is not None else 0
            if stock is not None and leased >= enc.number:
                return self._from_lease(stock, enc)
            if self._levels[session] + leased >= enc.number or (stock and stock.leasing):
                stock = self._active(session)
                stock.waiting.append(enc)
                return self._lease(session, stock)
            UKMS_ENC.advance(enc, I.SHORT)  # stock too low right now: make them end to end
        return self._ask(enc)

    def _from_lease(self, stock: Stock, enc: Enc) -> list[Action]:
        keys = [stock.leased.popleft() for _ in range(enc.number)]
        if self.policy.terms_from_akms:  # the AKMS allows and accounts for it first
            UKMS_ENC.advance(enc, I.TAKEN)
            out = self._allow_stocked(enc, keys)
        else:
            UKMS_ENC.advance(enc, I.LEASED)
            out = [SaeKeys(req=enc.req, keys=[(k.key_id, k.material) for k in keys])]
        return out + self._drawn(stock, enc.session)

    def _drawn(self, stock: Stock, session: str) -> list[Action]:
        """After keys were drawn from a pair's lease: forget an empty lease, refill."""
        if not stock.leased:
            self._leased.pop(session, None)
        out = self._want_stock(session)
        self._settle(session)
        return out

    def from_lease_now(
        self, master: str, slave: str, number: int, size: int, now: float
    ) -> tuple[list[StoredKey], list[Action]] | None:
        """A master's enc_keys served in one step (the adapter's direct path): when the
        pair's lease in memory already holds ``number`` keys of the usual size and no one
        has to be asked first (no AAA check), the keys (the caller hands them to the SAE
        and erases them) and the actions that follow (a refill); else None, having done
        nothing: the request then goes the full way (:class:`SaeEncKeys`). It is the
        ``LEASING -> LEASED -> DONE`` life of ``UKMS_ENC`` without waiting in between, so
        no request is kept for it."""
        if self.policy.terms_from_akms or size != self.policy.key_size:
            return None
        session = self.sessions.session_014(master, slave)
        stock = self._stocks.get(session) if session is not None else None
        if session is None or stock is None or len(stock.leased) < number or number < 1:
            return None
        self.now = now
        keys = [stock.leased.popleft() for _ in range(number)]
        return keys, self._drawn(stock, session)

    def _allow_stocked(self, enc: Enc, keys: list[StoredKey]) -> list[Action]:
        """Ask our AKMS to allow (and account for) a request served from the stock. The
        keys are in hand, so once it says yes the answer cannot fail here; if it says no
        (or cannot be asked) they go back to the front of the lease, seen by nobody."""
        request = m.KsaStocked(master=enc.master, slave=enc.slave, number=enc.number, size=enc.size)

        def allowed(_: m.Message) -> list[Action]:
            UKMS_ENC.advance(enc, I.VALID)
            return [SaeKeys(req=enc.req, keys=[(k.key_id, k.material) for k in keys])]

        def refused(error: KmsError) -> list[Action]:
            UKMS_ENC.advance(enc, I.REFUSED)
            stock = self._active(enc.session)
            stock.leased.extendleft(reversed(keys))
            self._leased[enc.session] = None
            self._leased.move_to_end(enc.session)
            return [SaeRefused(req=enc.req, error=error)]

        return [self.call((self.akms, "akms"), request, answer_or_fail(allowed, refused))]

    def _lease(self, session: str, stock: Stock) -> list[Action]:
        """Take keys from the pair's stock store ahead of demand (one take at a time)."""
        if stock.leasing:
            return []
        stock.leasing = True
        want = sum(e.number for e in stock.waiting) - len(stock.leased) + self._grow(session)
        self._leased[session] = None
        self._leased.move_to_end(session)
        out: list[Action] = [
            self.store(
                TakeOldest(session=session, kind=STOCK, n=want),
                functools.partial(self._leased_in, session, want),
            )
        ]
        while len(self._leased) > MAX_LEASED:
            out += self._give_back(next(iter(self._leased)))
        return out

    def _grow(self, session: str) -> int:
        """Keys the pair's lease now takes ahead of demand (``LEASE_FIRST`` for a pair not
        leased lately); the next takes twice as many, up to ``LEASE``."""
        ahead = self._ahead.pop(session, LEASE_FIRST)
        self._ahead[session] = min(2 * ahead, LEASE)
        if len(self._ahead) > MAX_GROWN:
            self._ahead.popitem(last=False)
        return ahead

    def _leased_in(self, session: str, want: int, event: Input) -> list[Action]:
        assert isinstance(event, StoreDone)
        stock = self._active(session)
        stock.leasing = False
        if isinstance(event.result, list):
            if event.result:
                self._leased[session] = None
                stock.leased.extend(event.result)
            # fewer than asked: the store holds no more (keys expired there, say)
            got = len(event.result)
            self._levels[session] = max(0, self._levels[session] - got) if got == want else 0
        if not stock.leased:
            self._leased.pop(session, None)
        waiting, stock.waiting = stock.waiting, []
        out: list[Action] = []
        for enc in waiting:
            if len(stock.leased) >= enc.number:
                out += self._from_lease(stock, enc)
            else:
                UKMS_ENC.advance(enc, I.SHORT)
                out += self._ask(enc)
        out += self._want_stock(session)
        self._settle(session)
        return out

    def _give_back(self, session: str) -> list[Action]:
        """The pair's leased keys back to its stock; its next lease starts small."""
        self._leased.pop(session, None)
        self._ahead.pop(session, None)
        stock = self._stocks.get(session)
        if stock is None or not stock.leased:
            return []
        keys, stock.leased = list(stock.leased), deque()
        self._levels[session] += len(keys)
        self._settle(session)
        pairs = [(k.key_id, k.material) for k in keys]
        return [
            self.store(Put(session=session, kind=STOCK, keys=pairs), lambda _: _erase_keys(pairs))
        ]

    def _ksa_request(
        self,
        master: str,
        slave: str,
        number: int,
        size: int,
        stream: m.StreamTag | None = None,
        also: tuple[str, ...] = (),
        *,
        refill: bool = False,
    ) -> m.KsaRequest:
        return m.KsaRequest(
            master=master,
            slave=slave,
            number=number,
            size=size,
            epoch=self.links[self.akms].epoch,
            fresh=self._fresh,
            stream=stream,
            also=list(also),
            refill=refill,
        )

    def _ask(self, enc: Enc) -> list[Action]:
        """Make keys end to end: our AKMS asks the network."""
        request = self._ksa_request(
            enc.master, enc.slave, enc.number, enc.size, enc.stream, enc.also
        )
        then = answer_or_fail(
            lambda msg: self._answered(enc, msg), lambda e: self._enc_failed(enc, e)
        )
        return [self.call((self.akms, "akms"), request, then)]

    def _answered(self, enc: Enc, answer: m.Message) -> list[Action]:
        if not isinstance(answer, m.KsaAnswer):
            return self._enc_failed(
                enc, ProtocolError("a KSA request answered with another message")
            )
        UKMS_ENC.advance(enc, I.ANSWER)
        return self.open_from(
            self.akms,
            answer.sealed,
            answer.epoch,
            lambda hop, batch: self._opened(enc, hop, batch),
            lambda exc: self._enc_failed(enc, exc),
        )

    def _opened(self, enc: Enc, hop: Hop, batch: bytearray) -> list[Action]:
        self._fresh = False
        try:
            keys = ksa.decode_batch(batch)
        except KmsError as exc:
            return self._enc_failed(enc, exc)
        finally:
            erase(batch)
        if (
            len(keys) != enc.number
            or any(len(k) * 8 != enc.size for _, k in keys)
            or (enc.stream is not None and not _stream_ids(enc.stream, keys))
        ):
            _erase_keys(keys)
            return self._enc_failed(enc, IntegrityFailure("keys other than those asked for"))
        UKMS_ENC.advance(enc, I.OPENED)
        return [SaeKeys(req=enc.req, keys=keys)]

    def _enc_failed(self, enc: Enc, error: KmsError) -> list[Action]:
        UKMS_ENC.advance(enc, I.REFUSED)
        out: list[Action] = [SaeRefused(req=enc.req, error=error)]
        if isinstance(error, IntegrityFailure):
            out.insert(0, Alarm(code=error.code, reason=error.message))
        return out

    # -- the stock --------------------------------------------------------------------------
    def _levels_read(self, event: Input) -> list[Action]:
        assert isinstance(event, StoreDone)
        if isinstance(event.result, dict):
            for session, n in event.result.items():
                if session in self._levels:
                    self._levels[session] = n
        out: list[Action] = []
        for session in self._levels:
            out += self._want_stock(session, start=False)
        return out + self._refill_next()

    def _missing(self, session: str) -> int:
        return self.policy.stock - self._levels[session] - self._leased_count(session)

    def _is_short(self, session: str) -> bool:
        """Whether a pair's stock (in the store and leased) misses half a batch or more, so
        that its refills start: a pair drawn on lightly is not refilled for each few keys
        it drew (a whole batch's relay each time)."""
        return self._missing(session) >= max(1, self._refill_size() // 2)

    def _refill_size(self) -> int:
        """Keys one refill asks for: always a whole batch (``stock_batch``, or the stock
        itself when smaller), so that a stock drawn on all the time is topped up by full
        batches, not by one relay per key served."""
        return min(self.policy.stock_batch, self.policy.stock)

    def _want_stock(
        self, session: str, *, start: bool = True, until_full: bool = False
    ) -> list[Action]:
        """Queue a pair for a refill (once) when its stock is short, or, ``until_full``
        (its refills under way), while it misses any key."""
        if session not in self._levels or session in self._queued:
            return []
        stock = self._stocks.get(session)
        if stock is not None and stock.refilling:
            return []
        if not (self._missing(session) > 0 if until_full else self._is_short(session)):
            return []
        self._short.append(session)
        self._queued.add(session)
        return self._refill_next() if start else []

    def _refill_next(self) -> list[Action]:
        """Start the refills of the pairs next in turn, unless the refills pause."""
        out: list[Action] = []
        while self._short and self._refills < self.policy.stock_parallel:
            if REFILL_PAUSE in self._timers:
                break
            session = self._short.popleft()
            self._queued.discard(session)
            pair = self.sessions.pair_of(session)
            if pair is None or self._missing(session) <= 0:
                continue
            refill = Refill(S.ASKING, session, self._refill_size())
            self._active(session).refilling = True
            self._refills += 1
            request = self._ksa_request(*pair, refill.number, self.policy.key_size, refill=True)
            then = answer_or_fail(
                functools.partial(self._refill_answer, refill),
                functools.partial(self._refill_failed, refill),
            )
            out.append(self.call((self.akms, "akms"), request, then))
        return out

    def _refill_answer(self, refill: Refill, answer: m.Message) -> list[Action]:
        if not isinstance(answer, m.KsaAnswer):
            return self._refill_failed(refill, ProtocolError("a KSA request answered otherwise"))
        REFILL.advance(refill, I.ANSWER)
        return self.open_from(
            self.akms,
            answer.sealed,
            answer.epoch,
            lambda hop, batch: self._refill_opened(refill, batch),
            lambda exc: self._refill_failed(refill, exc),
        )

    def _refill_opened(self, refill: Refill, batch: bytearray) -> list[Action]:
        self._fresh = False
        try:
            keys = ksa.decode_batch(batch)
        except KmsError as exc:
            return self._refill_failed(refill, exc)
        finally:
            erase(batch)
        REFILL.advance(refill, I.OPENED)
        put = Put(session=refill.session, kind=STOCK, keys=keys)
        return [self.store(put, lambda e: self._refill_stored(refill, keys, e))]

    def _refill_stored(self, refill: Refill, keys: list[KeyBits], event: Input) -> list[Action]:
        assert isinstance(event, StoreDone)
        _erase_keys(keys)
        if isinstance(event.result, KmsError):
            return self._refill_failed(refill, event.result)
        REFILL.advance(refill, I.STORED)
        self._levels[refill.session] += len(keys)
        self._refill_done(refill.session)
        self._refill_backoff = BACKOFF_FIRST
        out = self._want_stock(refill.session, start=False, until_full=True)
        out += self._refill_next()
        self._settle(refill.session)
        return out

    def _refill_done(self, session: str) -> None:
        self._active(session).refilling = False
        self._refills -= 1

    def _refill_failed(self, refill: Refill, error: KmsError) -> list[Action]:
        """The pair goes to the back of the queue; every refill pauses for the back-off
        (doubling while refills keep failing), on the engine's one refill timer."""
        REFILL.advance(refill, I.REFUSED)
        self._refill_done(refill.session)
        out: list[Action] = []
        if isinstance(error, IntegrityFailure):
            out.append(Alarm(code=error.code, reason=error.message))
        out += self._want_stock(refill.session, start=False, until_full=True)
        self._settle(refill.session)
        if REFILL_PAUSE not in self._timers:
            pause = self._refill_backoff
            self._refill_backoff = min(BACKOFF_MAX, pause * 2)
            out.append(self.timer(REFILL_PAUSE, self.now + pause, self._refill_next))
        return out

    # -- dec_keys -------------------------------------------------------------------------------
    def _dec_keys(self, event: SaeDecKeys) -> list[Action]:
        session = self.sessions.session_014_slave(event.slave, event.master)
        if session is None:
            return [SaeRefused(req=event.req, error=KeyUnavailable("not a pair served here"))]
        dec = Dec(S.TAKING, event.req, session)
        take = Take(session=session, key_ids=list(event.key_ids))
        return [self.store(take, lambda e: self._taken(dec, e))]

    def _taken(self, dec: Dec, event: Input) -> list[Action]:
        assert isinstance(event, StoreDone)
        if not isinstance(event.result, list):
            UKMS_DEC.advance(dec, I.REFUSED)
            error = event.result if isinstance(event.result, KmsError) else KeyUnavailable("")
            return [SaeRefused(req=dec.req, error=error)]  # the store raised its own alarm
        UKMS_DEC.advance(dec, I.TAKEN)
        dec.key_ids = tuple(k.key_id for k in event.result)
        self._dec[dec.req] = dec
        return [SaeKeys(req=dec.req, keys=[(k.key_id, k.material) for k in event.result])]

    def _written(self, event: SaeAnswerWritten) -> list[Action]:
        """The answer to a dec_keys left (release the keys) or could not (restore them)."""
        dec = self._dec.pop(event.req, None)
        if dec is None:
            return []
        if event.ok:
            UKMS_DEC.advance(dec, I.WRITTEN)
            op: StoreRequest = Release(session=dec.session, key_ids=list(dec.key_ids))
        else:
            UKMS_DEC.advance(dec, I.REFUSED)
            op = Restore(session=dec.session, key_ids=list(dec.key_ids))
        return [self.store(op, lambda _: [])]

    # -- deliveries from AKMS B -------------------------------------------------------------------
    def _on_deliver(self, event: Received, deliver: m.Deliver) -> list[Action]:
        session = self.sessions.session_014_slave(deliver.slave, deliver.master)
        if event.caller not in self.links or session is None:
            error = ProtocolError("delivery for an SAE that is not served here")
            return [Refuse(req=event.req, error=error)]
        delivery = Delivery(S.OPENING, event.req)
        return self.open_from(
            event.caller,
            deliver.sealed,
            deliver.epoch,
            lambda hop, batch: self._delivered(delivery, session, batch, deliver.stream),
            lambda exc: self._delivery_failed(delivery, exc),
        )

    def _delivered(
        self, delivery: Delivery, session: str, batch: bytearray, stream: m.StreamTag | None
    ) -> list[Action]:
        try:
            keys = ksa.decode_batch(batch)
        except KmsError as exc:
            return self._delivery_failed(delivery, exc)
        finally:
            erase(batch)
        if stream is not None and not _stream_ids(stream, keys):
            _erase_keys(keys)
            return self._delivery_failed(delivery, IntegrityFailure("stream chunks misnamed"))
        DELIVERY.advance(delivery, I.OPENED)
        put = Put(session=session, kind=KSA, keys=keys)
        if stream is not None:  # an ETSI 004 stream's chunks, for its destination end
            put = Put(session=stream_session(stream.ksid), kind=DST004, keys=keys, ttl=stream.ttl)
        return [self.store(put, lambda e: self._stored(delivery, keys, e))]

    def _stored(self, delivery: Delivery, keys: list[KeyBits], event: Input) -> list[Action]:
        assert isinstance(event, StoreDone)
        _erase_keys(keys)
        if isinstance(event.result, KmsError):
            return self._delivery_failed(delivery, event.result)
        DELIVERY.advance(delivery, I.STORED)
        return [Reply(req=delivery.req, message=m.Delivered(stored=len(keys)))]

    def _delivery_failed(self, delivery: Delivery, error: KmsError) -> list[Action]:
        DELIVERY.advance(delivery, I.REFUSED)
        out: list[Action] = [Refuse(req=delivery.req, error=error)]
        if isinstance(error, IntegrityFailure):
            out.insert(0, Alarm(code=error.code, reason=error.message))
        return out


def _erase_keys(keys: list[KeyBits]) -> list[Action]:
    for _, material in keys:
        erase(material)
    return []


def _stream_ids(stream: m.StreamTag, keys: list[KeyBits]) -> bool:
    """The keys carry the IDs of the stream's chunks from ``stream.first``, in order."""
    raw = keyids.stream_raw(stream.ksid, stream.first, len(keys))
    return [k for k, _ in keys] == [
        keyids.from_bytes(raw[16 * i : 16 * i + 16]) for i in range(len(keys))
    ]
