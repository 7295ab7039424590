"""The SAE-side HTTP/1.1 client (appliance.sae_http) and tkey's use of it.

Socket tests run against a small threaded TLS 1.3 server with the throwaway PKI: it reads
each request and answers with whatever bytes the test scripted, so every framing and
every misbehaviour is exact. The parser is also fuzzed without sockets (Hypothesis), and
through TLS, where the client must give what the parser gives for the same bytes.
"""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.pki import server_context
from appliance.sae_http import (
    HttpResponseError,
    HttpsConnection,
    Response,
    ResponseParser,
    Unanswered,
)
from appliance.tkey import WARMUP, SaeEndpoint, call, measure
from tests.pki_fixture import pki  # noqa: F401 - the shared PKI fixture


@dataclass
class Reply:
    data: bytes
    close: bool = False
    """The server closes the connection after sending ``data``."""
    closed: threading.Event | None = None
    """Set once the server has closed that connection."""


Handler = Callable[[bytes], Reply]


def ok(doc: object, *, extra: bytes = b"") -> Reply:
    body = json.dumps(doc).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    return Reply(head + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)


class Server:
    """A TLS HTTP/1.1 server on loopback answering each request with ``handler(request)``."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx, self.handler = ctx, self.scripted([])
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def scripted(self, replies: list[Reply]) -> Handler:
        """Answer requests with ``replies`` in order, over any connections."""
        return lambda _request: replies.pop(0)

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        reply = None
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as sock:
                sock.settimeout(10)
                buf = bytearray()
                while (request := _read_request(sock, buf)) is not None:
                    self.requests.append(request)
                    reply = self.handler(request)
                    sock.sendall(reply.data)
                    if reply.close:
                        break
        except (OSError, IndexError):
            raw.close()
        if reply is not None and reply.closed is not None:
            reply.closed.set()


def _read_request(sock: ssl.SSLSocket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head_end = buf.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buf[:head_end]).split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(buf) < head_end + length:
        buf += sock.recv(65536)
    request = bytes(buf[: head_end + length])
    del buf[: head_end + length]
    return request


@pytest.fixture(scope="module")
def server(pki) -> Iterator[Server]:  # noqa: F811 - the fixture imported above
    node = pki["node-a"]
    srv = Server(server_context(node.cert, node.key, node.ca, ()))
    yield srv
    srv.listener.close()


@pytest.fixture
def sae(pki, server: Server) -> SaeEndpoint:  # noqa: F811
    server.requests.clear()
    server.connections = 0
    me = pki["sae-1"]
    return SaeEndpoint("sae-1", server.port, me.cert, me.key, me.ca)


def script(server: Server, *replies: Reply) -> None:
    server.handler = server.scripted(list(replies))


# ---- framing ----------------------------------------------------------------------------


def test_a_get_is_one_request_and_its_content_length_body_is_the_json(server, sae):
    script(server, ok({"keys": [{"key_ID": "a", "key": "b"}]}))
    with sae.connect() as conn:
        assert call(conn, "/api/v1/keys/sae-2/enc_keys") == (
            200,
            {"keys": [{"key_ID": "a", "key": "b"}]},
        )
    assert server.requests == [
        b"GET /api/v1/keys/sae-2/enc_keys HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % server.port
    ]


def test_a_post_sends_json_with_its_length_and_type(server, sae):
    script(server, ok({"keys": []}))
    body = {"key_IDs": [{"key_ID": "x"}]}
    with sae.connect() as conn:
        assert call(conn, "/api/v1/keys/sae-1/dec_keys", body) == (200, {"keys": []})
    head, _, sent = server.requests[0].partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /api/v1/keys/sae-1/dec_keys HTTP/1.1"
    assert b"Content-Type: application/json" in head
    assert b"Content-Length: %d" % len(sent) in head
    assert json.loads(sent) == body


def test_chunked_bodies_with_extensions_and_trailers_are_joined(server, sae):
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"
        b'3\r\n{"a\r\nC;name=value\r\n": [1, 2, 3]\r\n1 \r\n}\r\n0\r\nX-Trailer: yes\r\n\r\n'
    )
    script(server, Reply(chunked), Reply(chunked.replace(b"X-Trailer: yes\r\n", b"")))
    with sae.connect() as conn:
        assert call(conn, "/a") == (200, {"a": [1, 2, 3]})
        assert call(conn, "/b") == (200, {"a": [1, 2, 3]})
    assert server.connections == 1


def test_a_body_without_length_is_read_to_the_close_and_the_next_request_reconnects(server, sae):
    script(
        server,
        Reply(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"n": 1}', close=True),
        ok({"n": 2}),
    )
    with sae.connect() as conn:
        assert call(conn, "/a") == (200, {"n": 1})
        assert call(conn, "/b") == (200, {"n": 2})
    assert server.connections == 2


def test_connection_close_with_a_length_is_honoured(server, sae):
    script(server, ok({"n": 1}, extra=b"connection: Close\r\n"), ok({"n": 2}))
    with sae.connect() as conn:
        response = conn.request("GET", "/a")
        assert response.will_close and response.headers["connection"] == "Close"
        assert call(conn, "/b") == (200, {"n": 2})
    assert server.connections == 2


def test_large_batches_arrive_whole_in_both_framings(server, sae):
    doc = {"keys": [{"key_ID": f"{i:036d}", "key": "k" * 44} for i in range(1024)]}
    body = json.dumps(doc).encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 5000]), body[i : i + 5000])
        for i in range(0, len(body), 5000)
    )
    script(
        server,
        ok(doc),
        Reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"),
    )
    with sae.connect() as conn:
        assert call(conn, "/a") == (200, doc)
        assert call(conn, "/b") == (200, doc)
    assert len(body) > 80_000


def test_informational_responses_are_skipped_and_204_has_no_body(server, sae):
    script(
        server,
        Reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"),
        Reply(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
    )
    with sae.connect() as conn:
        assert call(conn, "/a") == (200, {})
        response = conn.request("GET", "/b")
        assert (response.status, response.reason, response.body) == (204, "No Content", b"")


# ---- keep-alive and reconnection --------------------------------------------------------


def test_requests_reuse_one_connection(server, sae):
    script(server, *(ok({"i": i}) for i in range(5)))
    with sae.connect() as conn:
        assert [call(conn, "/k")[1]["i"] for _ in range(5)] == list(range(5))
    assert server.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_even_for_a_post(server, sae):
    closed = threading.Event()
    script(server, Reply(ok({"n": 1}).data, close=True, closed=closed), ok({"n": 2}))
    with sae.connect() as conn:
        assert call(conn, "/a") == (200, {"n": 1})
        assert closed.wait(5)
        assert call(conn, "/b", {"key_IDs": []}) == (200, {"n": 2})
    assert server.connections == 2 and len(server.requests) == 2


def test_a_get_the_server_hung_up_on_is_sent_once_more_on_a_new_connection(server, sae):
    script(server, ok({"n": 1}), Reply(b"", close=True), ok({"n": 2}))
    with sae.connect() as conn:
        assert call(conn, "/a") == (200, {"n": 1})
        assert call(conn, "/b") == (200, {"n": 2})
    assert server.connections == 2 and len(server.requests) == 3


def test_a_post_the_server_hung_up_on_is_not_replayed(server, sae):
    script(server, ok({"n": 1}), Reply(b"", close=True), ok({"n": 3}))
    with sae.connect() as conn:
        assert call(conn, "/a") == (200, {"n": 1})
        with pytest.raises(Unanswered):
            call(conn, "/b", {"key_IDs": []})
        assert call(conn, "/c") == (200, {"n": 3})
    assert len(server.requests) == 3


def test_a_silent_server_times_out(server, pki):  # noqa: F811
    hold = threading.Event()
    server.handler = lambda _request: (hold.wait(10), Reply(b""))[1]
    me = pki["sae-1"]
    ctx = ssl.create_default_context(cafile=str(me.ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(me.cert, me.key)
    with (
        HttpsConnection("127.0.0.1", server.port, ctx, timeout=0.2) as conn,
        pytest.raises(TimeoutError),
    ):
        conn.request("GET", "/a")
    hold.set()


# ---- malformed answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_a_malformed_reply_raises_the_response_error_and_the_next_request_reconnects(
    server, sae, reply
):
    script(server, Reply(reply), ok({"n": 2}))
    with sae.connect() as conn:
        with pytest.raises(HttpResponseError):
            call(conn, "/a")
        assert call(conn, "/b") == (200, {"n": 2})
    assert server.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
    ],
)
def test_a_truncated_reply_raises_the_response_error(server, sae, reply):
    script(server, Reply(reply, close=True))
    with sae.connect() as conn, pytest.raises(HttpResponseError) as caught:
        call(conn, "/a")
    assert not isinstance(caught.value, Unanswered)


def test_stray_bytes_after_a_response_end_the_connection(server, sae):
    script(server, Reply(ok({"n": 1}).data + b"HTTP/1.1 200 OK\r\n"), ok({"n": 2}))
    with sae.connect() as conn:
        assert conn.request("GET", "/a").will_close
        assert call(conn, "/b") == (200, {"n": 2})
    assert server.connections == 2


def test_head_and_bad_targets_are_refused_before_sending(sae):
    with sae.connect() as conn:
        for method, path in (("HEAD", "/a"), ("GET", "/a b"), ("GET", "/a\r\nX: y"), ("GET", "a")):
            with pytest.raises(ValueError):
                conn.request(method, path)


def test_the_parser_joins_repeated_fields_and_follows_http_1_0_rules():
    parser = ResponseParser()
    response = parser.feed(
        b"HTTP/1.0 404 Not Found\r\nX-A: 1\r\nx-a:2 \r\nContent-Length: 2\r\n\r\n{}"
    )
    assert response is not None
    assert (response.status, response.reason, response.body) == (404, "Not Found", b"{}")
    assert response.headers == {"x-a": "1, 2", "content-length": "2"}
    assert response.will_close  # HTTP/1.0 without keep-alive
    kept = ResponseParser().feed(
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"
    )
    assert kept is not None and not kept.will_close


def test_the_parser_refuses_a_malformed_trailer():
    parser = ResponseParser()
    with pytest.raises(HttpResponseError):
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad\r\n\r\n")


def test_measure_compares_keys_and_counts_garbage_as_failed(server, sae):
    def kme(request: bytes) -> Reply:
        if b"enc_keys" in request.split(b"\r\n")[0]:
            return ok({"keys": [{"key_ID": "id-1", "key": "a2V5"}]})
        return ok({"keys": [{"key_ID": "id-1", "key": "a2V5"}]})

    server.handler = kme
    result = measure(sae, sae, 4)
    assert (result["keys_matched"], result["failed_requests"]) == (4, 0)
    seen = len(server.requests)  # the warm-up and first measured request succeed, then garbage
    garbage_at = seen + 2 * WARMUP + 2
    server.handler = lambda r: (
        Reply(b"garb\r\n\r\n") if len(server.requests) == garbage_at + 1 else kme(r)
    )
    result = measure(sae, sae, 4)
    assert (result["keys_matched"], result["failed_requests"]) == (3, 1)


def test_garbage_during_the_warm_up_is_not_counted_and_does_not_stop_the_run(server, sae):
    def kme(request: bytes) -> Reply:
        return ok({"keys": [{"key_ID": "id-1", "key": "a2V5"}]})

    first = len(server.requests) + 1
    server.handler = lambda r: Reply(b"garb\r\n\r\n") if len(server.requests) == first else kme(r)
    result = measure(sae, sae, 3)
    assert (result["keys_matched"], result["failed_requests"]) == (3, 0)


# ---- the parser, fuzzed -----------------------------------------------------------------

TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=12).filter(
    lambda t: t not in ("content-length", "transfer-encoding", "connection")
)
VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int, bytes, str]:
    """A valid response: (its bytes, status, body, framing)."""
    status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    body = draw(st.binary(max_size=2000))
    framing = draw(st.sampled_from(["length", "chunked", "eof"]))
    fields = b"".join(
        b"%s: %s\r\n" % (n.encode(), v.encode())
        for n, v in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=4))
    )
    if framing == "length":
        return (
            b"HTTP/1.1 %d R\r\n%sContent-Length: %d\r\n\r\n%s" % (status, fields, len(body), body),
            status,
            body,
            framing,
        )
    if framing == "eof":
        return b"HTTP/1.1 %d R\r\n%s\r\n%s" % (status, fields, body), status, body, framing
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    chunks = b"".join(b"%X\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return (
        b"HTTP/1.1 %d R\r\nTransfer-Encoding: chunked\r\n%s\r\n%s0\r\n\r\n"
        % (status, fields, chunks),
        status,
        body,
        framing,
    )


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def parse(pieces: list[bytes]) -> object:
    """What the client would get: a Response, or the HttpResponseError (nothing else)."""
    parser = ResponseParser()
    try:
        for piece in pieces:
            if (response := parser.feed(piece)) is not None:
                return response
        return parser.feed_eof()
    except HttpResponseError as exc:
        return exc


@given(responses(), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_valid_response_parses_whatever_the_reads(case, cuts):
    raw, status, body, framing = case
    pieces = split(raw, cuts)
    parser = ResponseParser()
    results = [parser.feed(p) for p in pieces]
    response = parser.feed_eof() if framing == "eof" else results[-1]
    assert all(r is None for r in results[:-1])
    assert response is not None and (response.status, response.body) == (status, body)
    assert response.will_close == (framing == "eof")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(responses())[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "cut":
            del raw[at:]
        elif action == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        elif action == "insert":
            raw[at:at] = draw(
                st.sampled_from([b"\r\n", b"\r", b"\n", b":", b" ", b"0", b"\x00", b";"])
            )
        elif raw:
            raw[min(at, len(raw) - 1)] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=300), mutated()), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_bytes_give_a_response_or_the_response_error(data, cuts):
    result = parse(split(data, cuts))  # parse lets any other exception escape
    assert isinstance(result, Response | HttpResponseError)
    if isinstance(result, Response):
        assert isinstance(result.body, bytes) and 0 <= result.status <= 999


def outcome_of(data: bytes, close: bool) -> tuple[object, ...]:
    """What a client must make of ``data`` from a server that then closes (``close``) or
    goes silent: the parser's Response or error class, or "waits" when the parser needs
    more bytes than a silent server will ever send."""
    parser = ResponseParser()
    try:
        response = parser.feed(data) if data else None
        if response is None:
            if not close:
                return ("waits",)
            response = parser.feed_eof()
    except HttpResponseError as exc:
        return ("error", type(exc).__name__)
    return ("response", response.status, response.body)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.one_of(st.binary(max_size=200), mutated()), close=st.booleans())
def test_fuzzed_bytes_through_tls_give_what_the_parser_gives(server, pki, data, close):  # noqa: F811
    """Through TLS the client returns the parser's Response or raises its error, and never
    returns a response it did not fully read. A hang fails: where bytes are due, the timeout
    is long and a TimeoutError is a wrong answer; only where the parser proves the response
    unfinished and the server is silent is the timeout (short) the right answer."""
    expected = outcome_of(data, close)
    script(server, Reply(data, close=close))
    me = pki["sae-1"]
    conn = SaeEndpoint("sae-1", server.port, me.cert, me.key, me.ca).connect()
    conn.timeout = 0.2 if expected == ("waits",) else 30.0
    try:
        response = conn.request("GET", "/fuzz")
        got: tuple[object, ...] = ("response", response.status, response.body)
    except HttpResponseError as exc:
        got = ("error", type(exc).__name__)
    except TimeoutError:
        got = ("waits",)
    finally:
        conn.close()
    assert got == expected, data
