"""The HTTP/1.1 request parser of the 014 server: llhttp used strictly, sans-IO, the same
requests whatever way the bytes are split; anything else is a MalformedRequest with the
status to answer, never a crash; every byte it holds is bounded."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.net.h2 import Response
from appliance.net.http1 import (
    MAX_BODY,
    MAX_FRAMING,
    MAX_HEAD,
    MalformedRequest,
    Message,
    RequestParser,
    encode_response,
)
from tests.net.h1_driver import split

GET = b"GET /api/v1/keys/sae-2/status HTTP/1.1\r\nHost: kme\r\n\r\n"
POST = (
    b"POST /api/v1/keys/sae-1/dec_keys HTTP/1.1\r\nHost: kme\r\n"
    b"Content-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    b'{"key_IDs":1}'
)
CHUNKED = (
    b"POST /x HTTP/1.1\r\nHost: kme\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n"
)
CHUNKED_HEAD = b"POST /x HTTP/1.1\r\nHost: kme\r\nTransfer-Encoding: chunked\r\n\r\n"


def parse(data: bytes) -> list[Message]:
    return RequestParser().feed(data)


def feed_split(data: bytes, cuts: list[int]) -> list[Message]:
    parser = RequestParser()
    return [msg for piece in split(data, cuts) for msg in parser.feed(piece)]


def test_a_get_a_post_and_a_chunked_post_in_one_stream():
    requests = parse(GET + POST + CHUNKED)
    assert [(m.method, m.target, m.body) for m in requests] == [
        ("GET", "/api/v1/keys/sae-2/status", b""),
        ("POST", "/api/v1/keys/sae-1/dec_keys", b'{"key_IDs":1}'),
        ("POST", "/x", b"hello, world"),
    ]
    assert requests[1].headers["content-type"] == "application/json"
    assert "trailer" not in requests[2].headers  # trailer fields are not headers
    assert all(m.keep_alive for m in requests)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(GET + POST + CHUNKED)), max_size=12))
def test_any_split_of_the_bytes_gives_the_same_requests(cuts):
    data = GET + POST + CHUNKED
    assert feed_split(data, cuts) == parse(data)


def test_keep_alive_follows_the_version_and_connection_header():
    assert parse(b"GET / HTTP/1.0\r\n\r\n")[0].keep_alive is False
    assert parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")[0].keep_alive is True
    assert parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")[0].keep_alive is False


def test_repeated_fields_are_joined_and_values_trimmed():
    (msg,) = parse(b"GET / HTTP/1.1\r\nHost: a \t\r\nAccept: x\r\nACCEPT: y\r\n\r\n")
    assert msg.headers == {"host": "a", "accept": "x, y"}


def test_a_zero_padded_length_is_its_value():
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"0" * 5000 + b"2\r\n\r\nxy"
    assert parse(data)[0].body == b"xy"


def test_expect_100_continue_is_flagged_until_the_body_arrives():
    parser = RequestParser()
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    assert parser.feed(head) == [] and parser.wants_continue and parser.in_request
    assert parser.feed(b"{}")[0].body == b"{}"
    assert not parser.wants_continue and not parser.in_request
    assert parse(head + b"{}")[0].body == b"{}"  # body already there: nothing to ask
    assert not RequestParser().wants_continue


def test_a_request_in_progress_is_visible_and_counted():
    parser = RequestParser()
    assert not parser.in_request and parser.started == 0
    parser.feed(GET + GET[:10])
    assert parser.in_request and parser.started == 2


REFUSED = {
    "garbage": (b"GARBAGE / HTTP/9.9\r\n\x00\x01\r\n\r\n", 400),
    "no-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "obsolete-line-folding": (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n folded\r\n\r\n", 400),
    "bad-name": (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400),
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost: a\r\nX : x\r\n\r\n", 400),
    "control-in-value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "lf-only-line-ends": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "bare-cr": (b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "negative-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    "plus-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx", 400),
    "superscript-length-latin1": (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ²\r\n\r\n".encode("latin-1"),
        400,
    ),
    "superscript-length-utf8": (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ²\r\n\r\n".encode(),
        400,
    ),
    "arabic-indic-length": (
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ٢\r\n\r\nxx".encode(),
        400,
    ),
    "duplicate-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        400,
    ),
    "length-and-chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "chunked-and-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 1\r\n\r\n0\r\n\r\n",
        400,
    ),
    "gzip": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    "gzip-then-chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "chunked-twice": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad-chunk-size": (CHUNKED_HEAD + b"zz\r\n", 400),
    "space-before-chunk-extension": (CHUNKED_HEAD + b"1 ;a=b\r\nx\r\n0\r\n\r\n", 400),
    "control-in-chunk-extension": (CHUNKED_HEAD + b"1;\x01\r\nx\r\n0\r\n\r\n", 400),
    "empty-chunk-extension": (CHUNKED_HEAD + b"1;\r\nx\r\n0\r\n\r\n", 400),
    "chunk-overrun": (CHUNKED_HEAD + b"2\r\nabc\r\n", 400),
    "chunk-size-overflow": (CHUNKED_HEAD + b"1" + b"0" * 16 + b"\r\n", 400),
    "http-0.9": (b"GET / HTTP/0.9\r\n\r\n", 505),
    "http-2.0": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "upgrade": (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n", 400),
    "connect": (b"CONNECT kme:443 HTTP/1.1\r\nHost: kme\r\n\r\n", 400),
    "body-too-large": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
        413,
    ),
    "zero-padded-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"0" * 5000 + b"2000000\r\n\r\n",
        413,
    ),
    "head-too-large": (b"GET /" + b"a" * (MAX_HEAD + 1) + b" HTTP/1.1\r\n", 431),
    "field-too-large": (b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 1) + b"\r\n\r\n", 431),
}


@pytest.mark.parametrize("data, status", REFUSED.values(), ids=REFUSED.keys())
def test_malformed_requests_are_refused_with_a_status(data, status):
    with pytest.raises(MalformedRequest) as refused:
        parse(data)
    assert refused.value.status == status and str(refused.value)


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(sorted(REFUSED)), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_a_refusal_does_not_depend_on_the_split(case, cuts):
    data, status = REFUSED[case]
    with pytest.raises(MalformedRequest) as refused:
        feed_split(data, cuts)
    assert refused.value.status == status


def test_requests_before_a_fault_are_handed_over_with_it():
    with pytest.raises(MalformedRequest) as refused:
        parse(GET + POST + b"GET / HTTP/1.1\nHost: a\n\n")
    assert [m.method for m in refused.value.requests] == ["GET", "POST"]


def test_a_refused_parser_takes_nothing_more():
    parser = RequestParser()
    with pytest.raises(MalformedRequest):
        parser.feed(b"GET / HTTP/1.1\nHost: a\n\n")
    with pytest.raises(MalformedRequest) as again:
        parser.feed(GET)
    assert again.value.requests == []


def test_pipelined_requests_beyond_the_room_are_refused():
    assert len(RequestParser().feed(GET * 3, room=3)) == 3
    with pytest.raises(MalformedRequest) as refused:
        RequestParser().feed(GET * 4, room=3)
    assert "pipelined" in str(refused.value) and len(refused.value.requests) == 3


def _fed_until_refused(parser: RequestParser, piece: bytes, limit: int) -> tuple[int, int]:
    """Feed ``piece`` until the parser refuses (or ``limit`` bytes went in): the bytes fed
    and the peak of Python allocations meanwhile (what the parser buffered)."""
    fed = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(MalformedRequest) as refused:
            while fed < limit:
                parser.feed(piece)
                fed += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413
    return fed, peak


def test_a_chunk_declared_as_4_gib_is_refused_once_the_bytes_pass_the_limit():
    parser = RequestParser()
    parser.feed(CHUNKED_HEAD + b"FFFFFFFF\r\n")  # one chunk of 4 GiB - 1 declared
    piece = b"k" * (64 << 10)
    fed, peak = _fed_until_refused(parser, piece, 16 * MAX_BODY)
    assert fed <= MAX_BODY  # refused on the feed that passed the limit
    assert peak < MAX_BODY + 4 * len(piece)  # the body held is bounded, not what was sent


def test_a_body_by_length_is_refused_from_its_head_before_any_byte_is_held():
    with pytest.raises(MalformedRequest) as refused:
        parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4294967296\r\n\r\n")
    assert refused.value.status == 413


def test_many_small_chunks_are_bounded_like_one_large_one():
    parser = RequestParser()
    parser.feed(CHUNKED_HEAD)
    piece = b"".join(b"400\r\n" + b"c" * 1024 + b"\r\n" for _ in range(64))
    fed, peak = _fed_until_refused(parser, piece, 16 * MAX_BODY)
    assert fed <= MAX_BODY + len(piece) and peak < MAX_BODY + 4 * len(piece)


def test_a_trailer_or_chunk_extension_trickled_in_pieces_is_bounded():
    for tail in (b"0\r\nX-Trailer: ", b"1;name="):
        parser = RequestParser()
        parser.feed(CHUNKED_HEAD + tail)
        fed, peak = _fed_until_refused(parser, b"t" * 4096, 16 * MAX_BODY)
        assert fed <= MAX_FRAMING and peak < 4 * MAX_FRAMING


def test_a_head_trickled_in_pieces_is_refused_at_its_bound():
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nX-Long: ")
    fed = 0
    with pytest.raises(MalformedRequest) as refused:
        while fed < 4 * MAX_HEAD:
            parser.feed(b"v" * 1000)
            fed += 1000
    assert refused.value.status == 431 and fed <= MAX_HEAD + 1000


# -- fuzzing --------------------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real request with a few bytes flipped, inserted, deleted or cut."""
    raw = bytearray(draw(st.sampled_from([GET, POST, CHUNKED, GET + POST])))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "cut":
            del raw[at:]
        elif action == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        elif action == "insert":
            raw[at:at] = draw(
                st.sampled_from(
                    [b"\r\n", b"\r", b"\n", b":", b" ", b"0", b"\x00", b";", b"\xb2", b"\t"]
                )
            )
        elif raw:
            raw[min(at, len(raw) - 1)] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


@settings(max_examples=1000, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        mutated(),
        st.tuples(st.sampled_from([b"", GET, b"POST / HTTP/1.1\r\n"]), st.binary(max_size=200)).map(
            b"".join
        ),
    ),
    cuts=st.lists(st.integers(0, 500), max_size=8),
)
def test_fuzzed_bytes_parse_or_are_refused_cleanly(data, cuts):
    try:
        for msg in feed_split(data, cuts):
            assert msg.method and msg.target and isinstance(msg.headers, dict)
            assert len(msg.body) <= MAX_BODY
    except MalformedRequest as exc:
        assert exc.status in (400, 413, 431, 505) and str(exc)


def test_responses_carry_length_and_close():
    raw = encode_response(Response(503, b'{"message":"x"}', {"content-type": "a/b"}), close=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 503 Service Unavailable",
        b"content-length: 15",
        b"content-type: a/b",
        b"connection: close",
    ]
    assert body == b'{"message":"x"}'
