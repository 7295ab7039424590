"""ETSI GS QKD 004 key streams at a UKMS: what is decided, without I/O.

A **key stream** joins a source and a destination application (SAEs of one user) under a
16-byte Key_stream_ID (KSID). Both open it (OPEN_CONNECT) with the same KSID, at their own
UKMS; GET_KEY by index then gives both ends the same chunk, and each index once per end.
Chunks are KSA keys made and relayed exactly like ETSI 014 keys (the source's UKMS asks its
AKMS for them with a :class:`~appliance.kms.messages.StreamTag`), and the key ID of chunk
(KSID, index) is derived from both (:func:`~appliance.kms.keyids.stream_id`), so both
UKMSs file the same chunk under the same key ID without telling each other.

This module holds the streams' records and decides: which SAE pair a URI pair names, what
QoS can be granted (:func:`grant`), whether a KSID may be opened or joined, when a chunk
may be handed out under ``max_bps``, when a stream has expired, and how many chunks the
source's UKMS should have asked for by now (:meth:`StreamTable.supply_wanted`). The server
(:mod:`appliance.kms.etsi004`) does the I/O. Times are passed in (``now``: wall-clock
seconds, since records outlive a restart).

QoS, as granted (0 in a request asks for the default):

* ``key_chunk_size``: 1 to 1,024 bytes (default 32);
* ``max_bps``: chunk *i* is handed to an end no earlier than ``i * chunk bits / max_bps``
  seconds after that end's UKMS opened the stream (0: no maximum);
* ``min_bps``: reserved at the UKMS out of its stream capacity (``capacity_bps``); a stream
  that cannot have it gets QOS_NOT_MET with what can be granted. The source's UKMS keeps
  supplying chunks at that rate whether or not its own end reads;
* ``timeout`` (ms, default 60,000): how long a GET_KEY waits for a chunk still on its way
  (at most :data:`MAX_WAIT`), and how long a stream nobody calls stays open;
* ``TTL`` (s, default 3,600, at most 86,400): the stream's lifetime;
* ``jitter``, ``priority``: accepted and echoed, not acted on;
* metadata MIME type: ``""`` (no metadata) or ``application/json`` (each chunk's metadata
  is ``{"key_ID": ...}``, its identity as a KSA key record).

What this module must never do: let an SAE open or read a stream it is not an end of, or
hand an index to an end twice (the key store enforces the second: a chunk is taken once).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace

from appliance.kms import keyids
from appliance.kms.frames004 import MAX_CHUNK, U32_MAX, ZERO_KSID, Qos, Status
from appliance.kms.storeops import DST004, SRC004

DEFAULT_CHUNK = 32
DEFAULT_TIMEOUT_MS = 60_000
MAX_TIMEOUT_MS = 3_600_000
DEFAULT_TTL = 3600
MAX_TTL = 86_400
MAX_WAIT = 10.0
"""Seconds a GET_KEY waits at most for a chunk still on its way."""
JSON = "application/json"
MIME_TYPES = ("", JSON)
LEAD = 2.0
"""Seconds of chunks (at the stream's rate) the source's UKMS keeps made ahead."""
MIN_AHEAD, MAX_AHEAD = 64, 16_384
"""Chunks the source's UKMS keeps made ahead of what is asked, at least and at most."""
MAX_STREAMS = 10_000
"""Streams one UKMS keeps open at once."""
MAX_STREAMS_PER_SAE = 256
"""Streams one SAE may have open at its UKMS (so that one cannot take them all)."""
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def sae_of(uri: str) -> str | None:
    """The SAE ID a 004 URI names: ``SAE-ID`` or ``qkd://SAE-ID`` (a trailing ``/``
    allowed); None for anything else."""
    text = uri[len("qkd://") :] if uri.startswith("qkd://") else uri
    text = text.removesuffix("/")
    return text if _NAME.fullmatch(text) else None


def grant(asked: Qos, free_bps: int, max_chunk: int = MAX_CHUNK) -> tuple[Qos, bool]:
    """The QoS this UKMS grants for ``asked`` with ``free_bps`` of its capacity left and
    chunks of at most ``max_chunk`` bytes (the pair's contract may allow less than
    :data:`MAX_CHUNK`), and whether it meets the request (False: QOS_NOT_MET, the QoS
    returned is the counter-proposal). A 0 asks for the default and is always met."""
    chunk = asked.key_chunk_size or DEFAULT_CHUNK
    timeout = asked.timeout or DEFAULT_TIMEOUT_MS
    ttl = asked.ttl or DEFAULT_TTL
    min_bps, max_bps = asked.min_bps, asked.max_bps
    mime = asked.metadata_mimetype if asked.metadata_mimetype in MIME_TYPES else JSON
    counter = Qos(
        key_chunk_size=min(chunk, max_chunk),
        max_bps=max_bps,
        min_bps=min(min_bps, max(0, free_bps)),
        jitter=asked.jitter,
        priority=asked.priority,
        timeout=min(timeout, MAX_TIMEOUT_MS),
        ttl=min(ttl, MAX_TTL),
        metadata_mimetype=mime,
    )
    if counter.max_bps and counter.max_bps < counter.min_bps:
        counter = replace(counter, max_bps=counter.min_bps)
    met = (
        counter.key_chunk_size == chunk
        and counter.min_bps == min_bps
        and counter.max_bps == max_bps
        and counter.timeout == timeout
        and counter.ttl == ttl
        and mime == asked.metadata_mimetype
    )
    return counter, met


@dataclass(eq=False, slots=True, kw_only=True)
class Stream:
    """One stream as this UKMS knows it (persisted, but for the fields marked memory)."""

    ksid: bytes
    source: str
    destination: str
    qos: Qos
    created: float
    """Wall-clock seconds when this UKMS opened it."""
    opened: set[str] = field(default_factory=set)
    """The ends (SAE IDs) that opened it here and have not closed it."""
    next: int = 0
    """Source side: the first index not yet asked of the network (indices below it were
    asked for, once: a failed request's indices are never asked again). Destination side:
    one past the highest index received (a restart goes on from there)."""
    active: float = 0.0
    """Memory: the last call of an end (an idle stream expires after its timeout)."""
    high: int = 0
    """Memory: one past the highest index stored at this UKMS in this run."""
    served: int = 0
    """Memory: chunks handed to the source end in this run."""

    @property
    def expires(self) -> float:
        return self.created + self.qos.ttl

    def kind_for(self, sae: str) -> str:
        """The store kind of ``sae``'s copies of the chunks."""
        return SRC004 if sae == self.source else DST004

    def expired(self, now: float) -> bool:
        idle = now - max(self.active, self.created) > self.qos.timeout / 1000
        return now >= self.expires or idle

    def ready_at(self, index: int) -> float:
        """When chunk ``index`` may be handed out under ``max_bps``."""
        if not self.qos.max_bps:
            return self.created
        return self.created + index * self.qos.key_chunk_size * 8 / self.qos.max_bps

    def metadata(self, index: int) -> bytes:
        """The metadata of chunk ``index`` (its KSA key ID), per the stream's MIME type."""
        if self.qos.metadata_mimetype != JSON:
            return b""
        doc = {"key_ID": keyids.stream_id(self.ksid, index)}
        return json.dumps(doc, separators=(",", ":")).encode()

    def wait_for(self) -> float:
        """Seconds a GET_KEY waits for a chunk on its way."""
        return min(MAX_WAIT, self.qos.timeout / 1000)

    # -- persistence ------------------------------------------------------------------------
    def to_row(self) -> tuple[bytes, str, str, str, float, str, int]:
        q = self.qos
        qos = [q.key_chunk_size, q.max_bps, q.min_bps, q.jitter, q.priority, q.timeout, q.ttl]
        doc = json.dumps({"qos": qos, "mime": q.metadata_mimetype})
        opened = json.dumps(sorted(self.opened))
        return (self.ksid, self.source, self.destination, doc, self.created, opened, self.next)

    @classmethod
    def from_row(cls, row: tuple[bytes, str, str, str, float, str, int], now: float) -> Stream:
        ksid, source, destination, doc, created, opened, nxt = row
        parsed = json.loads(doc)
        names = ("key_chunk_size", "max_bps", "min_bps", "jitter", "priority", "timeout", "ttl")
        qos = Qos(**dict(zip(names, parsed["qos"], strict=True)), metadata_mimetype=parsed["mime"])
        stream = cls(ksid=ksid, source=source, destination=destination, qos=qos, created=created)
        stream.opened, stream.next, stream.active = set(json.loads(opened)), nxt, now
        return stream


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened:
    """What an OPEN_CONNECT comes to."""

    status: Status
    qos: Qos
    ksid: bytes = ZERO_KSID
    stream: Stream | None = None
    """The stream opened or joined (None: refused)."""
    new: bool = False
    """The stream is new at this UKMS (persist it)."""


class StreamTable:
    """The streams of one UKMS. ``served(master, slave)`` says whether this UKMS serves
    ``master`` with ``slave`` as its peer (the topology's sessions); ``capacity_bps`` is
    what ``min_bps`` reservations may add up to."""

    def __init__(self, *, capacity_bps: int) -> None:
        self.capacity_bps = capacity_bps
        self.streams: dict[bytes, Stream] = {}

    def reserved(self) -> int:
        return sum(s.qos.min_bps for s in self.streams.values())

    def open(
        self,
        caller: str,
        source: str,
        destination: str,
        asked: Qos,
        ksid: bytes,
        *,
        now: float,
        max_chunk: int = MAX_CHUNK,
    ) -> Opened:
        """Open or join (the caller is one end, checked by the server against the
        topology). ``ksid``: all zeros asks for a new one (the server passes a fresh random
        ID in ``ksid`` then, with ``asked`` as the new stream's QoS). ``max_chunk``: the
        largest chunk a new stream may have (:func:`grant`)."""
        found = self.streams.get(ksid)
        if found is not None:
            if (found.source, found.destination) != (source, destination) or caller in found.opened:
                return Opened(status=Status.KSID_IN_USE, qos=asked)
            found.opened.add(caller)
            found.active = now
            both = {found.source, found.destination} <= found.opened
            status = Status.SUCCESS if both or found.high else Status.PEER_NOT_CONNECTED
            return Opened(status=status, qos=found.qos, ksid=ksid, stream=found)
        mine = sum(1 for s in self.streams.values() if caller in s.opened)
        if len(self.streams) >= MAX_STREAMS or mine >= MAX_STREAMS_PER_SAE:
            return Opened(status=Status.NO_QKD_CONNECTION, qos=asked)
        qos, met = grant(asked, self.capacity_bps - self.reserved(), max_chunk)
        if not met:
            return Opened(status=Status.QOS_NOT_MET, qos=qos)
        stream = Stream(
            ksid=ksid, source=source, destination=destination, qos=qos, created=now, active=now
        )
        stream.opened.add(caller)
        self.streams[ksid] = stream
        return Opened(status=Status.PEER_NOT_CONNECTED, qos=qos, ksid=ksid, stream=stream, new=True)

    def of(self, caller: str, ksid: bytes) -> Stream | None:
        """The stream ``caller`` has open under ``ksid``, or None."""
        stream = self.streams.get(ksid)
        return stream if stream is not None and caller in stream.opened else None

    def close(self, caller: str, stream: Stream) -> bool:
        """The caller's end is closed; True when no end is left here (drop the stream)."""
        stream.opened.discard(caller)
        if stream.opened:
            return False
        self.streams.pop(stream.ksid, None)
        return True

    def drop(self, stream: Stream) -> None:
        self.streams.pop(stream.ksid, None)

    def expired(self, now: float) -> list[Stream]:
        return [s for s in self.streams.values() if s.expired(now)]

    def supply_wanted(self, stream: Stream, asked: int, now: float) -> int:
        """Source side: the index the network should have been asked for up to (exclusive),
        given the highest index an end asked for (``asked``, -1 for none) and the stream's
        rate (``min_bps``, else ``max_bps``: chunks made at that pace from the opening)."""
        chunk_bits = stream.qos.key_chunk_size * 8
        rate = stream.qos.min_bps or stream.qos.max_bps
        ahead = MIN_AHEAD
        by_rate = 0
        if rate:
            ahead = max(MIN_AHEAD, min(MAX_AHEAD, math.ceil(rate * LEAD / chunk_bits)))
            by_rate = math.ceil(max(0.0, now - stream.created) * rate / chunk_bits)
        want = max(asked + 1, by_rate) + ahead
        made_unread = stream.next - stream.served
        if made_unread >= MAX_AHEAD and want > stream.next:
            return stream.next  # enough made and not yet read: wait for the ends
        return min(want, U32_MAX + 1)
