"""ETSI 004 frames: the layout byte by byte, round trips, malformed input, and fuzzing.

The fuzz tests parse 110,000 derandomized inputs (a few seconds: parsing is pure); whatever
the bytes, only FrameError or MalformedPayload may come out. 5,000 more check that the
hand-packed hot path (header, GET_KEY, its answer) equals construct's layouts."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.kms import frames004 as f


def fuzz(cases: int) -> settings:
    return settings(
        max_examples=cases,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


KSID = bytes(range(16))
QOS = f.Qos(
    key_chunk_size=32,
    max_bps=1000,
    min_bps=10,
    jitter=1,
    priority=2,
    timeout=3000,
    ttl=60,
    metadata_mimetype="application/json",
)


def header(service: int, length: int, major: int = 2) -> bytes:
    return struct.pack(">BBBbI", major, 1, 1, service, length)


def test_the_header_is_eight_bytes_version_signed_type_and_big_endian_length():
    frame = f.encode(f.Close(ksid=KSID))
    assert frame[:8] == bytes([2, 1, 1, 0x08, 0, 0, 0, 16])
    assert frame[8:] == KSID
    assert f.HEADER.parse(header(-1, 5)).service == -1


def test_open_connect_layout():
    frame = f.encode(f.OpenConnect(source="qkd://a", destination="b", qos=QOS, ksid=KSID))
    payload = frame[8:]
    assert frame[3] == 0x02 and struct.unpack(">I", frame[4:8])[0] == len(payload)
    assert payload.startswith(b"qkd://a\0b\0")
    qos = payload[10 : 10 + 28]
    assert struct.unpack(">7I", qos) == (32, 1000, 10, 1, 2, 3000, 60)
    mime = payload[38 : 38 + 256]
    assert mime == b"application/json".ljust(256, b"\0")
    assert payload[294:] == KSID and len(payload) == 310


def test_get_key_and_its_answer_layout():
    assert f.encode(f.GetKey(ksid=KSID, index=7, metadata_size=9))[8:] == KSID + struct.pack(
        ">II", 7, 9
    )
    answer = f.encode(
        f.GetKeyAnswer(status=f.Status.SUCCESS, index=7, key=bytearray(b"k" * 4), metadata=b"md")
    )
    assert answer[3] == 0x05
    assert answer[8:] == struct.pack(">III", 0, 7, 4) + b"kkkk" + struct.pack(">I", 2) + b"md"


@pytest.mark.parametrize(
    "message",
    [
        f.OpenConnect(source="qkd://sae-a", destination="sae-b", qos=QOS),
        f.GetKey(ksid=KSID, index=(1 << 32) - 1, metadata_size=0),
        f.Close(ksid=KSID),
    ],
)
def test_requests_round_trip(message):
    (frame,) = f.FrameReader().feed(f.encode(message))
    assert frame.version == f.VERSION
    assert f.decode_request(frame) == message


@pytest.mark.parametrize(
    "message",
    [
        f.OpenConnectAnswer(status=f.Status.QOS_NOT_MET, qos=QOS, ksid=KSID),
        f.GetKeyAnswer(status=f.Status.SUCCESS, index=3, key=bytearray(32), metadata=b"{}"),
        f.CloseAnswer(status=f.Status.SUCCESS),
    ],
)
def test_responses_round_trip(message):
    (frame,) = f.FrameReader(f.MAX_RESPONSE).feed(f.encode(message))
    assert f.decode_response(frame) == message


def test_a_key_answer_prints_without_its_bits():
    answer = f.GetKeyAnswer(status=f.Status.SUCCESS, index=1, key=bytearray(b"\xab" * 8))
    assert "ab" not in repr(answer).lower().replace("redacted", "")


def test_frames_split_anywhere_come_out_whole():
    stream = b"".join(f.encode(f.GetKey(ksid=KSID, index=i, metadata_size=0)) for i in range(5))
    for cut in range(1, len(stream)):
        reader = f.FrameReader()
        frames = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [f.decode_request(x).index for x in frames] == list(range(5))  # type: ignore[union-attr]
        assert not reader.pending


def test_truncated_header_and_payload_are_waited_for():
    reader = f.FrameReader()
    assert reader.feed(header(0x04, 24)[:5]) == [] and reader.pending
    assert reader.feed(header(0x04, 24)[5:] + bytes(10)) == []  # payload short
    assert reader.pending


@pytest.mark.parametrize(
    "bad",
    [header(0x04, f.MAX_REQUEST + 1), header(0x04, 0xFFFFFFFF), header(0x04, 24, major=1)],
)
def test_a_length_past_the_bound_or_another_major_version_is_fatal(bad):
    reader = f.FrameReader()
    with pytest.raises(f.FrameError):
        reader.feed(bad)
    with pytest.raises(f.FrameError):  # and stays so
        reader.feed(f.encode(f.Close(ksid=KSID)))


@pytest.mark.parametrize("service", [0x03, 0x05, 0x09, 0x00, 0x07, -1, 0x7F])
def test_a_service_type_that_is_not_a_request_is_a_frame_error(service):
    with pytest.raises(f.FrameError):
        f.decode_request(f.Frame((2, 1, 1), service, KSID))


def _open_payload(
    source: bytes, destination: bytes, tail: bytes = b"", mime: bytes = bytes(256)
) -> bytes:
    qos = struct.pack(">7I", 32, 0, 0, 0, 0, 0, 0) + mime
    return source + destination + qos + KSID + tail


@pytest.mark.parametrize(
    ("service", "payload"),
    [
        (0x02, _open_payload(b"qkd://a", b"b\0")),  # source URI without its NUL: eats the rest
        (0x02, _open_payload(b"a\0", b"b")),  # destination without its NUL
        (0x02, _open_payload(b"a\0", b"b\0", b"x")),  # trailing byte
        (0x02, _open_payload(b"a\0", b"b\0")[:-1]),  # KSID cut short
        (0x02, _open_payload(b"\xff\0", b"b\0")),  # not UTF-8
        (0x02, _open_payload(b"a\nb\0", b"b\0")),  # control character
        (0x02, _open_payload(b"a" * 256 + b"\0", b"b\0")),  # URI too long
        (0x02, _open_payload(b"a\0", b"b\0", mime=b"x\0y" + bytes(253))),  # not NUL-padded
        (0x02, _open_payload(b"a\0", b"b\0", mime=b"a b" + bytes(253))),  # not a MIME token
        (0x02, _open_payload(b"\0", b"b\0")),  # empty URI
        (0x04, KSID + bytes(7)),
        (0x04, KSID + bytes(9)),
        (0x08, KSID[:15]),
        (0x08, KSID + b"\0"),
    ],
)
def test_malformed_payloads_name_their_service(service, payload):
    with pytest.raises(f.MalformedPayload) as raised:
        f.decode_request(f.Frame((2, 1, 1), service, payload))
    assert raised.value.service == service


def test_responses_with_an_unknown_status_or_a_lying_length_are_malformed():
    ok = f.encode(f.GetKeyAnswer(status=f.Status.SUCCESS, index=1, key=bytearray(4)))[8:]
    for payload in (
        struct.pack(">I", 9) + ok[4:],  # status 9 does not exist
        ok[:8] + struct.pack(">I", 40) + ok[12:],  # key longer than the payload
        ok[:-4] + struct.pack(">I", 1),  # metadata past the end
        ok[:8] + struct.pack(">I", f.MAX_CHUNK + 1) + bytes(f.MAX_CHUNK + 1) + bytes(4),
    ):
        with pytest.raises(f.MalformedPayload):
            f.decode_response(f.Frame((2, 1, 1), 0x05, payload))


# -- fuzzing ------------------------------------------------------------------------------------
# Hypothesis draws a seed per example; each seed makes BATCH inputs (random bytes, or valid
# frames with bytes overwritten and the end cut or extended). Hypothesis costs about 0.5 ms
# of CPU per example here, the parse of one input 30-60 µs: a hundred inputs per example
# keep 110,000 inputs within seconds, where 110,000 examples took minutes.
BATCH = 100


def _feed_all(data: bytes, max_payload: int, decode: object) -> None:
    """Only FrameError and MalformedPayload may come out, whatever ``data`` is."""
    reader = f.FrameReader(max_payload)
    try:
        frames = reader.feed(data)
    except f.FrameError:
        return
    except Exception as exc:
        raise AssertionError(f"FrameReader failed on {data.hex()}") from exc
    for frame in frames:
        try:
            decode(frame)  # type: ignore[operator]
        except (f.FrameError, f.MalformedPayload):
            pass
        except Exception as exc:
            raise AssertionError(f"decoding failed on {data.hex()}") from exc


def _mutated(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randrange(5)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    end = rng.randrange(8, len(data) + 1)
    return bytes(data[:end]) + (rng.randbytes(rng.randrange(17)) if rng.random() < 0.2 else b"")


VALID = [
    f.encode(f.OpenConnect(source="qkd://sae-a", destination="qkd://sae-b", qos=QOS, ksid=KSID)),
    f.encode(f.GetKey(ksid=KSID, index=5, metadata_size=64)),
    f.encode(f.Close(ksid=KSID)),
]
RESPONSES = [
    f.encode(f.OpenConnectAnswer(status=f.Status.SUCCESS, qos=QOS, ksid=KSID)),
    f.encode(f.GetKeyAnswer(status=f.Status.SUCCESS, index=1, key=bytearray(32), metadata=b"{}")),
    f.encode(f.CloseAnswer(status=f.Status.SUCCESS)),
]
SEED = st.integers(0, (1 << 64) - 1)


@fuzz(400)
@given(SEED)
def test_fuzz_any_bytes_as_requests(seed):
    rng = random.Random(seed)
    for _ in range(BATCH):
        header = rng.choice([rng.randbytes(8), rng.choice(VALID)[:8]])
        _feed_all(header + rng.randbytes(rng.randrange(400)), f.MAX_REQUEST, f.decode_request)


@fuzz(400)
@given(SEED)
def test_fuzz_mutated_valid_requests(seed):
    rng = random.Random(seed)
    for _ in range(BATCH):
        _feed_all(_mutated(rng, rng.choice(VALID)), f.MAX_REQUEST, f.decode_request)


@fuzz(300)
@given(SEED)
def test_fuzz_mutated_responses(seed):
    rng = random.Random(seed)
    for _ in range(BATCH):
        _feed_all(_mutated(rng, rng.choice(RESPONSES)), f.MAX_RESPONSE, f.decode_response)


@fuzz(200)
@given(SEED)
def test_the_hand_packed_hot_path_equals_construct(seed):
    rng = random.Random(seed)
    for _ in range(BATCH // 4):
        head = rng.randbytes(8)
        c = f.HEADER.parse(head)
        assert f._HEADER.unpack(head) == (c.major, c.minor, c.patch, c.service, c.length)
        payload = rng.randbytes(24)
        c = f.GET_KEY.parse(payload)
        fast = f.decode_request(f.Frame((2, 1, 1), f.Service.GET_KEY, payload))
        assert fast == f.GetKey(ksid=c.ksid, index=c.index, metadata_size=c.metadata_size)
        answer = f.GetKeyAnswer(
            status=f.Status(rng.randrange(9)),
            index=rng.randrange(1 << 32),
            key=bytearray(rng.randbytes(rng.randrange(f.MAX_CHUNK + 1))),
            metadata=rng.randbytes(rng.randrange(64)),
        )
        payload = f.GET_KEY_RESPONSE.build(
            {
                "status": int(answer.status),
                "index": answer.index,
                "key_chunk_size": len(answer.key),
                "key": bytes(answer.key),
                "metadata": answer.metadata,
            }
        )
        built = f.HEADER.build(
            {"major": 2, "minor": 1, "patch": 1, "service": 0x05, "length": len(payload)}
        )
        assert f.encode(answer) == built + payload
