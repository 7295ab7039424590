"""Inter-node messages: every type round-trips and encodes canonically; every bound holds at
its edge; arbitrary, mutated and damaged real encodings give the message or a MessageError
with the right code, nothing else."""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import re
import uuid
from pathlib import Path
from typing import Any, get_args

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config.topology import Name as TopologyName
from appliance.errors import ApplianceError
from appliance.kms import ksa, messages
from appliance.kms.batching import RelayBatcher
from appliance.kms.errors import (
    KmsError,
    MessageError,
    MessageFieldError,
    MessageSyntaxError,
    MessageTypeError,
    MessageVersionError,
    ProtocolError,
    StaleGrant,
)
from appliance.kms.messages import (
    MAX_RELAY_ITEMS,
    MESSAGE_TYPES,
    CnAnswer,
    CnLocal,
    CnRequest,
    Deliver,
    Grant,
    ItemResult,
    KsaAnswer,
    KsaRequest,
    Message,
    Refused,
    RelayAbort,
    RelayBatch,
    RelayItem,
    RelayLocal,
    RelayResults,
    Tagged,
    decode,
    decode_answer,
    encode,
    encode_into,
    refused,
)
from appliance.kms.relay import TAG_BYTES, Direction, Hop, Mode, Segment, encode_header, seal_gcm
from appliance.kms.relay import seal_otp as relay_seal_otp

SYNTAX, TYPE, VERSION, FIELD = (
    MessageSyntaxError.code,
    MessageTypeError.code,
    MessageVersionError.code,
    MessageFieldError.code,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- valid instances, generated from the types' own bounds ---------------------------------------
def info(cls: type) -> mi.StructType:
    t = mi.type_info(cls)
    assert isinstance(t, mi.StructType)
    return t


def values(t: mi.Type) -> st.SearchStrategy[Any]:
    """Valid values of a msgspec type (sizes capped so that examples stay small; the edges
    themselves are tested apart)."""
    if isinstance(t, mi.IntType):
        lo, hi, step = t.ge, t.le, t.multiple_of or 1
        return st.integers(-(-lo // step), hi // step).map(lambda k: k * step)
    if isinstance(t, mi.StrType):
        if t.pattern:
            fitting = st.from_regex(t.pattern, fullmatch=True)
            return fitting.filter(lambda s: len(s) <= (t.max_length or len(s)))
        return st.text(max_size=min(t.max_length, 40))
    if isinstance(t, mi.BytesType | mi.ByteArrayType):
        raw = st.binary(min_size=t.min_length or 0, max_size=min(t.max_length, 128))
        return raw.map(bytearray) if isinstance(t, mi.ByteArrayType) else raw
    if isinstance(t, mi.ListType):
        return st.lists(values(t.item_type), min_size=t.min_length or 0, max_size=4)
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(values(x) for x in t.types))
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.StructType):
        return instances(t.cls)
    raise AssertionError(f"no strategy for {t}")


_NAME = st.from_regex(messages.NAME_PATTERN, fullmatch=True)
_ALSO = st.lists(st.integers(0, 99), unique=True, max_size=messages.MAX_SLAVES)


def _shared(kw: dict[str, Any]) -> bool:
    """Additional slaves (``also-N``) that repeat no SAE of the request."""
    return not kw["also"] or (
        kw["master"] != kw["slave"] and not {kw["master"], kw["slave"]} & set(kw["also"])
    )


SPECIAL: dict[type, st.SearchStrategy[Any]] = {
    KsaRequest: st.fixed_dictionaries(
        {
            "master": _NAME,
            "slave": _NAME,
            "number": st.integers(1, 1024),
            "size": st.integers(1, 1024).map(lambda k: 8 * k),
            "epoch": st.none() | st.from_regex(r"\A[0-9a-f]{32}\Z", fullmatch=True),
            "fresh": st.booleans(),
            "also": _ALSO.map(lambda xs: [f"also-{x}" for x in xs]),
        }
    )
    .filter(_shared)
    .map(lambda kw: KsaRequest(**kw)),
    CnRequest: st.one_of(
        st.builds(
            CnRequest,
            request_id=st.binary(min_size=16, max_size=16),
            purpose=st.just("ksa"),
            master=st.from_regex(messages.NAME_PATTERN, fullmatch=True),
            slave=st.from_regex(messages.NAME_PATTERN, fullmatch=True),
            number=st.integers(1, 1024),
            size=st.integers(1, 1024).map(lambda k: 8 * k),
            ukms_b=st.integers(1, 65535),
            deliver_to=st.integers(1, 65535),
            route_policy=st.sampled_from(get_args(messages.RoutePolicy)),
        ),
        st.builds(
            CnRequest,
            request_id=st.binary(min_size=16, max_size=16),
            purpose=st.just("channel"),
            number=st.integers(1, 1024),
            size=st.integers(1, 1024).map(lambda k: 8 * k),
            deliver_to=st.integers(1, 65535),
        ),
    ),
    ItemResult: st.one_of(
        st.just(ItemResult(ok=True)),
        st.builds(
            ItemResult,
            ok=st.just(False),
            code=st.from_regex(messages.CODE_PATTERN, fullmatch=True),
            message=values(mi.type_info(messages.Text)),
        ),
    ),
}


def instances(cls: type) -> st.SearchStrategy[Any]:
    if cls in SPECIAL:
        return SPECIAL[cls]
    fields = {f.name: values(f.type) for f in info(cls).fields}
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**kw))


any_message = st.sampled_from(MESSAGE_TYPES).flatmap(instances)


def plain(msg: Message) -> dict[str, Any]:
    """The encoding as plain MessagePack values (maps keep their order)."""
    return msgspec.msgpack.decode(encode(msg))


def raw(doc: Any) -> bytes:
    return msgspec.msgpack.encode(doc)


def outcome(data: bytes, cls: type[Message]) -> Message | str:
    """The decoded message, or the code of the MessageError (any other exception fails)."""
    try:
        return decode(data, cls)
    except MessageError as exc:
        return exc.code


# -- round trip and canonical form ---------------------------------------------------------------
@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_type_round_trips_canonically(cls, data):
    msg = data.draw(instances(cls))
    wire = encode(msg)
    assert decode(wire, cls) == msg
    assert decode_answer(wire, cls) == msg
    rebuilt = msgspec.convert(msgspec.to_builtins(msg), cls)  # the same message, built anew
    assert rebuilt == msg and encode(rebuilt) == wire
    names = [f.encode_name for f in info(cls).fields]
    assert list(plain(msg)) == ["type", *names] and plain(msg)["type"] == cls.__name__
    assert names[0] == "v" and plain(msg)["v"] == 1


def test_every_message_is_a_small_map_that_opens_with_its_type():
    """The decoder's first check rests on this: a canonical message is a fixmap (at most
    15 entries) whose first key is ``type``."""
    for cls in MESSAGE_TYPES:
        assert len(info(cls).fields) + 1 <= 15
        assert info(cls).tag_field == "type" and info(cls).tag == cls.__name__
    for cls in [*MESSAGE_TYPES, RelayItem, ItemResult, messages.LinkStatus]:
        assert info(cls).forbid_unknown_fields and cls.__struct_config__.frozen
        params = inspect.signature(cls).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)


def test_a_missing_or_misplaced_version_is_not_canonical_another_is_a_version_error():
    doc = plain(KsaRequest(master="a", slave="b", number=1, size=8, epoch=None))
    del doc["v"]
    assert outcome(raw(doc), KsaRequest) == SYNTAX
    assert outcome(raw({**doc, "v": 1}), KsaRequest) == SYNTAX  # out of order
    assert outcome(raw({**doc, "v": 2}), KsaRequest) == VERSION  # wherever it is


def test_a_repeated_field_is_refused_so_two_readers_never_differ():
    wire = encode(KsaRequest(master="a", slave="b", number=1, size=8, epoch=None))
    doubled = bytes([wire[0] + 1]) + wire[1:] + raw("number") + raw(5)
    assert outcome(doubled, KsaRequest) == SYNTAX


def test_a_non_minimal_integer_encoding_is_refused():
    wire = encode(KsaRequest(master="a", slave="b", number=3, size=8, epoch=None))
    wide = wire.replace(b"\xa6number\x03", b"\xa6number\xcc\x03")
    assert msgspec.msgpack.decode(wide)["number"] == 3
    assert outcome(wide, KsaRequest) == SYNTAX


# -- decoding: types, answers, errors -------------------------------------------------------------
def test_another_message_is_a_type_error_and_answers_may_be_refusals():
    req = encode(KsaRequest(master="a", slave="b", number=1, size=8, epoch=None))
    no = encode(Refused(code="KMS-STALE-GRANT", message="earlier run"))
    assert outcome(req, KsaAnswer) == TYPE and outcome(no, KsaAnswer) == TYPE
    assert decode_answer(no, KsaAnswer) == Refused(code="KMS-STALE-GRANT", message="earlier run")
    with pytest.raises(MessageTypeError):
        decode_answer(req, KsaAnswer)
    with pytest.raises(MessageTypeError):
        decode_answer(raw({"v": 1, "code": "KMS", "message": ""}), KsaAnswer)  # no type


def test_the_usual_answers_are_encoded_once_and_read_back_as_any_other():
    plain = msgspec.msgpack.Encoder()  # what encode would make without its kept encodings
    assert encode(messages.Ok()) == plain.encode(messages.Ok())
    assert decode(encode(messages.Ok()), messages.Ok) == messages.Ok()
    assert decode_answer(encode(messages.Ok()), messages.Ok) == messages.Ok()
    assert decode_answer(bytearray(encode(messages.Ok())), messages.Ok) == messages.Ok()
    for count in (1, 2, 17, MAX_RELAY_ITEMS):
        ok = RelayResults(results=[ItemResult(ok=True) for _ in range(count)])
        wire = encode(ok)
        assert wire == plain.encode(ok) and encode(ok) is wire
        assert decode(wire, RelayResults) == ok
        assert decode_answer(wire, RelayResults) == ok
        assert decode_answer(memoryview(wire), RelayResults) == ok
    failed = RelayResults(results=[ItemResult(ok=True), ItemResult(ok=False, code="KMS")])
    assert decode_answer(encode(failed), RelayResults) == failed
    # what a peer would refuse is refused still, and never kept
    for bad in (RelayResults(results=[]), RelayResults(results=[ItemResult(ok=True)] * 257)):
        with pytest.raises(MessageFieldError):
            encode(bad)
    assert len(messages._ALL_OK) <= MAX_RELAY_ITEMS
    assert sorted(messages._ALL_OK_COUNTS.values()) == sorted(messages._ALL_OK)
    # an Ok or all-ok results where another answer is expected is the usual type error
    with pytest.raises(MessageTypeError):
        decode_answer(encode(messages.Ok()), RelayResults)
    with pytest.raises(MessageTypeError):
        decode_answer(encode(RelayResults(results=[ItemResult(ok=True)])), messages.Ok)


def test_errors_sit_under_the_protocol_error_with_their_codes():
    for cls, code in [
        (MessageError, "KMS-MSG"),
        (MessageSyntaxError, "KMS-MSG-SYNTAX"),
        (MessageVersionError, "KMS-MSG-VERSION"),
        (MessageTypeError, "KMS-MSG-TYPE"),
        (MessageFieldError, "KMS-MSG-FIELD"),
    ]:
        assert issubclass(cls, MessageError) and issubclass(cls, ProtocolError)
        assert cls.code == code


DEEP = b"\x91" * 100_000 + b"\x00"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", SYNTAX),
        (b"\xc1", SYNTAX),  # never used in MessagePack
        (b"{}", SYNTAX),  # JSON, as the nodes speak today
        (b"\x92\x01\x02", SYNTAX),  # an array, not a map
        (b"\x80", TYPE),  # an empty map: no type
        (b"\x81\xa1v\x01", TYPE),
        (b"\xdf\xff\xff\xff\xff", SYNTAX),  # a map of 4 G entries, truncated
        (b"\x82" + raw("type") + raw("Refused") + raw("zz") + DEEP, FIELD),
        (b"\x82" + raw("zz") + DEEP + raw("type") + raw("Refused"), TYPE),
        (b"\xde\x00\x02" + raw("zz") + DEEP + raw("type") + raw("Refused"), FIELD),
        (b"\x83\xa4type\xa7Refused\xa4code\xa3KMS\xa7message\xa2\xff\xfe", SYNTAX),  # not UTF-8
        (b"\x81\xa4type\xd4\x01\x00", TYPE),  # an extension value as the type
    ],
)
def test_hand_made_garbage_gets_its_code(data, code):
    assert outcome(data, Refused) == code
    with pytest.raises(MessageError):
        decode_answer(data, KsaAnswer)


def test_a_type_after_deep_nesting_is_a_syntax_error_not_a_recursion_error():
    """An answer decoder looks for the type among the keys, skipping values on its way."""
    data = b"\xde\x00\x02" + raw("zz") + DEEP + raw("type") + raw("Refused")
    with pytest.raises(MessageSyntaxError):
        decode_answer(data, KsaAnswer)


def test_patterns_refuse_a_final_newline():
    for name in ("a\n", "a\nb"):
        doc = plain(KsaRequest(master="a", slave="b", number=1, size=8, epoch=None))
        doc["master"] = name
        assert outcome(raw(doc), KsaRequest) == FIELD


def test_error_texts_are_short_and_printable_whatever_a_peer_sends():
    doc = plain(Refused(code="KMS", message=""))
    doc["\n" + "x" * 100_000] = 1
    with pytest.raises(MessageFieldError) as err:
        decode(raw(doc), Refused)
    assert len(err.value.message) <= messages.MAX_ERROR_TEXT + 20
    assert err.value.message.isprintable()


def test_cross_field_rules_are_field_errors():
    req = plain(
        CnRequest(
            request_id=bytes(16), purpose="channel", mode="GCM", number=1, size=256, deliver_to=3
        )
    )
    assert outcome(raw({**req, "master": "a"}), CnRequest) == FIELD
    assert outcome(raw({**req, "purpose": "ksa"}), CnRequest) == FIELD
    assert outcome(raw({**req, "route_policy": "cheapest"}), CnRequest) == FIELD
    assert outcome(raw({**req, "route_policy": 1}), CnRequest) == FIELD
    most_key = CnRequest(
        request_id=bytes(16), purpose="channel", mode="GCM", number=1, size=256, deliver_to=3,
        route_policy="most-key",
    )  # fmt: skip
    assert decode(encode(most_key), CnRequest) == most_key
    res = plain(RelayResults(results=[ItemResult(ok=True)]))
    res["results"][0]["code"] = "KMS"
    assert outcome(raw(res), RelayResults) == FIELD
    res["results"][0] = {"ok": False, "code": "", "message": "x"}
    assert outcome(raw(res), RelayResults) == FIELD


# -- encoding checks what it sends --------------------------------------------------------------
@pytest.mark.parametrize(
    "msg",
    [
        KsaRequest(master="a", slave="b", number=0, size=8, epoch=None),
        KsaRequest(master="A", slave="b", number=1, size=8, epoch=None),
        KsaRequest(master="a", slave="b", number=1, size=12, epoch=None),
        Refused(code="KMS", message="x" * (messages.MAX_TEXT + 1)),
        Refused(code="kms", message=""),
        RelayBatch(items=[]),
        CnLocal(request_id=bytes(15), cn_key=bytearray(32)),
        KsaRequest(master="a", slave="b", number=1 << 70, size=8, epoch=None),
        KsaRequest(master="a", slave="b", number=1, size=8, epoch={"not": "a str"}),
    ],
)
def test_encode_refuses_what_a_peer_would_refuse(msg):
    with pytest.raises(MessageFieldError, match=r"^outgoing "):
        encode(msg)
    buffer = bytearray(b"key material of an earlier message")
    with pytest.raises(MessageFieldError, match=r"^outgoing "):
        encode_into(msg, buffer)
    assert not any(buffer)


def test_refused_fits_any_error_into_an_answer():
    long = StaleGrant("x" * 5000 + "\n")
    answer = refused(long)
    assert answer.code == "KMS-STALE-GRANT" and len(answer.message) == messages.MAX_TEXT
    assert decode(encode(answer), Refused) == answer
    odd = ApplianceError("bad", code="not a code")
    assert refused(odd) == Refused(code="KMS", message="bad")
    assert refused(KmsError("tab\there")).message == "tab?here"


# -- key material -------------------------------------------------------------------------------
def test_local_hand_overs_decode_to_erasable_key_material():
    cn_key = bytearray(os.urandom(64))
    msg = RelayLocal(request_id=bytes(16), path=[4, 3, 1], index=0, cn_key=cn_key, mode="OTP")
    buffer = bytearray(b"old content")
    encode_into(msg, buffer)
    assert bytes(cn_key) in buffer and buffer == encode(msg)
    got = decode(bytes(buffer), RelayLocal)
    assert isinstance(got.cn_key, bytearray) and got == msg
    got.cn_key[:] = bytes(64)
    buffer[:] = bytes(len(buffer))
    assert not any(got.cn_key) and any(msg.cn_key)  # the decoded copy is the receiver's own
    assert {c for c in MESSAGE_TYPES if c.holds_key} == {RelayLocal, CnLocal}


# -- sizes: each bound at its edge ----------------------------------------------------------------
def edges(t: mi.Type) -> tuple[Any, Any] | None:
    """(largest valid value, smallest too large) of a bounded type, if it has such a bound."""
    if isinstance(t, mi.UnionType):
        return edges(t.types[0])
    if isinstance(t, mi.IntType) and t.le is not None:
        return t.le, t.le + (t.multiple_of or 1)
    if isinstance(t, mi.BytesType | mi.ByteArrayType) and t.max_length is not None:
        return bytes(t.max_length), bytes(t.max_length + 1)
    if isinstance(t, mi.ListType) and t.max_length is not None:
        return ("repeat", t.max_length), ("repeat", t.max_length + 1)
    if isinstance(t, mi.StrType) and t.max_length is not None and t.pattern is None:
        return "é" * t.max_length, "é" * (t.max_length + 1)
    return None


def fields_with_edges() -> list[tuple[type, str, Any, Any]]:
    out = []
    for cls in MESSAGE_TYPES:
        for f in info(cls).fields:
            if f.name != "v" and (e := edges(f.type)) is not None:
                out.append((cls, f.name, *e))
    return out


def _numbered(entry: Any, i: int) -> Any:
    """The ``i``-th of a list of distinct slaves (an SAE ID, or a SlaveAt's map)."""
    if isinstance(entry, dict):
        return {**entry, "slave": f"{entry['slave']}-{i}"}
    return f"{entry}-{i}"


@pytest.mark.parametrize(
    ("cls", "name", "largest", "too_large"),
    fields_with_edges(),
    ids=lambda x: x.__name__ if isinstance(x, type) else (x if isinstance(x, str) else ""),
)
def test_every_bound_holds_at_its_edge(cls, name, largest, too_large):
    base = plain(EXAMPLES[cls])

    def with_value(value: Any) -> bytes:
        if isinstance(value, tuple) and value[0] == "repeat":
            value = [base[name][0]] * value[1]
            if name == "also":  # additional slaves are distinct
                value = [_numbered(x, i) for i, x in enumerate(value)]
        return raw({**base, name: value})

    ok = getattr(decode(with_value(largest), cls), name)
    assert len(ok) == largest[1] if isinstance(largest, tuple) else ok == largest
    assert outcome(with_value(too_large), cls) == FIELD


def test_the_sizes_follow_the_code_that_makes_the_bytes():
    assert messages.MAX_RELAY_ITEMS == RelayBatcher.MAX_ITEMS
    assert ksa.cn_key_bytes(Mode.OTP, 1024, 1024) == messages.CN_KEY_MAX
    segments = tuple(Segment(str(uuid.uuid4()), 0, 1) for _ in range(255))
    hop = Hop(
        request_id=bytes(16),
        hop=0,
        direction=Direction.TO_REQUESTER,
        link="l" * 255,
        mode=Mode.OTP,
        segments=segments,
    )
    assert len(encode_header(hop, 0)) + TAG_BYTES == messages.HOP_OVERHEAD_MAX
    keys = [(str(uuid.uuid4()), bytes(1024)) for _ in range(1024)]
    batch = ksa.encode_batch(keys)
    assert len(batch) == messages.KSA_BATCH_MAX
    sealed = ksa.seal_batch(Mode.GCM, bytearray(32), bytes(16), batch)
    assert len(sealed) == messages.SEALED_BATCH_MAX
    body = encode(CnAnswer(batch=sealed))
    assert len(body) <= messages.TAGGED_BODY_MAX
    tagged = Tagged(channel_id="0" * 16, epoch=0, tag="0" * 64, body=body)
    assert decode(encode(tagged), Tagged) == tagged


def test_names_follow_the_topology():
    (constraint,) = TopologyName.__metadata__
    core = constraint.pattern.removeprefix("^").removesuffix("$")
    assert rf"\A{core}\Z" == messages.NAME_PATTERN


# -- fuzzing: arbitrary bytes ---------------------------------------------------------------------
@FUZZ
@given(cls=st.sampled_from(MESSAGE_TYPES), data=st.binary(max_size=200))
def test_arbitrary_bytes_give_a_message_or_a_message_error(cls, data):
    got = outcome(data, cls)
    if isinstance(got, Message):
        assert encode(got) == data
    with contextlib.suppress(MessageError):
        decode_answer(data, cls)


@FUZZ
@given(cls=st.sampled_from(MESSAGE_TYPES), data=st.data())
def test_a_valid_prefix_then_arbitrary_bytes_give_a_message_error(cls, data):
    """Arbitrary bytes after the type: the decoder gets past its first checks."""
    head = b"\x8f" + raw("type") + raw(cls.__name__)
    tail = data.draw(st.binary(max_size=300))
    assert isinstance(outcome(head + tail, cls), str)


# -- fuzzing: one field of a valid encoding mutated -----------------------------------------------
KINDS: dict[str, Any] = {
    "int": 7,
    "str": "x",
    "bytes": b"x",
    "list": [],
    "map": {},
    "bool": True,
    "nil": None,
    "float": 1.5,
}


def accepted(t: mi.Type) -> set[str]:
    """The MessagePack kinds a msgspec type takes."""
    if isinstance(t, mi.UnionType):
        return set().union(*(accepted(x) for x in t.types))
    if isinstance(t, mi.LiteralType):
        return {"int" if isinstance(t.values[0], int) else "str"}
    kinds = {
        mi.IntType: "int",
        mi.StrType: "str",
        mi.BytesType: "bytes",
        mi.ByteArrayType: "bytes",
        mi.ListType: "list",
        mi.StructType: "map",
        mi.BoolType: "bool",
        mi.NoneType: "nil",
    }
    return {kinds[type(t)]}


def int_type(t: mi.Type) -> mi.IntType | None:
    if isinstance(t, mi.UnionType):
        return next((x for x in t.types if isinstance(x, mi.IntType)), None)
    return t if isinstance(t, mi.IntType) else None


def targets(doc: dict[str, Any], cls: type) -> list[tuple[dict[str, Any], type, bool]]:
    """Every map in a plain message with its type: (map, type, is the message itself)."""
    out = [(doc, cls, True)]
    for f in info(cls).fields:
        if isinstance(f.type, mi.ListType) and isinstance(f.type.item_type, mi.StructType):
            out += [(part, f.type.item_type.cls, False) for part in doc[f.encode_name]]
    return out


MUTATIONS = [
    "remove",
    "rename",
    "retype",
    "oversize",
    "negative",
    "bool_for_int",
    "float_for_int",
    "wrong_version",
    "wrong_tag",
    "extra",
    "truncate",
    "trailing",
]


def mutate(draw: Any, msg: Message, how: str) -> tuple[bytes, str]:
    """A mutated encoding of ``msg`` and the code its decoding must fail with."""
    cls = type(msg)
    wire = encode(msg)
    if how == "truncate":
        return wire[: draw(st.integers(0, len(wire) - 1))], SYNTAX
    if how == "trailing":
        return wire + draw(st.binary(min_size=1, max_size=8)), SYNTAX
    doc = msgspec.msgpack.decode(wire)
    if how == "wrong_version":
        doc["v"] = draw(st.integers(-(1 << 63), (1 << 64) - 1).filter(lambda v: v != 1))
        return raw(doc), VERSION
    if how == "wrong_tag":
        others = [c.__name__ for c in MESSAGE_TYPES if c is not cls]
        doc["type"] = draw(
            st.sampled_from(others) | st.text(max_size=20).filter(lambda t: t != cls.__name__)
        )
        return raw(doc), TYPE
    where, part_cls, top = draw(st.sampled_from(targets(doc, cls)))
    fields = {f.encode_name: f for f in info(part_cls).fields}
    if how == "extra":
        items = list(where.items())
        at = draw(st.integers(0, len(items)))
        items.insert(at, ("zz_extra", draw(st.sampled_from(list(KINDS.values())))))
        where.clear()
        where.update(items)
        return raw(doc), TYPE if top and at == 0 else FIELD
    names = [n for n in where if n != "type"] + (["type"] if top else [])
    if how in ("negative", "bool_for_int", "float_for_int", "oversize"):
        names = [n for n in names if n in fields and _bounded(fields[n].type, how)]
        if not names:
            return mutate(draw, msg, "retype")
    name = draw(st.sampled_from(names))
    code = TYPE if name == "type" else VERSION if name == "v" else FIELD
    if how == "remove":
        where.pop(name)
        if name not in ("type", "v") and not fields[name].required:
            try:  # a field with a default: the rest may still make a message
                msgspec.convert(where, part_cls)
                code = SYNTAX  # ... which is not the canonical encoding
            except msgspec.ValidationError:
                code = FIELD
        if name == "v":
            code = SYNTAX  # read as version 1, but not the canonical encoding
    elif how == "rename":
        where[name + "_"] = where.pop(name)
        code = TYPE if name == "type" else FIELD
    elif how == "retype":
        kinds = {"str"} if name == "type" else accepted(fields[name].type)
        where[name] = KINDS[draw(st.sampled_from(sorted(set(KINDS) - kinds)))]
    else:
        where[name] = _bad_value(fields[name].type, where[name], how)
    return raw(doc), code


def _bounded(t: mi.Type, how: str) -> bool:
    if how == "oversize":
        return edges(t) is not None or isinstance(t, mi.LiteralType)
    literal_int = isinstance(t, mi.LiteralType) and isinstance(t.values[0], int)
    return int_type(t) is not None or literal_int


def _bad_value(t: mi.Type, current: Any, how: str) -> Any:
    if how == "bool_for_int":
        return True
    if how == "float_for_int":
        return float(current) if isinstance(current, int) else 1.0
    if how == "negative":
        it = int_type(t)
        return (min(it.ge, 0) if it and it.ge is not None else 0) - 1
    if isinstance(t, mi.LiteralType):
        return t.values[0] * 2 if isinstance(t.values[0], str) else max(t.values) + 1
    _, too_large = edges(t)  # type: ignore[misc]
    if isinstance(too_large, tuple):
        return [current[0] if current else None] * too_large[1]
    return too_large


@FUZZ
@given(data=st.data(), how=st.sampled_from(MUTATIONS))
def test_one_mutated_field_gives_the_right_code(data, how):
    msg = data.draw(any_message)
    mutated, code = mutate(data.draw, msg, how)
    assert outcome(mutated, type(msg)) == code
    with pytest.raises(MessageError):
        decode_answer(mutated, type(msg))


@pytest.mark.parametrize("how", MUTATIONS)
@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_every_mutation_applies_to_every_type(cls, how, data):
    """Each (type, mutation) pair, on the fixed example of the type."""
    mutated, code = mutate(data.draw, EXAMPLES[cls], how)
    assert outcome(mutated, cls) == code


# -- fuzzing: damaged real messages ----------------------------------------------------------------
def real_messages() -> list[Message]:
    """Messages as the node builds them: real hop messages and sealed batches inside."""
    link_key, cn_key = os.urandom(32), os.urandom(32)
    hop = Hop(
        request_id=os.urandom(16),
        hop=0,
        direction=Direction.TO_REQUESTER,
        link="link-1-2",
        mode=Mode.GCM,
        segments=(Segment(str(uuid.uuid4()), 0, 32),),
        counter=5,
    )
    gcm_hop = seal_gcm(hop, cn_key, link_key)
    otp_hop = relay_seal_otp(
        Hop(
            request_id=os.urandom(16),
            hop=1,
            direction=Direction.TO_REQUESTER,
            link="link-2-3",
            mode=Mode.OTP,
            segments=(Segment(str(uuid.uuid4()), 0, 64), Segment(str(uuid.uuid4()), 0, 32)),
        ),
        os.urandom(64),
        bytearray(os.urandom(96)),
    )
    keys = [(str(uuid.uuid4()), os.urandom(32)) for _ in range(8)]
    batch = ksa.encode_batch(keys)
    sealed_batch = ksa.seal_batch(Mode.GCM, bytearray(os.urandom(32)), hop.request_id, batch)
    ksa_hop = seal_gcm(hop, ksa.encode_batch(keys), link_key)
    epoch = uuid.uuid4().hex
    return [
        RelayBatch(
            items=[
                RelayItem(path=[5, 4, 3, 1], index=1, message=gcm_hop, epoch=epoch),
                RelayItem(path=[5, 4, 3, 1], index=2, message=otp_hop, epoch=None),
            ]
        ),
        KsaAnswer(sealed=ksa_hop, epoch=epoch),
        Deliver(master="sae-a", slave="sae-b", sealed=ksa_hop, epoch=None),
        Tagged(
            channel_id=os.urandom(8).hex(),
            epoch=3,
            tag=os.urandom(32).hex(),
            body=encode(CnAnswer(batch=sealed_batch)),
        ),
        RelayResults(results=[ItemResult(ok=True), refused_item()]),
        Grant(key_ids=[str(uuid.uuid4()) for _ in range(64)], epoch=epoch),
    ]


def refused_item() -> ItemResult:
    r = refused(StaleGrant("link-1-2: link keys granted by an earlier run of this end"))
    return ItemResult(ok=False, code=r.code, message=r.message)


REAL = real_messages()


@FUZZ
@given(
    index=st.integers(0, len(REAL) - 1),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=3),
    trim=st.integers(0, 8),
    extend=st.binary(max_size=4),
)
def test_damaged_real_messages_give_the_message_or_a_message_error(index, flips, trim, extend):
    msg = REAL[index]
    wire = bytearray(encode(msg))
    assert decode(bytes(wire), type(msg)) == msg
    for at, mask in flips:
        wire[at % len(wire)] ^= mask
    damaged = bytes(wire[: len(wire) - trim]) + extend
    got = outcome(damaged, type(msg))
    if isinstance(got, Message):  # a flip inside a payload: a message, exactly that one
        assert encode(got) == damaged
    if not flips and bool(trim) != bool(extend):
        assert got == SYNTAX  # cut short, or bytes after the message


def test_every_single_byte_flip_of_a_real_relay_batch_is_caught_or_exact():
    msg = REAL[0]
    wire = encode(msg)
    for at in range(len(wire)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(wire)
            damaged[at] ^= mask
            got = outcome(bytes(damaged), RelayBatch)
            assert isinstance(got, str) or encode(got) == bytes(damaged)


# -- this module's own rules -----------------------------------------------------------------------
def test_the_message_module_imports_no_io():
    """Engines import messages, and no asyncio, socket, ssl, sqlite3 or time (KMS-DESIGN)."""
    root = Path(messages.__file__).parents[2]
    banned = {"asyncio", "socket", "ssl", "sqlite3", "time", "logging"}
    seen, todo = set(), ["appliance.kms.messages"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = root / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = root / name.replace(".", "/") / "__init__.py"
        if not path.exists():
            continue  # a name imported from a module, not a module
        for node in ast.walk(ast.parse(path.read_text())):
            found = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                found = [node.module]
            for module in found:
                assert module.split(".")[0] not in banned, (name, module)
                if module.startswith("appliance"):
                    todo.append(module)
                    if isinstance(node, ast.ImportFrom):
                        todo += [f"{module}.{a.name}" for a in node.names]
    assert "appliance.kms.relay" in seen


def _example(cls: type) -> Message:
    """A fixed valid instance whose lists are not empty (for the edge tests)."""
    fills: dict[str, Any] = {
        "master": "sae-a",
        "slave": "sae-b",
        "number": 4,
        "size": 256,
        "epoch": uuid.uuid4().hex,
        "sealed": os.urandom(64),
        "batch": os.urandom(64),
        "request_id": os.urandom(16),
        "nonce": os.urandom(16),
        "path": [5, 4, 3],
        "index": 1,
        "cn_key": bytearray(os.urandom(32)),
        "mode": "GCM",
        "channel_id": "0123456789abcdef",
        "tag": "ab" * 32,
        "confirm": "cd" * 32,
        "body": b"inner",
        "items": [RelayItem(path=[5, 4], index=1, message=os.urandom(96), epoch=None)],
        "results": [ItemResult(ok=True), refused_item()],
        "link": "link-1-2",
        "n": 64,
        "key_ids": [str(uuid.uuid4())],
        "stored": 4,
        "node": "access-1",
        "links": [
            messages.LinkStatus(
                link="link-1-2",
                peer=2,
                role="master",
                qkdm_keys=-1,
                keys_produced=10,
                key_size=256,
                relay_batches=0,
                relay_messages=0,
            )
        ],
        "code": "KMS-NO-KEY",
        "message": "no key",
        "ukms_b": 7,
        "deliver_to": 3,
        "purpose": "ksa",
        "fresh": False,
        "refill": False,
        "stream": messages.StreamTag(ksid=os.urandom(16), first=7, ttl=60),
        "max_key_size": 256,
        "max_key_per_request": 128,
        "max_key_count": 5000,
        "route_policy": "most-key",
    }
    fills["also"] = ["sae-c", "sae-d"]
    if cls is messages.CnRequest:
        fills["also"] = [messages.SlaveAt(slave="sae-c", ukms=9)]
    if cls in (messages.KsaRequest, messages.CnRequest):
        fills["stream"] = None  # a 004 stream has one slave (Deliver keeps its stream)
    kw = {f.name: fills[f.name] for f in info(cls).fields if f.name != "v"}
    if cls is Tagged:
        kw["epoch"] = 2
    return cls(**kw)


EXAMPLES = {cls: _example(cls) for cls in MESSAGE_TYPES}


def test_the_examples_are_valid():
    for cls, msg in EXAMPLES.items():
        assert decode(encode(msg), cls) == msg


def test_a_grant_carries_uuid_text_and_the_master_epoch():
    ids = [str(uuid.uuid4()).upper(), str(uuid.uuid4())]
    grant = Grant(key_ids=ids, epoch=uuid.uuid4().hex)
    assert decode(encode(grant), Grant).key_ids == ids
    doc = plain(grant)
    for bad in ("{" + ids[1] + "}", ids[1].replace("-", ""), ids[1] + "\n", ""):
        assert outcome(raw({**doc, "key_ids": [bad]}), Grant) == FIELD
    assert outcome(raw({**doc, "epoch": None}), Grant) == FIELD
    assert re.fullmatch(r"[0-9a-f]{32}", grant.epoch)


UUID = "0b6e8a8e-5a8b-4c1e-9d0f-3c2b1a098765"
CONTRACT = [  # (type, field, accepted values, refused values): the sizes KMS-DESIGN.md names
    (RelayAbort, "request_id", [bytes(16)], [bytes(15), bytes(17), b""]),
    (RelayAbort, "path", [[1, 2], [65535] * 64], [[1], [1] * 65, [0, 1], [1, 65536], []]),
    (RelayAbort, "index", [0, 63], [-1, 64]),
    (KsaRequest, "number", [1, 1024], [0, 1025]),
    (KsaRequest, "size", [8, 256, 8192], [0, 4, 12, 8200]),
    (KsaRequest, "master", ["a", "sae-1", "a" * 63], ["", "A", "-a", "a_b", "a.b", "a" * 64]),
    (KsaRequest, "epoch", [None, "0" * 32], ["0" * 31, "0" * 33, "A" * 32]),
    (messages.GrantRequest, "n", [1, 4096], [0, 4097]),
    (messages.GrantRequest, "link", ["link-1-2", "link-999-65535"], ["link-0-1", "l-1-2"]),
    (Grant, "key_ids", [[UUID], [UUID] * 4096], [[], [UUID] * 4097, [UUID[:-1]]]),
    (messages.ChannelOpened, "channel_id", ["0" * 16], ["0" * 15, "g" * 16]),
    (messages.ChannelOpened, "confirm", ["f" * 64], ["f" * 63, "F" * 64]),
    (Tagged, "tag", ["f" * 64], ["f" * 65]),
    (Tagged, "epoch", [0, (1 << 32) - 1], [-1, 1 << 32]),
    (Refused, "code", ["KMS", "A" * 64], ["", "A" * 65, "kms", "KMS_X"]),
    (Refused, "message", ["", "x" * 1024, "é ü"], ["x" * 1025, "a\x1b[2Jb", "a\nb", "\x00"]),
    (RelayLocal, "mode", ["OTP", "GCM"], ["otp", "AES"]),
    (
        CnLocal,
        "cn_key",
        [bytes(1), bytes(messages.CN_KEY_MAX)],
        [b"", bytes(messages.CN_KEY_MAX + 1)],
    ),
    (Deliver, "sealed", [bytes(messages.SEALED_KSA_MAX)], [bytes(messages.SEALED_KSA_MAX + 1)]),
]


@pytest.mark.parametrize(
    ("cls", "name", "good", "bad"), CONTRACT, ids=[f"{c.__name__}.{n}" for c, n, _, _ in CONTRACT]
)
def test_the_contract_sizes(cls, name, good, bad):
    base = plain(EXAMPLES[cls])
    for value in good:
        assert getattr(decode(raw({**base, name: value}), cls), name) == value
    for value in bad:
        assert outcome(raw({**base, name: value}), cls) == FIELD, value


def test_relay_items_have_the_path_bounds_too():
    base = plain(EXAMPLES[RelayBatch])
    for path, index, code in [([1] * 64, 63, None), ([1] * 65, 1, FIELD), ([1, 2], 64, FIELD)]:
        base["items"][0].update(path=path, index=index)
        got = outcome(raw(base), RelayBatch)
        assert (got == code) if code else isinstance(got, RelayBatch)
    base["items"] = base["items"] * 257
    assert outcome(raw(base), RelayBatch) == FIELD


def test_additional_slaves_are_distinct_and_never_on_a_stream_or_a_channel_request():
    """Annex B's additional slaves: a field added with a default (a request without them
    encodes as before plus an empty list), each slave once, none of them the master."""
    plain_request = KsaRequest(master="a", slave="b", number=1, size=8, epoch=None)
    assert plain_request.also == [] and plain(plain_request)["also"] == []
    shared = KsaRequest(master="a", slave="b", number=1, size=8, epoch=None, also=["c", "d"])
    assert decode(encode(shared), KsaRequest) == shared
    for also in (["b"], ["a"], ["c", "c"], [f"s{i}" for i in range(messages.MAX_SLAVES + 1)]):
        assert outcome(raw({**plain(shared), "also": also}), KsaRequest) == FIELD, also
    tag = messages.StreamTag(ksid=bytes(16), first=0, ttl=1)
    with pytest.raises(ValueError):
        KsaRequest(master="a", slave="b", number=1, size=8, epoch=None, also=["c"], stream=tag)
    at = [messages.SlaveAt(slave="c", ukms=4)]
    with pytest.raises(ValueError):
        messages.CnRequest(
            request_id=bytes(16),
            purpose="channel",
            mode="GCM",
            number=1,
            size=256,
            deliver_to=2,
            also=at,
        )
