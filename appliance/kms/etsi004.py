"""ETSI GS QKD 004 at a UKMS: the key-stream service and its TLS server.

The server (:class:`Etsi004Server`) speaks the binary framing of :mod:`frames004` over
mutual TLS, on its own port beside the ETSI 014 server (the ``etsi004`` address of the
node's port plan). The caller is the CN of its client certificate (an SAE), never what a
frame says. Requests on one connection are answered in order; at most
:data:`MAX_QUEUED` wait (reading pauses beyond); a frame must arrive whole within
:data:`FRAME_TIMEOUT` of its first byte and an idle connection is closed after
:data:`IDLE_TIMEOUT`; an SAE holds at most :data:`MAX_PER_SAE` connections.

Faults, and what the caller sees (the module never lets an exception out of the protocol):

================================================  ===========================================
a header with another major version, a length      the connection is closed (the stream cannot
above the bound, a service type that is not a      be resynchronised, and no response type can
request (0x03, 0x07, ...)                           carry a status for an unknown service)
a truncated header or payload                      waited for, bounded by FRAME_TIMEOUT, then
                                                   the connection is closed
OPEN_CONNECT whose payload does not match (a URI   OPEN_CONNECT response, NO_QKD_CONNECTION
without its NUL, trailing bytes), or naming no     (4), no KSID
SAE pair this UKMS serves for the caller
GET_KEY or CLOSE whose payload does not match, or  its response, GET_KEY_PEER_NOT_CONNECTED
on a stream the caller has not open here (never    (3): no stream of that KSID is connected
opened, closed, unknown)                            for this caller here
GET_KEY or OPEN_CONNECT on an expired stream       TIMEOUT (6); the stream is erased
================================================  ===========================================

The service (:class:`StreamService`) carries out what :mod:`streams` decides:

* **OPEN_CONNECT** (:meth:`StreamService.open`): a new stream (all-zero KSID: a random one
  is allocated) or a stream joined; the record is saved (:mod:`streamstore`) before the
  answer. The source's UKMS then supplies chunks.
* **Supply** (source side): one task per stream asks its AKMS for the next chunks through
  the UKMS engine (an ``enc_keys`` made end to end with a :class:`StreamTag`, at most
  ``max_key_per_request`` per request, and under AAA at most the contract's keys per
  request), after writing the indices it reserves; the AKMS
  pair derives the chunks' key IDs from (KSID, index) and delivers the destination's copies
  to its UKMS, which files them under the stream's session. The source's copies are filed
  here the same way. A failed request's indices are never asked again (two draws for one
  index would give the two ends different bits).
* **GET_KEY**: chunk (KSID, index) is taken from this end's copies, pending, and released
  once the answer is written (restored if it could not be): each index once per end.
* **CLOSE** erases this end's chunks left; expiry (TTL, or idle for the stream's timeout)
  erases every chunk of the stream held here.

Key bits are held in ``bytearray``s erased once written; nothing here logs key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from appliance.kms import frames004 as f
from appliance.kms import keyids
from appliance.kms.errors import KeyUnavailable, KmsError
from appliance.kms.events import SaeEncKeys
from appliance.kms.messages import StreamTag, TermsAnswer, TermsRequest
from appliance.kms.storeops import (
    DST004,
    SRC004,
    Put,
    Release,
    Restore,
    StoredKey,
    Take,
    TakeOldest,
    stream_session,
)
from appliance.kms.streams import MAX_WAIT, Stream, StreamTable, sae_of
from appliance.kms.streamstore import StreamStore
from appliance.net.h2 import Handler, Request, Response, TlsServer
from appliance.pki import peer_name

if TYPE_CHECKING:
    from appliance.kms.node import KmsNode

log = logging.getLogger("qkdn.kms")
FRAME_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
MAX_QUEUED = 64
MAX_PER_SAE = 64
DEFAULT_CAPACITY_BPS = 100_000_000
"""Stream capacity of a UKMS (bit/s) that ``min_bps`` reservations may add up to."""
LEASE = 128
"""Chunks of one end of a stream taken ahead (pending) and served from memory."""
RELEASE_BATCH = 64
"""Chunks served before their release is queued (the sweep releases the rest)."""
MAX_LEASED = 1 << 16
"""Chunks held in leases over all streams."""
SUPPLY_BACKOFF = 0.5
SWEEP = 0.5
"""Seconds between two looks for expired streams and rate-driven supply."""
Written = Callable[[bool], None]


def _nothing(_: bool) -> None:
    return None


class StreamService:
    """The key streams of one UKMS node."""

    def __init__(
        self,
        node: KmsNode,
        store: StreamStore,
        *,
        capacity_bps: int = DEFAULT_CAPACITY_BPS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node, self.store, self.clock = node, store, clock
        self.table = StreamTable(capacity_bps=capacity_bps)
        self._events: dict[bytes, asyncio.Event] = {}
        self._wake: dict[bytes, asyncio.Event] = {}
        self._asked: dict[bytes, int] = {}  # source side: the highest index an end asked for
        self._inflight: dict[bytes, tuple[int, int]] = {}
        self._arrived: set[bytes] = set()  # destination side: a chunk came in this run
        self._tasks: dict[bytes, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[None]] = set()
        self._leases: dict[tuple[bytes, str], dict[str, bytearray]] = {}
        self._leasing: dict[tuple[bytes, str], asyncio.Future[None]] = {}
        self._leased_total = 0
        self._lease_end: dict[tuple[bytes, str], int] = {}  # the index after the last lease
        self._served: dict[str, list[str]] = {}  # session -> chunks served, to release
        self.closed = False

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        now = self.clock()
        for stream in await asyncio.to_thread(self.store.load, now):
            self.table.streams[stream.ksid] = stream
            if stream.destination in stream.opened and stream.source not in stream.opened:
                stream.high = stream.next  # what this run's deliveries will continue from
                if stream.high:
                    self._arrived.add(stream.ksid)
            if stream.expired(now):
                await self._expire(stream)
            elif stream.source in stream.opened:
                self._start_supply(stream)
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def close(self) -> None:
        self.closed = True  # from now on no chunk is taken
        self._release()
        for stream in list(self.table.streams.values()):
            self._unlease(stream, restore=True)  # a graceful stop keeps every chunk
        tasks = [*self._tasks.values(), *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def stored(self, op: Put) -> None:
        """The node stored keys (the node's hook): wake the GET_KEYs waiting on a stream."""
        if op.kind not in (SRC004, DST004) or not op.session.startswith("004:"):
            return
        try:
            ksid = bytes.fromhex(op.session[4:])
        except ValueError:
            return
        stream = self.table.streams.get(ksid)
        if op.kind == DST004 and op.keys:
            self._arrived.add(ksid)
            if stream is not None:
                first = _locate(stream, op.keys[0][0])
                if first is not None and first + len(op.keys) > stream.high:
                    stream.high = first + len(op.keys)
                    if stream.high > stream.next:  # the destination's record remembers it
                        stream.next = stream.high
                        self._later(self._save(stream))
        self._notify(ksid)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _notify(self, ksid: bytes) -> None:
        event = self._events.pop(ksid, None)
        if event is not None:
            event.set()

    async def _arrival(self, ksid: bytes, timeout: float) -> None:
        event = self._events.setdefault(ksid, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # -- OPEN_CONNECT ---------------------------------------------------------------------
    async def open(self, caller: str, req: f.OpenConnect) -> f.OpenConnectAnswer:
        source, destination = sae_of(req.source), sae_of(req.destination)
        sessions = self.node.sessions
        if self.closed or source is None or destination is None:
            return _no_connection(req.qos)
        if caller not in (source, destination):
            return _no_connection(req.qos)
        if caller == source and sessions.session_014(source, destination) is None:
            return _no_connection(req.qos)
        if caller == destination and sessions.session_014_slave(destination, source) is None:
            return _no_connection(req.qos)
        now = self.clock()
        ksid = req.ksid
        if ksid == f.ZERO_KSID:
            ksid = _new_ksid(self.table)
        found = self.table.streams.get(ksid)
        if found is not None and found.expired(now):
            await self._expire(found)
            return f.OpenConnectAnswer(status=f.Status.TIMEOUT, qos=req.qos)
        max_chunk = f.MAX_CHUNK
        if caller == source and found is None:  # a new stream at the source's UKMS
            terms = await self._terms(source, destination)
            if terms is not None:
                max_chunk = max(1, min(max_chunk, terms.max_key_size // 8))
        opened = self.table.open(
            caller, source, destination, req.qos, ksid, now=now, max_chunk=max_chunk
        )
        stream = opened.stream
        if stream is None:
            return f.OpenConnectAnswer(status=opened.status, qos=opened.qos)
        status = opened.status
        waiting = caller == destination and status == f.Status.PEER_NOT_CONNECTED
        if waiting and await self._count(stream, DST004):
            status = f.Status.SUCCESS  # the source's chunks are here: it is connected
        try:
            await asyncio.to_thread(self.store.save, stream)
        except KmsError as exc:
            self.table.close(caller, stream)
            log.error("stream not saved", extra={"node": self.node.name, "error": exc.code})
            return _no_connection(req.qos)
        if caller == source:
            self._start_supply(stream)
        log.info(
            "004 stream opened",
            extra={"node": self.node.name, "sae": caller, "ksid": ksid.hex(), "status": status},
        )
        return f.OpenConnectAnswer(status=status, qos=stream.qos, ksid=ksid)

    async def _count(self, stream: Stream, kind: str) -> int:
        stores = self.node.stores
        assert stores is not None
        session = stream_session(stream.ksid)
        try:
            return await asyncio.to_thread(stores.count, session, kind)
        except KmsError:
            return 0

    # -- GET_KEY --------------------------------------------------------------------------
    async def get_key(self, caller: str, req: f.GetKey) -> tuple[f.GetKeyAnswer, Written]:
        stream = self.table.of(caller, req.ksid)
        if self.closed:  # the node stops
            return _key_refused(f.Status.INSUFFICIENT_KEY, req), _nothing
        if stream is None:
            return _key_refused(f.Status.GET_KEY_PEER_NOT_CONNECTED, req), _nothing
        now = self.clock()
        if stream.expired(now):
            await self._expire(stream)
            return _key_refused(f.Status.TIMEOUT, req), _nothing
        stream.active = now
        metadata = stream.metadata(req.index)
        if len(metadata) > req.metadata_size:
            return _key_refused(f.Status.METADATA_TOO_SMALL, req), _nothing
        early = stream.ready_at(req.index) - now
        if early > stream.wait_for():  # max_bps: not that much key yet at this rate
            return _key_refused(f.Status.INSUFFICIENT_KEY, req), _nothing
        if early > 0:
            await asyncio.sleep(early)
        if caller == stream.source:
            self._asked[stream.ksid] = max(self._asked.get(stream.ksid, -1), req.index)
            self._wake_supply(stream)
        taken = await self._take(caller, stream, req.index)
        if isinstance(taken, f.Status):
            return _key_refused(taken, req), _nothing
        if caller == stream.source:
            stream.served += 1
        answer = f.GetKeyAnswer(
            status=f.Status.SUCCESS, index=req.index, key=taken.material, metadata=metadata
        )
        return answer, self._settle(stream, caller, taken)

    async def _take(self, caller: str, stream: Stream, index: int) -> StoredKey | f.Status:
        """Chunk ``index`` of the caller's copies, pending; or why not (after waiting up to
        the stream's wait for a chunk still on its way)."""
        stores = self.node.stores
        assert stores is not None
        loop = asyncio.get_running_loop()
        take = Take(
            session=stream_session(stream.ksid),
            key_ids=[keyids.stream_id(stream.ksid, index)],
            kind=stream.kind_for(caller),
        )
        leased = await self._from_lease(stream, take.kind, index, take.key_ids[0])
        if leased is not None:
            return leased
        deadline = loop.time() + stream.wait_for()
        while True:
            try:
                keys = await stores.submit(take)
            except KeyUnavailable:
                pass
            except KmsError as exc:
                log.error("004 take failed", extra={"node": self.node.name, "error": exc.code})
                return f.Status.INSUFFICIENT_KEY
            else:
                assert isinstance(keys, list)
                return keys[0]
            if self._gone(caller, stream, index):
                return f.Status.INSUFFICIENT_KEY  # came (or was asked for) once: taken or lost
            left = deadline - loop.time()
            if left <= 0 or self.table.of(caller, stream.ksid) is None:
                return self._timed_out(caller, stream)
            await self._arrival(stream.ksid, min(left, MAX_WAIT))

    # -- leases: chunks taken ahead, pending, served from memory --------------------------------
    async def _from_lease(
        self, stream: Stream, kind: str, index: int, key_id: str
    ) -> StoredKey | None:
        """Chunk ``index`` from this end's lease; the lease is taken (again) from the store
        when it does not hold it: the chunks from ``index`` on that are there, pending."""
        where = (stream.ksid, kind)
        lease = self._leases.setdefault(where, {})
        material = lease.pop(key_id, None)
        if material is None:
            await self._lease(stream, kind, index)
            material = lease.pop(key_id, None)
        if material is None:
            return None
        self._leased_total -= 1
        end = self._lease_end.get(where, 0)
        if len(lease) < LEASE // 2 and where not in self._leasing and end > index:
            self._later(self._lease(stream, kind, end))  # the next lease, ahead of need
        return StoredKey(key_id, material)

    async def _lease(self, stream: Stream, kind: str, index: int) -> None:
        where = (stream.ksid, kind)
        busy = self._leasing.get(where)
        if busy is not None:
            await busy
            return
        room = min(LEASE, MAX_LEASED - self._leased_total, f.U32_MAX + 1 - index)
        if room <= 0:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leasing[where] = done
        try:
            raw = keyids.stream_raw(stream.ksid, index, room)
            ids = [keyids.from_bytes(raw[i : i + 16]) for i in range(0, len(raw), 16)]
            keys = await self._take_present(stream_session(stream.ksid), kind, ids)
            if self.table.streams.get(stream.ksid) is not stream:  # dropped meanwhile
                self._served.setdefault(stream_session(stream.ksid), []).extend(
                    key.key_id for key in keys
                )
                self._release(stream_session(stream.ksid))
                for key in keys:
                    key.material[:] = bytes(len(key.material))
                return
            lease = self._leases.setdefault(where, {})
            for key in keys:
                lease[key.key_id] = key.material
            self._leased_total += len(keys)
            self._lease_end[where] = index + room
        finally:
            del self._leasing[where]
            done.set_result(None)

    async def _take_present(self, session: str, kind: str, ids: list[str]) -> list[StoredKey]:
        """Those of ``ids`` the store holds for the session, taken pending (two tries: the
        first names what is missing)."""
        stores = self.node.stores
        assert stores is not None
        for _ in range(2):
            try:
                keys = await stores.submit(Take(session=session, key_ids=ids, kind=kind))
            except KeyUnavailable as exc:
                missing = set(exc.missing)
                ids = [key_id for key_id in ids if key_id not in missing]
                if not ids or not missing:
                    return []
                continue
            except KmsError:
                return []
            assert isinstance(keys, list)
            return keys
        return []

    def _unlease(
        self, stream: Stream, kinds: tuple[str, ...] = (SRC004, DST004), *, restore: bool = False
    ) -> None:
        """Forget this UKMS's leases of the stream: their chunks deleted (released), or made
        available again (restored, at a graceful stop)."""
        stores = self.node.stores
        assert stores is not None
        for kind in kinds:
            self._lease_end.pop((stream.ksid, kind), None)
            lease = self._leases.pop((stream.ksid, kind), {})
            if not lease:
                continue
            self._leased_total -= len(lease)
            ids = list(lease)
            for material in lease.values():
                material[:] = bytes(len(material))
            op = Restore if restore else Release
            with contextlib.suppress(KmsError):
                stores.queue(op(session=stream_session(stream.ksid), key_ids=ids))

    def _gone(self, caller: str, stream: Stream, index: int) -> bool:
        """Whether chunk ``index`` will not come to the caller's copies any more: the
        source's UKMS asked for it already (and not now), or the destination's received
        chunks past it in this run (deliveries of a stream come in order)."""
        if caller == stream.destination:
            return index < stream.high
        first, end = self._inflight.get(stream.ksid, (0, 0))
        return index < stream.next and not first <= index < end

    def _timed_out(self, caller: str, stream: Stream) -> f.Status:
        if caller == stream.destination and stream.ksid not in self._arrived:
            return f.Status.GET_KEY_PEER_NOT_CONNECTED  # nothing from the source yet
        return f.Status.TIMEOUT

    def _settle(self, stream: Stream, caller: str, key: StoredKey) -> Written:
        """Once the answer is written: the chunk is released with the next batch of its
        stream (or restored if it never left)."""
        stores = self.node.stores
        assert stores is not None
        session = stream_session(stream.ksid)

        def written(ok: bool) -> None:
            key.material[:] = bytes(len(key.material))
            if ok:
                served = self._served.setdefault(session, [])
                served.append(key.key_id)
                if len(served) >= RELEASE_BATCH:
                    self._release(session)
                return
            if caller == stream.source:
                stream.served -= 1
            with contextlib.suppress(KmsError):  # the stores closed: it stays pending
                stores.queue(Restore(session=session, key_ids=[key.key_id]))

        return written

    def _release(self, session: str | None = None) -> None:
        """Release the chunks served (of one session, or of all): one store operation per
        session, which re-seals each batch once, not once per chunk."""
        stores = self.node.stores
        assert stores is not None
        for name in [session] if session is not None else list(self._served):
            ids = self._served.pop(name, [])
            if ids:
                with contextlib.suppress(KmsError):
                    stores.queue(Release(session=name, key_ids=ids))

    # -- CLOSE and expiry ---------------------------------------------------------------------
    async def close_stream(self, caller: str, req: f.Close) -> f.CloseAnswer:
        stream = self.table.of(caller, req.ksid)
        if stream is None:
            return f.CloseAnswer(status=f.Status.GET_KEY_PEER_NOT_CONNECTED)
        kind = stream.kind_for(caller)
        last = self.table.close(caller, stream)
        if last:
            await self._drop(stream)
        else:
            await self._save(stream)
            self._unlease(stream, (kind,))
            await self._erase(stream, (kind,))
        log.info(
            "004 stream closed",
            extra={"node": self.node.name, "sae": caller, "ksid": req.ksid.hex()},
        )
        return f.CloseAnswer(status=f.Status.SUCCESS)

    async def _expire(self, stream: Stream) -> None:
        self.table.drop(stream)
        await self._drop(stream)
        log.info("004 stream expired", extra={"node": self.node.name, "ksid": stream.ksid.hex()})

    async def _drop(self, stream: Stream) -> None:
        """The stream is gone here: stop its supply, forget it, erase its chunks."""
        task = self._tasks.pop(stream.ksid, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for table in (self._asked, self._inflight, self._wake):
            table.pop(stream.ksid, None)
        self._arrived.discard(stream.ksid)
        self._unlease(stream)
        self._release(stream_session(stream.ksid))
        self._notify(stream.ksid)
        with contextlib.suppress(KmsError):
            await asyncio.to_thread(self.store.delete, stream.ksid)
        await self._erase(stream, (SRC004, DST004))

    async def _erase(self, stream: Stream, kinds: tuple[str, ...]) -> None:
        """Delete this UKMS's chunks of the stream, of ``kinds``, and erase their bits."""
        stores = self.node.stores
        assert stores is not None
        session = stream_session(stream.ksid)
        for kind in kinds:
            while True:
                try:
                    keys = await stores.submit(TakeOldest(session=session, kind=kind, n=1000))
                except KmsError as exc:
                    log.error("004 erase failed", extra={"node": self.node.name, "error": exc.code})
                    break
                assert isinstance(keys, list)
                for key in keys:
                    key.material[:] = bytes(len(key.material))
                if len(keys) < 1000:
                    break

    async def _save(self, stream: Stream) -> None:
        with contextlib.suppress(KmsError):
            await asyncio.to_thread(self.store.save, stream)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            self._release()
            now = self.clock()
            for stream in self.table.expired(now):
                await self._expire(stream)
            for stream in list(self.table.streams.values()):
                if stream.qos.min_bps or stream.qos.max_bps:
                    self._wake_supply(stream)

    # -- supply (source side) -------------------------------------------------------------------
    def _start_supply(self, stream: Stream) -> None:
        if stream.ksid not in self._tasks:
            self._wake[stream.ksid] = asyncio.Event()
            self._tasks[stream.ksid] = asyncio.ensure_future(self._supply(stream))

    def _wake_supply(self, stream: Stream) -> None:
        event = self._wake.get(stream.ksid)
        if event is not None:
            event.set()

    async def _supply(self, stream: Stream) -> None:
        """Keep the stream's chunks asked for ahead of its ends (see StreamTable)."""
        while stream.ksid in self.table.streams:
            now = self.clock()
            want = self.table.supply_wanted(stream, self._asked.get(stream.ksid, -1), now)
            if want <= stream.next:
                wake = self._wake[stream.ksid]
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), SWEEP * 4)
                continue
            limit = await self._per_request(stream)
            if not await self._supply_once(stream, min(limit, want - stream.next), now):
                await asyncio.sleep(SUPPLY_BACKOFF)

    async def _per_request(self, stream: Stream) -> int:
        """Chunks one supply request may ask for: the network's bound, and when the
        contracts live at the AKMS (AAA) the pair's contract's keys per request (a request
        above it would be refused and its indices burnt)."""
        limit = self.node.policy.max_key_per_request
        terms = await self._terms(stream.source, stream.destination)
        return limit if terms is None else min(limit, terms.max_key_per_request)

    async def _terms(self, source: str, destination: str) -> TermsAnswer | None:
        """The pair's contract's terms as our AKMS answers them, when the contracts live
        there (AAA); None otherwise, or if it cannot answer (the AKMS then refuses the
        requests themselves, and accounts for the refusals)."""
        if not self.node.policy.terms_from_akms:
            return None
        ask = TermsRequest(master=source, slave=destination)
        try:
            answer = await self.node.request(self.node.ukms_akms(), "akms", ask)
        except KmsError:
            return None
        return answer if isinstance(answer, TermsAnswer) else None

    async def _supply_once(self, stream: Stream, n: int, now: float) -> bool:
        first = stream.next
        stream.next = first + n
        self._inflight[stream.ksid] = (first, first + n)
        try:  # reserve the indices on disk first: a crash never asks for one twice
            await asyncio.to_thread(self.store.save, stream)
        except KmsError:
            stream.next = first
            self._inflight.pop(stream.ksid, None)
            return False
        ttl = max(1, int(stream.expires - now) + 1)
        tag = StreamTag(ksid=stream.ksid, first=first, ttl=ttl)
        size = stream.qos.key_chunk_size * 8
        event = SaeEncKeys(
            req=self.node.new_req(),
            master=stream.source,
            slave=stream.destination,
            number=n,
            size=size,
            stream=tag,
        )
        try:
            keys = await self.node.sae(event)
            put = Put(session=stream_session(stream.ksid), kind=SRC004, keys=keys, ttl=ttl)
            try:
                await self.node.stores.submit(put)  # type: ignore[union-attr]
            finally:
                for _, material in keys:
                    material[:] = bytes(len(material))
        except KmsError as exc:
            extra = {"node": self.node.name, "ksid": stream.ksid.hex(), "error": exc.code}
            log.warning("004 supply failed; its indices are skipped", extra=extra)
            return False
        finally:
            self._inflight.pop(stream.ksid, None)
            self._notify(stream.ksid)
        stream.high = max(stream.high, first + n)
        return True


LOCATE_SPAN = 1 << 16
"""Indices past the highest known that a delivery's first key ID is looked for among."""


def _locate(stream: Stream, key_id: str) -> int | None:
    """The index of the chunk named ``key_id`` (looked for from ``stream.high`` on: the
    next delivery usually starts there), or None."""
    if keyids.stream_id(stream.ksid, stream.high) == key_id:
        return stream.high
    raw = keyids.to_bytes(key_id)
    for start in range(stream.high, stream.high + LOCATE_SPAN, 1024):
        ids = keyids.stream_raw(stream.ksid, start, 1024)
        at = ids.find(raw)
        if at >= 0 and at % 16 == 0:
            return start + at // 16
    return None


def _new_ksid(table: StreamTable) -> bytes:
    while True:
        ksid = os.urandom(f.KSID_BYTES)
        if ksid != f.ZERO_KSID and ksid not in table.streams:
            return ksid


def _no_connection(qos: f.Qos) -> f.OpenConnectAnswer:
    return f.OpenConnectAnswer(status=f.Status.NO_QKD_CONNECTION, qos=qos)


def _key_refused(status: f.Status, req: f.GetKey) -> f.GetKeyAnswer:
    return f.GetKeyAnswer(status=status, index=req.index)


# -- the server ---------------------------------------------------------------------------------
class Etsi004Server(TlsServer):
    """Serve a :class:`StreamService` over 004 framing with mutual TLS."""

    ALERTS = True  # the SAE edge: a refused SAE is told why

    def __init__(self, service: StreamService, ssl_ctx: ssl.SSLContext) -> None:
        super().__init__(cast(Handler, _no_http), ssl_ctx)
        self.service = service
        self.per_sae: Counter[str] = Counter()

    def _session(self) -> asyncio.Protocol:
        return _Session004(self)


async def _no_http(request: Request) -> Response:  # pragma: no cover - never called
    raise KmsError("the 004 server takes no HTTP request")


class _Session004(asyncio.Protocol):
    """One SAE connection: frames in, answers out in order."""

    def __init__(self, server: Etsi004Server) -> None:
        self.server = server
        self.reader = f.FrameReader(f.MAX_REQUEST)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.queue: deque[f.Frame] = deque()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server._open.add(self)
        peer = peer_name(transport.get_extra_info("ssl_object"))
        if peer is None or self.server.per_sae[peer] >= MAX_PER_SAE:
            log.warning("004 connection refused", extra={"peer": peer})
            self.close()
            return
        self.peer = peer
        self.server.per_sae[peer] += 1
        self._deadline(IDLE_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.queue.extend(self.reader.feed(data))
        except f.FrameError as exc:
            self._refuse(exc)
            return
        if len(self.queue) >= MAX_QUEUED and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        if self.queue and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._answer())
        self._watch()

    def _watch(self) -> None:
        if self.reader.pending:
            self._deadline(FRAME_TIMEOUT)
        elif not self.queue and self.task is None:
            self._deadline(IDLE_TIMEOUT)

    def _deadline(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.task is None and not self.queue:
            log.info("004 connection closed: incomplete or idle", extra={"peer": self.peer})
            self.close()
        else:
            self._deadline(FRAME_TIMEOUT)

    def _refuse(self, exc: KmsError) -> None:
        log.warning("004 frame refused", extra={"peer": self.peer, "error": exc.code})
        self.queue.clear()
        self.close()

    async def _answer(self) -> None:
        try:
            while self.queue and not self.closing:
                frame = self.queue.popleft()
                if self.paused and len(self.queue) < MAX_QUEUED // 2 and self.transport:
                    self.transport.resume_reading()
                    self.paused = False
                try:
                    answer, written = await self._serve(frame)
                except f.FrameError as exc:
                    self._refuse(exc)
                    break
                ok = self.transport is not None and not self.transport.is_closing()
                if ok:
                    assert self.transport is not None
                    out = f.encode(answer)
                    # the transport may hold what it is given until sent: it gets a copy
                    # (like the 014 server's answers, not erased); ours is erased
                    self.transport.write(bytes(out))
                    if isinstance(out, bytearray):
                        out[:] = bytes(len(out))
                written(ok)
        finally:
            self.task = None
        if not self.closing:
            self._watch()

    async def _serve(self, frame: f.Frame) -> tuple[f.Response, Written]:
        service, peer = self.server.service, cast(str, self.peer)
        try:
            request = f.decode_request(frame)
        except f.MalformedPayload as exc:
            log.warning("004 request refused", extra={"peer": peer, "error": exc.code})
            return _malformed(exc.service), _nothing
        try:
            if isinstance(request, f.GetKey):
                return await service.get_key(peer, request)
            if isinstance(request, f.Close):
                return await service.close_stream(peer, request), _nothing
            return await service.open(peer, request), _nothing
        except KmsError as exc:  # a store or network failure: no key now
            log.error("004 request failed", extra={"peer": peer, "error": exc.code})
            return _failed(request), _nothing

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server._open.discard(self)
        if self.peer is not None:
            self.server.per_sae[self.peer] -= 1
            if self.server.per_sae[self.peer] <= 0:
                del self.server.per_sae[self.peer]
            self.peer = None
        if self.timer is not None:
            self.timer.cancel()
        # a task under way finishes: a chunk it took is restored when its answer cannot leave


def _malformed(service: int) -> f.Response:
    if service == f.Service.OPEN_CONNECT:
        return _no_connection(f.Qos())
    if service == f.Service.GET_KEY:
        return f.GetKeyAnswer(status=f.Status.GET_KEY_PEER_NOT_CONNECTED, index=0)
    return f.CloseAnswer(status=f.Status.GET_KEY_PEER_NOT_CONNECTED)


def _failed(request: f.Request) -> f.Response:
    if isinstance(request, f.GetKey):
        return _key_refused(f.Status.INSUFFICIENT_KEY, request)
    if isinstance(request, f.Close):
        return f.CloseAnswer(status=f.Status.GET_KEY_PEER_NOT_CONNECTED)
    return _no_connection(request.qos)
