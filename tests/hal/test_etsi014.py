"""The ETSI 014 driver against an emulated vendor KME over real mutual TLS, and its parser."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hal
from hal import etsi014
from hal.errors import (
    DeviceDisconnected,
    DeviceTimeout,
    DeviceUnavailable,
    DeviceUrlError,
    HalError,
    KeyNotFound,
    KeyOutcomeUnknown,
    NoKeyAvailable,
    ProtocolError,
    TrustError,
)
from hal.qkdm import LinkState
from tests.hal.conftest import etsi_url


def ends(kme, pki, timeout=1.0, batch=32):
    """The master and slave ends; ``batch=1``: one enc_keys per key, so that each
    get_key is a request of its own."""
    return hal.open_qkdm(
        etsi_url(kme, pki, "kms-a", "kms-b", timeout=timeout, batch=batch)
    ), hal.open_qkdm(etsi_url(kme, pki, "kms-b", "kms-a", timeout=timeout))


def test_status_maps_the_eleven_fields_and_the_extension(kme, pki, bench):
    master, _ = ends(kme, pki)
    status = master.status()
    assert status.state is LinkState.UP and status.link == "link-d-1"
    assert status.key_count == bench.a.key_count() == master.key_count()
    assert status.key_size == 256 and status.skr_bps > 0


def test_503_is_retried_with_backoff(kme, pki):
    master, slave = ends(kme, pki, batch=1)
    kme.faults.unavailable = 2
    key = master.get_key()
    assert slave.get_key_by_id(key.key_id).material == key.material
    kme.faults.unavailable = 5
    with pytest.raises(DeviceUnavailable):
        master.get_key()


def test_malformed_json_is_a_protocol_error_and_draws_no_key(kme, pki, bench):
    master, _ = ends(kme, pki)
    before = bench.a.key_count()
    kme.faults.malformed = 1
    with pytest.raises(ProtocolError, match="not JSON"):
        master.get_key()
    assert bench.a.key_count() == before


@pytest.mark.parametrize("batch", [1, 32])
def test_lost_enc_keys_answer_is_never_retried(kme, pki, bench, batch):
    """The KME drew keys and the answer was lost: no second request, so no duplicate; the
    keys it drew (a whole batch) are given up."""
    master, slave = ends(kme, pki, batch=batch)
    master.status()
    kme.faults.drop_after_draw = 1
    served = kme.served
    with pytest.raises(KeyOutcomeUnknown):
        master.get_key()
    assert kme.served == served + batch
    keys = [master.get_key() for _ in range(batch)]  # one request for all of them
    assert kme.served == served + 2 * batch
    for key in keys:
        assert slave.get_key_by_id(key.key_id).material == key.material


def test_lost_dec_keys_answer_is_retried_and_reported(kme, pki):
    master, slave = ends(kme, pki)
    key = master.get_key()
    kme.faults.drop_after_draw = 1
    with pytest.raises(KeyOutcomeUnknown, match="lost answer"):
        slave.get_key_by_id(key.key_id)  # retried: the KME says the key is gone
    with pytest.raises(KeyNotFound):
        slave.get_key_by_id(key.key_id)


class CountingEvent(threading.Event):
    """The KME's release event, counting the requests that hang on it."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.waiting = 0

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            self.waiting += 1  # one handler thread per request, counted before it waits
        return super().wait(timeout)

    def settled_at(self, count: int, bound: float = 10.0) -> int:
        """The count once the handlers of ``count`` requests are waiting (they may lag the
        client's timeout on a loaded machine); bounded polling, then the count as it is."""
        deadline = time.monotonic() + bound
        while self.waiting < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.waiting


def test_kme_that_stops_answering_times_out_then_recovers(kme, pki):
    master, _ = ends(kme, pki, timeout=0.3)
    master.status()  # the driver knows the KME's limits: get_key sends enc_keys at once
    kme.faults.hang = True
    kme.release = hung = CountingEvent()
    with pytest.raises(KeyOutcomeUnknown):
        master.get_key()
    assert master.status().state is LinkState.DOWN
    # one enc_keys, never repeated (its outcome is unknown); a status is safe to repeat:
    # retries=2, then it gave up
    assert hung.settled_at(1 + 3) == 1 + 3
    kme.faults.hang = False
    kme.release.set()
    assert master.status().state is LinkState.UP


def test_kme_gone_and_back(kme, pki):
    master, slave = ends(kme, pki, batch=1)
    states = []
    master.subscribe(lambda event: states.append(event.new))
    master.status()
    kme.stop()
    with pytest.raises(DeviceDisconnected):
        master.get_key()
    assert master.status().state is LinkState.DOWN
    kme.start()
    key = master.get_key()
    assert slave.get_key_by_id(key.key_id).material == key.material
    assert master.poll_state() is LinkState.UP
    assert states == [LinkState.UP, LinkState.DOWN, LinkState.UP]


def test_trust_failures(kme, pki, tmp_path):
    wrong_sae = hal.open_qkdm(etsi_url(kme, pki, "kms-a", "kms-b", cert="mallory"))
    with pytest.raises(TrustError):
        wrong_sae.get_key()
    other = __import__("hal.emulated.pki", fromlist=["make_pki"]).make_pki(
        tmp_path / "other", ["kms-a"], ca_name="Other CA"
    )
    untrusted_kme = hal.open_qkdm(
        f"etsi014+https://127.0.0.1:{kme.port}?sae=kms-a&peer_sae=kms-b"
        f"&cert={pki.clients['kms-a']}&ca={other.ca}&timeout=1"
    )
    with pytest.raises(TrustError, match="certificate"):
        untrusted_kme.get_key()
    foreign_client = hal.open_qkdm(
        f"etsi014+https://127.0.0.1:{kme.port}?sae=kms-a&peer_sae=kms-b"
        f"&cert={other.clients['kms-a']}&ca={pki.ca}&timeout=1&retries=0"
    )
    with pytest.raises(HalError):
        foreign_client.get_key()


def test_empty_buffer_is_no_key_available(kme, pki, bench):
    master, _slave = ends(kme, pki)
    while bench.a.key_count():
        bench.a.get_key()
    with pytest.raises(NoKeyAvailable):
        master.get_key()


def test_concurrent_masters_never_share_a_key(kme, pki):
    seen: list[str] = []

    def take() -> None:
        q, _ = ends(kme, pki)
        seen.extend(q.get_key().key_id for _ in range(5))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == len(set(seen)) == 20


def test_one_connection_is_kept_alive_for_every_request(kme, pki):
    master, slave = ends(kme, pki, batch=1)
    keys = [master.get_key() for _ in range(50)]
    for key in keys:
        assert slave.get_key_by_id(key.key_id).material == key.material
    assert kme.calls["enc_keys"] == 50 and kme.calls["dec_keys"] == 50
    assert kme.connections == 2  # one per end


def test_enc_keys_takes_a_batch_with_number(kme, pki):
    master, slave = ends(kme, pki, batch=32)
    keys = [master.get_key() for _ in range(100)]
    assert len({k.key_id for k in keys}) == 100
    assert kme.calls["enc_keys"] == 4 and kme.served == 128  # ceil(100 / 32) requests
    assert master.key_count() == master.status().key_count
    for key in keys[:3] + keys[-3:]:
        assert slave.get_key_by_id(key.key_id).material == key.material


def test_a_kme_holding_fewer_keys_than_a_batch_gives_what_it_has(kme, pki, bench):
    master, _ = ends(kme, pki, batch=32)
    while bench.a.key_count() > 5:
        bench.a.get_key().erase()
    keys = [master.get_key() for _ in range(5)]
    assert len({k.key_id for k in keys}) == 5 and bench.a.key_count() == 0
    with pytest.raises(NoKeyAvailable):
        master.get_key()


def test_close_erases_the_keys_held(kme, pki):
    master, _ = ends(kme, pki, batch=8)
    master.get_key()
    held = list(master._held)
    assert len(held) == 7 and all(k.material for k in held)
    master.close()
    assert all(not k.material for k in held)


def test_a_connection_the_kme_closed_is_replaced_before_enc_keys_goes_out(kme, pki):
    """A KME closes idle connections: the next enc_keys must not be lost with it (a lost
    enc_keys answer costs its keys, KeyOutcomeUnknown)."""
    master, slave = ends(kme, pki, batch=1)
    master.get_key()
    for _ in range(3):
        kme.drop_connections()
        key = master.get_key()  # not KeyOutcomeUnknown
        assert slave.get_key_by_id(key.key_id).material == key.material
    assert kme.connections == 4 + 3  # each end opens a new one after each drop


def test_a_connection_that_rested_too_long_is_replaced(kme, pki):
    from hal.etsi014_driver import Etsi014Qkdm, client_context

    now = [0.0]
    master = Etsi014Qkdm(
        host="127.0.0.1",
        port=kme.port,
        sae="kms-a",
        peer_sae="kms-b",
        context=client_context(str(pki.clients["kms-a"]), None, str(pki.ca)),
        batch=1,
        idle=4.0,
        monotonic=lambda: now[0],
    )
    master.get_key()
    now[0] += 4.0
    master.get_key()  # rested exactly the limit: reused
    assert kme.connections == 1
    now[0] += 4.5
    master.get_key()
    assert kme.connections == 2


def test_url_errors(pki):
    with pytest.raises(DeviceUrlError, match="missing parameter 'peer_sae'"):
        hal.open_qkdm(f"etsi014+https://h:1?sae=a&cert={pki.clients['kms-a']}")
    with pytest.raises(DeviceUrlError, match="client certificate"):
        hal.open_qkdm("etsi014+https://h:1?sae=a&peer_sae=b&cert=/nonexistent.pem")
    with pytest.raises(DeviceUrlError, match="size"):
        hal.open_qkdm(f"etsi014+https://h:1?sae=a&peer_sae=b&cert={pki.clients['kms-a']}&size=7")


# -- the parser --------------------------------------------------------------------------------
KEY = base64.b64encode(bytes(32)).decode()
KID = str(uuid.uuid4())


@pytest.mark.parametrize(
    "doc",
    [
        {"keys": [{"key_ID": KID, "key": KEY[:-1]}]},  # unpadded
        {"keys": [{"key_ID": KID, "key": KEY.replace("A", "-", 1)}]},  # not Base64
        {"keys": [{"key_ID": KID.replace("-", ""), "key": KEY}]},  # 32-char UUID
        {"keys": [{"key_ID": KID, "key": base64.b64encode(bytes(31)).decode()}]},  # short
        {"keys": [{"key_ID": KID, "key": KEY}, {"key_ID": KID, "key": KEY}]},  # twice
        {"keys": []},
        {"keys": {"key_ID": KID, "key": KEY}},
        [1, 2],
    ],
)
def test_malformed_key_answers_are_rejected_whole(doc):
    body = json.dumps(doc).encode()
    number = len(doc["keys"]) if isinstance(doc, dict) and isinstance(doc["keys"], list) else 1
    with pytest.raises(ProtocolError) as err:
        etsi014.parse_keys(body, number=max(1, number), size_bits=256)
    assert KEY not in str(err.value)


def test_unknown_members_are_ignored():
    body = json.dumps(
        {"keys": [{"key_ID": KID, "key": KEY, "key_ID_extension": {}, "x": 1}], "key_container": 1}
    ).encode()
    (key,) = etsi014.parse_keys(body, number=1, size_bits=256)
    assert key.key_id == KID and key.material == bytearray(32)


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, b'{"message": "key not found"}', KeyNotFound),
        (400, b'{"message": "not enough keys"}', NoKeyAvailable),
        (400, b'{"message": "what"}', ProtocolError),
        (401, b"{}", TrustError),
        (503, b"<html>busy</html>", DeviceUnavailable),
        (500, b"", ProtocolError),
        (400, b'{"message": "x", "details": [{"hal_code": "HAL-TIMEOUT"}]}', ProtocolError),
    ],
)
def test_error_answers_map_to_typed_errors(status, body, cls):
    assert type(etsi014.error_for(status, body, "kme")) is cls


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
            lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids),
            max_leaves=20,
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_parsers_raise_only_hal_errors(body):
    for parse in (
        lambda: etsi014.parse_keys(body, number=1, size_bits=256),
        lambda: etsi014.parse_status(body),
    ):
        with contextlib.suppress(HalError):
            parse()
    assert isinstance(etsi014.error_for(400, body, "kme"), HalError)


def test_deep_nesting_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        etsi014.parse_keys(b"[" * 100_000, number=1, size_bits=None)


def test_status_timeout_is_typed(kme, pki):
    master, _ = ends(kme, pki, timeout=0.2)
    kme.faults.hang = True
    with pytest.raises(DeviceTimeout):
        master.key_count()
    kme.faults.hang = False
    kme.release.set()
