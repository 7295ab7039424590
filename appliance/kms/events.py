"""What the KMS role engines take in and what they ask for: their whole interface.

An engine (:mod:`appliance.kms.engines`) is a state machine without I/O, in the manner of
h2's ``receive_data -> events``: ``engine.handle(event, now)`` returns the actions the
event calls for. The node adapter (:mod:`appliance.kms.node`) or the simulation
(:mod:`appliance.kms.sim`) carries each action out and feeds its outcome back as another
event, tagged with the ``call``, ``req`` or ``ticket`` number the engine chose.

Inputs are messages from other nodes (``Received``, ``Answered``, ``CallFailed``), device
readings (``LinkKeysRead``, ``PskDerived``), store results (``StoreDone``), verdicts of the
seams (``Validated``, ``PathFound``), timers (``TimerFired``), a route's next hop
(``LinkWanted``) and, at a UKMS, the ETSI 014
calls of its SAEs. Actions are calls and replies to other nodes, link-key reads, store
operations, questions to the seams, timers, answers to SAEs, alarms and notices.

Nothing here is I/O, and nothing here is logged: key material travels in ``bytearray``
fields (link keys read, keys taken from a store, keys for an SAE) that their final holder
erases.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.kms.errors import KmsError
from appliance.kms.storeops import Op, StoredKey

if TYPE_CHECKING:
    from appliance.kms.messages import Message, RoutePolicy, Sendable, StreamTag
    from appliance.kms.seams import ValidationQuery, Verdict

Address = tuple[int, str]
"""A node's service: (node ID, ``ukms`` | ``akms`` | ``ckms``)."""
KeyBits = tuple[str, bytearray]
"""A key ID and the key's bits."""


# -- inputs ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """A request from another node (or from another engine of this node)."""

    req: int
    """The adapter's number for this request; the engine answers it with Reply or Refuse."""
    caller: int
    """Node ID of the caller, from its TLS certificate."""
    message: Sendable


@dataclass(frozen=True, slots=True, kw_only=True)
class Answered:
    """The answer to one of the engine's calls."""

    call: int
    message: Message


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFailed:
    """A call that got no answer (unreachable, timed out) or a refusal."""

    call: int
    error: KmsError


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkKeysRead:
    """Keys read from a QKD module for :class:`ReadLinkKeys` (maybe fewer than asked)."""

    ticket: int
    keys: Sequence[KeyBits] = ()
    gone: tuple[str, ...] = ()
    """IDs asked for that the module no longer has (handed out before, or dropped from a
    full buffer): never obtainable."""
    error: KmsError | None = None
    """Why no (or not all) keys came: KeyUnavailable (none yet, or the link is down)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PskDerived:
    """A channel key derived by a PSK source (file or smartcard) for :class:`DerivePsk`."""

    ticket: int
    key: bytearray | None = None
    error: KmsError | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreDone:
    """The outcome of a :class:`StoreOp`: keys stored or released (a count), keys taken, a
    level per session, or the store's error."""

    ticket: int
    result: int | list[StoredKey] | dict[str, int] | KmsError


@dataclass(frozen=True, slots=True, kw_only=True)
class Validated:
    """The request validator's verdict on a :class:`Validate`."""

    ticket: int
    verdict: Verdict


@dataclass(frozen=True, slots=True, kw_only=True)
class PathFound:
    """The path provider's answer to a :class:`FindPath`: node IDs, or why there is none."""

    ticket: int
    path: tuple[int, ...] = ()
    error: KmsError | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerFired:
    key: Hashable


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkWanted:
    """Relays will leave this node towards neighbour ``peer`` (a route was installed here
    with ``peer`` as its next hop, in use or as a standby backup): the engine gets the link
    key of the next message ready now, so that the first relay does not wait for it."""

    peer: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SaeEncKeys:
    """ETSI 014 enc_keys at a UKMS: ``number`` keys of ``size`` bits for master -> slave
        (with ``stream``: the next chunks of an ETSI 004 key stream; with ``also``: keys shared
    with more slaves; both made end to end, never from the stock)."""

    req: int
    master: str
    slave: str
    number: int
    size: int
    stream: StreamTag | None = None
    also: tuple[str, ...] = ()
    """Additional slaves that get copies of the same keys (ETSI 014 Annex B)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SaeDecKeys:
    """ETSI 014 dec_keys at a UKMS: the named keys, for the slave that calls."""

    req: int
    slave: str
    master: str
    key_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SaeAnswerWritten:
    """The answer to an SAE request was handed to its connection (``ok``), or the connection
    was gone first (``ok=False``)."""

    req: int
    ok: bool = True


Input = (
    Received
    | Answered
    | CallFailed
    | LinkKeysRead
    | PskDerived
    | StoreDone
    | Validated
    | PathFound
    | TimerFired
    | LinkWanted
    | SaeEncKeys
    | SaeDecKeys
    | SaeAnswerWritten
)


# -- actions -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """Send ``message`` to a node's service; the outcome comes back as Answered/CallFailed."""

    call: int
    to: Address
    message: Sendable


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    req: int
    message: Message


@dataclass(frozen=True, slots=True, kw_only=True)
class Refuse:
    req: int
    error: KmsError


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadLinkKeys:
    """Read keys from this node's QKD module on ``link``: the next ``count`` in order (the
    link's master end), or the keys named by ``ids`` (either end)."""

    ticket: int
    link: str
    count: int = 0
    ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DerivePsk:
    """Derive a channel key from the PSK shared with access node ``peer``."""

    ticket: int
    peer: str
    context: bytes
    nonces: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Levels:
    """Keys per session of one kind (for the stock at start-up)."""

    kind: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Housekeep:
    """Delete expired keys and fold the write-ahead logs (see :mod:`appliance.kms.store`)."""


StoreRequest = Op | Levels | Housekeep
"""A key-store operation (:mod:`appliance.kms.storeops`), or a look over all of a node's stores."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreOp:
    ticket: int
    op: StoreRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class Validate:
    """Ask the request validator (the topology's contracts today, AAA later)."""

    ticket: int
    query: ValidationQuery


@dataclass(frozen=True, slots=True, kw_only=True)
class FindPath:
    """Ask the path provider for a relay path from CKMS ``src`` to CKMS ``dst``."""

    ticket: int
    src: int
    dst: int
    route_policy: RoutePolicy = "balanced"
    """The contract's routing policy class (the path provider passes it on)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SetTimer:
    key: Hashable
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelTimer:
    key: Hashable


@dataclass(frozen=True, slots=True, kw_only=True)
class SaeKeys:
    """Answer an SAE's request with these keys (the adapter erases the bits once sent)."""

    req: int
    keys: list[KeyBits]


@dataclass(frozen=True, slots=True, kw_only=True)
class SaeRefused:
    """Answer an SAE's request with an error (ETSI 014 maps it to 400, 401 or 503)."""

    req: int
    error: KmsError


@dataclass(frozen=True, slots=True, kw_only=True)
class Alarm:
    """Something an operator must hear of (integrity, a device gone, a quarantined store)."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """An ordinary event worth a log line (request IDs and counts, never key material)."""

    event: str
    fields: Mapping[str, object] = field(default_factory=dict)
    warning: bool = False


Action = (
    Call
    | Reply
    | Refuse
    | ReadLinkKeys
    | DerivePsk
    | StoreOp
    | Validate
    | FindPath
    | SetTimer
    | CancelTimer
    | SaeKeys
    | SaeRefused
    | Alarm
    | Notice
)
