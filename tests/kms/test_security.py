"""Security of the network of OS processes (issue 5, item 9), over real mutual TLS.

One DemoQuanDT network for the module, without a KSA stock (every ``enc_keys`` crosses the
chain). Its four SAEs belong to two users: ``sae-berlin-1``/``sae-bonn-1`` and
``sae-berlin-2``/``sae-bonn-2``. What must hold:

* a client certificate from another CA is refused at TLS, even under a known name;
* an SAE cannot take keys meant for another SAE, nor ask keys for a pair it is not in;
* a relay message captured between two real nodes, replayed or with one bit flipped, is
  refused with an alarm in the receiver's log, and goes no further;
* no endpoint takes key material from an SAE, and node endpoints refuse SAE certificates;
* nothing an SAE can provoke names a carrier node, site, link, route or node address.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import os
import re
import socket
import ssl
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import tomli_w

from appliance.net.h2 import H2Client, H2Server, Request, Response, TransportError
from appliance.pki import CertificateAuthority, client_context, server_context, write_pair
from tests.kms.conftest import Net, Reply, exchange, poll, running_net

MASTER, SLAVE = "sae-berlin-1", "sae-bonn-1"  # one user's pair
OTHER_MASTER, OTHER_SLAVE = "sae-berlin-2", "sae-bonn-2"  # another user's pair
ENC = f"/api/v1/keys/{SLAVE}/enc_keys"
DEC = f"/api/v1/keys/{MASTER}/dec_keys"
NODE_PATHS = ("/v1/ksa", "/v1/cn", "/v1/relay", "/v1/ksa/deliver", "/v1/link/grant")
"""The node-to-node endpoints (appliance.kms.node)."""
LOGGED_ERROR = re.compile(r'"level": ?"(error|critical)"|^\S+ (error|critical) |handler failed')
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    with running_net(tmp_path_factory, "--stock", "0") as running:
        yield running


def issue_keys(net: Net, number: int = 2) -> dict[str, str]:
    got = net.enc_keys(MASTER, SLAVE, number)
    assert got.status == 200, got.body
    return {k["key_ID"]: k["key"] for k in got.json()["keys"]}


# -- TLS -----------------------------------------------------------------------------------
def forged_identity(directory: Path, cn: str) -> Path:
    """A certificate for ``cn`` from a CA of the same name as the network's, with its own
    key: what an attacker with a PKI of their own can make. Returns the .pem path."""
    ca = CertificateAuthority.create("demoquandt", os.urandom)
    cert, key = ca.issue(cn, os.urandom, server=True, hosts=("127.0.0.1",))
    write_pair(cert, key, directory / f"{cn}.pem", directory / f"{cn}.key")
    return directory / f"{cn}.pem"


def h2_greeting(address: str, ca: Path, cert: Path | None) -> bytes:
    """What a node endpoint sends after the HTTP/2 preface from a client with ``cert``
    (b"" when the server dropped the connection)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        ctx.load_cert_chain(cert, cert.with_suffix(".key"))
    host, port = address.rsplit(":", 1)
    try:
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            tls.sendall(H2_PREFACE)
            return tls.recv(1024)
    except (ssl.SSLError, ConnectionError):
        return b""


def test_a_certificate_from_another_ca_is_refused_at_tls(net, tmp_path):
    genuine = net.connect(MASTER)
    assert exchange(genuine, "GET", f"/api/v1/keys/{SLAVE}/status").status == 200
    forged = net.connect(MASTER, cert=forged_identity(tmp_path, MASTER))
    ctx = ssl.create_default_context(cafile=str(net.dir / "pki" / "ca.pem"))
    ctx.check_hostname = False
    anonymous = http.client.HTTPSConnection(
        "127.0.0.1", net.kme_port(MASTER), context=ctx, timeout=10
    )
    for conn in (forged, anonymous):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            exchange(conn, "GET", f"{ENC}?number=1")
    # node endpoints: a forged certificate under a neighbour's name gets not one byte
    ca, sender = net.dir / "pki" / "ca.pem", "ckms-braunschweig"
    forged_node = forged_identity(tmp_path, sender)
    for node in ("ckms-helmstedt", "akms-bonn", "ukms-bonn"):
        for service, address in net.node(node)["endpoints"].items():
            if service in ("etsi014", "etsi004"):  # the SAE edge
                continue
            assert h2_greeting(address, ca, net.pki("nodes", sender)[0]), address  # control
            assert h2_greeting(address, ca, forged_node) == b"", address


# -- one SAE, another's keys -----------------------------------------------------------------
def test_an_sae_cannot_take_keys_meant_for_another(net):
    issued = issue_keys(net)
    key_id = next(iter(issued))
    ports = {"berlin": net.kme_port(MASTER), "bonn": net.kme_port(SLAVE)}
    node_cert = net.pki("nodes", "akms-bonn")[0]
    attempts: list[tuple[str, str, Path | None, str, str]] = [
        # (who, at which KME, certificate, method, path)
        (OTHER_SLAVE, "bonn", None, "GET", f"{DEC}?key_ID={key_id}"),
        (OTHER_SLAVE, "bonn", None, "GET", f"/api/v1/keys/{OTHER_MASTER}/dec_keys?key_ID={key_id}"),
        (OTHER_MASTER, "bonn", None, "GET", f"{DEC}?key_ID={key_id}"),
        (OTHER_MASTER, "berlin", None, "GET", f"{DEC}?key_ID={key_id}"),
        (MASTER, "berlin", None, "GET", f"/api/v1/keys/{SLAVE}/dec_keys?key_ID={key_id}"),
        (MASTER, "bonn", None, "GET", f"{DEC}?key_ID={key_id}"),
        (SLAVE, "berlin", None, "GET", f"{DEC}?key_ID={key_id}"),
        (SLAVE, "bonn", node_cert, "GET", f"{DEC}?key_ID={key_id}"),  # a node, not an SAE
    ]
    attempts += [
        (who, kme, cert, "POST", path.split("?")[0]) for who, kme, cert, _, path in attempts
    ]
    for who, kme, cert, method, path in attempts:
        conn = net.connect(who, ports[kme], cert=cert)
        body = {"key_IDs": [{"key_ID": key_id}]} if method == "POST" else None
        got = exchange(conn, method, path, body)
        assert got.status == 401, (who, kme, path, got.status, got.body)  # §5.4
        assert "keys" not in got.json(), (who, path, got.body)
    for who, kme, slave in (  # enc_keys for pairs the caller is not the master of
        (OTHER_MASTER, "berlin", SLAVE),
        (OTHER_SLAVE, "bonn", MASTER),
        (MASTER, "berlin", OTHER_SLAVE),
        (MASTER, "berlin", "sae-nowhere"),
    ):
        got = exchange(net.connect(who, ports[kme]), "GET", f"/api/v1/keys/{slave}/enc_keys")
        assert got.status == 401, (who, slave, got.status, got.body)
    got = exchange(net.connect(SLAVE, cert=node_cert), "GET", f"/api/v1/keys/{MASTER}/enc_keys")
    assert got.status == 401, got.body
    taken = net.dec_keys(SLAVE, MASTER, list(issued))  # none of that consumed the keys
    assert taken.status == 200 and {k["key_ID"]: k["key"] for k in taken.json()["keys"]} == issued


def test_a_401_for_a_key_never_says_whether_it_exists(net):
    """§5.4: an SAE that was not given a key gets 401, and the same 401 (but for the ID)
    whether the key was issued to another SAE or never issued."""
    key_id = next(iter(issue_keys(net, 1)))
    never = str(uuid.uuid4())
    answers = set()
    for who, master, asked in (
        (MASTER, SLAVE, key_id),  # the master, on its own KME
        (MASTER, SLAVE, never),
        (SLAVE, MASTER, never),  # the right slave, an ID never issued
    ):
        got = exchange(net.connect(who), "GET", f"/api/v1/keys/{master}/dec_keys?key_ID={asked}")
        answers.add((got.status, got.body.decode().replace(asked, "ID")))
    assert len(answers) == 1 and next(iter(answers))[0] == 401, answers
    taken = net.dec_keys(SLAVE, MASTER, [key_id])
    assert taken.status == 200, taken.body


def test_a_kme_refuses_an_sae_it_does_not_serve(net):
    at_berlin = net.connect(SLAVE, net.kme_port(MASTER))
    for path in (f"/api/v1/keys/{MASTER}/status", f"/api/v1/keys/{MASTER}/enc_keys"):
        got = exchange(at_berlin, "GET", path)
        assert got.status == 401, (path, got.status, got.body)


def test_an_sae_naming_itself_as_its_peer_is_refused_like_any_pair_not_served(net):
    """Issue 16 A2: no Status for a pair of one SAE (it once got 200, then 503 from
    enc_keys with an internal failure logged): the 401 of a pair the KME does not serve."""
    key_id = next(iter(issue_keys(net, 1)))
    mark = net.log_mark("ukms-berlin")
    conn = net.connect(MASTER)
    unserved = exchange(conn, "GET", f"/api/v1/keys/{OTHER_SLAVE}/status")
    assert unserved.status == 401
    for method, path in (
        ("GET", f"/api/v1/keys/{MASTER}/status"),
        ("GET", f"/api/v1/keys/{MASTER}/enc_keys"),
        ("POST", f"/api/v1/keys/{MASTER}/enc_keys"),
        ("GET", f"/api/v1/keys/{MASTER}/dec_keys?key_ID={key_id}"),
    ):
        got = exchange(conn, method, path, {} if method == "POST" else None)
        assert got.status == 401, (method, path, got.status, got.body)
        assert set(got.json()) == {"message", "details"}
        assert "keys" not in got.json() and "source_KME_ID" not in got.json()
    failures = [line for line in net.log_since("ukms-berlin", mark) if LOGGED_ERROR.search(line)]
    assert not failures, failures


# -- relay messages, captured between two real nodes -------------------------------------
def flip_a_sealed_bit(body: bytes) -> bytes:
    """The body with one bit of its sealed part flipped: the tag of the last hop message
    of a relay batch (MessagePack), or the longest base64 string anywhere in a JSON body,
    else the last byte (the authentication tag, whatever the encoding)."""
    from appliance.kms import messages as m
    from appliance.kms.errors import MessageError

    try:
        batch = m.decode(body, m.RelayBatch)
    except MessageError:
        pass
    else:
        last = batch.items[-1]
        sealed = bytearray(last.message)
        sealed[-1] ^= 0x01
        items = [
            *batch.items[:-1],
            m.RelayItem(path=last.path, index=last.index, message=bytes(sealed), epoch=last.epoch),
        ]
        return m.encode(m.RelayBatch(items=items))
    try:
        doc: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    holders: list[tuple[int, Any, Any]] = []  # (length, container, key) of base64 strings

    def walk(node: Any) -> None:
        entries = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in entries:
            if isinstance(value, str) and _b64(value) is not None:
                holders.append((len(value), node, key))
            elif isinstance(value, dict | list):
                walk(value)

    if isinstance(doc, dict | list):
        walk(doc)
    if holders:
        _, container, key = max(holders, key=lambda h: h[0])
        raw = bytearray(_b64(container[key]) or b"")
        raw[-1] ^= 0x01
        container[key] = base64.b64encode(raw).decode()
        return json.dumps(doc).encode()
    out = bytearray(body)
    out[-1] ^= 0x01
    return bytes(out)


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True) or None
    except (binascii.Error, ValueError):
        return None


@dataclass
class Passed:
    """One request that went through the tap, and the receiver's answer."""

    peer: str | None
    path: str
    body: bytes
    status: int
    answer: bytes
    tampered: bool


class Tap:
    """A TLS-terminating HTTP/2 proxy in front of one node: it shows callers the node's own
    certificate, forwards each request to the node with the caller's certificate, and
    records what passed. It can flip a bit of the next relay message on the way."""

    def __init__(self, net: Net, node: str, target: str) -> None:
        self.net, self.node, self.target = net, node, target
        self.passed: list[Passed] = []
        self.tamper_next = False
        self._clients: dict[str, H2Client] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        cert, key, ca = net.pki("nodes", node)
        self._server = H2Server(self._forward, server_context(cert, key, ca, ("h2",)))

    def listen(self, address: str, timeout: float = 10) -> None:
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:  # the killed node's socket is gone once the kernel has reaped it
            try:
                return self._run(self._server.start(host, int(port)))
            except (OSError, TransportError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def send(self, sender: str, path: str, body: bytes) -> Response:
        """One request to the node itself, as node ``sender`` (its certificate)."""
        return self._run(self._client(sender).request("POST", path, body))

    def close(self) -> None:
        async def close_all() -> None:
            await self._server.close()
            for client in self._clients.values():
                await client.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:  # connections still being served
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self._run(close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def _client(self, sender: str) -> H2Client:
        if sender not in self._clients:
            host, port = self.target.rsplit(":", 1)
            ctx = client_context(*self.net.pki("nodes", sender), ("h2",))
            self._clients[sender] = H2Client(host, int(port), ctx, expect_peer=self.node)
        return self._clients[sender]

    async def _forward(self, request: Request) -> Response:
        body, tampered = request.body, False
        if self.tamper_next and request.path == "/v1/relay":
            self.tamper_next, body, tampered = False, flip_a_sealed_bit(body), True
        try:
            answer = await self._client(request.peer or "").request(
                request.method, request.path, body
            )
        except TransportError as exc:
            return Response(503, json.dumps({"message": f"tap: {exc}"}).encode())
        self.passed.append(
            Passed(request.peer, request.path, body, answer.status, answer.body, tampered)
        )
        kind = answer.headers.get("content-type", "application/json")
        return Response(answer.status, answer.body, {"content-type": kind})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


TAPPED, SENDER = "ckms-helmstedt", "ckms-braunschweig"
"""Relays run from AKMS Bonn down the node IDs to AKMS Berlin: node 6 sends to node 5."""
DOWNSTREAM = ("ckms-magdeburg", "ckms-brandenburg")


@pytest.fixture(scope="module")
def tap(net: Net) -> Iterator[Tap]:
    """The tap in front of TAPPED's relay endpoint, at the address its neighbours use; the
    node itself restarted (SIGKILL, supervisor) on another port. It stays, transparent,
    until the module ends."""
    path = net.dir / "nodes" / f"{TAPPED}.toml"
    config = tomllib.loads(path.read_text())
    public = config["listen"]["ckms"]
    hidden = f"{public.rsplit(':', 1)[0]}:{free_port()}"
    config["listen"]["ckms"] = hidden
    path.write_text(tomli_w.dumps(config))
    proxy = Tap(net, TAPPED, hidden)
    pid = net.kill(TAPPED)
    proxy.listen(public)
    try:
        net.wait_restarted(TAPPED, pid)
        net.wait_for_relays(MASTER, SLAVE)
        yield proxy
    finally:
        proxy.close()


def alarms_since(net: Net, node: str, mark: int) -> list[str]:
    """Log lines at error level (or naming an alarm) written since ``mark``."""
    found = []
    for line in net.log_since(node, mark):
        try:
            level = str(json.loads(line).get("level", ""))
        except (json.JSONDecodeError, AttributeError):
            level = ""
        if level in ("error", "critical") or "alarm" in line.lower():
            found.append(line)
    return found


def assert_refused_without_effect(net: Net, status: int, body: bytes, marks: dict[str, int]):
    """The receiver refused the message, raised an alarm, and nothing went further."""
    assert status != 200, body
    # A hop forwards in the background: a later key crossing the same hops is the barrier
    # (a forward of the refused message would have gone before it), not a pause.
    net.wait_for_relays(MASTER, SLAVE)
    assert not re.search(rb"[A-Za-z0-9+/]{40,}", body), f"material in the refusal: {body!r}"
    assert alarms_since(net, TAPPED, marks[TAPPED]), f"{TAPPED} raised no alarm"
    for node in DOWNSTREAM:
        went_on = [x for x in net.log_since(node, marks[node]) if "relay" in x]
        assert not went_on, f"the message went on to {node}: {went_on}"


def test_a_replayed_or_tampered_relay_message_is_refused(net, tap):
    tap.passed.clear()
    issue_keys(net, 1)
    # the tap (a thread of this process) records a message once its node answered it; the
    # node forwards it at once, so on a loaded machine the keys may reach the SAE first
    relayed = poll(
        lambda: [p for p in tap.passed if p.path == "/v1/relay" and p.status == 200],
        f"a relay message passing {TAPPED}",
        timeout=10,
    )
    captured = relayed[-1]
    assert captured.peer == SENDER

    marks = {n: net.log_mark(n) for n in (TAPPED, *DOWNSTREAM)}
    replay = tap.send(SENDER, captured.path, captured.body)
    assert_refused_without_effect(net, replay.status, replay.body, marks)

    marks = {n: net.log_mark(n) for n in (TAPPED, *DOWNSTREAM)}
    tap.tamper_next = True
    answer = net.enc_keys(MASTER, SLAVE)
    # the tampered relay fails; AKMS A asks once more, with fresh keys and a fresh CN key
    # (appliance/kms/engines/akms.py): the keys the master gets are the retry's, and the
    # slave gets the same ones
    assert answer.status == 200, answer.body
    keys = answer.json()["keys"]
    fetched = net.dec_keys(SLAVE, MASTER, [k["key_ID"] for k in keys])
    assert fetched.status == 200 and fetched.json()["keys"] == keys
    tampered = [p for p in tap.passed if p.tampered]
    assert len(tampered) == 1, "the tap saw no relay message to tamper with"
    assert_refused_without_effect(net, tampered[0].status, tampered[0].answer, marks)
    net.wait_for_relays(MASTER, SLAVE, timeout=20)  # and the link carries keys again


# -- key material from users -----------------------------------------------------------------
def test_no_endpoint_takes_key_material_from_an_sae(net):
    planted_id, planted = str(uuid.uuid4()), base64.b64encode(os.urandom(32)).decode()
    offer = [{"key_ID": planted_id, "key": planted}]
    master, slave = net.connect(MASTER), net.connect(SLAVE)
    answers = [
        exchange(master, "POST", ENC, {"number": 1, "keys": offer}),
        exchange(master, "GET", f"{ENC}?key_ID={planted_id}&key={quote(planted)}"),
        exchange(slave, "POST", DEC, {"key_IDs": offer, "keys": offer}),
        exchange(slave, "GET", f"{DEC}?key_ID={planted_id}&key={quote(planted)}"),
    ]
    for got in answers:
        assert got.status in (200, 400, 401), got.body  # 401: the planted ID was not given
        assert planted.encode() not in got.body
        if got.status == 200:
            assert planted_id not in {k["key_ID"] for k in got.json()["keys"]}
    body = json.dumps(
        {
            "master": MASTER,
            "slave": SLAVE,
            "keys": offer,
            "key_ids": [planted_id],
            "sealed": planted,
            "message": planted,
            "link": "link-14-15",
            "n": 1,
        }
    ).encode()

    async def knock_everywhere() -> list[tuple[str, int, bytes]]:
        cert, key, ca = net.pki("saes", SLAVE)
        ctx = client_context(cert, key, ca, ("h2",))
        out = []
        for node in net.status()["nodes"]:
            for service, address in node["endpoints"].items():
                if service in ("etsi014", "etsi004", "gnmi"):  # the SAE edge; gNMI speaks
                    continue  # gRPC only and carries no key (tests/control/test_agent.py)
                host, port = address.rsplit(":", 1)
                client = H2Client(host, int(port), ctx)
                try:
                    for path in NODE_PATHS:
                        got = await client.request("POST", path, body)
                        out.append((f"{node['name']} {service} {path}", got.status, got.body))
                finally:
                    await client.close()
        return out

    knocked = asyncio.run(knock_everywhere())
    assert len(knocked) >= 16 * len(NODE_PATHS)
    for where, status, answer in knocked:
        assert status != 200, f"{where} took a request from an SAE: {answer!r}"
        assert planted.encode() not in answer
    assert net.dec_keys(SLAVE, MASTER, [planted_id]).status == 401  # stored nowhere


# -- what an SAE can learn -------------------------------------------------------------------
def blank_keys(reply: Reply) -> str:
    """Headers and body, key material replaced (random base64 could spell anything)."""
    text = reply.body.decode(errors="replace")
    try:
        doc = json.loads(reply.body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("keys"), list):
        for key in doc["keys"]:
            key["key"] = "<key>"
        text = json.dumps(doc)
    return json.dumps(reply.headers) + text


def raw_request(net: Net, sae: str, data: bytes) -> Reply:
    """Bytes that are not HTTP, to the SAE's KME over TLS; the raw answer."""
    entry = net.sae(sae)
    ctx = ssl.create_default_context(cafile=entry["ca_cert"])
    ctx.check_hostname = False
    ctx.load_cert_chain(entry["cert"], entry["key"])
    with (
        socket.create_connection(("127.0.0.1", net.kme_port(sae)), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(data)
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return Reply(int(head.split()[1]), {"raw-head": head.decode(errors="replace")}, body)


def test_no_answer_names_a_carrier_link_or_route(net):
    master, slave, other = net.connect(MASTER), net.connect(SLAVE), net.connect(OTHER_SLAVE)
    ok = exchange(master, "GET", f"{ENC}?number=2")
    ids = [k["key_ID"] for k in ok.json()["keys"]]
    replies = [ok, exchange(master, "GET", f"/api/v1/keys/{SLAVE}/status")]
    replies += [
        exchange(master, "GET", f"{ENC}?{query}")
        for query in ("size=7", "size=99999", "number=0", "number=100000", "number=x")
    ]
    replies += [
        exchange(master, "POST", ENC, body)
        for body in (
            {"extension_mandatory": [{"x_unknown": True}]},
            {"additional_slave_SAE_IDs": [OTHER_SLAVE]},
            b"{not json",
            b"[]",
        )
    ]
    replies += [
        exchange(master, "GET", "/api/v1/keys/x/nothing"),
        exchange(master, "DELETE", ENC),
        exchange(master, "GET", "/api/v1/keys/sae-nowhere/status"),
        exchange(master, "GET", f"/api/v1/keys/{OTHER_SLAVE}/enc_keys"),
        exchange(slave, "GET", f"{DEC}?key_ID={ids[0]}"),
        exchange(slave, "GET", f"{DEC}?key_ID={ids[0]}"),
        exchange(slave, "GET", f"{DEC}?key_ID={uuid.uuid4()}"),
        exchange(slave, "GET", f"{DEC}?key_ID=not-a-uuid"),
        exchange(slave, "POST", DEC, {"key_IDs": []}),
        exchange(slave, "POST", DEC, {"key_IDs": [{"key_ID": ids[1]}, {"key_ID": ids[1]}]}),
        exchange(other, "GET", f"{DEC}?key_ID={ids[1]}"),
        raw_request(net, MASTER, b"NOT HTTP AT ALL\r\n\r\n"),
    ]
    victim = "ckms-hamm"  # a carrier down: what do the SAEs hear?
    pid = net.kill(victim)
    deadline, down = time.monotonic() + 10, list[Reply]()
    while len(down) < 3 and time.monotonic() < deadline:
        got = exchange(master, "GET", ENC)
        if got.status == 503:
            down.append(got)
    assert down, "no request failed while a carrier was down"
    replies += down
    net.wait_restarted(victim, pid)
    net.wait_for_relays(MASTER, SLAVE)
    assert {r.status for r in replies} >= {200, 400, 401, 503}
    for reply in replies:
        net.assert_reveals_no_carrier(blank_keys(reply))
