"""ETSI 004 key streams without I/O: QoS grants, opening and joining, pacing, expiry, supply,
the chunk key IDs, and the stream records on disk."""

from __future__ import annotations

import json

import pytest

from appliance.kms import keyids
from appliance.kms.frames004 import Qos, Status
from appliance.kms.streams import (
    DEFAULT_CHUNK,
    DEFAULT_TIMEOUT_MS,
    DEFAULT_TTL,
    MAX_AHEAD,
    MAX_STREAMS_PER_SAE,
    MAX_TTL,
    MIN_AHEAD,
    Stream,
    StreamTable,
    grant,
    sae_of,
)
from appliance.kms.streamstore import StreamStore

K1, K2 = b"\x01" * 16, b"\x02" * 16


def test_uris_name_saes():
    assert sae_of("qkd://sae-a") == sae_of("sae-a") == sae_of("qkd://sae-a/") == "sae-a"
    for bad in ("", "qkd://", "http://sae-a", "qkd://Sae-A", "sae a", "qkd://a/b", "-a"):
        assert sae_of(bad) is None, bad


def test_zeros_ask_for_the_defaults_and_are_met():
    qos, met = grant(Qos(), 1000)
    assert met
    assert (qos.key_chunk_size, qos.timeout, qos.ttl) == (
        DEFAULT_CHUNK,
        DEFAULT_TIMEOUT_MS,
        DEFAULT_TTL,
    )


@pytest.mark.parametrize(
    ("asked", "counter"),
    [
        (Qos(key_chunk_size=2048), {"key_chunk_size": 1024}),
        (Qos(ttl=MAX_TTL + 1), {"ttl": MAX_TTL}),
        (Qos(min_bps=5000), {"min_bps": 1000}),  # capacity left: 1000
        (Qos(min_bps=500, max_bps=100), {"max_bps": 500}),
        (Qos(metadata_mimetype="text/plain"), {"metadata_mimetype": "application/json"}),
    ],
)
def test_what_cannot_be_met_gets_a_counter_proposal(asked, counter):
    qos, met = grant(asked, 1000)
    assert not met
    for name, value in counter.items():
        assert getattr(qos, name) == value
    assert grant(qos, 1000) == (qos, True)  # the counter-proposal itself is met


def test_min_bps_is_reserved_out_of_the_capacity():
    table = StreamTable(capacity_bps=1000)
    assert (
        table.open("a", "a", "b", Qos(min_bps=600), K1, now=0).status is Status.PEER_NOT_CONNECTED
    )
    refused = table.open("a", "a", "b", Qos(min_bps=600), K2, now=0)
    assert refused.status is Status.QOS_NOT_MET and refused.qos.min_bps == 400
    assert refused.stream is None and K2 not in table.streams
    assert table.close("a", table.streams[K1])
    assert table.open("a", "a", "b", Qos(min_bps=600), K2, now=0).stream is not None


def test_both_ends_join_once_and_a_third_party_never():
    table = StreamTable(capacity_bps=10**9)
    first = table.open("a", "a", "b", Qos(), K1, now=0)
    assert first.new and first.status is Status.PEER_NOT_CONNECTED
    assert table.open("a", "a", "b", Qos(), K1, now=1).status is Status.KSID_IN_USE  # twice
    assert table.open("b", "a", "c", Qos(), K1, now=1).status is Status.KSID_IN_USE  # other pair
    joined = table.open("b", "a", "b", Qos(key_chunk_size=64), K1, now=1)
    assert joined.status is Status.SUCCESS and not joined.new
    assert joined.qos.key_chunk_size == DEFAULT_CHUNK  # the stream's QoS, as first granted
    assert table.of("b", K1) is joined.stream and table.of("c", K1) is None
    assert not table.close("a", joined.stream)  # b still has it open
    assert table.of("a", K1) is None and table.close("b", joined.stream)
    assert K1 not in table.streams


def test_max_bps_paces_each_index():
    stream = Stream(
        ksid=K1, source="a", destination="b", qos=Qos(key_chunk_size=32, max_bps=2560), created=100
    )
    assert stream.ready_at(0) == 100
    assert stream.ready_at(10) == pytest.approx(101.0)  # 10 chunks of 256 bits at 2560 bit/s
    unpaced = Stream(ksid=K1, source="a", destination="b", qos=Qos(), created=100)
    assert unpaced.ready_at(10**6) == 100


def test_ttl_and_idle_timeout_expire_a_stream():
    qos = Qos(timeout=2000, ttl=10)
    stream = Stream(ksid=K1, source="a", destination="b", qos=qos, created=0, active=0)
    assert not stream.expired(1.9)
    assert stream.expired(2.1)  # nobody called for 2 s
    stream.active = 9.0
    assert not stream.expired(9.9)
    assert stream.expired(10.0)  # the TTL
    table = StreamTable(capacity_bps=1)
    table.streams[K1] = stream
    assert table.expired(10.0) == [stream] and table.expired(9.5) == []


def test_metadata_names_the_chunk_by_its_ksa_key_id():
    stream = Stream(
        ksid=K1,
        source="a",
        destination="b",
        qos=Qos(metadata_mimetype="application/json"),
        created=0,
    )
    assert json.loads(stream.metadata(7)) == {"key_ID": keyids.stream_id(K1, 7)}
    plain = Stream(ksid=K1, source="a", destination="b", qos=Qos(), created=0)
    assert plain.metadata(7) == b""


def test_chunk_key_ids_are_uuids_unique_per_stream_and_index():
    ids = {keyids.stream_id(k, i) for k in (K1, K2) for i in range(1000)}
    assert len(ids) == 2000
    some = keyids.stream_id(K1, 3)
    assert keyids.canonical(some) == some and some[14] == "8"  # version 8
    raw = keyids.stream_raw(K1, 2, 3)
    assert [keyids.from_bytes(raw[i : i + 16]) for i in (0, 16, 32)] == [
        keyids.stream_id(K1, i) for i in (2, 3, 4)
    ]


def test_supply_keeps_ahead_of_what_is_asked_and_of_the_rate():
    table = StreamTable(capacity_bps=10**9)
    stream = Stream(ksid=K1, source="a", destination="b", qos=Qos(key_chunk_size=32), created=0)
    assert table.supply_wanted(stream, -1, now=0) == MIN_AHEAD
    assert table.supply_wanted(stream, 100, now=0) == 101 + MIN_AHEAD
    rated = Stream(
        ksid=K1, source="a", destination="b", qos=Qos(key_chunk_size=32, min_bps=25600), created=0
    )  # 100 chunks/s: 200 ahead (2 s), and 100 more per second since the opening
    assert table.supply_wanted(rated, -1, now=0) == 200
    assert table.supply_wanted(rated, -1, now=3) == 300 + 200
    rated.next = MAX_AHEAD  # made and nobody read: it waits
    assert table.supply_wanted(rated, -1, now=1000) == MAX_AHEAD


def test_records_survive_a_reopening(tmp_path):
    store = StreamStore(tmp_path)
    qos = Qos(key_chunk_size=64, min_bps=5, timeout=7, ttl=9, metadata_mimetype="application/json")
    stream = Stream(ksid=K1, source="a", destination="b", qos=qos, created=12.5)
    stream.opened, stream.next = {"a", "b"}, 42
    store.save(stream)
    store.save(Stream(ksid=K2, source="c", destination="d", qos=Qos(), created=1))
    store.delete(K2)
    store.close()
    assert oct((tmp_path / "streams.sqlite").stat().st_mode & 0o777) == "0o600"
    (back,) = StreamStore(tmp_path).load(now=99)
    assert (back.ksid, back.source, back.destination, back.qos) == (K1, "a", "b", qos)
    assert (back.created, back.opened, back.next, back.active) == (12.5, {"a", "b"}, 42, 99)


def test_one_sae_cannot_take_every_stream():
    table = StreamTable(capacity_bps=10**9)
    for i in range(MAX_STREAMS_PER_SAE):
        assert table.open("a", "a", "b", Qos(), i.to_bytes(16, "big"), now=0).stream is not None
    refused = table.open("a", "a", "b", Qos(), b"\xff" * 16, now=0)
    assert refused.status is Status.NO_QKD_CONNECTION
    assert table.open("c", "c", "d", Qos(), b"\xff" * 16, now=0).stream is not None


def test_a_chunk_above_the_contracts_largest_key_gets_the_contracts_size():
    qos, met = grant(Qos(key_chunk_size=64), 1000, max_chunk=32)
    assert not met and qos.key_chunk_size == 32
    assert grant(qos, 1000, max_chunk=32) == (qos, True)
    assert grant(Qos(), 1000, max_chunk=DEFAULT_CHUNK)[1]  # the default chunk fits
