"""The messages between a KMS node and its SNMP agent beside it (sans-IO).

The node (:mod:`appliance.mgmt.feed`) and its agent (:mod:`appliance.mgmt.sidecar`) talk
over two local sequenced-packet sockets (one message per packet, at most
:data:`MAX_MESSAGE` bytes):

* the *query* socket: the agent asks ``R`` + a 4-byte sequence number; the node answers
  ``V`` + the same number + its :class:`NodeReading` as JSON, or ``E`` + the number + a
  short reason when reading failed;
* the *notice* socket: the node sends ``L`` (look now: a link changed state, an alarm).

Every message is parsed with its length and types checked; anything else raises
:class:`ChannelError`. A reading carries states, rates and counts only, never a key or a
key ID.
"""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from appliance.mgmt.errors import MgmtError
from appliance.mgmt.nodeview import NodeReading

MAX_MESSAGE = 64 * 1024
"""Longest message either side sends or reads."""
MAX_REASON = 200
"""Longest reason of a failed reading, in bytes."""
READ, READING, FAILED, LOOK = b"R", b"V", b"E", b"L"
SEQ_BYTES = 4
LOOK_MESSAGE = LOOK
"""The node's notice: read me now."""

_READING = TypeAdapter(NodeReading)


class ChannelError(MgmtError):
    """A message between a node and its agent that is malformed, or a failed reading."""

    code = "MGMT-CHANNEL"


class NodeGone(ChannelError):
    """The node closed its end of the channel: it stopped, or it died (its agent follows)."""


def _seq(seq: int) -> bytes:
    return (seq % (1 << 32)).to_bytes(SEQ_BYTES, "big")


def read_request(seq: int) -> bytes:
    """The agent's ask for a reading."""
    return READ + _seq(seq)


def parse_request(message: bytes) -> int:
    """The sequence number of an ask for a reading."""
    if len(message) != 1 + SEQ_BYTES or message[:1] != READ:
        raise ChannelError(f"not a read request ({len(message)} bytes)")
    return int.from_bytes(message[1:], "big")


def reading_answer(seq: int, reading: NodeReading) -> bytes:
    """The node's answer: its reading as JSON (:class:`ChannelError` if it is too long)."""
    message = READING + _seq(seq) + _READING.dump_json(reading)
    if len(message) > MAX_MESSAGE:
        raise ChannelError(f"a reading of {len(message)} bytes is longer than {MAX_MESSAGE}")
    return message


def failed_answer(seq: int, reason: str) -> bytes:
    """The node's answer when reading itself failed."""
    return FAILED + _seq(seq) + reason.encode("utf-8", "replace")[:MAX_REASON]


def parse_answer(message: bytes) -> tuple[int, NodeReading]:
    """The sequence number and reading of a node's answer; a failed reading, or anything
    malformed, raises :class:`ChannelError`."""
    if len(message) > MAX_MESSAGE or len(message) < 1 + SEQ_BYTES:
        raise ChannelError(f"an answer of {len(message)} bytes")
    kind, seq, body = message[:1], int.from_bytes(message[1 : 1 + SEQ_BYTES], "big"), message[5:]
    if kind == FAILED:
        reason = body[:MAX_REASON].decode("utf-8", "replace")
        raise ChannelError(f"the node could not read itself: {reason}")
    if kind != READING:
        raise ChannelError(f"an answer of kind {kind!r}")
    try:
        return seq, _READING.validate_json(body)
    except ValidationError as exc:
        raise ChannelError(f"a malformed reading ({exc.error_count()} errors)") from exc


def answer_seq(message: bytes) -> int | None:
    """The sequence number an answer carries (None if it carries none)."""
    if len(message) < 1 + SEQ_BYTES or message[:1] not in (READING, FAILED):
        return None
    return int.from_bytes(message[1 : 1 + SEQ_BYTES], "big")
