"""The HTTP/1.1 request parser of the 014 server: strict, sans-IO, the same requests
whatever way the bytes are split; anything else is a MalformedRequest, never a crash."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.net.h2 import Response
from appliance.net.http1 import MAX_BODY, MalformedRequest, RequestParser, encode_response

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


def parse(data: bytes) -> list[tuple[str, str, dict[str, str], bytes, bool]]:
    return RequestParser().feed(data)


def test_a_get_a_post_and_a_chunked_post_in_one_stream():
    requests = parse(GET + POST + CHUNKED)
    assert [(m, t, b) for m, t, _, b, _ in requests] == [
        ("GET", "/api/v1/keys/sae-2/status", b""),
        ("POST", "/api/v1/keys/sae-1/dec_keys", b'{"key_IDs":1}'),
        ("POST", "/x", b"hello, world"),
    ]
    assert requests[1][2]["content-type"] == "application/json"
    assert all(keep for *_, keep in requests)


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(GET + POST + CHUNKED)), max_size=12))
def test_any_split_of_the_bytes_gives_the_same_requests(cuts):
    data = GET + POST + CHUNKED
    parser, out, last = RequestParser(), [], 0
    for cut in [*sorted(cuts), len(data)]:
        out += parser.feed(data[last:cut])
        last = cut
    assert out == parse(data)


def test_keep_alive_follows_the_version_and_connection_header():
    assert parse(b"GET / HTTP/1.0\r\n\r\n")[0][4] is False
    assert parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")[0][4] is True
    assert parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")[0][4] is False


def test_expect_100_continue_is_flagged_until_the_body_arrives():
    parser = RequestParser()
    head = b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    assert parser.feed(head) == [] and parser.wants_continue
    assert parser.feed(b"{}")[0][3] == b"{}"


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE / HTTP/9.9\r\n\x00\x01\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1),
        b"GET /" + b"a" * (1 << 17),
    ],
    ids=[
        "garbage",
        "no-host",
        "folding",
        "bad-name",
        "negative-length",
        "two-lengths",
        "gzip",
        "bad-chunk-size",
        "chunk-overrun",
        "body-too-large",
        "head-too-large",
    ],
)
def test_malformed_requests_are_refused(data):
    with pytest.raises(MalformedRequest):
        parse(data)


@settings(max_examples=500, deadline=None)
@given(junk=st.binary(max_size=300), prefix=st.sampled_from([b"", GET, b"POST / HTTP/1.1\r\n"]))
def test_fuzzed_bytes_parse_or_are_refused_cleanly(junk, prefix):
    try:
        for method, target, headers, body, _ in parse(prefix + junk):
            assert method and target and isinstance(headers, dict) and len(body) <= MAX_BODY
    except MalformedRequest:
        pass


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
