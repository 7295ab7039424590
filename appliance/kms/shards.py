"""A node's key stores: a fixed, small number of shard files; sessions spread over them.

What it is for: a UKMS's cost in files and descriptors independent of how many SAE pairs
it serves. :class:`ShardedStore` keeps ``shards`` (default 8) :class:`~store.KeyStore`
files, ``keys-0.db`` ... ``keys-7.db``, in the data directory (mode 0700, files 0600),
each with at most three descriptors open (the database, its ``-wal`` and ``-shm``). A
session lives in the shard a stable hash of its name picks (BLAKE2b, not Python's
salted ``hash``), so it finds its keys again after a restart. Each shard has one
:class:`~groupcommit.GroupCommitter`, so the operations of all its sessions share
transactions, and the committers share ``commit_threads`` (default 2) worker threads, so
that the threads a UKMS runs, and their hand-offs, do not grow with the shards its pairs
fall in.

What it must never do: use a shard it cannot trust as if nothing happened, or let one bad
shard stop the others. At open, a shard SQLite cannot read (its header overwritten:
StoreCorrupt) or whose key-check record does not open under the node key (sealed under
another key: StoreKeyMismatch) is **quarantined**: renamed with its ``-wal`` and ``-shm``
to ``*.quarantined-<UTC time>`` (kept for forensics and recovery, never read again), the
alarm callback is told (code ``KMS-STORE-CORRUPT`` or ``KMS-STORE-KEY``), and a fresh
shard takes its place. Damage found during an operation (StoreCorrupt) fails that
operation (and its group), quarantines the shard the same way and raises the alarm once.
A record that fails authentication raises IntegrityFailure to its caller (nothing taken)
and the alarm ``KMS-INTEGRITY``; the shard stays. A full disk or a busy file is a
StoreError for the caller, not damage. A changed shard count, or a shard file gone
without a quarantine, is refused at open (``KMS-STORE-LAYOUT``): sessions would silently
lose their keys. Messages and alarms name files and codes, never key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from appliance.kms.errors import (
    IntegrityFailure,
    KmsError,
    StoreCorrupt,
    StoreError,
    StoreKeyMismatch,
)
from appliance.kms.groupcommit import CommitWorkers, GroupCommitter
from appliance.kms.store import REFETCH_WINDOW, KeyStore, RecordKey, private_dir
from appliance.kms.storeops import Op, Outcome

log = logging.getLogger("qkdn.kms")
T = TypeVar("T")

DEFAULT_SHARDS = 8
COMMIT_THREADS = 2
"""Threads that run the shards' group commits (:class:`~groupcommit.CommitWorkers`):
at most two commits at once, so that pairs spread over every shard cost no more thread
hand-offs than pairs in two shards."""
MAX_REMEMBERED = 4096
"""Sessions whose shard a store remembers (more: it forgets them all and starts again)."""
Alarm = Callable[[str, str], None]
"""``alarm(code, reason)``: a store condition an operator must see."""
_SHARD = re.compile(r"keys-(\d{1,3})\.db")
_QUARANTINED = re.compile(r"keys-(\d{1,3})\.db\.quarantined-.*")


def shard_index(session: str, shards: int) -> int:
    """The shard of ``session``: the same in every process and run."""
    digest = hashlib.blake2b(session.encode(), digest_size=8, person=b"qkdn/shard").digest()
    return int.from_bytes(digest, "big") % shards


class ShardedStore:
    """The key stores of one node. Thread-safe; :meth:`submit` and :meth:`queue` are for
    the event loop, the other methods for threads (each call one transaction per shard)."""

    def __init__(
        self,
        directory: Path,
        node_key: RecordKey,
        *,
        alarm: Alarm,
        shards: int = DEFAULT_SHARDS,
        clock: Callable[[], float] = time.time,
        run_id: str | None = None,
        capacity: int = 1_000_000,
        ttl: float = 7 * 86400.0,
        refetch_window: float = REFETCH_WINDOW,
        commit_threads: int = COMMIT_THREADS,
    ) -> None:
        """``capacity`` (keys per shard), ``ttl`` and ``refetch_window`` are each
        :class:`~store.KeyStore`'s; ``run_id`` names this run (random by default);
        ``commit_threads``: the threads the shards' group commits share."""
        if not 1 <= shards <= 256:
            raise StoreError(f"key stores: {shards} shards, expected 1 to 256")
        self.directory, self.shards = directory, shards
        self._shard_of: dict[str, int] = {}  # shard_index's answers (a hash each time)
        self.run_id = run_id or os.urandom(8).hex()
        self._key, self._alarm, self._clock = node_key, alarm, clock
        self._limits = (capacity, ttl, refetch_window)
        self._lock = threading.Lock()
        self._committers: dict[int, GroupCommitter] = {}
        self._workers = CommitWorkers(commit_threads)
        private_dir(directory)
        self._check_layout()
        self._stores: list[KeyStore] = []
        try:
            for i in range(shards):
                self._stores.append(self._open(i))
        except BaseException:
            for store in self._stores:
                store.close()
            raise

    def shard_of(self, session: str) -> int:
        index = self._shard_of.get(session)
        if index is None:
            if len(self._shard_of) >= MAX_REMEMBERED:
                self._shard_of.clear()
            index = self._shard_of[session] = shard_index(session, self.shards)
        return index

    # -- operations ---------------------------------------------------------------------
    def run(self, op: Op) -> Outcome:
        """Run one operation in a transaction of its own (from a thread)."""
        store = self._stores[self.shard_of(op.session)]
        return self._guarded(store, lambda s: s.run(op))

    async def submit(self, op: Op) -> Outcome:
        """Run one operation in the next group commit of its shard."""
        return await self._committer(self.shard_of(op.session)).submit(op)

    def start(self, op: Op) -> asyncio.Future[Any]:
        """:meth:`submit`, its outcome as a future of the running loop (no task)."""
        return self._committer(self.shard_of(op.session)).start(op)

    def queue(self, op: Op) -> None:
        """Queue an operation nobody awaits (a release) for its shard's next group."""
        self._committer(self.shard_of(op.session)).queue(op)

    def count(self, session: str, kind: str) -> int:
        """The session's available keys of ``kind``."""
        store = self._stores[self.shard_of(session)]
        return self._guarded(store, lambda s: s.count(session, kind))

    def levels(self, kind: str) -> dict[str, int]:
        """Available keys of ``kind`` per session holding any, over all shards."""
        levels: dict[str, int] = {}
        for store in list(self._stores):
            levels |= self._guarded(store, lambda s: s.levels(kind))
        return levels

    def purge_expired(self) -> int:
        """Purge every shard (see :meth:`KeyStore.purge_expired`); how many keys went. A
        shard that fails does not stop the others; the first error is raised after."""
        return sum(self._each(lambda store: store.purge_expired()))

    def checkpoint(self) -> None:
        """Checkpoint every shard (see :meth:`KeyStore.checkpoint`)."""
        self._each(lambda store: store.checkpoint())

    def close(self) -> None:
        """Run what is queued, checkpoint, and close every shard."""
        with self._lock:
            committers, self._committers = list(self._committers.values()), {}
        for committer in committers:
            committer.close()
        self._workers.close()
        for store in self._stores:
            with contextlib.suppress(StoreError):
                store.checkpoint()
            store.close()

    def _each(self, work: Callable[[KeyStore], T]) -> list[T]:
        done: list[T] = []
        first: KmsError | None = None
        for store in list(self._stores):
            try:
                done.append(self._guarded(store, work))
            except KmsError as exc:
                first = first or exc
        if first is not None:
            raise first
        return done

    def _guarded(self, store: KeyStore, work: Callable[[KeyStore], T]) -> T:
        """``work(store)``; a damaged file or a record that does not open is reported
        (:meth:`_failed`) before the error goes on to the caller."""
        try:
            return work(store)
        except (StoreCorrupt, IntegrityFailure) as exc:
            self._failed(store, exc)
            raise

    def _committer(self, i: int) -> GroupCommitter:
        with self._lock:
            committer = self._committers.get(i)
            if committer is None:
                committer = GroupCommitter(
                    self._stores[i], on_error=self._failed, workers=self._workers
                )
                self._committers[i] = committer
            return committer

    # -- trust: key check, damage, quarantine ------------------------------------------
    def _path(self, i: int) -> Path:
        return self.directory / f"keys-{i}.db"

    def _new(self, i: int) -> KeyStore:
        capacity, ttl, window = self._limits
        return KeyStore(
            self._path(i),
            f"keys-{i}",
            self._key,
            capacity=capacity,
            ttl=ttl,
            refetch_window=window,
            clock=self._clock,
            run_id=self.run_id,
        )

    def _open(self, i: int) -> KeyStore:
        """Shard ``i``; quarantined and made afresh if damaged or sealed under another key."""
        try:
            return self._new(i)
        except (StoreCorrupt, StoreKeyMismatch) as exc:
            self._quarantine(self._path(i), exc)
            return self._new(i)

    def _failed(self, store: KeyStore, exc: KmsError) -> None:
        """An operation found a record that does not open (alarm), or a damaged file:
        quarantine it and open a fresh shard in its place, once per damaged store."""
        if not isinstance(exc, StoreCorrupt):
            self._raise_alarm(exc.code, f"key store {store.path.name}: {exc.message}")
            return
        with self._lock:
            if store not in self._stores:
                return  # replaced already: the alarm was raised then
            i = self._stores.index(store)
            store.close()
            self._quarantine(store.path, exc)
            self._stores[i] = fresh = self._new(i)
            if i in self._committers:
                self._committers[i].store = fresh

    def _quarantine(self, path: Path, exc: KmsError) -> None:
        """Rename the shard and its -wal/-shm aside, and raise the alarm."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        suffix, n = f".quarantined-{stamp}", 1
        while path.with_name(path.name + suffix).exists():
            n += 1
            suffix = f".quarantined-{stamp}-{n}"
        try:
            for side in ("-wal", "-shm", ""):  # the database last: no WAL left for a new one
                old = path.with_name(path.name + side)
                if old.exists():
                    old.rename(old.with_name(old.name + suffix))
        except OSError as err:
            reason = f"key store {path.name}: {exc.message}; cannot quarantine it ({err})"
            self._raise_alarm(exc.code, reason)
            raise StoreError(reason, code=exc.code) from err
        reason = f"key store {path.name}: {exc.message}; quarantined as {path.name}{suffix}"
        self._raise_alarm(exc.code, reason + ", a fresh shard replaces it")

    def _raise_alarm(self, code: str, reason: str) -> None:
        try:
            self._alarm(code, reason)
        except Exception as exc:  # the alarm's failure must not hide the store's
            log.error("store alarm failed", extra={"error": exc.__class__.__name__})

    def _check_layout(self) -> None:
        """Refuse a directory whose shard files do not match the shard count."""
        names = [p.name for p in self.directory.iterdir()]
        found = {int(m[1]) for name in names if (m := _SHARD.fullmatch(name))}
        aside = {int(m[1]) for name in names if (m := _QUARANTINED.fullmatch(name))}
        wanted = set(range(self.shards))
        if found and (found - wanted or wanted - found - aside):
            raise StoreError(
                f"key stores in {self.directory}: shard files {sorted(found)} do not match "
                f"the {self.shards} shards configured (a changed count, or a file removed)",
                code="KMS-STORE-LAYOUT",
            )
