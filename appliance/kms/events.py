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

Each is a frozen :class:`msgspec.Struct` (built ~50 times per relayed request across
the engines: ~0.1 µs each, where a frozen slotted dataclass took ~0.6). Those that can
hold no exception (whose traceback may lead back to them) nor arbitrary objects are not
tracked by the cyclic GC (``gc=False``).

Nothing here is I/O, and nothing here is logged: key material travels in ``bytearray``
fields (link keys read, keys taken from a store, keys for an SAE) that their final holder
erases.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec

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
class Received(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A request from another node (or from another engine of this node)."""

    req: int
    """The adapter's number for this request; the engine answers it with Reply or Refuse."""
    caller: int
    """Node ID of the caller, from its TLS certificate."""
    message: Sendable


class Answered(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The answer to one of the engine's calls."""

    call: int
    message: Message


class CallFailed(msgspec.Struct, frozen=True, kw_only=True):
    """A call that got no answer (unreachable, timed out) or a refusal."""

    call: int
    error: KmsError


class LinkKeysRead(msgspec.Struct, frozen=True, kw_only=True):
    """Keys read from a QKD module for :class:`ReadLinkKeys` (maybe fewer than asked)."""

    ticket: int
    keys: Sequence[KeyBits] = ()
    gone: tuple[str, ...] = ()
    """IDs asked for that the module no longer has (handed out before, or dropped from a
    full buffer): never obtainable."""
    error: KmsError | None = None
    """Why no (or not all) keys came: KeyUnavailable (none yet, or the link is down)."""


class PskDerived(msgspec.Struct, frozen=True, kw_only=True):
    """A channel key derived by a PSK source (file or smartcard) for :class:`DerivePsk`."""

    ticket: int
    key: bytearray | None = None
    error: KmsError | None = None


class StoreDone(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of a :class:`StoreOp`: keys stored or released (a count), keys taken, a
    level per session, or the store's error."""

    ticket: int
    result: int | list[StoredKey] | dict[str, int] | KmsError


class Validated(msgspec.Struct, frozen=True, kw_only=True):
    """The request validator's verdict on a :class:`Validate`."""

    ticket: int
    verdict: Verdict


class PathFound(msgspec.Struct, frozen=True, kw_only=True):
    """The path provider's answer to a :class:`FindPath`: node IDs, or why there is none."""

    ticket: int
    path: tuple[int, ...] = ()
    error: KmsError | None = None


class TimerFired(msgspec.Struct, frozen=True, kw_only=True):
    key: Hashable


class LinkWanted(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Relays will leave this node towards neighbour ``peer`` (a route was installed here
    with ``peer`` as its next hop, in use or as a standby backup): the engine gets the link
    key of the next message ready now, so that the first relay does not wait for it."""

    peer: int


class SaeEncKeys(msgspec.Struct, frozen=True, kw_only=True, gc=False):
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


class SaeDecKeys(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """ETSI 014 dec_keys at a UKMS: the named keys, for the slave that calls."""

    req: int
    slave: str
    master: str
    key_ids: tuple[str, ...]


class SaeAnswerWritten(msgspec.Struct, frozen=True, kw_only=True, gc=False):
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
class Call(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Send ``message`` to a node's service; the outcome comes back as Answered/CallFailed."""

    call: int
    to: Address
    message: Sendable


class Reply(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    req: int
    message: Message


class Refuse(msgspec.Struct, frozen=True, kw_only=True):
    req: int
    error: KmsError


class ReadLinkKeys(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Read keys from this node's QKD module on ``link``: the next ``count`` in order (the
    link's master end), or the keys named by ``ids`` (either end)."""

    ticket: int
    link: str
    count: int = 0
    ids: tuple[str, ...] = ()


class DerivePsk(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Derive a channel key from the PSK shared with access node ``peer``."""

    ticket: int
    peer: str
    context: bytes
    nonces: bytes


class Levels(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Keys per session of one kind (for the stock at start-up)."""

    kind: str


class Housekeep(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Delete expired keys and fold the write-ahead logs (see :mod:`appliance.kms.store`)."""


StoreRequest = Op | Levels | Housekeep
"""A key-store operation (:mod:`appliance.kms.storeops`), or a look over all of a node's stores."""


class StoreOp(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    ticket: int
    op: StoreRequest


class Validate(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Ask the request validator (the topology's contracts today, AAA later)."""

    ticket: int
    query: ValidationQuery


class FindPath(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Ask the path provider for a relay path from CKMS ``src`` to CKMS ``dst``."""

    ticket: int
    src: int
    dst: int
    route_policy: RoutePolicy = "balanced"
    """The contract's routing policy class (the path provider passes it on)."""


class SetTimer(msgspec.Struct, frozen=True, kw_only=True):
    key: Hashable
    at: float


class CancelTimer(msgspec.Struct, frozen=True, kw_only=True):
    key: Hashable


class SaeKeys(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Answer an SAE's request with these keys (the adapter erases the bits once sent)."""

    req: int
    keys: list[KeyBits]


class SaeRefused(msgspec.Struct, frozen=True, kw_only=True):
    """Answer an SAE's request with an error (ETSI 014 maps it to 400, 401 or 503)."""

    req: int
    error: KmsError


class Alarm(msgspec.Struct, frozen=True, kw_only=True):
    """Something an operator must hear of (integrity, a device gone, a quarantined store)."""

    code: str
    reason: str


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """An ordinary event worth a log line (request IDs and counts, never key material)."""

    event: str
    fields: Mapping[str, object] = msgspec.field(default_factory=dict)
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
