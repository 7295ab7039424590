"""ETSI 004 key streams across a running DemoQuanDT network (one network for the module).

Our own 004 client (:mod:`appliance.sae004`, written from the frame layout) acts as two
SAEs, Berlin and Bonn: both open one stream, read the same chunks by index (each once),
and close it; a UKMS restarted in between keeps the stream. Malformed frames get their
status (or a closed connection) and never stop the server; the logs hold no key bits."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.kms import frames004 as f
from appliance.kms import keyids
from appliance.sae004 import Client004, Client004Error
from tests.kms.conftest import Net, poll, qkdn, running_net

SOURCE, DESTINATION = "sae-berlin-1", "sae-bonn-1"
OTHER = "sae-berlin-2"  # another user's SAE at the same UKMS as SOURCE
SLAVE_UKMS = "ukms-bonn"
JSON = "application/json"
QUICK = f.Qos(key_chunk_size=32, timeout=1500, metadata_mimetype=JSON)
"""GET_KEY waits 1.5 s at most for a chunk on its way; a stream idle that long expires."""
CONTRACT_CHUNK = 256 // 8
"""Bytes of the largest chunk the pair's contract allows (demoquandt.toml: 256-bit keys)."""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    # the key path (AAA included); the node agents and the manager are tests/mgmt's
    with running_net(tmp_path_factory, "--stock", "0", "--no-mgmt") as running:
        yield running


def client(net: Net, sae: str, timeout: float = 30) -> Client004:
    entry = net.sae(sae)
    host, port = entry["etsi004"].rsplit(":", 1)
    return Client004(
        host,
        int(port),
        cert=Path(entry["cert"]),
        key=Path(entry["key"]),
        ca=Path(entry["ca_cert"]),
        timeout=timeout,
    )


def open_both(net: Net, qos: f.Qos = QUICK) -> tuple[Client004, Client004, bytes]:
    a, b = client(net, SOURCE), client(net, DESTINATION)
    opened = a.open_connect(f"qkd://{SOURCE}", f"qkd://{DESTINATION}", qos)
    assert opened.status is f.Status.PEER_NOT_CONNECTED, opened
    assert opened.ksid != f.ZERO_KSID
    joined = b.open_connect(f"qkd://{SOURCE}", f"qkd://{DESTINATION}", qos, opened.ksid)
    assert joined.status in (f.Status.SUCCESS, f.Status.PEER_NOT_CONNECTED)
    assert joined.ksid == opened.ksid and joined.qos == opened.qos
    return a, b, opened.ksid


def test_both_saes_read_the_same_chunks_once_each_then_close(net):
    a, b, ksid = open_both(net)
    seen: list[bytes] = []
    with a, b:
        for index in range(6):
            x, y = a.get_key(ksid, index), b.get_key(ksid, index)
            assert x.status is y.status is f.Status.SUCCESS, (x, y)
            assert x.key == y.key and len(x.key) == 32
            assert x.metadata == y.metadata
            assert json.loads(x.metadata) == {"key_ID": keyids.stream_id(ksid, index)}
            seen.append(bytes(x.key))
        assert len(set(seen)) == len(seen)
        for end in (a, b):  # each index once per end
            assert end.get_key(ksid, 2).status is f.Status.INSUFFICIENT_KEY
        many = b.get_keys(ksid, list(range(6, 40)))  # pipelined
        assert [m.status for m in many] == [f.Status.SUCCESS] * 34
        assert [bytes(m.key) for m in a.get_keys(ksid, list(range(6, 40)))] == [
            bytes(m.key) for m in many
        ]
        assert b.get_key(ksid, 50, metadata_size=10).status is f.Status.METADATA_TOO_SMALL
        assert b.get_key(ksid, 50).status is f.Status.SUCCESS  # not spent by the refusal
        assert b.close(ksid).status is f.Status.SUCCESS
        assert b.get_key(ksid, 51).status is f.Status.GET_KEY_PEER_NOT_CONNECTED  # closed
        assert b.close(ksid).status is f.Status.GET_KEY_PEER_NOT_CONNECTED
        assert a.get_key(ksid, 51).status is f.Status.SUCCESS  # the other end still reads
        assert a.close(ksid).status is f.Status.SUCCESS
        assert a.get_key(ksid, 52).status is f.Status.GET_KEY_PEER_NOT_CONNECTED
    canary(net, seen)


def canary(net: Net, keys: list[bytes]) -> None:
    """No key bits, in hex or base64, in any node's log."""
    texts = [p.read_text(errors="replace") for p in sorted((net.dir / "logs").glob("*.log"))]
    assert texts
    for key in keys:
        for form in (key.hex(), key.hex().upper(), base64.b64encode(key).decode()):
            assert not any(form in text for text in texts), "key bits in a log"


def test_only_the_two_ends_may_open_or_read_a_stream(net):
    a, b, ksid = open_both(net)
    with a, b, client(net, OTHER) as other:
        for source, destination in ((SOURCE, DESTINATION), (OTHER, DESTINATION), (OTHER, OTHER)):
            answer = other.open_connect(source, destination, QUICK, ksid)
            assert answer.status is f.Status.NO_QKD_CONNECTION, (source, destination)
        assert other.get_key(ksid, 0).status is f.Status.GET_KEY_PEER_NOT_CONNECTED
        assert other.close(ksid).status is f.Status.GET_KEY_PEER_NOT_CONNECTED
        again = a.open_connect(SOURCE, DESTINATION, QUICK, ksid)
        assert again.status is f.Status.KSID_IN_USE
        assert a.get_key(ksid, 0).status is f.Status.SUCCESS  # nothing of the stream spent
        a.close(ksid), b.close(ksid)


def test_qos_not_met_answers_a_counter_proposal_within_the_contract(net):
    """The network runs AAA: the pair's contract allows keys of 256 bits at most, so the
    counter-proposal's chunk is 32 bytes (not the relay's 1,024), and its chunks are served
    (a larger chunk was granted before, and every GET_KEY got INSUFFICIENT_KEY)."""
    with client(net, SOURCE) as a, client(net, DESTINATION) as b:
        asked = f.Qos(key_chunk_size=4096, min_bps=10**10 % (1 << 32), metadata_mimetype="x/y")
        answer = a.open_connect(SOURCE, DESTINATION, asked)
        assert answer.status is f.Status.QOS_NOT_MET and answer.ksid == f.ZERO_KSID
        counter = answer.qos
        assert counter.key_chunk_size == CONTRACT_CHUNK and counter.metadata_mimetype == JSON
        assert 0 < counter.min_bps < asked.min_bps
        bigger = a.open_connect(SOURCE, DESTINATION, replace(QUICK, key_chunk_size=64))
        assert bigger.status is f.Status.QOS_NOT_MET
        assert bigger.qos.key_chunk_size == CONTRACT_CHUNK
        accepted = a.open_connect(SOURCE, DESTINATION, replace(QUICK, key_chunk_size=32))
        assert accepted.status is f.Status.PEER_NOT_CONNECTED
        ksid = accepted.ksid
        joined = b.open_connect(SOURCE, DESTINATION, accepted.qos, ksid)
        assert joined.status in (f.Status.SUCCESS, f.Status.PEER_NOT_CONNECTED)
        x, y = a.get_key(ksid, 0), b.get_key(ksid, 0)
        assert x.status is y.status is f.Status.SUCCESS, (x, y)
        assert x.key == y.key and len(x.key) == CONTRACT_CHUNK
        assert a.close(ksid).status is b.close(ksid).status is f.Status.SUCCESS


def test_max_bps_holds_back_chunks_ahead_of_the_rate(net):
    slow = f.Qos(key_chunk_size=32, max_bps=256, timeout=1000, ttl=600)  # one chunk a second
    with client(net, SOURCE) as a:
        ksid = a.open_connect(SOURCE, DESTINATION, slow).ksid
        assert a.get_key(ksid, 0).status is f.Status.SUCCESS
        assert a.get_key(ksid, 300).status is f.Status.INSUFFICIENT_KEY  # due in 300 s
        a.close(ksid)


def test_ttl_expires_a_stream_and_erases_it(net):
    with client(net, SOURCE) as a:
        ksid = a.open_connect(SOURCE, DESTINATION, f.Qos(ttl=1, timeout=1000)).ksid
        assert a.get_key(ksid, 0).status is f.Status.SUCCESS

        indices = iter(range(1, 1 << 20))

        def expired() -> bool:
            status = a.get_key(ksid, next(indices)).status
            assert status in (
                f.Status.SUCCESS,
                f.Status.TIMEOUT,
                f.Status.GET_KEY_PEER_NOT_CONNECTED,
            )
            return status is not f.Status.SUCCESS

        poll(expired, "the stream expired after its TTL", timeout=30)
        assert a.get_key(ksid, 0).status is f.Status.GET_KEY_PEER_NOT_CONNECTED  # gone


def test_a_stream_survives_a_restart_of_the_destination_ukms(net):
    a, b, ksid = open_both(net, f.Qos(key_chunk_size=32, timeout=30_000, metadata_mimetype=JSON))
    with a:
        first = a.get_key(ksid, 0)
        with b:
            assert b.get_key(ksid, 0).key == first.key
            spent = b.get_key(ksid, 1)  # index 1 handed out before the crash
            assert spent.status is f.Status.SUCCESS
        source_side = a.get_keys(ksid, list(range(1, 10)))
        assert all(c.status is f.Status.SUCCESS for c in source_side)
        pid = net.kill(SLAVE_UKMS)
        net.wait_restarted(SLAVE_UKMS, pid)
        with client(net, DESTINATION) as b2:
            after = b2.get_key(ksid, 5)
            assert after.status is f.Status.SUCCESS
            assert after.key == source_side[4].key  # index 5, the same bits at both ends
            # index 1 again: refused if its release committed before the crash, else the
            # same bits once more to the same end (the refetch rule); never other bits
            again = b2.get_key(ksid, 1)
            assert again.status in (f.Status.INSUFFICIENT_KEY, f.Status.SUCCESS)
            assert again.status is f.Status.INSUFFICIENT_KEY or again.key == spent.key
            assert b2.close(ksid).status is f.Status.SUCCESS
        a.close(ksid)


def test_the_source_ukms_supplies_on_after_a_restart(net):
    a, b, ksid = open_both(net, f.Qos(key_chunk_size=32, timeout=30_000, metadata_mimetype=JSON))
    with b:
        with a:
            before = a.get_key(ksid, 0)
            assert before.status is f.Status.SUCCESS
        pid = net.kill("ukms-berlin")
        net.wait_restarted("ukms-berlin", pid)
        with client(net, SOURCE) as a2:
            # past what was asked before the crash: the restarted UKMS asks the network for
            # it, under indices never asked for before (no key ID twice at either end)
            later = a2.get_key(ksid, 300)
            assert later.status is f.Status.SUCCESS, later
            assert b.get_key(ksid, 300).key == later.key
            assert b.get_key(ksid, 0).key == before.key
            a2.close(ksid)
        b.close(ksid)


# -- malformed frames ---------------------------------------------------------------------
def raw_connection(net: Net, sae: str = SOURCE) -> ssl.SSLSocket:
    entry = net.sae(sae)
    host, port = entry["etsi004"].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=entry["ca_cert"])
    ctx.check_hostname = False
    ctx.load_cert_chain(entry["cert"], entry["key"])
    sock = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=30))
    return sock


def closed_by_server(sock: ssl.SSLSocket) -> bool:
    """The server ended the connection without answering."""
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def header(service: int, length: int, major: int = 2) -> bytes:
    return struct.pack(">BBBbI", major, 1, 1, service, length)


@pytest.mark.parametrize(
    "frame",
    [
        header(0x03, 0),  # a response type sent as a request
        header(0x07, 0),  # no such service
        header(-1, 0),
        header(0x04, 24, major=3),  # another major version
        header(0x04, 1 << 20),  # a length past the bound
    ],
    ids=["response-type", "unknown-type", "negative-type", "version", "length-past-bound"],
)
def test_frames_that_cannot_be_followed_close_the_connection(net, frame):
    with raw_connection(net) as sock:
        sock.sendall(frame + bytes(24))
        assert closed_by_server(sock)
    assert_still_serving(net)


def test_malformed_payloads_get_their_status(net):
    with client(net, SOURCE) as c:
        qos = struct.pack(">7I", 32, 0, 0, 0, 0, 0, 0) + bytes(256)
        no_nul = b"qkd://" + SOURCE.encode() + b"qkd://" + DESTINATION.encode() + b"\0"
        c.send_raw(header(0x02, len(no_nul + qos) + 16) + no_nul + qos + bytes(16))
        answer = c.read()
        assert isinstance(answer, f.OpenConnectAnswer)
        assert answer.status is f.Status.NO_QKD_CONNECTION and answer.ksid == f.ZERO_KSID
        c.send_raw(header(0x04, 20) + bytes(20))  # GET_KEY without its metadata size
        answer = c.read()
        assert isinstance(answer, f.GetKeyAnswer)
        assert answer.status is f.Status.GET_KEY_PEER_NOT_CONNECTED
        unknown = c.get_key(b"\x55" * 16, 0)
        assert unknown.status is f.Status.GET_KEY_PEER_NOT_CONNECTED and not unknown.key
        c.send_raw(header(0x08, 17) + bytes(17))  # CLOSE with a trailing byte
        answer = c.read()
        assert isinstance(answer, f.CloseAnswer)
        assert answer.status is f.Status.GET_KEY_PEER_NOT_CONNECTED
        assert c.open_connect("qkd://", DESTINATION, QUICK).status is f.Status.NO_QKD_CONNECTION
    assert_still_serving(net)


def test_truncated_frames_are_waited_for_then_dropped_without_harm(net):
    for partial in (header(0x04, 24)[:5], header(0x04, 24) + bytes(10)):
        with raw_connection(net) as sock:
            sock.sendall(partial)  # then the client goes away mid-frame
    with raw_connection(net) as sock:  # a frame completed later is served
        frame = f.encode(f.GetKey(ksid=b"\x66" * 16, index=0, metadata_size=0))
        sock.sendall(frame[:3])
        sock.sendall(frame[3:])
        data = sock.recv(64)
        assert data[3] == f.Service.GET_KEY_RESPONSE
    assert_still_serving(net)


def test_a_client_without_a_certificate_is_refused(net):
    entry = net.sae(SOURCE)
    host, port = entry["etsi004"].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=entry["ca_cert"])
    ctx.check_hostname = False
    with (
        pytest.raises((ssl.SSLError, ConnectionError, Client004Error)),
        ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10)) as sock,
    ):
        sock.sendall(f.encode(f.Close(ksid=bytes(16))))
        if sock.recv(1) == b"":
            raise ConnectionError("closed")


def assert_still_serving(net: Net) -> None:
    with client(net, SOURCE) as c:
        opened = c.open_connect(SOURCE, DESTINATION, QUICK)
        assert opened.status is f.Status.PEER_NOT_CONNECTED
        assert c.close(opened.ksid).status is f.Status.SUCCESS


# -- the command ------------------------------------------------------------------------------
def test_the_command_opens_reads_and_closes_a_stream(net):
    base = ("--dir", str(net.dir), "--json")
    opened = qkdn("sae", "stream", "open", *base, "--sae", SOURCE, "--to", DESTINATION)
    assert opened.returncode == 0, opened.stderr
    ksid = json.loads(opened.stdout)["ksid"]
    joined = qkdn("sae", "stream", "open", *base, "--sae", DESTINATION, "--from", SOURCE,
                  "--ksid", ksid)  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    got = {}
    for sae in (SOURCE, DESTINATION):
        run = qkdn("sae", "stream", "get", *base, "--sae", sae, "--ksid", ksid, "--count", "3")
        assert run.returncode == 0, run.stderr
        got[sae] = [(c["index"], c["key"], c["metadata"]) for c in json.loads(run.stdout)]
    assert got[SOURCE] == got[DESTINATION] and len(got[SOURCE]) == 3
    for sae in (SOURCE, DESTINATION):
        assert qkdn("sae", "stream", "close", *base, "--sae", sae, "--ksid", ksid).returncode == 0
    after = qkdn("sae", "stream", "get", "--dir", str(net.dir), "--sae", SOURCE, "--ksid", ksid)
    assert after.returncode == 1
    assert after.stderr.strip().splitlines() == [
        "qkdn: error [SAE-004-GET_KEY_PEER_NOT_CONNECTED]: the KME answered "
        "GET_KEY_PEER_NOT_CONNECTED (3)"
    ]
    bad = qkdn("sae", "stream", "get", "--dir", str(net.dir), "--sae", SOURCE, "--ksid", "zz")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("qkdn: error [USAGE]:")
