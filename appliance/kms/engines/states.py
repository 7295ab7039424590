"""The life of every request the KMS engines handle, as state tables.

Rules of this file:

* One table per kind of request; each is ``state -> {input: next state}`` and nothing
  else (:mod:`appliance.kms.fsm`). The engines call ``TABLE.advance(request, INPUT)``
  before any side effect of that input.
* A pair that is not listed is a protocol error: the request fails at once (a clean
  refusal to whoever waits for it), it never waits for an input that cannot come.
* "Once" rules (a stale link key is answered by sealing again *once*; an unknown channel
  by opening it again *once*) are counted by the engine, which feeds ``REFUSED`` the
  second time; the tables stay free of counters.
* ``DONE`` and ``FAILED`` are terminal. An input for a request that has left its table
  (a late answer) is not an error; the engines erase what it carries.
"""

from __future__ import annotations

from enum import Enum, auto

from appliance.kms.fsm import Table


class S(Enum):
    """States of every table (each table uses the ones it needs)."""

    __hash__ = object.__hash__  # members are singletons compared by identity: a C hash

    VALIDATING = auto()
    CHANNEL = auto()
    ASKING = auto()
    HAVE_ANSWER = auto()
    HAVE_KEY = auto()
    PATHING = auto()
    RELAYING = auto()
    WAIT_DELIVERY = auto()
    WAIT_RELAY = auto()
    OPENING = auto()
    HANDING = auto()
    SEALING = auto()
    SENT = auto()
    LEASING = auto()
    TAKING = auto()
    ANSWERED = auto()
    STORING = auto()
    READING = auto()
    DERIVING = auto()
    REKEYING = auto()
    OPEN = auto()
    DONE = auto()
    FAILED = auto()


class I(Enum):  # noqa: E742 - the inputs of the tables, named as h2 names them
    """Inputs of every table."""

    __hash__ = object.__hash__

    VALID = auto()
    CHANNEL_READY = auto()
    REOPEN = auto()
    ANSWER = auto()
    CN_KEY = auto()
    PATH = auto()
    RELAYED = auto()
    DELIVERED = auto()
    OPENED = auto()
    OPENED_LAST = auto()
    SEALED = auto()
    ACCEPTED = auto()
    STALE = auto()
    LEASED = auto()
    SHORT = auto()
    TAKEN = auto()
    WRITTEN = auto()
    STORED = auto()
    READ = auto()
    DERIVED = auto()
    REKEYED = auto()
    CLOSED = auto()
    """A channel closes (the callee forgot it, or this node stops)."""
    RETRY = auto()
    """A request's relay failed on its way: it starts again under a new request ID."""
    REFUSED = auto()
    """Any failure: a refusal, a timeout, an abort, a call that got no answer."""


_END = frozenset({S.DONE, S.FAILED})


def _table(name: str, transitions: dict[S, dict[I, S]]) -> Table[S, I]:
    return Table(name, transitions, failed=S.FAILED, terminal=_END)


RELAY = _table(
    "relay",
    {
        # a CN key at a carrier hop: opened from the previous hop (OPENING), or handed over
        # by our own AKMS at the start of the path (starts in SEALING)
        S.OPENING: {I.OPENED: S.SEALING, I.OPENED_LAST: S.HANDING, I.REFUSED: S.FAILED},
        S.HANDING: {I.ACCEPTED: S.DONE, I.REFUSED: S.FAILED},
        S.SEALING: {I.SEALED: S.SENT, I.REFUSED: S.FAILED},
        S.SENT: {I.ACCEPTED: S.DONE, I.STALE: S.SEALING, I.REFUSED: S.FAILED},
    },
)
"""A CN key passing through a CKMS."""

AKMS_A = _table(
    "akms-a",
    {
        S.VALIDATING: {I.VALID: S.CHANNEL, I.REFUSED: S.FAILED},
        S.CHANNEL: {I.CHANNEL_READY: S.ASKING, I.REFUSED: S.FAILED},
        S.ASKING: {
            I.ANSWER: S.HAVE_ANSWER,
            I.CN_KEY: S.HAVE_KEY,
            I.REOPEN: S.CHANNEL,
            I.RETRY: S.CHANNEL,
            I.REFUSED: S.FAILED,
        },
        S.HAVE_ANSWER: {I.CN_KEY: S.SEALING, I.RETRY: S.CHANNEL, I.REFUSED: S.FAILED},
        S.HAVE_KEY: {I.ANSWER: S.SEALING, I.REFUSED: S.FAILED},
        S.SEALING: {I.SEALED: S.DONE, I.REFUSED: S.FAILED},
    },
)
"""A user's request at the requesting access node (AKMS A): validate, ask AKMS B over the
channel, wait for both its answer and the CN key, seal the keys for UKMS A. A relay that
failed on its way (RETRY) asks again from scratch: new request ID, fresh keys and CN key."""

REKEY = _table(
    "rekey",
    {
        S.ASKING: {
            I.ANSWER: S.HAVE_ANSWER,
            I.CN_KEY: S.HAVE_KEY,
            I.REFUSED: S.FAILED,
        },
        S.HAVE_ANSWER: {I.CN_KEY: S.OPENING, I.REFUSED: S.FAILED},
        S.HAVE_KEY: {I.ANSWER: S.OPENING, I.REFUSED: S.FAILED},
        S.OPENING: {I.OPENED: S.DONE, I.REFUSED: S.FAILED},
    },
)
"""A channel key asked of AKMS B over the QKDN (the channel's re-key)."""

CHANNEL = _table(
    "channel",
    {
        S.ASKING: {I.ANSWER: S.DERIVING, I.REFUSED: S.FAILED},
        S.DERIVING: {I.DERIVED: S.REKEYING, I.REFUSED: S.FAILED},
        S.REKEYING: {I.REKEYED: S.OPEN, I.REFUSED: S.FAILED},
        S.OPEN: {I.REKEYED: S.OPEN, I.CLOSED: S.DONE},
    },
)
"""The caller's end of an AKMS-AKMS channel: opened from the PSK, re-keyed over the QKDN
at once (and again later), closed when the callee no longer knows it or the node stops.
While the first re-key runs (REKEYING) requests go under the PSK-derived key."""

AKMS_B = _table(
    "akms-b",
    {
        S.PATHING: {I.PATH: S.RELAYING, I.REFUSED: S.FAILED},
        S.RELAYING: {I.RELAYED: S.WAIT_DELIVERY, I.DELIVERED: S.WAIT_RELAY, I.REFUSED: S.FAILED},
        S.WAIT_DELIVERY: {I.DELIVERED: S.DONE, I.REFUSED: S.FAILED},
        S.WAIT_RELAY: {I.RELAYED: S.DONE, I.REFUSED: S.FAILED},
    },
)
"""AKMS B: the path, then the CN key relayed and the slave's keys delivered side by side
(a channel re-key has nothing to deliver), then the answer under the CN key."""

CALLEE_OPEN = _table(
    "channel-open",
    {S.DERIVING: {I.DERIVED: S.DONE, I.REFUSED: S.FAILED}},
)
"""The callee's end of a channel being opened: the PSK-derived key, then the answer."""

GRANT = _table(
    "grant",
    {S.READING: {I.READ: S.DONE, I.REFUSED: S.FAILED}},
)
"""A master end granting link keys to its slave."""

UKMS_ENC = _table(
    "ukms-enc",
    {
        S.LEASING: {I.LEASED: S.DONE, I.TAKEN: S.VALIDATING, I.SHORT: S.ASKING},
        S.VALIDATING: {I.VALID: S.DONE, I.REFUSED: S.FAILED},
        S.ASKING: {I.ANSWER: S.OPENING, I.REFUSED: S.FAILED},
        S.OPENING: {I.OPENED: S.DONE, I.REFUSED: S.FAILED},
    },
)
"""enc_keys at the master's UKMS: from the pair's stock (LEASING) when it can, else made
through the network (ASKING our AKMS, OPENING its answer). When the contracts live at
the AKMS (AAA), keys taken from the stock wait for the AKMS to allow and account for the
request (VALIDATING) before they are handed out."""

AKMS_STOCKED = _table(
    "akms-stocked",
    {S.VALIDATING: {I.VALID: S.DONE, I.REFUSED: S.FAILED}},
)
"""AKMS A allowing a request its UKMS serves from a stock: validated, nothing drawn."""

REFILL = _table(
    "refill",
    {
        S.ASKING: {I.ANSWER: S.OPENING, I.REFUSED: S.FAILED},
        S.OPENING: {I.OPENED: S.STORING, I.REFUSED: S.FAILED},
        S.STORING: {I.STORED: S.DONE, I.REFUSED: S.FAILED},
    },
)
"""A UKMS refilling one pair's stock: keys made through the network, then stored."""

UKMS_DEC = _table(
    "ukms-dec",
    {
        S.TAKING: {I.TAKEN: S.ANSWERED, I.REFUSED: S.FAILED},
        S.ANSWERED: {I.WRITTEN: S.DONE, I.REFUSED: S.FAILED},
    },
)
"""dec_keys at the slave's UKMS: the keys taken (pending), answered, then released once
the answer is on its way (or restored for the slave when its connection was gone)."""

DELIVERY = _table(
    "delivery",
    {
        S.OPENING: {I.OPENED: S.STORING, I.REFUSED: S.FAILED},
        S.STORING: {I.STORED: S.DONE, I.REFUSED: S.FAILED},
    },
)
"""The slave's copies of new keys arriving at its UKMS from AKMS B."""

TABLES: tuple[Table[S, I], ...] = (
    RELAY,
    AKMS_A,
    AKMS_STOCKED,
    REKEY,
    CHANNEL,
    AKMS_B,
    CALLEE_OPEN,
    GRANT,
    UKMS_ENC,
    REFILL,
    UKMS_DEC,
    DELIVERY,
)
