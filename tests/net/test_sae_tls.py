"""TLS at the SAE edge (issue 16 A8), as clients see it: TLS 1.2 (forward-secret AEAD
suites only) beside TLS 1.3, per node; a refused client certificate gets its TLS alert
(certificate_required, unknown_ca), not a silent close. Checked with Python's ssl and with
``openssl s_client``."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest
import uvloop

from appliance.config.node import Etsi014Edge
from appliance.net import tls
from appliance.net.h2 import Request, Response
from appliance.net.http1 import H1Server
from appliance.pki import sae_server_context

GET = b"GET /x HTTP/1.1\r\nHost: kme\r\n\r\n"


async def ok(request: Request) -> Response:
    return Response(200, (request.peer or "").encode(), {"content-type": "text/plain"})


@pytest.fixture
def edge(pki) -> Iterator[Callable[..., int]]:
    """Start a 014-edge HTTP/1.1 server with the given TLS versions; its port."""
    started: list[tuple[H1Server, asyncio.AbstractEventLoop, threading.Thread]] = []

    def start(
        versions: tuple[str, ...] = ("1.2", "1.3"),
        new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> int:
        loop = new_loop()
        node = pki["node-a"]
        ctx = sae_server_context(node.cert, node.key, node.ca, ("http/1.1",), versions)
        server = H1Server(ok, ctx)
        loop.run_until_complete(server.start("127.0.0.1", 0))
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        started.append((server, loop, thread))
        return server.port

    yield start
    for server, loop, thread in started:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def client(pki, who: str | None, version: str, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["sae-1"].ca))
    ctx.check_hostname = False
    wanted = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
    ctx.minimum_version = ctx.maximum_version = wanted
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if who is not None:
        ctx.load_cert_chain(pki[who].cert, pki[who].key)
    return ctx


def first_reply(ctx: ssl.SSLContext, port: int) -> tuple[str, bytes]:
    """The negotiated version and the start of the server's answer to one GET."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(GET)
        return str(tls.version()), tls.recv(4096)


def refusal(ctx: ssl.SSLContext, port: int) -> str:
    """The reason of the TLS error the client gets, during the handshake or on its first
    read ("" for a close without an alert)."""
    with pytest.raises((ssl.SSLError, ConnectionError)) as caught:
        first_reply(ctx, port)
    return getattr(caught.value, "reason", None) or ""


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_both_tls_versions_are_served_by_default(pki, edge, version):
    port = edge()
    negotiated, reply = first_reply(client(pki, "sae-1", version), port)
    assert negotiated == f"TLSv{version}"
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"sae-1")


def test_a_node_can_take_one_version_only(pki, edge):
    only13, only12 = edge(("1.3",)), edge(("1.2",))
    assert first_reply(client(pki, "sae-1", "1.3"), only13)[0] == "TLSv1.3"
    assert first_reply(client(pki, "sae-1", "1.2"), only12)[0] == "TLSv1.2"
    assert refusal(client(pki, "sae-1", "1.2"), only13)
    assert refusal(client(pki, "sae-1", "1.3"), only12)


def test_tls12_takes_forward_secret_aead_suites_only(pki, edge):
    port = edge()
    ctx = client(pki, "sae-1", "1.2")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        name, _, _ = tls.cipher()
    assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name
    for weak in ("AES128-SHA256", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA256"):
        with pytest.raises(ssl.SSLError):  # static RSA key exchange, or CBC
            first_reply(client(pki, "sae-1", "1.2", weak + ":@SECLEVEL=0"), port)


def test_the_edge_settings_default_to_both_versions():
    assert Etsi014Edge().tls_versions == ["1.2", "1.3"]
    with pytest.raises(ValueError):
        Etsi014Edge(tls_versions=[])
    with pytest.raises(ValueError):
        Etsi014Edge(tls_versions=["1.1"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "version, who, alert",
    [
        ("1.3", None, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        ("1.3", "intruder", "TLSV1_ALERT_UNKNOWN_CA"),
        ("1.2", None, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
        ("1.2", "intruder", "TLSV1_ALERT_UNKNOWN_CA"),
    ],
)
@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_refused_client_certificate_gets_its_tls_alert(pki, edge, version, who, alert, new_loop):
    """With asyncio's own TLS and with uvloop's (in C, what the nodes run)."""
    assert refusal(client(pki, who, version), edge(new_loop=new_loop)) == alert


def s_client(pki, port: int, who: str | None, version: str) -> str:
    args = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        f"-tls{version[0]}_{version[2]}",
    ]
    args += ["-CAfile", str(pki["sae-1"].ca)]
    if who is not None:
        args += ["-cert", str(pki[who].cert), "-key", str(pki[who].key)]
    args += ["-ign_eof"]  # read to the end: the answer, or the alert (the request closes)
    request = "GET /x HTTP/1.1\r\nHost: kme\r\nConnection: close\r\n\r\n"
    done = subprocess.run(args, input=request, capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize(
    "version, who, shown",
    [
        ("1.3", None, "alert certificate required"),
        ("1.3", "intruder", "alert unknown ca"),
        ("1.2", "intruder", "alert unknown ca"),
    ],
)
def test_openssl_s_client_is_told_why(pki, edge, version, who, shown):
    assert shown in s_client(pki, edge(), who, version)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_with_its_certificate_gets_an_answer(pki, edge, version):
    out = s_client(pki, edge(), "sae-1", version)
    assert f"Protocol  : TLSv{version}" in out or f"TLSv{version}" in out
    assert "HTTP/1.1 200" in out


def test_a_client_that_never_finishes_its_handshake_is_dropped(pki, edge, monkeypatch):
    monkeypatch.setattr(tls, "HANDSHAKE_TIMEOUT", 0.05)
    port = edge()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and no more
        assert sock.recv(100) == b""  # the server closed (the timeout bounds the wait)


def test_a_client_that_closes_with_close_notify_ends_cleanly(pki, edge):
    port = edge()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        tls_sock = client(pki, "sae-1", "1.3").wrap_socket(raw)
        tls_sock.sendall(GET)
        assert tls_sock.recv(4096).startswith(b"HTTP/1.1 200")
        tls_sock.unwrap()  # close_notify both ways: the server answers with its own
