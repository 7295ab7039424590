"""The ETSI GS QKD 014 API over HTTPS with mutual TLS, against an in-memory key service."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import ssl
import threading
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kms.errors import KeyUnavailable
from appliance.kms.etsi014 import Etsi014Api, Limits
from appliance.net.h2 import Request
from appliance.net.http1 import H1Server
from appliance.pki import server_context

LIMITS = Limits(
    source_kme="kme-berlin", target_kme="kme-bonn", max_key_per_request=16, max_key_count=1000
)


class MemoryService:
    """Keys issued by enc_keys wait for their one slave; each goes out once."""

    def __init__(self) -> None:
        self.pairs = {("sae-1", "sae-2")}
        self.issued: dict[str, tuple[str, str, bytes]] = {}
        self.empty = False

    def limits(self, master: str, slave: str, *, caller_is_master: bool) -> Limits | None:
        return LIMITS if (master, slave) in self.pairs else None

    def stored(self, master: str, slave: str) -> int:
        return 0 if self.empty else 500

    async def enc_keys(self, master, slave, number, size):
        if self.empty:
            raise KeyUnavailable("stock empty")
        out = [(str(uuid.uuid4()), os.urandom(size // 8)) for _ in range(number)]
        for key_id, key in out:
            self.issued[key_id] = (master, slave, key)
        return out

    async def dec_keys(self, slave, master, key_ids):
        for key_id in key_ids:
            entry = self.issued.get(key_id)
            if entry is None or entry[:2] != (master, slave):
                raise KeyUnavailable(key_id)
        return [(k, self.issued.pop(k)[2]) for k in key_ids]


@pytest.fixture
def kme(pki) -> Iterator[tuple[int, MemoryService]]:
    service = MemoryService()
    loop = asyncio.new_event_loop()
    node = pki["node-a"]
    server = H1Server(
        Etsi014Api(service).handle, server_context(node.cert, node.key, node.ca, ("http/1.1",))
    )
    loop.run_until_complete(server.start("127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.port, service
    asyncio.run_coroutine_threadsafe(server.close(), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def sae(pki, name: str, port: int) -> http.client.HTTPSConnection:
    ident = pki[name]
    ctx = ssl.create_default_context(cafile=str(ident.ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(ident.cert, ident.key)
    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)


def call(conn, method, path, body=None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_status_has_all_fields_and_is_consistent(pki, kme):
    port, _ = kme
    status, doc = call(sae(pki, "sae-1", port), "GET", "/api/v1/keys/sae-2/status")
    assert status == 200
    assert set(doc) == {
        "source_KME_ID",
        "target_KME_ID",
        "master_SAE_ID",
        "slave_SAE_ID",
        "key_size",
        "stored_key_count",
        "max_key_count",
        "max_key_per_request",
        "max_key_size",
        "min_key_size",
        "max_SAE_ID_count",
        "status_extension",
    }
    assert doc["master_SAE_ID"] == "sae-1" and doc["slave_SAE_ID"] == "sae-2"
    assert doc["min_key_size"] <= doc["key_size"] <= doc["max_key_size"]
    assert doc["stored_key_count"] <= doc["max_key_count"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_master_gets_keys_and_slave_gets_the_same_once(pki, kme, method):
    port, _ = kme
    master, slave = sae(pki, "sae-1", port), sae(pki, "sae-2", port)
    if method == "GET":
        status, doc = call(master, "GET", "/api/v1/keys/sae-2/enc_keys?number=3&size=512")
    else:
        status, doc = call(
            master, "POST", "/api/v1/keys/sae-2/enc_keys", {"number": 3, "size": 512}
        )
    assert status == 200 and len(doc["keys"]) == 3
    for entry in doc["keys"]:
        assert len(entry["key_ID"]) == 36 and str(uuid.UUID(entry["key_ID"])) == entry["key_ID"]
        assert len(base64.b64decode(entry["key"], validate=True)) == 64
    ids = [k["key_ID"] for k in doc["keys"]]
    status, got = call(slave, "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={ids[0]}")
    assert status == 200 and got["keys"] == doc["keys"][:1]
    status, got = call(
        slave,
        "POST",
        "/api/v1/keys/sae-1/dec_keys",
        {"key_IDs": [{"key_ID": i, "master_SAE_ID": "sae-1"} for i in ids[1:]]},
    )
    assert status == 200 and got["keys"] == doc["keys"][1:]
    status, err = call(slave, "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={ids[0]}")
    assert status == 400 and "not found" in err["message"]


def test_roles_are_enforced(pki, kme):
    port, _ = kme
    master, slave = sae(pki, "sae-1", port), sae(pki, "sae-2", port)
    _, doc = call(master, "GET", "/api/v1/keys/sae-2/enc_keys")
    key_id = doc["keys"][0]["key_ID"]
    assert call(slave, "GET", "/api/v1/keys/sae-1/enc_keys")[0] == 401  # slave is not a master
    assert call(master, "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={key_id}")[0] == 401
    assert call(slave, "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={key_id}")[0] == 200


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/api/v1/keys/sae-2/enc_keys?size=100", None, "multiple of 8"),
        ("/api/v1/keys/sae-2/enc_keys?size=8192", None, "between 64 and 1024"),
        ("/api/v1/keys/sae-2/enc_keys?number=17", None, "max_key_per_request (16)"),
        ("/api/v1/keys/sae-2/enc_keys?number=zero", None, "integer"),
        (
            "/api/v1/keys/sae-2/enc_keys",
            {"extension_mandatory": [{"abc_route_type": "direct"}]},
            "mandatory extensions",
        ),
        ("/api/v1/keys/sae-2/enc_keys", {"additional_slave_SAE_IDs": ["sae-3"]}, "additional"),
        ("/api/v1/keys/sae-2/enc_keys", [1, 2], "JSON object"),
        ("/api/v1/keys/sae-1/dec_keys?key_ID=not-a-uuid", None, "not a UUID"),
        ("/api/v1/keys/sae-1/dec_keys", {"key_IDs": []}, "key_IDs"),
        ("/api/v1/keys/sae-2/nonsense", None, "Unknown resource"),
    ],
)
def test_bad_requests_get_a_clear_400(pki, kme, path, body, fragment):
    port, _ = kme
    who = "sae-2" if "dec_keys" in path else "sae-1"
    method = "GET" if body is None else "POST"
    status, err = call(sae(pki, who, port), method, path, body)
    assert status == 400 and fragment in err["message"] + json.dumps(err.get("details", []))


def test_an_empty_stock_is_a_503_with_json(pki, kme):
    port, service = kme
    service.empty = True
    status, err = call(sae(pki, "sae-1", port), "GET", "/api/v1/keys/sae-2/enc_keys")
    assert status == 503 and "retry" in err["message"]


def test_keep_alive_serves_many_requests_on_one_connection(pki, kme):
    port, _ = kme
    conn = sae(pki, "sae-1", port)
    for _ in range(20):
        assert call(conn, "GET", "/api/v1/keys/sae-2/status")[0] == 200


def test_malformed_http_gets_a_json_400(pki, kme):
    port, _ = kme
    ident = pki["sae-1"]
    ctx = ssl.create_default_context(cafile=str(ident.ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(ident.cert, ident.key)
    import socket

    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"GARBAGE / HTTP/9.9\r\n\x00\x01\r\n\r\n")
        reply = tls.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400") and b'"message"' in reply


def test_a_client_without_certificate_is_refused(pki, kme):
    port, _ = kme
    ctx = ssl.create_default_context(cafile=str(pki["sae-1"].ca))
    ctx.check_hostname = False
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        call(conn, "GET", "/api/v1/keys/sae-2/status")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(["enc_keys", "dec_keys", "status"]),
    method=st.sampled_from(["GET", "POST"]),
    body=json_values,
    query=st.text(max_size=30),
    peer=st.sampled_from(["sae-1", "sae-2", None]),
)
def test_fuzzed_requests_always_get_a_valid_014_answer(op, method, body, query, peer):
    api = Etsi014Api(MemoryService())
    sae_id = "sae-1" if op == "dec_keys" else "sae-2"
    request = Request(
        method, f"/api/v1/keys/{sae_id}/{op}?{query}", json.dumps(body).encode(), {}, peer
    )
    response = asyncio.run(api.handle(request))
    assert response.status in (200, 400, 401, 503)
    doc = json.loads(response.body)
    assert "keys" in doc or "message" in doc or "source_KME_ID" in doc
