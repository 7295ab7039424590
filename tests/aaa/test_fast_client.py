"""The AKMS's fast SNMP client of AAA (``appliance.snmp.requester`` over the requester's
side of ``appliance.snmp.fastpath``): round trips with the real AAA agent answering on its
own fast path and through pysnmp, the refusals kept as pysnmp's, every changed octet of a
response refused, and the fall back to pysnmp on a Report (time window, unknown engine)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.aaa import mib
from appliance.aaa.client import AaaClient
from appliance.aaa.errors import SnmpError
from appliance.aaa.wallet import Terms
from appliance.snmp import fastpath
from appliance.snmp.requester import Known, Requester
from tests.aaa.agent_fixture import AKMS, Running, aaa

__all__ = ["aaa"]

ENGINE = bytes.fromhex("80004fb805716b646e2d74657374")
USER = fastpath.UserKeys(b"akms-2", bytes(range(32)), bytes(range(16, 32)))
PEER = fastpath.Peer(ENGINE, 3, 1000)
OID = (1, 3, 6, 1, 4, 1, 99999, 1, 2, 7)


def learnt(aaa: Running, akms: int = 2) -> AaaClient:
    """A client whose first request went through pysnmp: the engine is known."""
    client = aaa.client(akms)
    assert client.fast is not None and client.fast.known is None
    assert isinstance(aaa.call(client.ask(1, "alice-a", "alice-b", 1, 256)), Terms)
    assert client.fast.known is not None and client.fast.answered == 0
    return client


def report(aaa: Running, client: AaaClient, request: str) -> None:
    aaa.call(
        client.report(1, request, master="alice-a", slave="alice-b", outcome="delivered", keys=1)
    )


@pytest.mark.parametrize("agent_fast", [True, False], ids=["agent-fast-path", "agent-pysnmp"])
def test_asks_and_reports_round_trip_without_pysnmp_coding(aaa, monkeypatch, agent_fast):
    served = aaa.agent.served.fast
    if not agent_fast:
        monkeypatch.setattr(served, "answer", lambda data, address=None: None)
    client = learnt(aaa)
    before = served.answered
    terms = aaa.call(client.ask(1, "alice-a", "alice-b", 2, 512))
    assert isinstance(terms, Terms) and terms.keys == 2 and terms.contract == "alice-2026"
    report(aaa, client, "fast-1")
    report(aaa, client, "fast-1")  # a retried report counts once
    aaa.call(client.close_grant(1, terms.grant, 1, 256))
    assert client.fast.answered == 4 and client.fast.fallbacks == 0
    assert served.answered == before + (4 if agent_fast else 0)
    assert aaa.call(recorded(aaa, "1:fast-1")) == (1, 1)


async def recorded(aaa: Running, request: str) -> tuple[int, int]:
    """(keys of the report of ``request``, records for it) in AAA's accounting."""
    acct = aaa.agent.service.accounting
    got = acct.recorded(request)
    n = acct.db.execute("SELECT count(*) FROM records WHERE request=?", (request,)).fetchone()
    return (got.keys if got else 0), n[0]


def test_refusals_read_as_pysnmps(aaa):
    fast, slow = learnt(aaa), aaa.call(pysnmp_only(aaa))
    messages = []
    for client in (fast, slow):
        with pytest.raises(SnmpError) as outside:  # UKMS 15 sits behind AKMS 14
            aaa.call(client.ask(15, "alice-b", "alice-a", 1, 256))
        suspend = (*mib.oid("aaaUserSuspended"), 5, *b"alice")
        with pytest.raises(SnmpError) as refused:
            aaa.call(client._call(fastpath.SET, [(suspend, (0x02, b"\x01"))]))
        messages.append((outside.value.code, refused.value.message, refused.value.code))
    assert messages[0] == messages[1]
    assert messages[0][0] == "AAA-DENIED" and "noAccess" in messages[0][1]
    assert fast.fast.answered == 2 and slow.fast is None


async def pysnmp_only(aaa: Running) -> AaaClient:
    return AaaClient(f"127.0.0.1:{aaa.port}", AKMS[2], fast=False)


@pytest.mark.parametrize("skew", ["time", "engine"])
def test_a_report_hands_the_request_to_pysnmp_which_learns_again(aaa, skew):
    client = learnt(aaa)
    known = client.fast.known
    if skew == "time":  # the agent answers with notInTimeWindow (authNoPriv)
        known.time += 1000
    else:  # as after a restart of AAA: unknownEngineID (noAuth)
        known.engine_id = b"\x80\x00\x00\x00\x01stale"
    terms = aaa.call(client.ask(1, "alice-a", "alice-b", 1, 256))
    assert isinstance(terms, Terms)
    assert client.fast.fallbacks == 1 and client.fast.answered == 0
    assert client.fast.known is not None and client.fast.known.engine_id == aaa_engine(aaa)
    report(aaa, client, "after-fallback")  # and the next request is fast again
    assert client.fast.answered == 1 and client.fast.fallbacks == 1


def aaa_engine(aaa: Running) -> bytes:
    return aaa.agent.served.fast.engine.engine_id


def test_a_silent_aaa_is_unreachable_with_pysnmps_error_code(aaa):
    client = learnt(aaa)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        dead = Requester(silent.getsockname(), AKMS[2], timeout_s=0.05, retries=1)
        dead.known = client.fast.known
        client.fast = dead
        with pytest.raises(SnmpError) as err:
            aaa.call(client.ask(1, "alice-a", "alice-b", 1, 256))
        assert err.value.code == "AAA-UNREACHABLE" and dead.known is None
        assert len(drain(silent)) == 2  # the request and one retry
    finally:
        silent.close()
        aaa.call(_close(client))


async def _close(client: AaaClient) -> None:
    client.close()


def drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    got = []
    while True:
        try:
            got.append(sock.recv(65535))
        except BlockingIOError:
            return got


# -- sans-IO: the requester's side of fastpath ------------------------------------------
def exchange(pdu: int = fastpath.GET) -> tuple[bytes, fastpath.Request]:
    """A request sealed by the requester's side and opened by the agent's, and the
    agent's sealed response to it."""
    binds = [(OID, (0x05, b""))] if pdu == fastpath.GET else [(OID, (0x42, b"\x07"))]
    sent = fastpath.seal_request(pdu, 4242, 77, USER, PEER, b"saltsalt", binds)
    engine = fastpath.Engine(ENGINE, {USER.name: USER}, 65507)
    got = fastpath.open_request(sent, engine, PEER.boots, PEER.time + 2)
    assert got is not None and got.pdu == pdu and got.request_id == 77 and got.oids == [OID]
    reply = fastpath.response(got, engine, 3, 1002, b"pepper!!", [(OID, (0x04, b"grant 7"))])
    return reply, got


def test_a_sealed_request_opens_at_the_agent_and_its_response_at_the_requester():
    reply, _ = exchange(fastpath.SET)
    answer = fastpath.open_response(reply, USER, PEER, 4242, 77)
    assert answer == fastpath.Answer(3, 1002, 0, 0, [(OID, (0x04, b"grant 7"))])
    assert fastpath.message_id(reply) == 4242
    assert fastpath.open_response(reply, USER, PEER, 4243, 77) is None  # another msgID
    assert fastpath.open_response(reply, USER, PEER, 4242, 78) is None  # another request
    later = fastpath.Peer(ENGINE, 3, 1002 + fastpath.WINDOW_S + 1)
    assert fastpath.open_response(reply, USER, later, 4242, 77) is None  # untimely
    rebooted = fastpath.Peer(ENGINE, 4, 0)
    assert fastpath.open_response(reply, USER, rebooted, 4242, 77) is None


def test_a_response_with_any_changed_octet_is_refused():
    reply, _ = exchange()
    for i in range(len(reply)):
        for flip in (0x01, 0x80):
            bad = bytearray(reply)
            bad[i] ^= flip
            try:
                got = fastpath.open_response(bytes(bad), USER, PEER, 4242, 77)
            except fastpath.Fallback:
                continue  # the flags octet: a Report's, handed to pysnmp
            assert got is None, (i, flip)
    for cut in range(len(reply)):
        assert fastpath.open_response(reply[:cut], USER, PEER, 4242, 77) is None
    assert fastpath.open_response(reply + b"\x00", USER, PEER, 4242, 77) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_datagrams_are_refused(data):
    with contextlib.suppress(fastpath.Fallback):
        assert fastpath.open_response(data, USER, PEER, 4242, 77) is None


class TamperingAgent(asyncio.DatagramProtocol):
    """Answers each request twice: first with one octet changed, then as sealed."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        engine = fastpath.Engine(ENGINE, {USER.name: USER}, 65507)
        got = fastpath.open_request(data, engine, PEER.boots, PEER.time)
        assert got is not None
        reply = fastpath.response(got, engine, 3, 1001, b"pepper!!", [(OID, (0x04, b"ok"))])
        bad = bytearray(reply)
        bad[-40] ^= 0x01
        self.transport.sendto(bytes(bad), addr)
        self.transport.sendto(reply, addr)


def test_the_requester_discards_a_changed_response_and_takes_the_genuine_one():
    async def run() -> tuple[fastpath.Answer, Requester]:
        loop = asyncio.get_running_loop()
        agent, _ = await loop.create_datagram_endpoint(TamperingAgent, local_addr=("127.0.0.1", 0))
        requester = Requester(agent.get_extra_info("sockname"), AKMS[2], timeout_s=5, retries=0)
        requester.known = Known(USER, ENGINE, PEER.boots, PEER.time, time.monotonic())
        try:
            return await requester.request(fastpath.GET, [(OID, (0x05, b""))]), requester
        finally:
            requester.close()
            agent.close()

    answer, requester = asyncio.run(run())
    assert answer.binds == [(OID, (0x04, b"ok"))] and answer.time == 1001
    assert requester.discarded == 1 and requester.answered == 1
