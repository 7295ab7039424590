"""The HTTP/1.1 server session, without sockets: every outcome is a well-formed response
with a JSON body or a clean close; bodies are bounded before they are held; half-sent
requests and idle connections time out on the loop's clock (moved by the test, never
waited for); each client certificate holds a bounded number of connections."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.net.h2 import Request, Response
from appliance.net.http1 import MAX_BODY, MAX_PIPELINED
from tests.net.h1_driver import FakeTransport, exchange, replies, server, split
from tests.net.test_http1 import CHUNKED, CHUNKED_HEAD, GET, POST, mutated

FINAL = {200, 400, 408, 413, 431, 503, 505}


async def echo(request: Request) -> Response:
    doc = {"method": request.method, "path": request.path, "size": len(request.body)}
    return Response(200, json.dumps(doc).encode(), {"content-type": "application/json"})


def run(pieces: list[bytes], **options: Any) -> FakeTransport:
    settle = options.pop("settle", True)
    return asyncio.run(exchange(server(echo, **options), pieces, settle=settle))


def check_well_formed(transport: FakeTransport) -> list[Any]:
    """Every response is whole, final ones have a JSON body (errors: message and details),
    and a response that says close is the last one, on a closed connection."""
    got = replies(bytes(transport.out))
    final = [r for r in got if r.status != 100]
    for i, reply in enumerate(final):
        assert reply.status in FINAL and reply.headers["content-type"] == "application/json"
        doc = reply.json()
        if reply.status != 200:
            assert isinstance(doc["message"], str)
            assert doc["details"] and all(isinstance(d, dict) for d in doc["details"])
        if reply.headers.get("connection") == "close":
            assert i == len(final) - 1 and transport.closed
    return final


def test_a_superscript_length_gets_a_json_400_and_a_close():
    transport = run(["POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ²\r\n\r\n".encode("latin-1")])
    (reply,) = check_well_formed(transport)
    assert reply.status == 400 and "Content-Length" in reply.json()["details"][0]["reason"]


def test_lf_only_line_ends_are_refused_at_once_not_waited_on():
    transport = run([b"GET / HTTP/1.1\nHost: a\n\n"])
    (reply,) = check_well_formed(transport)
    assert reply.status == 400 and transport.closed


def test_requests_before_a_fault_are_answered_then_the_refusal():
    transport = run([GET + POST + b"GET / HTTP/1.1\nHost: a\n\n"])
    assert [r.status for r in check_well_formed(transport)] == [200, 200, 400]


def test_a_4_gib_chunk_gets_413_and_a_close_with_the_held_bytes_bounded():
    async def scenario() -> tuple[FakeTransport, int, int]:
        srv = server(echo)
        transport = FakeTransport("sae-1")
        session: Any = srv._session()
        session.connection_made(transport)
        session.data_received(CHUNKED_HEAD + b"FFFFFFFF\r\n")
        piece, sent = b"k" * (64 << 10), 0
        tracemalloc.start()
        try:
            while not transport.closed and sent < 16 * MAX_BODY:
                session.data_received(piece)
                sent += len(piece)
                await asyncio.sleep(0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        session.connection_lost(None)
        return transport, sent, peak

    transport, sent, peak = asyncio.run(scenario())
    (reply,) = check_well_formed(transport)
    assert reply.status == 413 and transport.closed
    assert sent <= MAX_BODY + (64 << 10) and peak < MAX_BODY + (512 << 10)


def test_a_body_too_large_for_its_length_is_refused_before_100_continue():
    head = b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n"
    transport = run([head])
    assert [r.status for r in replies(bytes(transport.out))] == [413]


def test_100_continue_is_sent_once_earlier_requests_are_answered():
    head = b"POST /c HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    transport = run([GET + head, b"{}"])  # the 100 must not come before the GET's answer
    check_well_formed(transport)
    assert [r.status for r in replies(bytes(transport.out))] == [200, 100, 200]
    transport = run([head, b"{}"])
    assert [r.status for r in replies(bytes(transport.out))] == [100, 200]


def test_pipelined_requests_past_the_limit_are_refused_after_the_others():
    transport = run([GET * (MAX_PIPELINED + 1)], settle=False)
    statuses = [r.status for r in check_well_formed(transport)]
    assert statuses == [200] * MAX_PIPELINED + [400]


def test_a_handler_failure_is_a_json_503_and_the_connection_goes_on(caplog):
    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    transport = asyncio.run(exchange(server(broken), [GET, GET]))
    assert [r.status for r in check_well_formed(transport)] == [503, 503]
    assert not transport.closed  # the session did not end the connection
    assert [r.message for r in caplog.records] == ["request handler failed"] * 2


# -- fuzzing --------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=300), mutated(), st.just(GET + POST + CHUNKED)),
    cuts=st.lists(st.integers(0, 500), max_size=8),
    settle=st.booleans(),
)
def test_fuzzed_bytes_get_well_formed_answers_or_a_clean_close(data, cuts, settle):
    transport = run(split(data, cuts), settle=settle)  # an exception here fails the test
    check_well_formed(transport)


# -- deadlines, on a loop whose clock the test moves ----------------------------------------
class SkewLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock the test moves forward: timers fall due without waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.skew = 0.0

    def time(self) -> float:
        return super().time() + self.skew


async def later(seconds: float) -> None:
    """Move the loop's clock on and let due timers run."""
    loop: Any = asyncio.get_running_loop()
    loop.skew += seconds
    for _ in range(5):
        await asyncio.sleep(0)


def on_skewed_loop(scenario: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=SkewLoop) as runner:
        runner.run(scenario())


def open_session(**options: Any) -> tuple[Any, FakeTransport]:
    transport = FakeTransport("sae-1")
    session: Any = server(echo, request_timeout=10.0, idle_timeout=60.0, **options)._session()
    session.connection_made(transport)
    return session, transport


def test_a_half_sent_head_gets_408_and_a_close_at_its_deadline():
    async def scenario() -> None:
        session, transport = open_session()
        session.data_received(GET[:20])
        await later(9.5)
        assert not transport.closed and not transport.out
        await later(1.0)
        (reply,) = check_well_formed(transport)
        assert reply.status == 408 and transport.closed

    on_skewed_loop(scenario)


def test_a_head_trickled_a_byte_at_a_time_still_times_out():
    async def scenario() -> None:
        session, transport = open_session()
        for byte in GET[:12]:
            session.data_received(bytes([byte]))
            await later(1.0)
        assert [r.status for r in check_well_formed(transport)] == [408]

    on_skewed_loop(scenario)


def test_a_request_begun_while_idle_gets_its_own_shorter_deadline():
    async def scenario() -> None:
        session, transport = open_session()
        await later(30.0)  # idle: the idle deadline is at 60
        session.data_received(GET[:20])
        await later(10.5)  # 40.5: the request's deadline (40) has passed
        assert [r.status for r in check_well_formed(transport)] == [408]

    on_skewed_loop(scenario)


def test_an_idle_connection_is_closed_quietly_and_each_answer_restarts_its_clock():
    async def scenario() -> None:
        session, transport = open_session()
        await later(50.0)
        session.data_received(GET)
        await later(0)
        await later(50.0)  # 100 s open, 50 s idle since the answer
        assert not transport.closed
        session.data_received(b"\r\n")  # no request begins: the idle clock goes on
        await later(10.5)
        assert transport.closed and [r.status for r in replies(bytes(transport.out))] == [200]

    on_skewed_loop(scenario)


def test_no_deadline_runs_while_the_handler_works():
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        await release.wait()
        return await echo(request)

    async def scenario() -> None:
        transport = FakeTransport("sae-1")
        session: Any = server(slow, request_timeout=10.0, idle_timeout=60.0)._session()
        session.connection_made(transport)
        session.data_received(GET)
        await later(300.0)
        assert not transport.closed
        release.set()
        await later(0)
        await later(59.0)
        assert not transport.closed and [r.status for r in replies(bytes(transport.out))] == [200]
        await later(1.5)
        assert transport.closed

    on_skewed_loop(scenario)


# -- connections per client certificate ------------------------------------------------------
def test_connections_past_the_cap_of_one_certificate_get_503_and_a_close():
    async def scenario() -> None:
        srv = server(echo, max_per_sae=2)
        sessions: list[tuple[Any, FakeTransport]] = []
        for peer in ("sae-1", "sae-1", "sae-1", "sae-2"):
            transport = FakeTransport(peer)
            session: Any = srv._session()
            session.connection_made(transport)
            session.data_received(GET)
            sessions.append((session, transport))
        await later(0)
        statuses = [[r.status for r in check_well_formed(t)] for _, t in sessions]
        assert statuses == [[200], [200], [503], [200]]
        assert "connections" in replies(bytes(sessions[2][1].out))[0].json()["message"]
        for session, _ in sessions[:3]:  # the refused one does not hold a place
            session.connection_lost(None)
        again = [FakeTransport("sae-1") for _ in range(3)]
        for transport in again:
            session = srv._session()
            session.connection_made(transport)
            session.data_received(GET)
        await later(0)
        assert [[r.status for r in replies(bytes(t.out))] for t in again] == [[200], [200], [503]]

    on_skewed_loop(scenario)
