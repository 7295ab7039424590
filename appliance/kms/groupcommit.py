"""Group commit for a key store: the puts and takes of many callers, one transaction.

Every :class:`~appliance.kms.store.KeyStore` call is a transaction ending in an fsync
(``synchronous=FULL``), and from the event loop one thread hand-off too. A UKMS serving a
busy SAE pair stores and takes a few keys per request, hundreds of times a second, so the
fsyncs and hand-offs cost more than the work. :class:`GroupCommitter` queues the
operations of the event loop; its one worker thread runs *all* those queued when it looks
(up to MAX_GROUP) in one ``BEGIN IMMEDIATE ... COMMIT``, each in a SAVEPOINT of its own.

* An operation that fails (KeyUnavailable: not all its keys are there; StoreFull; a key
  ID already stored) is rolled back to its savepoint and raises to its own caller only;
  the rest of the group commits.
* If the transaction cannot begin, SQLite drops it half-way, or the COMMIT fails (disk
  full, busy), *every* operation of the group raises StoreError: nothing is reported
  stored or taken that was not committed.
* A put's batch is sealed before the store lock is taken; a take opens and re-seals its
  batches inside the transaction, as in the synchronous calls. The bits of a take whose
  transaction did not stand are erased. :func:`commit_group` is that whole step, without
  threads.

Cancellation, and what it costs. An operation whose caller was cancelled before its group
began is skipped: nothing stored, nothing taken. One whose caller is cancelled later still
runs: a put's keys stay stored (taken later, or deleted when they expire, like any slave
copy nobody claims); a take's keys are gone from the store, exactly once, and as nobody
receives them their material is erased. :meth:`GroupCommitter.close` refuses new
operations, runs those already queued and waits for the worker; a taken result whose
event loop has closed meanwhile is erased likewise.

This module never logs or keeps key material: a result lives only in its caller's future.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from appliance.kms.errors import KmsError, StoreError
from appliance.kms.store import Found, KeyStore, StoredKey, erase_found

log = logging.getLogger("qkdn.kms")

Step = Callable[[sqlite3.Connection], int | Found]
"""What one operation does inside the group's transaction."""
Outcome = int | list[StoredKey] | Exception
"""What one operation's caller gets: keys stored, keys taken, or the error to raise."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Put:
    """Store keys, all or none, as :meth:`KeyStore.put_many`."""

    keys: list[tuple[str, bytes | bytearray]]
    """Key IDs and material."""
    meta: str = ""
    """Stored with each key."""
    ttl: float | None = None
    """Lifetime in seconds; None for the store's default."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Take:
    """Take the named keys, all or none, as :meth:`KeyStore.take_many`."""

    key_ids: list[str]
    """The keys, in the order the result lists them."""


Request = Put | Take


def commit_group(store: KeyStore, requests: Sequence[Request]) -> list[Outcome]:
    """Run ``requests`` in one transaction, each in its own savepoint: one outcome each."""
    now = store._clock()
    steps = [_step(store, request, now) for request in requests]
    done: list[int | Found | Exception] = []
    try:
        with store._transaction() as db:
            for step in steps:
                done.append(step if isinstance(step, Exception) else _in_savepoint(store, db, step))
    except StoreError as exc:  # no BEGIN, a lost transaction, or no COMMIT: none stands
        for taken in done:
            if isinstance(taken, dict):
                erase_found(taken)  # nobody gets bits whose take did not stand
        return [StoreError(str(exc)) for _ in requests]
    return [_finish(store, request, d) for request, d in zip(requests, done, strict=True)]


def _step(store: KeyStore, request: Request, now: float) -> Step | Exception:
    """The request's work in the transaction, prepared outside the lock (a put's batch sealed)."""
    try:
        if isinstance(request, Put):
            rows = store._sealed(request.keys, request.meta, request.ttl)
            return lambda db: store._put_rows(db, rows)
        store._check_ids(request.key_ids)
        return lambda db: store._take_rows(db, request.key_ids, now)
    except Exception as exc:  # the caller's own error, raised to it as the store would
        return exc


def _in_savepoint(store: KeyStore, db: sqlite3.Connection, step: Step) -> int | Found | Exception:
    """Run one step; on its failure undo it alone and return its error."""
    db.execute("SAVEPOINT op")
    try:
        result = step(db)
    except (KmsError, sqlite3.Error) as exc:
        if not db.in_transaction:  # SQLite rolled back the whole group (disk full, I/O)
            raise StoreError(f"store {store.name}: {exc}") from None
        db.execute("ROLLBACK TO op")
        db.execute("RELEASE op")
        return exc if isinstance(exc, KmsError) else StoreError(f"store {store.name}: {exc}")
    db.execute("RELEASE op")
    return result


def _finish(store: KeyStore, request: Request, done: int | Found | Exception) -> Outcome:
    """After the commit: the keys a take removed, in the order it named them."""
    if isinstance(done, dict):
        assert isinstance(request, Take)
        return store._as_named(request.key_ids, done)
    return done


@dataclass(frozen=True, slots=True)
class _Op:
    request: Request
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class GroupCommitter:
    """The puts and takes of one store's event-loop callers, committed in groups."""

    MAX_GROUP = 256
    """Operations per transaction at most (bounds how long one holds the store lock)."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._queue: list[_Op] = []
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.commits = self.ops = 0
        """Transactions run, and operations run in them, so far (the worker counts)."""

    async def put_many(
        self,
        keys: Iterable[tuple[str, bytes | bytearray]],
        *,
        meta: str = "",
        ttl: float | None = None,
    ) -> int:
        """Add keys, all or none, as :meth:`KeyStore.put_many`; how many."""
        return cast(int, await self._submit(Put(keys=list(keys), meta=meta, ttl=ttl)))

    async def take_many(self, key_ids: list[str]) -> list[StoredKey]:
        """Remove and return the named keys, all or none, as :meth:`KeyStore.take_many`."""
        return cast(list[StoredKey], await self._submit(Take(key_ids=list(key_ids))))

    async def _submit(self, request: Request) -> Any:
        loop = asyncio.get_running_loop()
        op = _Op(request, loop.create_future(), loop)
        with self._wake:
            if self._closed:
                raise StoreError(f"store {self.store.name}: closed")
            self._queue.append(op)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, name=f"groupcommit {self.store.name}", daemon=True
                )
                self._worker.start()
            self._wake.notify()
        return await op.future

    def close(self) -> None:
        """Refuse new operations, run those queued, and wait for the worker to stop."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            worker = self._worker
        if worker is not None:
            worker.join()

    def _run(self) -> None:
        while group := self._next_group():
            live = [op for op in group if not op.future.cancelled()]  # skip callers gone
            if live:
                for op, outcome in zip(live, self._commit(live), strict=True):
                    _deliver(op, outcome)

    def _next_group(self) -> list[_Op]:
        """Wait for operations and take those queued; none once closed and drained."""
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()
            group, self._queue = self._queue[: self.MAX_GROUP], self._queue[self.MAX_GROUP :]
        return group

    def _commit(self, live: list[_Op]) -> list[Outcome]:
        self.commits += 1
        self.ops += len(live)
        try:
            return commit_group(self.store, [op.request for op in live])
        except Exception as exc:  # a bug: it escaped before any COMMIT, so none stands
            why = exc.__class__.__name__  # the class only: a message might quote an argument
            log.error("group commit failed", extra={"store": self.store.name, "error": why})
            return [StoreError(f"store {self.store.name}: group commit failed") for _ in live]


def _deliver(op: _Op, outcome: Outcome) -> None:
    """Hand an outcome to its caller's event loop, from the worker thread."""
    try:
        op.loop.call_soon_threadsafe(_settle, op.future, outcome)
    except RuntimeError:  # that loop is closed: nobody will receive the keys
        _erase(outcome)


def _settle(future: asyncio.Future[Any], outcome: Outcome) -> None:
    """On the caller's loop: its result, or its error; erased if it stopped waiting."""
    if future.cancelled():
        _erase(outcome)
    elif isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _erase(outcome: Outcome) -> None:
    if isinstance(outcome, list):
        for key in outcome:
            key.material[:] = bytes(len(key.material))
