"""Group commit for a key store: the operations of many callers and sessions, one transaction.

Every :class:`~appliance.kms.store.KeyStore` call is a transaction ending in an fsync
(``synchronous=FULL``), and from the event loop one thread hand-off too. A UKMS serving
busy SAE pairs stores, takes and releases a few keys per request, hundreds of times a
second, so the fsyncs and hand-offs cost more than the work. :class:`GroupCommitter` (one
per store file: a shard serves many sessions) queues the operations of the event loop
(:class:`~appliance.kms.storeops.Put`, ``Take``, ``TakeOldest``, ``Release``, of any
session); a worker thread runs *all* those queued when it looks (up to MAX_GROUP) in one
``BEGIN IMMEDIATE ... COMMIT``, each in a SAVEPOINT of its own. The worker is the
committer's own, or one of a few :class:`CommitWorkers` shared by the committers of a
node's shard files (:mod:`shards`), which take the shards with operations queued in turn.

* An operation that fails (KeyUnavailable: not all its keys are there; StoreFull; a key
  ID already stored; IntegrityFailure: a record that does not open) is rolled back to its
  savepoint and raises to its own caller only; the rest of the group commits.
* If the transaction cannot begin, SQLite drops it half-way, an operation finds the file
  damaged (StoreCorrupt), or the COMMIT fails (disk full, busy), *every* operation of the
  group raises StoreError: nothing is reported stored or taken that was not committed.
* A put's batch is sealed before the store lock is taken; takes open their batches inside
  the transaction. The bits of a take whose transaction did not stand are erased.
  :func:`commit_group` is that whole step, without threads.
* ``on_error(store, error)`` is called by the worker, before the group's callers hear of
  it, for each StoreCorrupt or IntegrityFailure outcome: :mod:`shards` raises its alarm
  and quarantines a damaged file there, so that a caller's retry meets the fresh one.
* :meth:`GroupCommitter.queue` queues an operation whose outcome nobody awaits (the
  releases after an SAE's reply is written): it goes in the next group, at once, with
  whatever else is queued; a failure is logged (the keys stay pending and are purged
  after the refetch window).

Cancellation, and what it costs. An operation whose caller was cancelled before its group
began is skipped: nothing stored, nothing taken. One whose caller is cancelled later still
runs: a put's keys stay stored (taken later, or deleted when they expire); a take's keys
are taken and, as nobody receives them, their bits are erased (a pending take is purged
after the refetch window; an oldest-take's keys are gone, exactly once).
:meth:`GroupCommitter.close` refuses new operations, runs those already queued and waits
for its last group; a taken result whose event loop has closed meanwhile is erased likewise.

This module never logs or keeps key material: a result lives only in its caller's future.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from appliance.kms.errors import IntegrityFailure, KmsError, StoreCorrupt, StoreError
from appliance.kms.store import KeyStore, Step, erase_outcome, store_error
from appliance.kms.storeops import Op, Outcome, needs_fsync

log = logging.getLogger("qkdn.kms")

Result = Outcome | KmsError
"""What one operation's caller gets: keys stored or released, keys taken, or the error."""
OnError = Callable[[KeyStore, KmsError], None]
"""Told, from the worker thread, of a damaged file or a record that failed to open."""


def commit_group(store: KeyStore, ops: Sequence[Op]) -> list[Result]:
    """Run ``ops`` in one transaction, each in its own savepoint: one result each."""
    steps = [_prepared(store, op) for op in ops]
    done: list[Result] = []
    try:
        with store.transaction(fsync=any(needs_fsync(op) for op in ops)) as db:
            for step in steps:
                done.append(step if isinstance(step, KmsError) else _in_savepoint(store, db, step))
    except StoreError as exc:  # no BEGIN, a lost transaction, a damaged file, or no COMMIT
        for taken in done:
            erase_outcome(taken)  # nobody gets bits whose take did not stand
        return [_copy(exc) for _ in ops]
    return done


def _prepared(store: KeyStore, op: Op) -> Step | KmsError:
    """The operation's work, prepared outside the lock, or its own error (bad arguments)."""
    try:
        return store.prepare(op)
    except KmsError as exc:
        return exc


def _in_savepoint(store: KeyStore, db: sqlite3.Connection, step: Step) -> Result:
    """Run one step; on its failure undo it alone and return its error (a damaged file or
    a transaction SQLite dropped fails the whole group: raised)."""
    db.execute("SAVEPOINT op")
    try:
        result = step(db)
    except (KmsError, sqlite3.Error) as exc:
        error = exc if isinstance(exc, KmsError) else store_error(f"store {store.name}", exc)
        if isinstance(error, StoreCorrupt) or not db.in_transaction:  # SQLite dropped it all
            raise (error if isinstance(error, StoreError) else StoreError(error.message)) from exc
        db.execute("ROLLBACK TO op")
        db.execute("RELEASE op")
        return error
    db.execute("RELEASE op")
    return result


def _copy(exc: StoreError) -> StoreError:
    """One error per caller, of the same class and code, caused by the group's."""
    error = type(exc)(exc.message, code=exc.code)
    error.__cause__ = exc
    return error


class _Op(msgspec.Struct, frozen=True):
    op: Op
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None


class CommitWorkers:
    """The worker threads that run the groups of several committers (the shards of one
    store): at most ``threads`` groups at once, whatever the number of committers, and the
    committers with operations queued served in turn (first ready, first served; one with
    more queued after its group goes to the back). A committer's groups never overlap.

    Why: a thread per shard file meant, with SAE pairs spread over every shard, eight
    threads waking for small groups and handing the GIL to each other (UKMS B at 10,000
    pairs: 1.6 times the futex calls of 2 pairs, and its commit threads' CPU per request
    1.4 times); shared workers commit what queued meanwhile for every shard in turn.
    Threads start with the first operation and stop at :meth:`close`."""

    def __init__(self, threads: int = 1) -> None:
        if not 1 <= threads <= 64:
            raise StoreError(f"group commit: {threads} worker threads, expected 1 to 64")
        self.threads = threads
        self.lock = threading.RLock()
        """Guards every queue of the committers served here (and the ready list)."""
        self._work = threading.Condition(self.lock)  # a committer became ready, or closed
        self.done = threading.Condition(self.lock)
        """Notified after every group (a committer's close waits for its last)."""
        self._ready: deque[GroupCommitter] = deque()
        self._workers: list[threading.Thread] = []
        self.closed = False

    def ready(self, committer: GroupCommitter, *, wake: bool = True) -> None:
        """``committer`` has operations queued (the caller holds :attr:`lock`); ``wake``:
        wake a worker for it (not when the worker that just ran it looks again itself)."""
        if committer.scheduled or committer.running:
            return
        committer.scheduled = True
        self._ready.append(committer)
        if len(self._workers) < self.threads:
            worker = threading.Thread(target=self._run, name="groupcommit", daemon=True)
            self._workers.append(worker)
            worker.start()
        if wake:
            self._work.notify()

    def close(self) -> None:
        """Stop the workers once every ready committer's queue has been run."""
        with self.lock:
            self.closed = True
            self._work.notify_all()
            workers = list(self._workers)
        for worker in workers:
            if worker is not threading.current_thread():
                worker.join()

    def _run(self) -> None:
        while picked := self._next():
            committer, group = picked
            done = False
            try:
                committer.run_group(group)
                done = True
            finally:
                with self.lock:
                    committer.running = False
                    if committer.has_queued():  # this worker looks again: no hand-off
                        self.ready(committer, wake=not done)
                    self.done.notify_all()  # a committer's close waits for its last group

    def _next(self) -> tuple[GroupCommitter, list[_Op]] | None:
        """The next ready committer and its group; None once closed with none ready."""
        with self.lock:
            while not self._ready and not self.closed:
                self._work.wait()
            if not self._ready:
                return None
            committer = self._ready.popleft()
            committer.scheduled, committer.running = False, True
            return committer, committer.take_group()


class GroupCommitter:
    """The operations of one store's event-loop callers, committed in groups, by its own
    worker thread or by ``workers`` shared with other stores (:class:`CommitWorkers`)."""

    MAX_GROUP = 256
    """Operations per transaction at most (bounds how long one holds the store lock)."""

    def __init__(
        self,
        store: KeyStore,
        *,
        on_error: OnError | None = None,
        workers: CommitWorkers | None = None,
    ) -> None:
        self.store = store
        """The store the next group runs on (:mod:`shards` swaps in a fresh one)."""
        self._on_error = on_error
        self._own = workers is None  # its own worker thread, stopped by close
        self._workers = workers if workers is not None else CommitWorkers(1)
        self._lock = self._workers.lock  # guards the queue (held: operations wait together)
        self._queue: list[_Op] = []
        self._closed = False
        self.scheduled = self.running = False
        """Waiting in the workers' ready list; a group of it being run (under the lock)."""
        self.commits = self.ops = 0
        """Transactions run, and operations run in them, so far (the worker counts)."""

    async def submit(self, op: Op) -> Outcome:
        """Run ``op`` in the next group; its outcome, or its error raised."""
        result: Outcome = await self.start(op)
        return result

    def start(self, op: Op) -> asyncio.Future[Any]:
        """Run ``op`` in the next group; a future of the running loop for its outcome (or
        its error), for a caller that takes it by callback rather than by a task."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._enqueue(_Op(op, future, loop))
        return future

    def queue(self, op: Op) -> None:
        """Run ``op`` in the next group, nobody awaiting its outcome (a release). It does
        not wait for company: a release that waited would leave its keys pending, and a
        crash meanwhile would let their slave fetch them again (see :mod:`store`)."""
        self._enqueue(_Op(op, None, None))

    def _enqueue(self, item: _Op) -> None:
        with self._lock:
            if self._closed or self._workers.closed:
                raise StoreError(f"store {self.store.name}: closed")
            self._queue.append(item)
            self._workers.ready(self)

    def close(self) -> None:
        """Refuse new operations, run those queued, and wait until the last group is done
        (its own worker thread stopped; shared workers are the owner's to close)."""
        with self._lock:
            self._closed = True
            while self._queue or self.running or self.scheduled:
                self._workers.done.wait()
        if self._own:
            self._workers.close()

    def has_queued(self) -> bool:
        return bool(self._queue)

    def take_group(self) -> list[_Op]:
        """The operations queued, up to MAX_GROUP (the caller holds the workers' lock)."""
        group, self._queue = self._queue[: self.MAX_GROUP], self._queue[self.MAX_GROUP :]
        return group

    def run_group(self, group: list[_Op]) -> None:
        """Commit a group (from a worker thread) and hand each caller its result."""
        live = [item for item in group if item.future is None or not item.future.cancelled()]
        if live:
            for item, result in zip(live, self._commit(live), strict=True):
                _deliver(item, result)

    def _commit(self, live: list[_Op]) -> list[Result]:
        self.commits += 1
        self.ops += len(live)
        store = self.store
        try:
            results = commit_group(store, [item.op for item in live])
        except Exception as exc:  # a bug: it escaped before any COMMIT, so none stands
            why = exc.__class__.__name__  # the class only: a message might quote an argument
            log.error("group commit failed", extra={"store": store.name, "error": why})
            return [StoreError(f"store {store.name}: group commit failed") for _ in live]
        for result in results:
            if self._on_error is not None and isinstance(result, StoreCorrupt | IntegrityFailure):
                try:
                    self._on_error(store, result)
                except Exception as exc:  # the hook's failure must not stop the worker
                    log.error(
                        "store error hook failed",
                        extra={"store": store.name, "error": exc.__class__.__name__},
                    )
        return results


def _deliver(item: _Op, result: Result) -> None:
    """Hand a result to its caller's event loop, from the worker thread."""
    if item.future is None or item.loop is None:  # queued: nobody awaits it
        if isinstance(result, KmsError):
            log.warning("queued store operation failed", extra={"error": result.code})
        else:
            erase_outcome(result)
        return
    try:
        item.loop.call_soon_threadsafe(_settle, item.future, result)
    except RuntimeError:  # that loop is closed: nobody will receive the keys
        erase_outcome(result)


def _settle(future: asyncio.Future[Any], result: Result) -> None:
    """On the caller's loop: its result, or its error; erased if it stopped waiting."""
    if future.cancelled():
        erase_outcome(result)
    elif isinstance(result, KmsError):
        future.set_exception(result)
    else:
        future.set_result(result)
