"""The messages KMS nodes send each other: one typed, bounded, versioned type per message,
and the codec that carries them.

Every request and answer between nodes (the endpoints in :data:`ENDPOINTS`) is a frozen,
keyword-only :class:`msgspec.Struct` here, with one docstring line per field. The engines
and the node adapter build and read these types, never dicts. :func:`encode` turns a message
into bytes; :func:`decode` and :func:`decode_answer` turn bytes from a peer into the message
the endpoint expects, or raise a :class:`~appliance.kms.errors.MessageError` with a code:

* ``KMS-MSG-SYNTAX``: not MessagePack, not a map, trailing bytes, or not the canonical
  encoding (a field repeated, missing although it has a default, or out of order);
* ``KMS-MSG-TYPE``: the message does not open with its type, or it is another message;
* ``KMS-MSG-VERSION``: its version ``v`` is not 1;
* ``KMS-MSG-FIELD``: a field is unknown, missing, of the wrong type, or out of its bounds.

Nothing else escapes them, whatever the bytes. :func:`encode` checks what it sends by the
same rules (msgspec checks bounds only when decoding), so a node never sends what its peer
would refuse.

**Codec.** MessagePack through msgspec: decoding and checking every bound happen in C, and
binary fields (hop messages, sealed batches, nonces, request IDs) travel as raw bytes where
JSON needed base64 (a third larger, encoded and decoded again at each hop). Measured with
``bench/messages.py`` (encode + decode, CPU time, medians of 15 interleaved runs on a shared
2-core machine), against today's ``json`` + ``base64`` of the same fields: a relay batch of
one 96-byte hop message 5.0 µs against 9.4 µs (1.9x), 191 bytes against 235; of 16 such
messages 28.8 µs against 61.7 µs (2.1x); a KSA answer carrying a 1,024-key batch (49 KB)
9.3 µs against 453 µs (49x), 49,302 bytes against 65,703. Of the 5.0 µs, msgspec alone takes
1.5; the rest checks what is sent and that what is read is canonical. The encoding is
canonical: the type first, then the fields in declaration order, every one present (no dict
whose key order could vary), so one message has one encoding, and a decoder accepts only
that one. The two usual answers, :class:`Ok` and a relay batch's results all ok, are
encoded and checked once and kept (by count, at most :data:`MAX_RELAY_ITEMS` encodings);
:func:`decode_answer` recognises exactly those bytes without decoding them again.

**Versions.** A field added to a message comes after the existing ones, with a default
that means what the message meant before it (``None``, ``False``, an empty list: ``stream``,
``also``), and ``v`` stays 1: a message that does not use the new field means exactly what
it did. Every node encodes every field, so a node of an older release refuses a message
with the new field (``KMS-MSG-FIELD``, an unknown field): it fails closed, never reading a
request for one slave where several were meant. A change that alters what an existing
field means needs ``v`` 2.

**Never.** Key material travels only in the fields that hold sealed bytes (under link keys
or a CN key) and in ``cn_key`` of the two local hand-overs between the processes of one
access node (:class:`RelayLocal`, :class:`CnLocal`): those decode to ``bytearray`` so the
receiver can erase them, and :func:`encode_into` lets the sender erase its buffer. This
module logs nothing, and its error texts quote field names and short values, never bytes.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, TypeVar, Union, cast, get_args

import msgspec
from msgspec import Meta, Struct

from appliance.errors import ApplianceError
from appliance.kms.errors import (
    MessageError,
    MessageFieldError,
    MessageSyntaxError,
    MessageTypeError,
    MessageVersionError,
)
from appliance.kms.relay import MAC_KEY_BYTES, TAG_BYTES

# -- sizes ----------------------------------------------------------------------------------
MAX_KEYS = 1024
"""Keys one request may ask for (``Policy.max_key_per_request``, ETSI 014's limit)."""
MAX_KEY_BITS = 8192
"""Bits of one KSA key at most (AKMS A's check today)."""
KEY_ID_BYTES = 16
KSA_BATCH_MAX = 4 + MAX_KEYS * (KEY_ID_BYTES + MAX_KEY_BITS // 8)
"""An encoded KSA batch (:mod:`ksa`): size and count, then (ID, key) per key."""
SEALED_BATCH_MAX = KSA_BATCH_MAX + TAG_BYTES
"""A KSA batch under a CN key: IDs in clear, key bits encrypted, one tag."""
CN_KEY_MAX = MAX_KEYS * MAX_KEY_BITS // 8 + MAC_KEY_BYTES
"""An OTP CN key covers every key bit of its batch plus a MAC key (a GCM one is 32 bytes)."""
HOP_OVERHEAD_MAX = (4 + 1 + 1 + 1 + KEY_ID_BYTES) + (1 + 255) + (1 + 255 * 20) + 8 + TAG_BYTES
"""Header and tag of a hop message (:mod:`relay`) at most: fixed part, link name of up to
255 bytes, up to 255 link-key segments of 20 bytes, counter and length; then the tag."""
HOP_MESSAGE_MAX = CN_KEY_MAX + HOP_OVERHEAD_MAX
"""A relay hop message: a CN key under link keys."""
SEALED_KSA_MAX = KSA_BATCH_MAX + HOP_OVERHEAD_MAX
"""A KSA batch under link keys (UKMS <-> AKMS): a hop message whose payload is the batch."""
TAGGED_BODY_MAX = SEALED_BATCH_MAX + 64
"""The encoded :class:`CnAnswer` (or :class:`CnRequest`) inside a :class:`Tagged`."""
MAX_RELAY_ITEMS = 256
"""Hop messages in one relay batch (``RelayBatcher.MAX_ITEMS``)."""
MAX_SLAVES = 8
"""Additional slave SAEs one request may name (ETSI 014 Annex B ``max_SAE_ID_count``)."""
MAX_GRANT = 4096
"""Link key IDs a master grants in one answer."""
MAX_LINKS = 1024
"""Links a status answer lists."""
MAX_TEXT = 1024
"""Characters of an error text in an answer (no control characters: it ends up in logs)."""
INT64_MAX = (1 << 63) - 1

# -- field types ------------------------------------------------------------------------------
# Patterns end in \Z: msgspec searches with ``re``, where ``$`` also matches before a final
# newline. Every string has a max_length, checked before its pattern.
NAME_PATTERN = r"\A[a-z0-9][a-z0-9-]{0,62}\Z"
"""The topology's ``Name`` (node names, SAE IDs)."""
Name = Annotated[str, Meta(max_length=63, pattern=NAME_PATTERN)]
NodeId = Annotated[int, Meta(ge=1, le=65535)]
Path = Annotated[list[NodeId], Meta(min_length=2, max_length=64)]
RoutePolicy = Literal["balanced", "fewest-hops", "most-key"]
"""A contract's routing policy class: all the carrier network learns of the contract."""
Index = Annotated[int, Meta(ge=0, le=63)]
RequestId = Annotated[bytes, Meta(min_length=16, max_length=16)]
Nonce = Annotated[bytes, Meta(min_length=16, max_length=16)]
Number = Annotated[int, Meta(ge=1, le=MAX_KEYS)]
KeyBits = Annotated[int, Meta(ge=8, le=MAX_KEY_BITS, multiple_of=8)]
LinkEpoch = Annotated[str, Meta(max_length=32, pattern=r"\A[0-9a-f]{32}\Z")]
LinkName = Annotated[str, Meta(max_length=16, pattern=r"\Alink-[1-9][0-9]{0,4}-[1-9][0-9]{0,4}\Z")]
KeyId = Annotated[
    str,
    Meta(max_length=36, pattern=r"\A[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z"),
]
ChannelId = Annotated[str, Meta(max_length=16, pattern=r"\A[0-9a-f]{16}\Z")]
ChannelEpoch = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]
HexMac = Annotated[str, Meta(max_length=64, pattern=r"\A[0-9a-f]{64}\Z")]
CODE_PATTERN = r"\A[A-Z0-9-]{1,64}\Z"
Code = Annotated[str, Meta(max_length=64, pattern=CODE_PATTERN)]
Text = Annotated[str, Meta(max_length=MAX_TEXT, pattern=r"\A[^\x00-\x1f\x7f-\x9f]*\Z")]
Reading = Annotated[int, Meta(ge=-1, le=INT64_MAX)]
Counter = Annotated[int, Meta(ge=0, le=INT64_MAX)]


class Message(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type", tag=True
):
    """A message between nodes; on the wire a map whose ``type`` is the class name."""

    v: Literal[1] = 1
    """Version of the message layout."""

    holds_key: ClassVar[bool] = False
    """The message carries key material in clear (a local hand-over)."""


class Part(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A piece of a message (a list entry); versioned and typed by the message holding it."""


# -- UKMS A -> AKMS A: /v1/ksa ------------------------------------------------------------------
class StreamTag(Part, frozen=True, kw_only=True):
    """The ETSI 004 key stream a request's KSA keys are for: their key IDs derive from the
    stream and each key's index (:func:`appliance.kms.keyids.stream_raw`), so both UKMSs
    file them as chunks of that stream."""

    ksid: Annotated[bytes, Meta(min_length=16, max_length=16)]
    """The Key_stream_ID."""
    first: Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]
    """The index of the first key of the request (the others follow in order)."""
    ttl: Annotated[int, Meta(ge=1, le=(1 << 32) - 1)]
    """Seconds the slave's UKMS keeps the chunks (the stream's TTL)."""


Slaves = Annotated[list[Name], Meta(max_length=MAX_SLAVES)]


def _distinct_slaves(master: str | None, slave: str | None, also: list[str]) -> None:
    """The additional slaves differ from each other, from the slave and from the master."""
    if also and len({master, slave, *also}) != len(also) + 2:
        raise ValueError("additional slaves repeat an SAE of the request")


class KsaRequest(Message, frozen=True, kw_only=True):
    """UKMS A asks its AKMS for KSA keys for an SAE pair."""

    master: Name
    """SAE ID of the master (the caller of enc_keys)."""
    slave: Name
    """SAE ID of the slave that will receive copies of the keys."""
    number: Number
    """Keys asked for."""
    size: KeyBits
    """Bits per key."""
    epoch: LinkEpoch | None
    """The caller's view of the epoch of its link to the AKMS (None: no grant held)."""
    fresh: bool = False
    """The caller started anew and holds no link key it received before: the answer must
    be sealed with keys it can still read (the AKMS drops the ones it was sending with)."""
    stream: StreamTag | None = None
    """For an ETSI 004 key stream: which, and the index of the first key."""
    also: Slaves = []
    """Additional slave SAEs that receive copies of the same keys (ETSI 014 Annex B
    ``additional_slave_SAE_IDs``), none of them the master, the slave or another twice;
    never with ``stream``."""
    refill: bool = False
    """Keys for the pair's stock at the UKMS, not for an SAE's request: under AAA the AKMS
    only looks the pair up (where the slave is, how keys cross) and charges nothing; each
    request later served from the stock is allowed and accounted by a :class:`KsaStocked`.
    Never with ``stream`` or ``also``."""

    def __post_init__(self) -> None:
        _distinct_slaves(self.master, self.slave, self.also)
        if self.also and self.stream is not None:
            raise ValueError("a 004 stream has one slave")
        if self.refill and (self.also or self.stream is not None):
            raise ValueError("a stock refill is for one pair, never a stream")


class KsaStocked(Message, frozen=True, kw_only=True):
    """UKMS A asks its AKMS to allow (and account for) an SAE's request it will serve from
    the pair's stock: the same contract rules as a :class:`KsaRequest`, nothing drawn. The
    answer is :class:`Ok` (the AKMS has committed the request's accounting: the UKMS hands
    the keys out) or a refusal (the UKMS keeps the keys in the stock)."""

    master: Name
    """SAE ID of the master (the caller of enc_keys)."""
    slave: Name
    """SAE ID of the slave."""
    number: Number
    """Keys the SAE asked for."""
    size: KeyBits
    """Bits per key."""


class KsaAnswer(Message, frozen=True, kw_only=True):
    """AKMS A's answer: the keys, as a KSA batch under link keys."""

    sealed: Annotated[bytes, Meta(max_length=SEALED_KSA_MAX)]
    """A hop message whose payload is the encoded batch."""
    epoch: LinkEpoch | None
    """The AKMS's epoch of the link (None: no grant held)."""


# -- AKMS A -> AKMS B: /v1/cn, on the channel ------------------------------------------------
class Tagged(Message, frozen=True, kw_only=True):
    """A request or answer on an AKMS-AKMS channel, with its authentication tag."""

    channel_id: ChannelId
    """The channel, as the callee named it at open."""
    epoch: ChannelEpoch
    """The channel key's epoch (0 after open, one more per re-key)."""
    tag: HexMac
    """HMAC-SHA256 of the body under that epoch's key, hex."""
    body: Annotated[bytes, Meta(max_length=TAGGED_BODY_MAX)]
    """The encoded inner message (:class:`CnRequest` or :class:`CnAnswer`)."""


class SlaveAt(Part, frozen=True, kw_only=True):
    """An additional slave SAE of a request, and the UKMS that serves it."""

    slave: Name
    """Its SAE ID."""
    ukms: NodeId
    """Its UKMS, to deliver its copies to."""


class CnRequest(Message, frozen=True, kw_only=True):
    """AKMS A asks AKMS B to make keys and relay their CN key back to it."""

    request_id: RequestId
    """ID of the request, chosen by AKMS A."""
    purpose: Literal["ksa", "channel"]
    """KSA keys for an SAE pair, or the next key of this channel."""
    mode: Literal["OTP", "GCM"]
    """How the keys and their CN key cross the network (AKMS A's validator decided)."""
    master: Name | None = None
    """SAE ID of the master (``ksa`` only)."""
    slave: Name | None = None
    """SAE ID of the slave (``ksa`` only)."""
    number: Number
    """Keys asked for."""
    size: KeyBits
    """Bits per key."""
    ukms_b: NodeId | None = None
    """The slave's UKMS, to deliver its copies to (``ksa`` only)."""
    deliver_to: NodeId
    """The access node the CN key is relayed to (the caller)."""
    stream: StreamTag | None = None
    """For an ETSI 004 key stream (``ksa`` only): key IDs derive from it."""
    also: Annotated[list[SlaveAt], Meta(max_length=MAX_SLAVES)] = []
    """Additional slaves that receive copies of the same keys (``ksa`` only, no stream)."""
    route_policy: RoutePolicy = "balanced"
    """The contract's routing policy class (AKMS A's validator decided): AKMS B asks for
    the CN key's path under it."""

    def __post_init__(self) -> None:
        named = [x is not None for x in (self.master, self.slave, self.ukms_b)]
        if named != [self.purpose == "ksa"] * 3:
            raise ValueError("a ksa CnRequest names master, slave and ukms_b; a channel one none")
        if self.also and (self.purpose != "ksa" or self.stream is not None):
            raise ValueError("only a ksa CnRequest without a stream has additional slaves")
        _distinct_slaves(self.master, self.slave, [a.slave for a in self.also])


class CnAnswer(Message, frozen=True, kw_only=True):
    """AKMS B's answer: the keys sealed under the CN key relayed to AKMS A."""

    batch: Annotated[bytes, Meta(max_length=SEALED_BATCH_MAX)]
    """The sealed KSA batch (:func:`appliance.kms.ksa.seal_batch`)."""


# -- CKMS -> next CKMS: /v1/relay, /v1/relay/abort; AKMS B -> AKMS A: /v1/cn/abort -------------
class RelayItem(Part, frozen=True, kw_only=True):
    """One hop of a CN key."""

    path: Path
    """Node IDs from the responding access node to the requesting one."""
    index: Index
    """Position of the receiver in ``path``."""
    message: Annotated[bytes, Meta(max_length=HOP_MESSAGE_MAX)]
    """The hop message: the CN key under the link keys of this hop."""
    epoch: LinkEpoch | None
    """The sender's epoch of the link (None: no grant held)."""


class RelayBatch(Message, frozen=True, kw_only=True):
    """Hop messages for one neighbour, sent together."""

    items: Annotated[list[RelayItem], Meta(min_length=1, max_length=MAX_RELAY_ITEMS)]
    """The hops, each handled on its own."""


class ItemResult(Part, frozen=True, kw_only=True):
    """What became of one hop of a batch."""

    ok: bool
    """The hop message was opened and checked."""
    code: Annotated[str, Meta(max_length=64, pattern=r"\A[A-Z0-9-]{0,64}\Z")] = ""
    """Error code when not ok, else empty."""
    message: Text = ""
    """Error text when not ok, else empty."""

    def __post_init__(self) -> None:
        if self.ok != (self.code == "") or (self.ok and self.message):
            raise ValueError("an ok ItemResult has no code or text; a failed one has a code")


class RelayResults(Message, frozen=True, kw_only=True):
    """The answer to a relay batch: one result per item, in order."""

    results: Annotated[list[ItemResult], Meta(min_length=1, max_length=MAX_RELAY_ITEMS)]
    """The results, item by item."""


class RelayAbort(Message, frozen=True, kw_only=True):
    """One step back along a path: the CN key of this request will not arrive."""

    request_id: RequestId
    """The request given up."""
    path: Path
    """The path the CN key was on."""
    index: Index
    """Position of the receiver in ``path``."""


class CnAbort(Message, frozen=True, kw_only=True):
    """To the requesting access node: fail this request now."""

    request_id: RequestId
    """The request given up."""


class Ok(Message, frozen=True, kw_only=True):
    """An answer that says only that the request was done."""


# -- AKMS B -> UKMS B: /v1/ksa/deliver ------------------------------------------------------------
class Deliver(Message, frozen=True, kw_only=True):
    """The slave's copies of KSA keys, under link keys, for its UKMS to store."""

    master: Name
    """SAE ID of the master."""
    slave: Name
    """SAE ID of the slave."""
    sealed: Annotated[bytes, Meta(max_length=SEALED_KSA_MAX)]
    """A hop message whose payload is the encoded batch."""
    epoch: LinkEpoch | None
    """The sender's epoch of the link (None: no grant held)."""
    stream: StreamTag | None = None
    """For an ETSI 004 key stream: the keys are its chunks, kept for ``stream.ttl``."""


class Delivered(Message, frozen=True, kw_only=True):
    """UKMS B stored the keys."""

    stored: Number
    """Keys stored."""


# -- slave -> master end of a link: /v1/link/grant -------------------------------------------------
class GrantRequest(Message, frozen=True, kw_only=True):
    """The slave end of a link asks its master for key IDs to send with."""

    link: LinkName
    """The link, e.g. ``link-8-9``."""
    n: Annotated[int, Meta(ge=1, le=MAX_GRANT)]
    """Key IDs wanted."""


class Grant(Message, frozen=True, kw_only=True):
    """Key IDs the slave may send with, from this run of the master."""

    key_ids: Annotated[list[KeyId], Meta(min_length=1, max_length=MAX_GRANT)]
    """QKDM key IDs (UUID text), in the order to use them."""
    epoch: LinkEpoch
    """The master's epoch (one per run)."""


# -- AKMS A -> AKMS B: /v1/channel/open -------------------------------------------------------
class ChannelOpen(Message, frozen=True, kw_only=True):
    """Open a PSK-bootstrapped channel (:mod:`channel`)."""

    nonce: Nonce
    """The caller's nonce."""


class ChannelOpened(Message, frozen=True, kw_only=True):
    """The callee's half of the open."""

    channel_id: ChannelId
    """The new channel's ID."""
    nonce: Nonce
    """The callee's nonce."""
    confirm: HexMac
    """Proof that the callee derived the same key, hex."""


# -- anyone -> a node: /v1/status --------------------------------------------------------------
class StatusRequest(Message, frozen=True, kw_only=True):
    """Ask a node for the key counts of its links."""


class LinkStatus(Part, frozen=True, kw_only=True):
    """One link at this end (no key material, no key IDs)."""

    link: LinkName
    """The link's name."""
    peer: NodeId
    """The node at the other end."""
    role: Literal["master", "slave"]
    """This end's role on the link."""
    qkdm_keys: Reading
    """Keys waiting in this end's QKDM (-1: the QKDM did not answer)."""
    keys_produced: Reading
    """Keys the QKDM produced since it started (-1: it did not answer)."""
    key_size: Annotated[int, Meta(ge=-1, le=65536)]
    """Bits per QKDM key (-1: it did not answer)."""
    relay_batches: Counter
    """Relay requests sent to the peer."""
    relay_messages: Counter
    """Hop messages sent to the peer in them."""


class StatusAnswer(Message, frozen=True, kw_only=True):
    """Key counts of a node's links."""

    node: Name
    """The node's name."""
    links: Annotated[list[LinkStatus], Meta(max_length=MAX_LINKS)]
    """Its links."""


# -- UKMS -> its AKMS: /v1/terms ---------------------------------------------------------------
class TermsRequest(Message, frozen=True, kw_only=True):
    """Ask the AKMS for the contract's terms of an SAE pair (for ETSI 014 Status)."""

    master: Name
    """SAE ID of the master."""
    slave: Name
    """SAE ID of the slave."""


class TermsAnswer(Message, frozen=True, kw_only=True):
    """The contract's limits for the pair, as the AKMS's validator knows them."""

    max_key_size: KeyBits
    """Largest key the contract allows, in bits."""
    max_key_per_request: Number
    """Most keys one request may ask for."""
    max_key_count: Annotated[int, Meta(ge=0, le=INT64_MAX)] = 0
    """Most keys the contract allows per day or month (0: no contract bound)."""


# -- the two processes of a split access node: /v1/relay/local, /v1/cn/local --------------------
class RelayLocal(Message, frozen=True, kw_only=True):
    """AKMS -> its own CKMS: relay this CN key along a path (in clear, over loopback TLS)."""

    holds_key: ClassVar[bool] = True
    request_id: RequestId
    """The request the CN key belongs to."""
    path: Path
    """The relay path."""
    index: Index
    """Position of this node in ``path``."""
    cn_key: Annotated[bytearray, Meta(min_length=1, max_length=CN_KEY_MAX)]
    """The CN key (erase it once sent on)."""
    mode: Literal["OTP", "GCM"]
    """How the hops protect it."""


class CnLocal(Message, frozen=True, kw_only=True):
    """CKMS -> its own AKMS: a CN key arrived for a request of ours."""

    holds_key: ClassVar[bool] = True
    request_id: RequestId
    """The request the CN key belongs to."""
    cn_key: Annotated[bytearray, Meta(min_length=1, max_length=CN_KEY_MAX)]
    """The CN key (erase it once used)."""


# -- any endpoint ---------------------------------------------------------------------------------
class Refused(Message, frozen=True, kw_only=True):
    """An error answer."""

    code: Code
    """The error's code (``KMS-STALE-GRANT``, ...)."""
    message: Text
    """What went wrong, for the log."""


AnyMessage = (
    KsaRequest
    | KsaAnswer
    | KsaStocked
    | Tagged
    | CnRequest
    | CnAnswer
    | RelayBatch
    | RelayResults
    | RelayAbort
    | CnAbort
    | Ok
    | Deliver
    | Delivered
    | GrantRequest
    | Grant
    | ChannelOpen
    | ChannelOpened
    | StatusRequest
    | StatusAnswer
    | TermsRequest
    | TermsAnswer
    | RelayLocal
    | CnLocal
    | Refused
)
MESSAGE_TYPES: tuple[type[Message], ...] = get_args(AnyMessage)
"""Every message type, in the order above."""
Sendable = Message | RelayItem
"""What an engine sends: a message, or one hop that the adapter puts in a batch."""

ENDPOINTS: dict[str, tuple[type[Message], type[Message]]] = {
    "/v1/ksa": (KsaRequest, KsaAnswer),
    "/v1/ksa/stocked": (KsaStocked, Ok),
    "/v1/cn": (Tagged, Tagged),
    "/v1/relay": (RelayBatch, RelayResults),
    "/v1/relay/abort": (RelayAbort, Ok),
    "/v1/cn/abort": (CnAbort, Ok),
    "/v1/ksa/deliver": (Deliver, Delivered),
    "/v1/link/grant": (GrantRequest, Grant),
    "/v1/channel/open": (ChannelOpen, ChannelOpened),
    "/v1/status": (StatusRequest, StatusAnswer),
    "/v1/terms": (TermsRequest, TermsAnswer),
    "/v1/relay/local": (RelayLocal, Ok),
    "/v1/cn/local": (CnLocal, Ok),
}
"""Each endpoint between nodes: the request it takes and the answer it gives."""
TAGGED_INNER: tuple[type[Message], ...] = (CnRequest, CnAnswer)
"""The messages that travel encoded inside a :class:`Tagged` (AKMS to AKMS), not as an
endpoint's request or answer."""
_PATHS = {request: (path, answer) for path, (request, answer) in ENDPOINTS.items()}


def endpoint_of(message: Message) -> tuple[str, type[Message]]:
    """The endpoint a request goes to, and the type of its answer."""
    try:
        return _PATHS[type(message)]
    except KeyError:
        raise MessageTypeError(f"{type(message).__name__} is not a request") from None


# -- codec -------------------------------------------------------------------------------------
M = TypeVar("M", bound=Message)
Buffer = bytes | bytearray | memoryview

_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[tuple[type[Message], ...], msgspec.msgpack.Decoder[Message]] = {}
_TYPE_KEY = b"\xa4type"
_AT = re.compile(r" - at `([^`]*)`\Z")
MAX_ERROR_TEXT = 200
"""Characters of a decoding error kept in its message (peers choose the names quoted)."""
OK = Ok()
"""The one Ok (it has no field but ``v``)."""
ITEM_OK = ItemResult(ok=True)
"""The result of a hop that went through (every one is equal to this)."""
_OK_WIRE = _ENCODER.encode(OK)
"""Ok's canonical encoding (its only one; tests/kms/test_messages.py checks it)."""
_ALL_OK: dict[int, bytes] = {}
"""The canonical encoding of RelayResults of ``n`` results, all ok, by ``n``: the usual
answer to a relay batch, encoded and checked once (at most MAX_RELAY_ITEMS entries)."""
_ALL_OK_COUNTS: dict[bytes, int] = {}
"""The same, the other way: read back without decoding."""


def encode(msg: Message) -> bytes:
    """The canonical encoding of ``msg``; MessageError if a peer would refuse it."""
    cls = type(msg)
    if cls is Ok:
        return _OK_WIRE
    if cls is RelayResults:
        results = cast(RelayResults, msg).results
        if all(r.ok for r in results):  # then code and text are empty: one encoding per count
            count = len(results)
            wire = _ALL_OK.get(count)
            if wire is None:  # checked below: a count out of 1..MAX_RELAY_ITEMS is refused
                wire = _ALL_OK[count] = _checked(msg)
                _ALL_OK_COUNTS[wire] = count
            return wire
    return _checked(msg)


def _checked(msg: Message) -> bytes:
    """The encoding, checked by decoding it as a peer would."""
    data = _encode(msg)
    _erase(_decode(data, (type(msg),), "outgoing "))
    return data


def encode_into(msg: Message, buffer: bytearray) -> None:
    """:func:`encode` into ``buffer`` (replacing its content), which the caller erases once
    sent: for the messages that hold key material (:attr:`Message.holds_key`). On error the
    buffer is erased here."""
    try:
        _encode(msg, buffer)
        _erase(_decode(buffer, (type(msg),), "outgoing "))
    except MessageError:
        buffer[:] = bytes(len(buffer))
        raise


def decode(data: Buffer, expected: type[M]) -> M:
    """The ``expected`` message encoded in ``data``, or MessageError."""
    msg = _decode(data, (expected,), "")
    _check_canonical(msg, data)
    return cast(M, msg)


def decode_answer(data: Buffer, expected: type[M]) -> M | Refused:
    """An answer: the ``expected`` message or a :class:`Refused`, or MessageError."""
    if type(data) is bytes:  # the usual answers, byte for byte as encode made them
        if expected is Ok and data == _OK_WIRE:
            return cast(M, OK)
        if expected is RelayResults:
            count = _ALL_OK_COUNTS.get(data)
            if count is not None:
                return cast(M, RelayResults(results=[ITEM_OK] * count))
    msg = _decode(data, (expected, Refused), "")
    _check_canonical(msg, data)
    return cast("M | Refused", msg)  # a string: a TypeVar union costs at run time


def refused(error: ApplianceError) -> Refused:
    """The answer for ``error``, its text cut to fit (a code that does not fit: ``KMS``)."""
    code = error.code if re.fullmatch(CODE_PATTERN, error.code) else "KMS"
    return Refused(code=code, message=_printable(error.message, MAX_TEXT))


def _encode(msg: Message, buffer: bytearray | None = None) -> bytes:
    """msgspec's encoding of ``msg``, returned, or written into ``buffer`` (then ``b""``)."""
    try:
        if buffer is None:
            return _ENCODER.encode(msg)
        _ENCODER.encode_into(msg, buffer)
        return b""
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError) as exc:
        raise MessageFieldError(f"outgoing {type(msg).__name__}: {_clip(exc)}") from exc


def prepare() -> None:
    """Build the decoders of every endpoint's request and answer now, at a process's
    start: msgspec analyses a type on its first use (~0.5 ms each), which would otherwise
    fall on a node's first relay over a fresh path, at every hop. Also those of the
    messages carried inside a :class:`Tagged` (:data:`TAGGED_INNER`), which the
    network's first request decodes at both access nodes."""
    for request, answer in ENDPOINTS.values():
        for types in ((request,), (answer,), (answer, Refused)):
            _decoder(types)
    for inner in TAGGED_INNER:
        _decoder((inner,))


def _decoder(types: tuple[type[Message], ...]) -> msgspec.msgpack.Decoder[Message]:
    decoder = _DECODERS.get(types)
    if decoder is None:
        decoder = _DECODERS[types] = msgspec.msgpack.Decoder(Union[types])  # noqa: UP007
    return decoder


def _decode(data: Buffer, types: tuple[type[Message], ...], side: str) -> Message:
    """Decode as one of ``types``, mapping every failure to its MessageError."""
    # A canonical encoding is a small map whose first key is the type: a map that opens
    # with anything else has no type we can trust (a decoder for one type accepts none).
    # A start cut short inside that key is left to msgspec: a truncation.
    small_map = len(data) > 0 and 0x80 <= data[0] <= 0x8F
    if small_map and (data[0] == 0x80 or not _TYPE_KEY.startswith(bytes(data[1:6]))):
        raise MessageTypeError(
            f"{side}{types[0].__name__}: the message does not open with its type"
        )
    try:
        return _decoder(types).decode(data)
    except msgspec.ValidationError as exc:
        error = _classify(str(exc))(f"{side}{types[0].__name__}: {_clip(exc)}")
        raise error from exc
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        reason = f"not a MessagePack message: {_clip(exc)}"
        raise MessageSyntaxError(f"{side}{types[0].__name__}: {reason}") from exc


def _classify(text: str) -> type[MessageError]:
    """Which rule a msgspec validation error broke, from the place it names."""
    at = _AT.search(text)
    place = at.group(1) if at else None
    if place == "$.v":
        return MessageVersionError
    if place == "$.type" or text.startswith("Object missing required field `type`"):
        return MessageTypeError
    if place is None and text.startswith("Expected `object`"):
        return MessageSyntaxError
    return MessageFieldError


def _check_canonical(msg: Message, data: Buffer) -> None:
    """Refuse any encoding but the one :func:`encode` makes (duplicate keys, say, would let
    two readers of one message see different values)."""
    again = bytearray()
    _ENCODER.encode_into(msg, again)
    same = again == data
    if msg.holds_key:
        again[:] = bytes(len(again))
    if not same:
        _erase(msg)
        raise MessageSyntaxError(f"{type(msg).__name__}: not the canonical encoding")


def _erase(msg: Message) -> None:
    """Zero the key material of a message we will not hand on."""
    if msg.holds_key:
        for name in msg.__struct_fields__:
            value = getattr(msg, name)
            if isinstance(value, bytearray):
                value[:] = bytes(len(value))


def _clip(exc: BaseException) -> str:
    return _printable(str(exc), MAX_ERROR_TEXT)


def _printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, anything unprintable shown as ``?``."""
    cut = text if len(text) <= limit else text[: limit - 3] + "..."
    return "".join(c if c.isprintable() else "?" for c in cut)
