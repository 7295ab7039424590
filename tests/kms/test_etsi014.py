"""The ETSI GS QKD 014 API over HTTPS with mutual TLS, against an in-memory key service."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import json
import logging
import os
import re
import ssl
import threading
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.kms.errors import KeyUnavailable, KmsError
from appliance.kms.etsi014 import MAX_DEPTH, Etsi014Api, Limits
from appliance.net.h2 import Request
from appliance.net.http1 import H1Server
from appliance.pki import server_context
from tests.net.h1_driver import exchange, replies, server, split

LIMITS = Limits(
    source_kme="kme-berlin", target_kme="kme-bonn", max_key_per_request=16, max_key_count=1000
)


class MemoryService:
    """Keys issued by enc_keys wait for their one slave; each goes out once. Both SAEs
    have a pair with the other (as a user's SAEs do); ``expired`` keys are still held for
    their pair but cannot be served."""

    def __init__(self) -> None:
        self.pairs = {("sae-1", "sae-2"), ("sae-2", "sae-1")}
        self.issued: dict[str, tuple[str, str, bytes]] = {}
        self.expired: set[str] = set()
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
        held = {k for k in key_ids if self.issued.get(k, ("", "", b""))[:2] == (master, slave)}
        missing = [k for k in key_ids if k not in held or k in self.expired]
        if missing:
            mine = [k for k in missing if k in held]
            raise KeyUnavailable(f"{len(missing)} keys not here", missing=missing, held=mine)
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
    assert status == 401 and err["details"][0]["key_IDs"] == ids[:1]  # handed out already


def test_roles_are_enforced(pki, kme):
    port, _ = kme
    master, slave = sae(pki, "sae-1", port), sae(pki, "sae-2", port)
    _, doc = call(master, "GET", "/api/v1/keys/sae-2/enc_keys")
    key_id = doc["keys"][0]["key_ID"]
    assert call(slave, "GET", "/api/v1/keys/sae-3/enc_keys")[0] == 401  # no such pair
    assert call(master, "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={key_id}")[0] == 401
    # §5.4: the master, a slave of the reverse pair, was not given the key: 401, not 400
    assert call(master, "GET", f"/api/v1/keys/sae-2/dec_keys?key_ID={key_id}")[0] == 401
    assert call(slave, "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={key_id}")[0] == 200


def test_a_401_for_a_key_id_never_tells_whether_it_exists(pki, kme):
    """§5.4's 401 for an SAE that was not given a key: the same answer, whether the ID was
    issued to another SAE or never issued; only the ID itself differs."""
    port, _ = kme
    master, slave = sae(pki, "sae-1", port), sae(pki, "sae-2", port)
    issued = call(master, "GET", "/api/v1/keys/sae-2/enc_keys")[1]["keys"][0]["key_ID"]
    never = str(uuid.uuid4())
    answers = []
    for key_id in (issued, never):
        status, err = call(master, "GET", f"/api/v1/keys/sae-2/dec_keys?key_ID={key_id}")
        answers.append((status, json.dumps(err).replace(key_id, "ID")))
    status, err = call(slave, "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={never}")
    answers.append((status, json.dumps(err).replace(never, "ID")))
    assert answers[0][0] == 401 and len(set(answers)) == 1, answers
    status, _ = call(slave, "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={issued}")
    assert status == 200  # none of that took it


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
            "extension_mandatory parameters",
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


@pytest.mark.parametrize(
    "method, path, body, message, detail",
    [
        (
            "GET",
            "/api/v1/keys/sae-2/enc_keys?size=100",
            None,
            "size shall be a multiple of 8",
            "100",
        ),
        (
            "POST",
            "/api/v1/keys/sae-2/enc_keys",
            {"number": 1, "size": 257},
            "size shall be a multiple of 8",
            "257",
        ),
        (
            "POST",
            "/api/v1/keys/sae-2/enc_keys",
            {"extension_mandatory": [{"abc_route_type": "direct"}, {"abc_transfer_method": "qkd"}]},
            "not all extension_mandatory parameters are supported",
            '"extension_mandatory_unsupported": ["abc_route_type", "abc_transfer_method"]',
        ),
    ],
)
def test_the_messages_the_standard_fixes_are_sent_word_for_word(
    pki, kme, method, path, body, message, detail
):
    """§6.2 and §6.4 fix these messages; the rest goes in details."""
    port, _ = kme
    status, err = call(sae(pki, "sae-1", port), method, path, body)
    assert status == 400 and err["message"] == message
    assert detail in json.dumps(err["details"])


def test_keys_not_found_get_the_standard_message(pki, kme):
    port, service = kme
    _, doc = call(sae(pki, "sae-1", port), "GET", "/api/v1/keys/sae-2/enc_keys")
    key_id = doc["keys"][0]["key_ID"]
    service.expired.add(key_id)
    status, err = call(
        sae(pki, "sae-2", port), "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={key_id}"
    )
    assert status == 400 and err == {
        "message": "one or more keys specified are not found on KME",
        "details": [{"key_IDs_not_found": [key_id]}],
    }


def test_sae_ids_in_the_path_are_url_decoded(pki, kme):
    """Tables 3, 5 and 7: the path holds URL-encoded SAE IDs."""
    port, _ = kme
    master, slave = sae(pki, "sae-1", port), sae(pki, "sae-2", port)
    for encoded in ("sae%2D2", "sae%2d2", "%73%61%65%2D%32"):
        status, doc = call(master, "GET", f"/api/v1/keys/{encoded}/status")
        assert status == 200 and doc["slave_SAE_ID"] == "sae-2", (encoded, doc)
    status, doc = call(master, "GET", "/api/v1/keys/sae%2D2/enc_keys")
    assert status == 200
    key_id = doc["keys"][0]["key_ID"]
    status, got = call(slave, "GET", f"/api/v1/keys/sae%2D1/dec_keys?key_ID={key_id}")
    assert status == 200 and got["keys"] == doc["keys"]


@pytest.mark.parametrize(
    "segment",
    [
        "sae%2",  # cut short
        "sae%zz-2",
        "sae-2%",
        "sae%2-2",
        "sae%C3%28",  # not UTF-8
        "sae%00-2",  # a control character
        "sae%0A-2",
        "sae%C2%85",  # C1 control
        "s" * 769,
        "%41" * 257,  # 257 characters once decoded
        "sa\xe9",
    ],
)
def test_a_badly_encoded_sae_id_is_a_400_with_a_code(segment):
    for op, parameter in (("status", "slave_SAE_ID"), ("dec_keys", "master_SAE_ID")):
        status, doc, _ = answer("GET", f"/api/v1/keys/{segment}/{op}")
        assert status == 400, (segment, doc)
        assert doc["details"][0]["parameter"] == parameter
        assert doc["details"][0]["code"] == "SAE-ID-ENCODING"
        assert len(doc["message"]) < 100


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
    if response.status != 200:
        assert doc["details"] and all(isinstance(d, dict) for d in doc["details"])


# -- bounded inputs and error details (issue 13, items 12, 14 and 15) -----------------------
def answer(method: str, path: str, body: bytes = b"", peer: str | None = "sae-1") -> tuple:
    """The API's answer to one request, without the network: (status, JSON document)."""
    service = MemoryService()
    response = asyncio.run(Etsi014Api(service).handle(Request(method, path, body, {}, peer)))
    assert response.headers["content-type"] == "application/json"
    return response.status, json.loads(response.body), len(response.body)


@pytest.mark.parametrize(
    "query",
    [
        "number=%D9%A2",  # an Arabic-Indic two
        "number=1_0",
        "number=%2B5",
        "number=%205",
        "number=5%20",
        "number=0x10",
        "number=" + "9" * 5000,
        "size=%D9%A2%D9%A5%D9%A6",
        "size=2_5_6",
        "size=" + "9" * 5000,
    ],
)
def test_numbers_in_the_query_are_ascii_digits_only(query):
    status, doc, size = answer("GET", f"/api/v1/keys/sae-2/enc_keys?{query}")
    name = query.partition("=")[0]
    assert status == 400 and doc["details"][0]["parameter"] == name
    assert "integer" in doc["message"] and size < 1000


DEEP = 100_000


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"[" * DEEP + b"]" * DEEP, "nest more than"),
        (b"[" * DEEP, "balance"),
        (b'{"a":' * DEEP + b"1" + b"}" * DEEP, "nest more than"),
        (b'{"key_IDs":' + b"[" * 5000 + b"]" * 5000 + b"}", "nest more than"),
        (b'{"number": ' + b"7" * 5000 + b"}", "digits"),
        (b'{"size": ' + b"8" * 5000 + b"}", "digits"),
        (b'{"size": -' + b"8" * 5000 + b"}", "digits"),
        (b'{"extension_optional": [' + b"1" * 4301 + b"]}", "digits"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[1, 2]", "array"),
        (b'"a string"', "string"),
        (b"3", "a number"),
        (b"null", "null"),
        (b'{"number": 1', "Expecting"),
    ],
    ids=[
        "deep-arrays",
        "unbalanced",
        "deep-objects",
        "deep-key_IDs",
        "long-number",
        "long-size",
        "long-negative",
        "long-int-elsewhere",
        "not-utf8",
        "array",
        "string",
        "number",
        "null",
        "truncated",
    ],
)
def test_bad_json_values_get_a_clear_400(body, reason):
    if b"key_IDs" in body:
        status, doc, size = answer("POST", "/api/v1/keys/sae-1/dec_keys", body, "sae-2")
    else:
        status, doc, size = answer("POST", "/api/v1/keys/sae-2/enc_keys", body)
    assert status == 400 and doc["details"][0]["parameter"] == "body"
    assert reason in doc["details"][0]["reason"] and size < 1000


def test_nesting_at_the_bound_is_parsed_and_strings_do_not_count():
    deep_ok = b'{"extension_optional": ' + b"[" * 15 + b"]" * 15 + b"}"
    assert answer("POST", "/api/v1/keys/sae-2/enc_keys", deep_ok)[0] == 200
    brackets_in_strings = json.dumps({"extension_optional": ["[{" * 1000 + '\\"]']}).encode()
    assert answer("POST", "/api/v1/keys/sae-2/enc_keys", brackets_in_strings)[0] == 200


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


tricky_text = st.text(alphabet='[]{}"\\:, ab\u00e9', max_size=12)


@st.composite
def nested(draw: st.DrawFn) -> object:
    doc = draw(
        st.recursive(
            st.none() | st.integers(-(10**6), 10**6) | tricky_text,
            lambda c: st.lists(c, max_size=3) | st.dictionaries(tricky_text, c, max_size=3),
            max_leaves=12,
        )
    )
    for key in draw(st.lists(st.none() | tricky_text, max_size=24)):
        doc = [doc] if key is None else {key: doc}
    return doc


@settings(max_examples=300, deadline=None)
@given(doc=nested())
def test_the_nesting_bound_agrees_with_the_real_depth(doc):
    body = json.dumps({"extension_optional": doc}).encode()
    status, err, _ = answer("POST", "/api/v1/keys/sae-2/enc_keys", body)
    if depth(doc) + 1 <= MAX_DEPTH:
        assert status == 200
    else:
        assert status == 400 and "deep" in err["details"][0]["reason"]


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/api/v1/keys/sae-2/enc_keys", json.dumps({"number": "x" * 1_000_000})),
        ("POST", "/api/v1/keys/sae-1/dec_keys", json.dumps({"key_IDs": [{"key_ID": "x" * 10**6}]})),
        ("GET", "/api/v1/keys/sae-1/dec_keys?key_ID=" + "y" * 60_000, ""),
        ("GET", "/api/v1/keys/" + "s" * 60_000 + "/status", ""),
        ("GET", "/" + "p" * 60_000, ""),
        (
            "POST",
            "/api/v1/keys/sae-2/enc_keys",
            json.dumps({"extension_mandatory": [{"e" * 100_000: 1}] * 1000}),
        ),
    ],
    ids=["number", "key_ID", "query-key_ID", "sae-id", "path", "extension-names"],
)
def test_huge_strings_are_not_echoed_whole(method, path, body):
    peer = "sae-2" if "dec_keys" in path else "sae-1"
    status, doc, size = answer(method, path, body.encode(), peer)
    assert status in (400, 401) and size < 2000 and doc["details"]


def test_a_target_urlsplit_cannot_read_is_a_400_not_an_internal_error():
    status, doc, _ = answer("GET", "//[::1/api/v1/keys/sae-2/status")
    assert status == 400 and doc["details"][0]["parameter"] == "resource"


class FailingService(MemoryService):
    """Fails as a relay through the network can: its error text names the network's parts."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def enc_keys(self, master, slave, number, size):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        KeyUnavailable("no key: ckms-frankfurt link fra-ber down on route ber>fra>bon"),
        KmsError("ckms-frankfurt refused: link fra-ber, route ber>fra>bon"),
    ],
)
def test_a_failure_inside_the_network_is_a_503_that_names_no_part_of_it(error):
    api = Etsi014Api(FailingService(error))
    request = Request("GET", "/api/v1/keys/sae-2/enc_keys", b"", {}, "sae-1")
    response = asyncio.run(api.handle(request))
    doc = json.loads(response.body)
    assert response.status == 503 and doc["details"] and doc["message"]
    for word in ("ckms", "frankfurt", "fra-ber", "route", "ber>"):
        assert word not in response.body.decode()


ERRORS = [
    ("GET", "/api/v1/keys/sae-2/enc_keys?size=100", "sae-1", "size"),
    ("GET", "/api/v1/keys/sae-2/enc_keys?number=0", "sae-1", "number"),
    ("GET", "/api/v1/keys/sae-2/enc_keys?number=zero", "sae-1", "number"),
    ("GET", "/api/v1/keys/sae-3/enc_keys", "sae-1", "slave_SAE_ID"),
    ("GET", "/api/v1/keys/sae-3/dec_keys?key_ID=x", "sae-2", "master_SAE_ID"),
    ("GET", "/api/v1/keys/sae-2/status", None, "client certificate"),
    ("POST", "/api/v1/keys/sae-2/status", "sae-1", "method"),
    ("GET", "/api/v1/keys/sae-2/nonsense", "sae-1", "resource"),
    ("GET", "/api/v1/keys/sae-1/dec_keys?key_ID=not-a-uuid", "sae-2", "key_ID"),
    ("GET", "/api/v1/keys/sae-1/dec_keys", "sae-2", "key_IDs"),
    (
        "GET",
        "/api/v1/keys/sae-1/dec_keys?key_ID=9e3d2c1b-0000-4000-8000-000000000000"
        "&key_ID=9e3d2c1b-0000-4000-8000-000000000000",
        "sae-2",
        "key_IDs",
    ),
    (
        "GET",
        "/api/v1/keys/sae-2/enc_keys?additional_slave_SAE_IDs=x",
        "sae-1",
        "additional_slave_SAE_IDs",
    ),
]


ROUTE_WORDS = re.compile(r"\b(links?|hops?|routes?|path|relay\w*|carrier|ckms|akms)\b", re.I)


@pytest.mark.parametrize("method, path, peer, parameter", ERRORS)
def test_every_error_carries_details_naming_the_parameter(method, path, peer, parameter):
    status, doc, _ = answer(method, path, b"", peer)
    assert not ROUTE_WORDS.search(json.dumps(doc))  # nor any word of the network's inside
    assert status in (400, 401) and isinstance(doc["message"], str)
    assert isinstance(doc["details"], list) and doc["details"]
    assert all(isinstance(d, dict) for d in doc["details"])
    if parameter is not None:
        assert doc["details"][0]["parameter"] == parameter and doc["details"][0]["reason"]


def test_not_found_keys_and_an_empty_stock_carry_details(pki, kme):
    port, service = kme
    status, doc = call(sae(pki, "sae-1", port), "GET", "/api/v1/keys/sae-2/enc_keys?number=2")
    here, missing = (k["key_ID"] for k in doc["keys"])
    service.expired.add(missing)  # held for the pair, but it cannot be served
    status, doc = call(
        sae(pki, "sae-2", port), "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={missing}"
    )
    assert status == 400 and doc["details"] == [{"key_IDs_not_found": [missing]}]
    body = {"key_IDs": [{"key_ID": here}, {"key_ID": missing}]}
    status, doc = call(sae(pki, "sae-2", port), "POST", "/api/v1/keys/sae-1/dec_keys", body)
    assert status == 400 and doc["details"] == [{"key_IDs_not_found": [missing]}]  # only it
    status, doc = call(sae(pki, "sae-2", port), "GET", f"/api/v1/keys/sae-1/dec_keys?key_ID={here}")
    assert status == 200 and doc["keys"][0]["key_ID"] == here  # and the other one is there
    service.empty = True
    status, doc = call(sae(pki, "sae-1", port), "GET", "/api/v1/keys/sae-2/enc_keys")
    assert status == 503 and doc["details"]


def test_bad_values_through_the_server_log_no_internal_error(pki, kme, caplog):
    port, _ = kme
    conn = sae(pki, "sae-1", port)
    for body in (b"[" * DEEP + b"]" * DEEP, b'{"number": ' + b"7" * 5000 + b"}"):
        conn.request("POST", "/api/v1/keys/sae-2/enc_keys", body=body)
        response = conn.getresponse()
        assert response.status == 400 and json.loads(response.read())["details"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- the parser and the API together, fuzzed ------------------------------------------------
REAL = [
    b"GET /api/v1/keys/sae-2/status HTTP/1.1\r\nHost: kme\r\n\r\n",
    b"GET /api/v1/keys/sae-2/enc_keys?number=3&size=512 HTTP/1.1\r\nHost: kme\r\n\r\n",
    b"POST /api/v1/keys/sae-2/enc_keys HTTP/1.1\r\nHost: kme\r\nContent-Type: application/json"
    b'\r\nContent-Length: 25\r\n\r\n{"number": 2, "size": 64}',
    b"POST /api/v1/keys/sae-1/dec_keys HTTP/1.1\r\nHost: kme\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'1c\r\n{"key_IDs": [{"key_ID": "9e3\r\n'
    b'1b\r\nd2c1b-0000-4000-8000-0000000\r\n9\r\n00000"}]}\r\n0\r\n\r\n',
]


@st.composite
def mutated_014(draw: st.DrawFn) -> bytes:
    raw = bytearray(b"".join(draw(st.lists(st.sampled_from(REAL), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "cut":
            del raw[at:]
        elif action == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        elif action == "insert":
            raw[at:at] = draw(
                st.sampled_from(
                    [b"\r\n", b"\n", b" ", b"0", b"9" * 30, b"[" * 40, b"\xd9\xa2", b"%D9%A2", b'"']
                )
            )
        elif raw:
            raw[min(at, len(raw) - 1)] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


@settings(max_examples=500, deadline=None)
@given(
    data=st.one_of(mutated_014(), st.binary(max_size=200)),
    cuts=st.lists(st.integers(0, 600), max_size=6),
    peer=st.sampled_from(["sae-1", "sae-2", None]),
)
def test_fuzzed_014_traffic_gets_well_formed_json_answers_or_a_clean_close(data, cuts, peer):
    handler = Etsi014Api(MemoryService()).handle
    transport = asyncio.run(exchange(server(handler), split(data, cuts), peer=peer))
    for reply in replies(bytes(transport.out)):
        if reply.status == 100:
            continue
        assert reply.status in (200, 400, 401, 408, 413, 431, 503, 505)
        doc = reply.json()
        assert isinstance(doc, dict)
        if reply.status != 200:
            assert isinstance(doc["message"], str) and doc["details"]
            assert all(isinstance(d, dict) for d in doc["details"])


class SharingService(MemoryService):
    """Pairs sae-1 with sae-2, sae-3 and sae-4 (up to 2 additional slaves); remembers who
    each enc_keys named."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs |= {("sae-1", "sae-3"), ("sae-1", "sae-4")}
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    def limits(self, master: str, slave: str, *, caller_is_master: bool) -> Limits | None:
        found = super().limits(master, slave, caller_is_master=caller_is_master)
        return None if found is None else dataclasses.replace(found, max_sae_id_count=2)

    async def enc_keys(self, master, slave, number, size, *, also=()):
        self.asked.append((slave, also))
        return await super().enc_keys(master, slave, number, size)


@pytest.mark.parametrize(
    "also, status, fragment",
    [
        (["sae-3", "sae-4"], 200, ""),
        (["sae-3", "sae-3"], 400, "repeats an SAE ID"),
        (["sae-2"], 400, "repeats an SAE ID"),
        (["sae-1"], 400, "repeats an SAE ID"),
        (["sae-3", "sae-4", "sae-5"], 400, "at most 2 additional"),
        (["sae-9"], 401, "not authorised"),
        ("sae-3", 400, "list of SAE IDs"),
        ([3], 400, "list of SAE IDs"),
        (["x" * 300], 400, "malformed SAE ID"),
    ],
)
def test_additional_slaves_are_checked_before_any_key_is_asked_for(also, status, fragment):
    service = SharingService()
    body = json.dumps({"number": 2, "additional_slave_SAE_IDs": also}).encode()
    request = Request("POST", "/api/v1/keys/sae-2/enc_keys", body, {}, "sae-1")
    response = asyncio.run(Etsi014Api(service).handle(request))
    doc = json.loads(response.body)
    assert response.status == status, doc
    if status == 200:
        assert service.asked == [("sae-2", ("sae-3", "sae-4"))] and len(doc["keys"]) == 2
    else:
        assert service.asked == [] and fragment in doc["message"], doc
    status_doc = asyncio.run(
        Etsi014Api(service).handle(Request("GET", "/api/v1/keys/sae-2/status", b"", {}, "sae-1"))
    )
    assert json.loads(status_doc.body)["max_SAE_ID_count"] == 2


# -- the direct path (a stocked enc_keys answered at once) -----------------------------------
class ImmediateService(MemoryService):
    """Also serves up to ``lease`` keys of 256 bits at once (:class:`ImmediateKeys`)."""

    def __init__(self, lease: int = 10) -> None:
        super().__init__()
        self.lease = lease

    def limits_now(self, master: str, slave: str) -> Limits | None:
        return self.limits(master, slave, caller_is_master=True)

    def limits(self, master: str, slave: str, *, caller_is_master: bool) -> Limits | None:
        return (
            LIMITS
            if master == slave
            else super().limits(master, slave, caller_is_master=caller_is_master)
        )

    def enc_keys_now(self, master, slave, number, size):
        if size != 256 or number > self.lease:
            return None
        self.lease -= number
        out = [(str(uuid.uuid4()), os.urandom(size // 8)) for _ in range(number)]
        for key_id, key in out:
            self.issued[key_id] = (master, slave, key)
        return out


def key_shape(response) -> tuple[int, list[tuple[int, int]]]:
    doc = json.loads(response.body)
    keys = doc.get("keys", []) if response.status == 200 else []
    return response.status, [(len(k["key_ID"]), len(base64.b64decode(k["key"]))) for k in keys]


wanted = st.builds("number={}&size={}".format, st.integers(-1, 20), st.sampled_from([256, 128, 7]))


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(["enc_keys", "enc_keys", "dec_keys", "status"]),
    method=st.sampled_from(["GET", "POST", "PUT"]),
    body=st.one_of(json_values, st.fixed_dictionaries({"number": st.integers(0, 20)})),
    query=st.one_of(wanted, st.text(max_size=30)),
    peer=st.sampled_from(["sae-1", "sae-2", None]),
)
def test_the_direct_path_answers_as_the_full_path_would_or_takes_nothing(
    op, method, body, query, peer
):
    request = Request(
        method, f"/api/v1/keys/sae-2/{op}?{query}", json.dumps(body).encode(), {}, peer
    )
    service = ImmediateService()
    now = Etsi014Api(service).handle_now(request)
    if now is None:
        assert service.issued == {} and service.lease == 10
        return
    full = asyncio.run(Etsi014Api(MemoryService()).handle(request))
    assert key_shape(now) == key_shape(full) and now.status == 200
    assert now.headers == full.headers
    assert len(service.issued) == 10 - service.lease == len(json.loads(now.body)["keys"])


def test_the_direct_path_is_taken_over_http_and_answers_in_order():
    """Pipelined: a stocked enc_keys (direct), one the lease cannot serve (the full path,
    in a task), then a dec_keys and a stocked enc_keys again; answered in that order."""
    service = ImmediateService(lease=3)
    api = Etsi014Api(service)
    taken_now = []

    def handle_now(request):
        response = api.handle_now(request)
        taken_now.append(response is not None)
        return response

    srv = server(api.handle, handler_now=handle_now)

    def get(path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: kme\r\n\r\n".encode()

    first = get("/api/v1/keys/sae-2/enc_keys?number=2")
    transport = asyncio.run(exchange(srv, [first]))
    (reply,) = replies(bytes(transport.out))
    ids = [k["key_ID"] for k in reply.json()["keys"]]
    assert taken_now == [True] and service.lease == 1
    later = [
        get("/api/v1/keys/sae-2/enc_keys?number=3"),
        get(f"/api/v1/keys/sae-1/dec_keys?key_ID={ids[0]}"),
        get("/api/v1/keys/sae-2/enc_keys?number=1"),
    ]
    transport = asyncio.run(exchange(srv, [b"".join(later)]))
    statuses = [(r.status, len(r.json().get("keys", []))) for r in replies(bytes(transport.out))]
    assert statuses == [(200, 3), (401, 0), (200, 1)]  # sae-1 is no slave of its own keys
    assert taken_now == [True, False] and service.lease == 1  # after a task, no direct path
