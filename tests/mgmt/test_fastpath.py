"""The agents' fast path for authPriv GETs (appliance.snmp.fastpath and .responder), with
pysnmp as the peer that builds the requests and checks the answers.

A node agent runs on its own event loop for the module; a pysnmp client engine discovers
it over UDP, then its transport is swapped for a list so that pysnmp encodes, signs and
encrypts requests that the tests hold as bytes (a GET, a GETNEXT). The fast path must
take the GET, answer it in a message that pysnmp accepts (digest, decryption, value), and
refuse everything else to pysnmp: any single changed octet, a message outside the time
window, other PDUs (a SET here: the node agent takes none), garbage (fuzzed). The AAA
agent's SETs through the fast path: tests/aaa/test_agent.py (net-snmp's snmpset)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdgen
from pysnmp.proto import rfc1902

from appliance.mgmt import mib
from appliance.mgmt.agent import Agent, AgentConfig
from appliance.mgmt.nodeview import NodeReading
from appliance.snmp import fastpath, responder
from appliance.snmp.usm import AUTH, PRIV
from tests.mgmt.test_agent import LINK
from tests.mgmt.test_agent import MANAGER as USER

LEVEL = (*mib.oid("qkdnLinkKeyLevel"), 9)


def _reading() -> NodeReading:
    return NodeReading(
        id=8,
        name="ckms-minden",
        role="ckms",
        software="qkdn 0.1.0",
        links=(dataclasses.replace(LINK, level=4242),),
        requests=3,
    )


@dataclasses.dataclass
class Peer:
    loop: asyncio.AbstractEventLoop
    agent: Agent
    fast: responder.FastPath
    client: engine.SnmpEngine
    transport: Any
    answers: dict[int, Any]
    get: bytes
    next: bytes
    set: bytes
    bulk: bytes

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)


async def _client(port: int, answers: dict[int, Any]) -> tuple[engine.SnmpEngine, Any]:
    eng = engine.SnmpEngine()
    config.add_v3_user(eng, USER.user, AUTH, USER.auth, PRIV, USER.priv)
    config.add_target_parameters(eng, "p", USER.user, "authPriv")
    transport = udp.UdpAsyncioTransport().open_client_mode()
    config.add_transport(eng, config.SNMP_UDP_DOMAIN, transport)
    config.add_target_address(
        eng, "a", config.SNMP_UDP_DOMAIN, ("127.0.0.1", port), "p", timeout=6000, retryCount=2
    )

    def done(_e: Any, _h: Any, err: Any, status: Any, _i: Any, vbs: Any, key: Any) -> None:
        answers[key] = (err, status, vbs)

    cmdgen.GetCommandGenerator().send_varbinds(eng, "a", None, "", [(LEVEL, None)], done, 0)
    for _ in range(600):  # discovery and the first GET: bounded, ~30 s at most
        if 0 in answers:
            break
        await asyncio.sleep(0.05)
    return eng, transport


def _captured(peer_transport: Any, send: Any) -> bytes:
    """What pysnmp sends for ``send()``, kept instead of sent."""
    kept: list[bytes] = []
    real = peer_transport.send_message
    peer_transport.send_message = lambda msg, _addr: kept.append(bytes(msg))
    try:
        send()
    finally:
        peer_transport.send_message = real
    assert len(kept) == 1
    return kept[0]


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    answers: dict[int, Any] = {}

    async def start() -> Peer:
        agent = Agent("ckms-minden", _reading, AgentConfig(users=[USER]))
        port = await agent.start()
        client, transport = await _client(port, answers)
        assert agent.served is not None
        get, nxt = cmdgen.GetCommandGenerator(), cmdgen.NextCommandGenerator()
        setter, bulk = cmdgen.SetCommandGenerator(), cmdgen.BulkCommandGenerator()
        level = [(LEVEL, rfc1902.Unsigned32(7))]
        arc = [(mib.QKDN_ARC, None)]

        def cb(_e: Any, _h: Any, err: Any, status: Any, _i: Any, vbs: Any, key: Any) -> None:
            answers[key] = (err, status, vbs)

        return Peer(
            loop,
            agent,
            agent.served.fast,
            client,
            transport,
            answers,
            _captured(
                transport, lambda: get.send_varbinds(client, "a", None, "", [(LEVEL, None)], cb, 1)
            ),
            _captured(
                transport, lambda: nxt.send_varbinds(client, "a", None, "", [(LEVEL, None)], cb, 2)
            ),
            _captured(transport, lambda: setter.send_varbinds(client, "a", None, "", level, cb, 3)),
            _captured(
                transport, lambda: bulk.send_varbinds(client, "a", None, "", 0, 50, arc, cb, 4)
            ),
        )

    p = asyncio.run_coroutine_threadsafe(start(), loop).result(90)
    yield p

    async def stop() -> None:
        p.client.close_dispatcher()
        await p.agent.close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def test_pysnmp_discovers_through_pysnmp_then_its_get_is_answered_on_the_fast_path(peer: Peer):
    err, status, vbs = peer.answers[0]
    assert not err and not status and int(vbs[0][1]) == 4242
    boots, now = peer.fast.clock()
    get = fastpath.open_request(peer.get, peer.fast.engine, boots, now)
    assert get is not None and get.oids == [LEVEL] and get.user.name == b"manager-8"
    assert get.pdu == fastpath.GET and get.values == [fastpath.NULL]


def test_a_held_get_sent_as_bytes_is_answered_and_pysnmp_accepts_the_answer(peer: Peer):
    before = peer.fast.answered
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(30)
        s.connect(("127.0.0.1", peer.agent.port))
        s.send(peer.get)
        reply = s.recv(65536)

    async def check() -> None:
        receive = peer.client.transport_dispatcher._callback_function  # the socket's entry
        receive(peer.transport, ("127.0.0.1", peer.agent.port), reply)

    peer.run(check())
    err, status, vbs = peer.answers[1]
    assert not err and not status and tuple(vbs[0][0]) == LEVEL and int(vbs[0][1]) == 4242
    assert peer.fast.answered == before + 1


def _exchange(peer: Peer, request: bytes) -> None:
    """``request`` sent to the agent as bytes, its reply handed to the pysnmp client."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(30)
        s.connect(("127.0.0.1", peer.agent.port))
        s.send(request)
        reply = s.recv(65536)

    async def check() -> None:
        receive = peer.client.transport_dispatcher._callback_function  # the socket's entry
        receive(peer.transport, ("127.0.0.1", peer.agent.port), reply)

    peer.run(check())


def test_a_held_getbulk_is_answered_as_pysnmp_answers_it(peer: Peer):
    boots, now = peer.fast.clock()
    opened = fastpath.open_request(peer.bulk, peer.fast.engine, boots, now)
    assert opened is not None and opened.pdu == fastpath.GETBULK
    assert (opened.non_repeaters, opened.max_repetitions, opened.oids) == (0, 50, [mib.QKDN_ARC])
    before = peer.fast.answered
    _exchange(peer, peer.bulk)
    err, status, vbs = peer.answers[4]
    assert not err and not status and peer.fast.answered == before + 1
    names = [tuple(name) for name, _ in vbs]
    assert len(names) == 50 and names == sorted(set(names))  # 50 repetitions, in order
    assert int(dict(zip(names, (v for _, v in vbs), strict=True))[LEVEL]) == 4242
    ours = [n for n in names if n[: len(mib.QKDN_ARC)] == mib.QKDN_ARC]
    # the repetitions past QKDN-MIB are pysnmp's own instances, after ours, as pysnmp walks
    assert 30 <= len(ours) < 50 and names[: len(ours)] == ours


def test_other_pdus_and_untimely_messages_are_left_to_pysnmp(peer: Peer):
    boots, now = peer.fast.clock()
    assert fastpath.open_request(peer.next, peer.fast.engine, boots, now) is None
    opened = fastpath.open_request(peer.set, peer.fast.engine, boots, now)
    assert opened is not None and opened.pdu == fastpath.SET
    assert opened.values == [(0x42, b"\x07")]  # Unsigned32 7, as pysnmp encoded it
    assert peer.fast.answer(peer.set) is None  # the node agent takes no SET: pysnmp's
    assert (
        fastpath.open_request(peer.get, peer.fast.engine, boots, now + fastpath.WINDOW_S + 5)
        is None
    )
    assert fastpath.open_request(peer.get, peer.fast.engine, boots + 1, now) is None
    assert fastpath.open_request(peer.get + b"\x00", peer.fast.engine, boots, now) is None
    stranger = dataclasses.replace(peer.fast.engine, users={})
    assert fastpath.open_request(peer.get, stranger, boots, now) is None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_changed_octet_is_refused(peer: Peer, data: st.DataObject):
    boots, now = peer.fast.clock()
    at = data.draw(st.integers(0, len(peer.get) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = bytearray(peer.get)
    changed[at] ^= flip
    assert fastpath.open_request(bytes(changed), peer.fast.engine, boots, now) is None
    cut = data.draw(st.integers(0, len(peer.get) - 1))
    assert fastpath.open_request(peer.get[:cut], peer.fast.engine, boots, now) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(peer: Peer, blob: bytes):
    boots, now = peer.fast.clock()
    assert fastpath.open_request(blob, peer.fast.engine, boots, now) is None
    assert fastpath.open_request(b"\x30\x82" + blob, peer.fast.engine, boots, now) is None


def test_ber_integers_and_object_identifiers_round_trip():
    for value in (0, 1, 127, 128, 255, 256, -1, -128, -129, 2**31 - 1, 2**32 - 1, 2**64 - 1):
        raw = fastpath.integer(value)
        assert int.from_bytes(raw, "big", signed=True) == value
        assert len(raw) == 1 or raw[0] not in (0, 0xFF) or (raw[0] == 0) != (raw[1] < 0x80)
    for oid in ((1, 3, 6, 1, 4, 1, 32473, 1), (2, 999, 3), (0, 39), (1, 3, 2**32 - 1)):
        assert fastpath.decode_oid(fastpath.oid_content(oid)) == oid
