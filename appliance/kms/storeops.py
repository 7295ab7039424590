"""The key store's operations and results as plain values, for the engines and the stores.

An engine asks for store work by returning one of these operations; the adapter runs it on
the session's shard (:mod:`shards`, :mod:`groupcommit`, :mod:`store`) and hands back the
outcome: keys stored (``int``), keys taken (``list[StoredKey]``) or the error. This module
imports nothing that does I/O, so the sans-IO engines may import it. It never holds key
material beyond the :class:`StoredKey` values callers pass around (and erase).

A **session** groups keys: for ETSI 014, one SAE pair, ``014:MASTER:SLAVE``; for an ETSI
004 key stream, ``004:KSID`` (hex). A **kind** says what the keys are for: :data:`KSA` (a
slave's copies awaiting dec_keys), :data:`STOCK` (a master's keys made ahead), or a
stream's chunks, :data:`SRC004` and :data:`DST004` (one copy for each end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

KSA = "ksa"
"""Kind: slave copies of KSA keys awaiting the slave SAE's dec_keys."""
STOCK = "stock"
"""Kind: a master's KSA keys made ahead of demand."""
SRC004 = "s004src"
"""Kind: the source application's copies of an ETSI 004 stream's chunks."""
DST004 = "s004dst"
"""Kind: the destination application's copies of an ETSI 004 stream's chunks."""


def stream_session(ksid: bytes) -> str:
    """The session of an ETSI 004 key stream: its chunks' key in the store."""
    return f"004:{ksid.hex()}"


class StoredKey(msgspec.Struct, frozen=True, gc=False):
    """A key taken from a store; its bits are the caller's to erase after use. Its repr
    (and rich's) names the key, never its bits."""

    key_id: str
    material: bytearray

    def __repr__(self) -> str:
        return f"StoredKey(key_id={self.key_id!r}, bits=<redacted>)"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("key_id", self.key_id), ("bits", "<redacted>")]


class Put(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Store keys in a session, all or none (StoreFull; StoreError for a key ID already
    stored in this kind). Outcome: how many."""

    session: str
    """The session the keys belong to."""
    keys: Sequence[tuple[str, bytes | bytearray]]
    """Key IDs and bits."""
    kind: str = KSA
    """What the keys are for."""
    ttl: float | None = None
    """Lifetime in seconds; None for the store's default."""


class Take(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Take the named keys of a session, all or none, as **pending** takes (see
    :meth:`store.KeyStore.take_many`). Outcome: the keys, in the order named."""

    session: str
    """The session the keys must belong to."""
    key_ids: list[str]
    """The keys, in the order the outcome lists them."""
    kind: str = KSA
    """The kind they must be of."""


class TakeOldest(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Take up to ``n`` of a session's oldest keys of a kind, deleted at once (the stock
    lease). Outcome: the keys, oldest first (maybe none)."""

    session: str
    """The session to take from."""
    kind: str
    """The kind to take."""
    n: int
    """How many at most."""


class Release(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Delete keys this run took and holds pending: their bits leave the live records.
    Outcome: how many were released."""

    session: str
    """The session they were taken from (it names the shard)."""
    key_ids: list[str]
    """The keys."""


class Restore(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Make keys this run holds pending available to their session again: the answer that
    carried them never left (the SAE's connection was gone). Outcome: how many."""

    session: str
    """The session they were taken from (it names the shard)."""
    key_ids: list[str]
    """The keys."""


Op = Put | Take | TakeOldest | Release | Restore
"""Any store operation."""


def needs_fsync(op: Op) -> bool:
    """Whether ``op`` must reach the disk before its caller hears of it (``synchronous=FULL``).

    A slave's pending take and its release need not: undone by a power cut (a process crash
    loses neither: the WAL is written at COMMIT), they only let the same slave fetch the same
    bits again, which a crash before the reply allows anyway (see :mod:`store`). Every other
    operation does: a put is acknowledged upstream, which then erases its copy; an oldest-take
    hands stock to a master once; a restore keeps keys that would otherwise be purged."""
    return not isinstance(op, Take | Release)


Outcome = int | list[StoredKey]
"""What a successful operation gives: keys stored or released, or keys taken."""
