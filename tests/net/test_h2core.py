"""The sans-IO HTTP/2 core (appliance.net.h2core) without sockets: against itself, against the
python-hyper ``h2`` library in both roles, and against hand-made and fuzzed frames."""

from __future__ import annotations

import contextlib
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.net import h2core
from appliance.net.h2core import (
    PREFACE,
    Connection,
    ConnectionEnded,
    H2ProtocolError,
    MessageReceived,
    StreamReset,
)
from appliance.net.hpackdec import Decoder, HpackError

REQUEST = [(":method", "POST"), (":scheme", "https"), (":authority", "a"), (":path", "/x")]


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, kind, flags, stream_id) + payload


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of every frame in ``data`` (after a preface, if any)."""
    data = data.removeprefix(PREFACE)
    out = []
    while data:
        high, low, kind, flags, stream_id = struct.unpack_from(">HBBBL", data)
        n = high << 8 | low
        out.append((kind, flags, stream_id, data[9 : 9 + n]))
        data = data[9 + n :]
    return out


def block(headers: list[tuple[str, str]]) -> bytes:
    return b"".join(h2core.encode_field(n, v) for n, v in headers)


def pump(a: Connection, b: Connection) -> tuple[list[h2core.Event], list[h2core.Event]]:
    """Move bytes both ways until both sides are quiet; the events each side saw."""
    seen_a: list[h2core.Event] = []
    seen_b: list[h2core.Event] = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return seen_a, seen_b
        seen_b += b.receive(to_b)
        seen_a += a.receive(to_a)


def connected() -> tuple[Connection, Connection]:
    client, server = Connection(client_side=True), Connection(client_side=False)
    pump(client, server)
    return client, server


def server_after_preface() -> Connection:
    """A server that has taken a client's preface and SETTINGS (its own output drained)."""
    server = Connection(client_side=False)
    server.receive(PREFACE + frame(h2core.SETTINGS, 0, 0))
    server.data_to_send()
    return server


# -- our core against itself ---------------------------------------------------------------------
def test_request_and_response_between_our_cores() -> None:
    client, server = connected()
    client.send(1, [*REQUEST, ("content-length", "5")], b"hello")
    _, at_server = pump(client, server)
    assert at_server == [
        MessageReceived(
            stream_id=1,
            headers={**dict(REQUEST), "content-length": "5"},
            body=b"hello",
        )
    ]
    server.send(1, [(":status", "200"), ("x-a", "b")], b"olleh")
    at_client, _ = pump(client, server)
    assert at_client == [
        MessageReceived(stream_id=1, headers={":status": "200", "x-a": "b"}, body=b"olleh")
    ]
    assert client.open_streams == server.open_streams == 0


def test_repeated_heads_are_checked_once_but_handed_out_fresh() -> None:
    server = server_after_preface()
    head = block([*REQUEST, ("x-a", "1")])
    bad = block([*REQUEST, ("connection", "close")])
    first, second = (
        server.receive(frame(h2core.HEADERS, 5, stream_id, head))[0] for stream_id in (1, 3)
    )
    assert isinstance(first, MessageReceived) and isinstance(second, MessageReceived)
    assert first.headers == second.headers and first.headers is not second.headers
    for stream_id in (5, 7):  # a malformed head stays malformed when it comes again
        (reset,) = server.receive(frame(h2core.HEADERS, 5, stream_id, bad))
        assert isinstance(reset, StreamReset) and reset.error_code == h2core.PROTOCOL_ERROR


def test_settings_are_acknowledged_and_pings_answered() -> None:
    client = Connection(client_side=True)
    sent = frames(client.data_to_send())
    assert sent[0][:3] == (h2core.SETTINGS, 0, 0)
    assert sent[1][:3] == (h2core.WINDOW_UPDATE, 0, 0)
    client.receive(frame(h2core.SETTINGS, 0, 0) + frame(h2core.PING, 0, 0, b"12345678"))
    assert frames(client.data_to_send()) == [
        (h2core.SETTINGS, h2core.ACK, 0, b""),
        (h2core.PING, h2core.ACK, 0, b"12345678"),
    ]


def test_padding_continuation_and_priority_are_understood() -> None:
    server = server_after_preface()
    head = block([*REQUEST, ("x-long", "v" * 100)])
    padded = bytes([3]) + struct.pack(">LB", 0, 16) + head[:10] + b"\0\0\0"
    flags = h2core.PADDED | h2core.PRIORITY_FLAG
    data = (
        frame(h2core.HEADERS, flags, 1, padded)
        + frame(h2core.CONTINUATION, 0, 1, head[10:50])
        + frame(h2core.CONTINUATION, h2core.END_HEADERS, 1, head[50:])
        + frame(h2core.PRIORITY, 0, 1, struct.pack(">LB", 0, 1))
        + frame(h2core.DATA, h2core.PADDED | h2core.END_STREAM, 1, b"\x02ab\0\0")
    )
    (event,) = server.receive(data)
    assert isinstance(event, MessageReceived)
    assert event.body == b"ab" and event.headers["x-long"] == "v" * 100


def test_flow_control_holds_a_body_until_the_peer_opens_its_window() -> None:
    client = Connection(client_side=True)
    client.data_to_send()
    small = struct.pack(">HL", h2core.INITIAL_WINDOW_SIZE, 1000)
    client.receive(frame(h2core.SETTINGS, 0, 0, small))
    client.data_to_send()
    client.send(1, REQUEST, b"x" * 5000)
    sent = frames(client.data_to_send())
    assert [(k, len(p)) for k, _, _, p in sent if k == h2core.DATA] == [(h2core.DATA, 1000)]
    client.receive(frame(h2core.WINDOW_UPDATE, 0, 1, struct.pack(">L", 3000)))
    sent = frames(client.data_to_send())
    assert [len(p) for k, _, _, p in sent if k == h2core.DATA] == [3000]
    client.receive(frame(h2core.WINDOW_UPDATE, 0, 1, struct.pack(">L", 10_000)))
    ((kind, flags, _, payload),) = frames(client.data_to_send())
    assert (kind, flags, len(payload)) == (h2core.DATA, h2core.END_STREAM, 1000)


def test_a_body_waits_for_the_peers_first_settings() -> None:
    client = Connection(client_side=True)
    client.send(1, REQUEST, b"body")
    assert [k for k, *_ in frames(client.data_to_send())] == [
        h2core.SETTINGS,
        h2core.WINDOW_UPDATE,
        h2core.HEADERS,
    ]
    client.receive(frame(h2core.SETTINGS, 0, 0))
    assert [(k, p) for k, _, _, p in frames(client.data_to_send())] == [
        (h2core.SETTINGS, b""),
        (h2core.DATA, b"body"),
    ]


def test_the_connection_window_is_honoured_and_topped_up() -> None:
    client, server = connected()
    body = bytes(range(256)) * 40_000  # 10 MB: beyond the 65,535 default and half our window
    client.send(1, REQUEST, body)
    _, at_server = pump(client, server)
    assert [e.body for e in at_server if isinstance(e, MessageReceived)] == [body]


def test_a_stream_reset_by_the_peer_is_reported() -> None:
    client, server = connected()
    client.send(1, REQUEST, b"")
    pump(client, server)
    server.reset(1)
    at_client, _ = pump(client, server)
    assert at_client == [StreamReset(stream_id=1, error_code=h2core.CANCEL, remote=True)]


def test_goaway_is_reported_with_the_last_stream() -> None:
    client, server = connected()
    client.send(1, REQUEST, b"")
    pump(client, server)
    server.close()
    at_client, _ = pump(client, server)
    assert at_client == [ConnectionEnded(error_code=0, last_stream_id=1)]


# -- strict on receipt ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20, h2core.PROTOCOL_ERROR),
        (PREFACE + frame(h2core.PING, 0, 0, bytes(8)), h2core.PROTOCOL_ERROR),
    ],
    ids=["not-a-preface", "first-frame-not-settings"],
)
def test_a_bad_start_is_a_connection_error(data: bytes, code: int) -> None:
    server = Connection(client_side=False)
    with pytest.raises(H2ProtocolError) as caught:
        server.receive(data)
    assert caught.value.error_code == code
    assert frames(server.data_to_send())[-1][0] == h2core.GOAWAY


CONNECTION_ERRORS = {
    "data-on-stream-0": (frame(h2core.DATA, 0, 0, b"x"), h2core.PROTOCOL_ERROR),
    "data-on-idle-stream": (frame(h2core.DATA, 0, 5, b"x"), h2core.PROTOCOL_ERROR),
    "headers-on-even-stream": (frame(h2core.HEADERS, 5, 2, block(REQUEST)), h2core.PROTOCOL_ERROR),
    "settings-on-a-stream": (frame(h2core.SETTINGS, 0, 1), h2core.PROTOCOL_ERROR),
    "settings-bad-length": (frame(h2core.SETTINGS, 0, 0, b"\0\0\0"), h2core.FRAME_SIZE_ERROR),
    "settings-ack-with-payload": (
        frame(h2core.SETTINGS, h2core.ACK, 0, bytes(6)),
        h2core.FRAME_SIZE_ERROR,
    ),
    "settings-push-2": (
        frame(h2core.SETTINGS, 0, 0, struct.pack(">HL", h2core.ENABLE_PUSH, 2)),
        h2core.PROTOCOL_ERROR,
    ),
    "settings-window-too-large": (
        frame(h2core.SETTINGS, 0, 0, struct.pack(">HL", h2core.INITIAL_WINDOW_SIZE, 1 << 31)),
        h2core.FLOW_CONTROL_ERROR,
    ),
    "settings-frame-too-small": (
        frame(h2core.SETTINGS, 0, 0, struct.pack(">HL", h2core.MAX_FRAME_SIZE, 100)),
        h2core.PROTOCOL_ERROR,
    ),
    "ping-bad-length": (frame(h2core.PING, 0, 0, b"1234"), h2core.FRAME_SIZE_ERROR),
    "ping-on-a-stream": (frame(h2core.PING, 0, 1, bytes(8)), h2core.PROTOCOL_ERROR),
    "push-promise": (frame(h2core.PUSH_PROMISE, 4, 1, bytes(4)), h2core.PROTOCOL_ERROR),
    "frame-too-large": (frame(h2core.DATA, 0, 1, bytes(20_000)), h2core.FRAME_SIZE_ERROR),
    "window-update-0": (
        frame(h2core.WINDOW_UPDATE, 0, 0, bytes(4)),
        h2core.PROTOCOL_ERROR,
    ),
    "window-overflow": (
        frame(h2core.WINDOW_UPDATE, 0, 0, struct.pack(">L", (1 << 31) - 1)),
        h2core.FLOW_CONTROL_ERROR,
    ),
    "rst-stream-on-idle": (frame(h2core.RST_STREAM, 0, 7, bytes(4)), h2core.PROTOCOL_ERROR),
    "rst-stream-bad-length": (frame(h2core.RST_STREAM, 0, 1, bytes(3)), h2core.FRAME_SIZE_ERROR),
    "goaway-short": (frame(h2core.GOAWAY, 0, 0, bytes(4)), h2core.FRAME_SIZE_ERROR),
    "continuation-alone": (
        frame(h2core.CONTINUATION, h2core.END_HEADERS, 1, b""),
        h2core.PROTOCOL_ERROR,
    ),
    "headers-interrupted": (
        frame(h2core.HEADERS, 0, 1, block(REQUEST)) + frame(h2core.PING, 0, 0, bytes(8)),
        h2core.PROTOCOL_ERROR,
    ),
    "padding-too-long": (
        frame(h2core.HEADERS, h2core.PADDED | h2core.END_HEADERS, 1, b"\x09abc"),
        h2core.PROTOCOL_ERROR,
    ),
    "bad-hpack-index": (
        frame(h2core.HEADERS, h2core.END_HEADERS, 1, b"\xff\x10"),
        h2core.COMPRESSION_ERROR,
    ),
    "stream-id-goes-down": (
        frame(h2core.HEADERS, 5, 5, block(REQUEST)) + frame(h2core.HEADERS, 5, 3, block(REQUEST)),
        h2core.STREAM_CLOSED,
    ),
    "data-beyond-the-connection-window": (
        b"".join(
            frame(h2core.HEADERS, 4, i, block(REQUEST))
            + frame(h2core.DATA, 0, i, bytes(16_384)) * 513
            for i in (1, 3)
        ),
        h2core.FLOW_CONTROL_ERROR,
    ),
}


@pytest.mark.parametrize("name", sorted(CONNECTION_ERRORS))
def test_a_broken_frame_is_a_connection_error(name: str) -> None:
    data, code = CONNECTION_ERRORS[name]
    server = server_after_preface()
    with pytest.raises(H2ProtocolError) as caught:
        server.receive(data)
    assert caught.value.error_code == code
    kind, _, _, payload = frames(server.data_to_send())[-1]
    assert kind == h2core.GOAWAY and struct.unpack_from(">L", payload, 4)[0] == code
    assert server.closed and server.receive(frame(h2core.PING, 0, 0, bytes(8))) == []


STREAM_ERRORS = {
    "missing-path": REQUEST[:3],
    "status-in-request": [*REQUEST, (":status", "200")],
    "pseudo-after-regular": [("x-a", "1"), *REQUEST],
    "duplicate-pseudo": [*REQUEST, (":path", "/y")],
    "connection-header": [*REQUEST, ("connection", "keep-alive")],
    "te-not-trailers": [*REQUEST, ("te", "gzip")],
    "newline-in-value": [*REQUEST, ("x-a", "1\r\nx-b: 2")],
    "space-around-value": [*REQUEST, ("x-a", " 1")],
    "content-length-mismatch": [*REQUEST, ("content-length", "3")],
}


UPPERCASE = block(REQUEST) + b"\x00\x05X-Big\x011"  # our encoder cannot write this


@pytest.mark.parametrize("name", [*sorted(STREAM_ERRORS), "uppercase-name"])
def test_a_malformed_request_resets_its_stream_only(name: str) -> None:
    server = server_after_preface()
    head = block(STREAM_ERRORS[name]) if name in STREAM_ERRORS else UPPERCASE
    events = server.receive(frame(h2core.HEADERS, 5, 1, head))
    assert events == [StreamReset(stream_id=1, error_code=h2core.PROTOCOL_ERROR, remote=False)]
    assert frames(server.data_to_send()) == [
        (h2core.RST_STREAM, 0, 1, struct.pack(">L", h2core.PROTOCOL_ERROR))
    ]
    (ok,) = server.receive(frame(h2core.HEADERS, 5, 3, block(REQUEST)))
    assert isinstance(ok, MessageReceived) and ok.stream_id == 3


def test_data_after_end_stream_resets_the_stream() -> None:
    server = server_after_preface()
    server.receive(frame(h2core.HEADERS, 5, 1, block(REQUEST)))
    events = server.receive(frame(h2core.DATA, 0, 1, b"late"))
    assert events == [StreamReset(stream_id=1, error_code=h2core.STREAM_CLOSED, remote=False)]


def test_frames_for_a_stream_we_reset_are_ignored() -> None:
    server = server_after_preface()
    server.receive(frame(h2core.HEADERS, 4, 1, block(REQUEST)))
    server.reset(1)
    server.data_to_send()
    assert server.receive(frame(h2core.DATA, h2core.END_STREAM, 1, b"in flight")) == []
    assert server.data_to_send() == b""


def test_unknown_frame_types_and_settings_are_ignored() -> None:
    server = server_after_preface()
    unknown = frame(0x42, 0xFF, 0, b"whatever") + frame(h2core.SETTINGS, 0, 0, bytes(6) + b"\0")
    with pytest.raises(H2ProtocolError):  # the SETTINGS has 7 bytes: a real error after all
        server.receive(unknown)
    server = server_after_preface()
    events = server.receive(
        frame(0x42, 0xFF, 0, b"whatever") + frame(h2core.SETTINGS, 0, 0, b"\x00\x99" + bytes(4))
    )
    assert events == [] and frames(server.data_to_send()) == [(h2core.SETTINGS, h2core.ACK, 0, b"")]


def test_too_many_streams_are_refused() -> None:
    server = server_after_preface()
    opened = b"".join(
        frame(h2core.HEADERS, 4, 2 * i + 1, block(REQUEST)) for i in range(h2core.MAX_STREAMS + 1)
    )
    assert server.receive(opened) == []
    refused = struct.pack(">L", h2core.REFUSED_STREAM)
    assert frames(server.data_to_send()) == [
        (h2core.RST_STREAM, 0, 2 * h2core.MAX_STREAMS + 1, refused)
    ]


def test_bytes_may_arrive_one_at_a_time() -> None:
    client, server = Connection(client_side=True), Connection(client_side=False)
    events = []
    for byte in client.data_to_send():  # preface and SETTINGS
        events += server.receive(bytes([byte]))
    client.receive(server.data_to_send())
    client.send(1, REQUEST, b"body")
    for byte in client.data_to_send():
        events += server.receive(bytes([byte]))
    assert [e.body for e in events if isinstance(e, MessageReceived)] == [b"body"]


# -- interoperability with the h2 library, both roles --------------------------------------------
def h2lib(client_side: bool, local: dict[int, int] | None = None) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
    )
    conn.initiate_connection()
    if local:
        conn.update_settings(local)
    return conn


def test_our_client_against_an_h2_library_server_with_a_small_window() -> None:
    theirs = h2lib(False, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    ours = Connection(client_side=True)
    ours.receive(theirs.data_to_send())  # (the library never reopens a window its own
    theirs.receive_data(ours.data_to_send())  # SETTINGS made negative: settle them first)
    body = b"y" * 200_000  # far beyond their window: we must wait for WINDOW_UPDATEs
    ours.send(1, [*REQUEST, ("content-length", str(len(body)))], body)
    received = bytearray()
    done = False
    while not done:
        data = ours.data_to_send()
        assert data, "our client stalled"
        for event in theirs.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                received += event.data
                theirs.acknowledge_received_data(event.flow_controlled_length, 1)
            done = done or isinstance(event, h2.events.StreamEnded)
        assert ours.receive(theirs.data_to_send()) == []
    assert received == body
    theirs.send_headers(1, [(":status", "201"), ("content-length", "2")])
    theirs.send_data(1, b"ok", end_stream=True)
    (answer,) = ours.receive(theirs.data_to_send())
    assert answer == MessageReceived(
        stream_id=1, headers={":status": "201", "content-length": "2"}, body=b"ok"
    )


def test_an_h2_library_client_against_our_server() -> None:
    theirs = h2lib(True)  # default 65,535-byte windows: our answers must wait for its updates
    ours = Connection(client_side=False)
    ours.receive(theirs.data_to_send())
    theirs.receive_data(ours.data_to_send())
    bodies = {}
    for i in range(50):  # the library's HPACK encoder indexes: our decoder must follow
        stream_id = theirs.get_next_available_stream_id()
        body = bodies[stream_id] = str(i).encode() * 3000
        theirs.send_headers(stream_id, [*REQUEST, ("x-n", str(i % 7))])
        for start in range(0, len(body), 16_384):
            end = start + 16_384 >= len(body)
            theirs.send_data(stream_id, body[start : start + 16_384], end_stream=end)
    events = ours.receive(theirs.data_to_send())
    assert {e.stream_id: e.body for e in events if isinstance(e, MessageReceived)} == bodies
    for stream_id, body in bodies.items():
        ours.send(stream_id, [(":status", "200")], body[::-1])
    answers: dict[int, bytes] = dict.fromkeys(bodies, b"")
    ended: set[int] = set()
    while len(ended) < len(bodies):
        data = ours.data_to_send()
        assert data, "our server stalled"
        for event in theirs.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                answers[event.stream_id] += event.data
                theirs.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
        assert ours.receive(theirs.data_to_send()) == []
    assert answers == {k: v[::-1] for k, v in bodies.items()}
    assert ours.open_streams == 0


# -- fuzzing -------------------------------------------------------------------------------------
frame_kinds = st.sampled_from([*range(10), 0x42])
fuzz_frames = st.lists(
    st.tuples(frame_kinds, st.integers(0, 255), st.integers(0, 9), st.binary(max_size=64)),
    max_size=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_frames, st.booleans())
def test_fuzzed_frames_give_events_or_a_protocol_error(
    parts: list[tuple[int, int, int, bytes]], client_side: bool
) -> None:
    conn = Connection(client_side=client_side)
    if client_side:
        conn.send(1, REQUEST, b"x")
        conn.receive(frame(h2core.SETTINGS, 0, 0))
    else:
        conn = server_after_preface()
        conn.receive(frame(h2core.HEADERS, 4, 1, block(REQUEST)))
    data = b"".join(frame(kind, flags, sid, payload) for kind, flags, sid, payload in parts)
    try:
        events = conn.receive(data)
    except H2ProtocolError:
        assert conn.closed and frames(conn.data_to_send())[-1][0] == h2core.GOAWAY
    else:
        assert all(isinstance(e, MessageReceived | StreamReset | ConnectionEnded) for e in events)
        frames(conn.data_to_send())  # whatever it answered is well-framed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_bytes_after_the_preface(data: bytes) -> None:
    server = Connection(client_side=False)
    try:
        server.receive(PREFACE + frame(h2core.SETTINGS, 0, 0) + data)
    except H2ProtocolError:
        assert server.closed


# -- HPACK ---------------------------------------------------------------------------------------
field_names = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
field_values = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80)
header_lists = st.lists(st.tuples(field_names, field_values), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=10), st.booleans(), st.integers(0, 4096))
def test_hpack_decoder_agrees_with_the_library(
    lists: list[list[tuple[str, str]]], huffman: bool, table: int
) -> None:
    encoder, theirs, ours = hpack.Encoder(), hpack.Decoder(), Decoder()
    encoder.header_table_size = table
    for headers in lists:
        data = encoder.encode(headers, huffman=huffman)
        assert ours.decode(data) == [(bytes(n), bytes(v)) for n, v in theirs.decode(data, raw=True)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_hpack_decoder_fails_cleanly_on_garbage(data: bytes) -> None:
    with contextlib.suppress(HpackError):
        Decoder().decode(data)


def test_our_hpack_encoding_decodes_in_the_library() -> None:
    headers = [*REQUEST, (":status", "200"), ("content-type", "application/json"), ("x-" * 40, "é")]
    data = b"\x20" + block(headers)
    assert hpack.Decoder().decode(data) == headers
    assert Decoder().decode(data) == [(n.encode(), v.encode()) for n, v in headers]
