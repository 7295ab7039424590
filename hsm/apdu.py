"""ISO/IEC 7816-4 APDUs: command (C-APDU) and response (R-APDU) parsing and building.

Sans-IO: bytes in, dataclasses out, and back. Used by the card applet (which parses
commands and builds responses) and by the card client (the reverse). Layouts are
``construct`` structures; the only logic outside them is choosing the case (1, 2, 3, 4;
short or extended) from the length, as ISO/IEC 7816-3 section 12.1.3 prescribes:

====  =========================================  ==============================
case  short form                                 extended form
====  =========================================  ==============================
1     CLA INS P1 P2                              (same)
2     header Le(1; 00 = 256)                     header 00 Le(2; 0000 = 65536)
3     header Lc(1, 01..FF) data                  header 00 Lc(2, 0001..FFFF) data
4     header Lc(1) data Le(1)                    header 00 Lc(2) data Le(2)
====  =========================================  ==============================

``Command.le`` holds Ne, the number of bytes expected (1..65536), or None when the
command carries no Le field. This module never logs and never holds secrets beyond the
bytes it is handed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from construct import (
    Bytes,
    Check,
    Computed,
    Const,
    ConstructError,
    GreedyRange,
    IfThenElse,
    Int8ub,
    Int16ub,
    Struct,
    Switch,
    Terminated,
    this,
)

from hsm.errors import ApduError

MAX_SHORT_LC = 255
MAX_SHORT_NE = 256
MAX_EXTENDED_LC = 65535
MAX_EXTENDED_NE = 65536


class SW(IntEnum):
    """Status words used by the applet (ISO/IEC 7816-4 section 5.1.3)."""

    OK = 0x9000
    WARNING_DEACTIVATED = 0x6283  # selected file deactivated (a locked card)
    WARNING_TERMINATED = 0x6285  # selected file in termination state
    VERIFY_FAILED = 0x63C0  # 63Cx: verification failed, x tries left
    MEMORY_FAILURE = 0x6581
    WRONG_LENGTH = 0x6700
    LOGICAL_CHANNEL_NOT_SUPPORTED = 0x6881
    SECURE_MESSAGING_NOT_SUPPORTED = 0x6882
    CHAINING_NOT_SUPPORTED = 0x6884
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTH_METHOD_BLOCKED = 0x6983
    CONDITIONS_NOT_SATISFIED = 0x6985
    WRONG_DATA = 0x6A80
    FILE_NOT_FOUND = 0x6A82
    INCORRECT_P1P2 = 0x6A86
    REFERENCED_DATA_NOT_FOUND = 0x6A88
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    NO_PRECISE_DIAGNOSIS = 0x6F00


SW_MEANING: dict[int, str] = {
    SW.OK: "success",
    SW.WARNING_DEACTIVATED: "selected, but deactivated (locked)",
    SW.WARNING_TERMINATED: "selected, but terminated",
    SW.MEMORY_FAILURE: "memory failure",
    SW.WRONG_LENGTH: "wrong length",
    SW.LOGICAL_CHANNEL_NOT_SUPPORTED: "logical channel not supported",
    SW.SECURE_MESSAGING_NOT_SUPPORTED: "secure messaging not supported",
    SW.CHAINING_NOT_SUPPORTED: "command chaining not supported",
    SW.SECURITY_STATUS_NOT_SATISFIED: "security status not satisfied",
    SW.AUTH_METHOD_BLOCKED: "authentication method blocked",
    SW.CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    SW.WRONG_DATA: "incorrect parameters in the data field",
    SW.FILE_NOT_FOUND: "application not found",
    SW.INCORRECT_P1P2: "incorrect parameters P1-P2",
    SW.REFERENCED_DATA_NOT_FOUND: "referenced data not found",
    SW.INS_NOT_SUPPORTED: "instruction not supported",
    SW.CLA_NOT_SUPPORTED: "class not supported",
    SW.NO_PRECISE_DIAGNOSIS: "no precise diagnosis",
}


def describe_sw(sw: int) -> str:
    """``63C2`` -> ``verification failed, 2 tries left``; known words by name."""
    if sw & 0xFFF0 == SW.VERIFY_FAILED:
        return f"verification failed, {sw & 0x0F} tries left"
    return SW_MEANING.get(sw, "unknown status word")


HEADER = Struct("cla" / Int8ub, "ins" / Int8ub, "p1" / Int8ub, "p2" / Int8ub)

LAYOUTS: dict[str, Any] = {
    name: layout.compile()  # compiled: ~5x faster, which exhaustive fuzzing needs
    for name, layout in {
        "1": Struct("header" / HEADER, Terminated),
        "2S": Struct("header" / HEADER, "le" / Int8ub, Terminated),
        "3S": Struct("header" / HEADER, "lc" / Int8ub, "data" / Bytes(this.lc), Terminated),
        "4S": Struct(
            "header" / HEADER, "lc" / Int8ub, "data" / Bytes(this.lc), "le" / Int8ub, Terminated
        ),
        "2E": Struct("header" / HEADER, Const(b"\0"), "le" / Int16ub, Terminated),
        "3E": Struct(
            "header" / HEADER, Const(b"\0"), "lc" / Int16ub, "data" / Bytes(this.lc), Terminated
        ),
        "4E": Struct(
            "header" / HEADER,
            Const(b"\0"),
            "lc" / Int16ub,
            "data" / Bytes(this.lc),
            "le" / Int16ub,
            Terminated,
        ),
    }.items()
}

RESPONSE = Struct("data" / Bytes(this._params.size - 2), "sw" / Int16ub, Terminated).compile()


@dataclass(frozen=True, kw_only=True)
class Command:
    """A command APDU."""

    cla: int
    """Class byte: 0x00 interindustry, 0x80 proprietary (plus chaining/SM/channel bits)."""
    ins: int
    """Instruction byte."""
    p1: int = 0
    """First parameter byte."""
    p2: int = 0
    """Second parameter byte."""
    data: bytes = b""
    """Command data (Nc = len(data) bytes, empty when there is no Lc field)."""
    le: int | None = None
    """Ne, the maximum number of response bytes expected (1..65536), or None: no Le field."""

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise ApduError(f"{name} must be one byte")
        if len(self.data) > MAX_EXTENDED_LC:
            raise ApduError(f"command data of {len(self.data)} bytes exceeds {MAX_EXTENDED_LC}")
        if self.le is not None and not 1 <= self.le <= MAX_EXTENDED_NE:
            raise ApduError(f"Ne must be 1..{MAX_EXTENDED_NE}, got {self.le}")

    @property
    def case(self) -> int:
        """ISO 7816-3 case: 1 (nothing), 2 (Le), 3 (data), 4 (data and Le)."""
        return 1 + (self.le is not None) + 2 * bool(self.data)

    @property
    def extended(self) -> bool:
        """True when the command needs the extended length form."""
        return len(self.data) > MAX_SHORT_LC or (self.le or 0) > MAX_SHORT_NE

    def build(self, *, extended: bool | None = None) -> bytes:
        """The command's bytes; short form unless the lengths (or ``extended``) need more."""
        long = self.extended if extended is None else extended or self.extended
        layout = f"{self.case}{'E' if long else 'S'}" if self.case > 1 else "1"
        fields: dict[str, Any] = {
            "header": {"cla": self.cla, "ins": self.ins, "p1": self.p1, "p2": self.p2},
            "lc": len(self.data),
            "data": bytes(self.data),
        }
        if self.le is not None:
            fields["le"] = self.le % (MAX_EXTENDED_NE if long else MAX_SHORT_NE)
        return bytes(LAYOUTS[layout].build(fields))


def case_of(raw: bytes | bytearray) -> str:
    """The layout name (``1``, ``2S``... ``4E``) a command's length implies; ApduError if none."""
    n = len(raw)
    if n < 4:
        raise ApduError(f"a command APDU has at least 4 bytes, got {n}")
    if n == 4:
        return "1"
    b1 = raw[4]
    if n == 5:
        return "2S"
    if b1:
        if n == 5 + b1:
            return "3S"
        if n == 6 + b1:
            return "4S"
        raise ApduError(f"Lc={b1} does not match a {n}-byte command")
    if n == 7:
        return "2E"
    lc = int.from_bytes(raw[5:7], "big") if n > 7 else 0
    if lc and n == 7 + lc:
        return "3E"
    if lc and n == 9 + lc:
        return "4E"
    raise ApduError(f"malformed extended-length command of {n} bytes")


def parse_command(raw: bytes | bytearray) -> Command:
    """Parse a C-APDU; ApduError if its lengths are inconsistent."""
    layout = case_of(raw)
    try:
        fields = LAYOUTS[layout].parse(bytes(raw))
    except ConstructError as exc:  # unreachable after case_of, kept as a guard
        raise ApduError(f"malformed command APDU: {exc}") from None
    le = fields.get("le")
    if le is not None and le == 0:
        le = MAX_EXTENDED_NE if layout.endswith("E") else MAX_SHORT_NE
    head = fields.header
    return Command(
        cla=head.cla, ins=head.ins, p1=head.p1, p2=head.p2, data=fields.get("data", b""), le=le
    )


@dataclass(frozen=True, kw_only=True)
class Response:
    """A response APDU."""

    data: bytes = b""
    """Response data (may be empty)."""
    sw: int = SW.OK
    """Status word SW1-SW2."""

    @property
    def ok(self) -> bool:
        """True for 9000."""
        return self.sw == SW.OK

    def build(self) -> bytes:
        """The response's bytes: data then SW1 SW2."""
        return bytes(
            RESPONSE.build({"data": bytes(self.data), "sw": self.sw}, size=len(self.data) + 2)
        )


def parse_response(raw: bytes | bytearray) -> Response:
    """Parse an R-APDU (at least the two status bytes)."""
    if len(raw) < 2:
        raise ApduError(f"a response APDU has at least 2 bytes, got {len(raw)}")
    fields = RESPONSE.parse(bytes(raw), size=len(raw))
    return Response(data=fields.data, sw=fields.sw)


# -- simple BER-TLV (one-byte tags; lengths in the short, 81 and 82 forms) --------------

TLV = Struct(
    "tag" / Int8ub,
    "first" / Int8ub,
    Check((this.first < 0x80) | (this.first == 0x81) | (this.first == 0x82)),
    "length"
    / IfThenElse(
        this.first < 0x80, Computed(this.first), Switch(this.first, {0x81: Int8ub, 0x82: Int16ub})
    ),
    "value" / Bytes(this.length),
).compile()
TLVS = Struct("objects" / GreedyRange(TLV), Terminated).compile()


def build_tlv(tag: int, value: bytes | bytearray) -> bytes:
    """One data object: tag, BER length, value."""
    n = len(value)
    if n < 0x80:
        fields = {"tag": tag, "first": n, "length": None, "value": bytes(value)}
    else:
        fields = {
            "tag": tag,
            "first": 0x81 if n <= 0xFF else 0x82,
            "length": n,
            "value": bytes(value),
        }
    return bytes(TLV.build(fields))


def parse_tlvs(raw: bytes | bytearray) -> list[tuple[int, bytes]]:
    """A sequence of data objects as (tag, value) pairs; ApduError if malformed."""
    try:
        items = TLVS.parse(bytes(raw)).objects
    except ConstructError:
        raise ApduError("malformed BER-TLV data") from None
    if any(len(item.value) != item.length for item in items):  # compiled Bytes reads short
        raise ApduError("malformed BER-TLV data: a value is shorter than its length")
    return [(item.tag, bytes(item.value)) for item in items]
