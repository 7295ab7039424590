"""The operator's web page and ``/metrics``, served by the manager over HTTPS.

* Login with a name and a password checked against an scrypt hash; a session is a random
  token in a cookie (``HttpOnly; Secure; SameSite=Strict``) that expires after
  ``session_s``. Two roles: ``read`` sees everything, ``ack`` may also acknowledge alarms.
* ``/`` is the page (``web/index.html``, its script and style: no CDN, every asset is
  package data); ``/api/state`` the map, links and alarms as JSON; ``/api/history`` a
  link's samples; ``/api/tkey`` a node's T_key history; ``/api/events`` server-sent
  events, one ``state`` event after each change the manager reports;
  ``POST /api/alarms/N/ack`` acknowledges.
* ``/metrics``: the Prometheus text format, read-only, for an operator's session or HTTP
  Basic credentials of an operator.

Requests are parsed by the project's strict HTTP/1.1 parser
(:class:`appliance.net.http1.RequestParser`: bounded head and body). Nothing here carries
key material or key IDs: the manager has none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from appliance.mgmt.accounting import per_user
from appliance.mgmt.manager import Manager, ManagerConfig
from appliance.mgmt.store import Store
from appliance.net.http1 import MalformedRequest, Message, RequestParser
from appliance.snmp.usm import host_port

log = logging.getLogger("qkdn.mgmt")
COOKIE = "qkdn_session"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_SESSIONS = 256
MAX_STREAMS = 32
HEARTBEAT_S = 15.0
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/login": ("login.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (hex) of a password."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt" or int(n) > 2**20 or int(r) > 32 or int(p) > 4:
            return False
        got = hashlib.scrypt(
            password.encode()[:1024],
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest) // 2,
        )
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    role: str
    expires: float


class Sessions:
    """Session tokens; sans-IO, on an injected clock."""

    def __init__(self, lifetime: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime, self.clock = lifetime, clock
        self.live: dict[str, Session] = {}

    def open(self, user: str, role: str) -> str:
        now = self.clock()
        self.live = {t: s for t, s in self.live.items() if s.expires > now}
        while len(self.live) >= MAX_SESSIONS:
            self.live.pop(next(iter(self.live)))
        token = secrets.token_urlsafe(32)
        self.live[token] = Session(user, role, now + self.lifetime)
        return token

    def get(self, token: str | None) -> Session | None:
        session = self.live.get(token or "")
        if session is None:
            return None
        if session.expires <= self.clock():
            del self.live[token or ""]
            return None
        return session

    def close(self, token: str | None) -> None:
        self.live.pop(token or "", None)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    kind: str = "application/json"
    headers: dict[str, str] | None = None


REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _json(status: int, doc: Any) -> Reply:
    return Reply(status, json.dumps(doc).encode())


def _error(status: int, code: str, message: str) -> Reply:
    return _json(status, {"error": code, "message": message})


def cookie_of(headers: dict[str, str]) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value[:128]
    return None


class WebApp:
    """Routes to replies, without sockets (the tests call :meth:`handle` directly)."""

    def __init__(self, cfg: ManagerConfig, store: Store, sessions: Sessions) -> None:
        self.cfg, self.store, self.sessions = cfg, store, sessions
        self.operators = {o.name: o for o in cfg.operators}
        self.assets = resources.files("appliance.mgmt") / "web"
        self.on_change: Callable[[str], None] = lambda _what: None
        """Told when a request changed the records (an acknowledgement)."""

    def handle(self, msg: Message) -> Reply:
        url = urlsplit(msg.target)
        path = url.path
        session = self.sessions.get(cookie_of(msg.headers))
        if path == "/login" and msg.method == "POST":
            return self.login(msg.body)
        if path == "/logout" and msg.method == "POST":
            self.sessions.close(cookie_of(msg.headers))
            return Reply(303, headers={"location": "/login", "set-cookie": _cookie("", 0)})
        if path == "/metrics" and msg.method == "GET":
            return self.metrics(session, msg.headers)
        if path in ("/login", "/static/app.js", "/static/app.css") and msg.method == "GET":
            return self.asset(path)
        if session is None:
            if path == "/":
                return Reply(303, headers={"location": "/login"})
            return _error(401, "MGMT-SESSION", "log in first (or the session expired)")
        return self.private(msg, path, url.query, session)

    def private(self, msg: Message, path: str, query: str, session: Session) -> Reply:
        if msg.method == "GET" and path == "/":
            return self.asset(path)
        if msg.method == "GET" and path == "/api/state":
            return _json(200, self.state(session))
        if msg.method == "GET" and path == "/api/tkey":
            node = parse_qs(query).get("node", [""])[0][:64]
            return _json(200, {"node": node, "samples": self.store.tkey_history(node)})
        if msg.method == "GET" and path == "/api/history":
            link = parse_qs(query).get("link", [""])[0][:32]
            return _json(200, {"link": link, "samples": self.store.history(link)})
        if msg.method == "POST" and path.startswith("/api/alarms/") and path.endswith("/ack"):
            return self.ack(msg, path, session)
        return _error(404, "MGMT-PATH", "no such page")

    def asset(self, path: str) -> Reply:
        name, kind = STATIC[path]
        return Reply(200, (self.assets / name).read_bytes(), kind)

    def login(self, body: bytes) -> Reply:
        form = parse_qs(body[:4096].decode("utf-8", "replace"))
        user = form.get("user", [""])[0][:32]
        password = form.get("password", [""])[0][:256]
        op = self.operators.get(user)
        if op is None or not check_password(password, op.password):
            self.store.security("web", "login-refused", f"user {user!r}"[:64])
            page = (self.assets / "login.html").read_bytes()
            page = page.replace(b"<!--error-->", b'<p id="error">Wrong name or password.</p>')
            return Reply(401, page, "text/html; charset=utf-8")
        token = self.sessions.open(op.name, op.role)
        cookie = _cookie(token, int(self.cfg.session_s))
        return Reply(303, headers={"location": "/", "set-cookie": cookie})

    def ack(self, msg: Message, path: str, session: Session) -> Reply:
        if session.role != "ack":
            return _error(403, "MGMT-ROLE", "this operator may not acknowledge alarms")
        if msg.headers.get("x-qkdn") != "1":
            return _error(403, "MGMT-CSRF", "missing the page's request header")
        raw = path.removeprefix("/api/alarms/").removesuffix("/ack")
        if not raw.isdigit() or len(raw) > 12:
            return _error(400, "MGMT-VALUE", "expected an alarm number")
        if not self.store.ack(int(raw), session.user):
            return _error(404, "MGMT-ALARM", "no such unacknowledged alarm")
        self.on_change("alarms")
        return _json(200, {"acked": int(raw), "by": session.user})

    def state(self, session: Session) -> dict[str, Any]:
        return {
            "user": session.user,
            "role": session.role,
            "nodes": self.store.inventory(),
            "links": self.store.links(),
            "topology": [[x.a, x.b, x.name] for x in self.cfg.links],
            "alarms": [a.to_json() for a in self.store.alarms()],
            "accounting": per_user(self.store.accounting()),
            "tkey_nodes": self.store.tkey_nodes(),
            "time": time.time(),
        }

    def metrics(self, session: Session | None, headers: dict[str, str]) -> Reply:
        if session is None and not self._basic(headers.get("authorization", "")):
            return Reply(
                401,
                b"authentication required\n",
                "text/plain",
                {"www-authenticate": 'Basic realm="qkdn-manager"'},
            )
        return Reply(200, prometheus(self.store).encode(), "text/plain; version=0.0.4")

    def _basic(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:][:512]).decode().partition(":")
        except ValueError:
            return False
        op = self.operators.get(user)
        return op is not None and check_password(password, op.password)


def _cookie(token: str, max_age: int) -> str:
    return f"{COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")[:64]


def prometheus(store: Store) -> str:
    """The links, nodes and alarms in the Prometheus text exposition format."""
    lines = []
    gauges = (
        ("qkdn_link_skr_bits_per_second", "skr", "Secret key rate"),
        ("qkdn_link_qber_ratio", "qber_ppm", "Quantum bit error ratio"),
        ("qkdn_link_key_level", "level", "Keys in the QKD module's buffer"),
        ("qkdn_link_keys_consumed_total", "consumed", "Link keys taken by the node"),
    )
    links = store.links()
    for metric, col, text in gauges:
        kind = "counter" if metric.endswith("_total") else "gauge"
        lines += [f"# HELP {metric} {text}.", f"# TYPE {metric} {kind}"]
        for row in links:
            value = row[col] / 1e6 if col == "qber_ppm" else row[col]
            labels = f'link="{_label(row["link"])}",node="{_label(row["node"])}"'
            lines.append(f"{metric}{{{labels}}} {value}")
    lines += ["# HELP qkdn_link_up 1 when the link distils keys.", "# TYPE qkdn_link_up gauge"]
    for row in links:
        labels = f'link="{_label(row["link"])}",node="{_label(row["node"])}"'
        lines.append(f"qkdn_link_up{{{labels}}} {int(row['state'] == 'up')}")
    lines += [
        "# HELP qkdn_node_reachable 1 when the agent answers.",
        "# TYPE qkdn_node_reachable gauge",
    ]
    for node in store.inventory():
        lines.append(f'qkdn_node_reachable{{node="{_label(node["node"])}"}} {node["reachable"]}')
    lines += ["# HELP qkdn_alarms_open Open alarms by severity.", "# TYPE qkdn_alarms_open gauge"]
    counts: dict[str, int] = {}
    for alarm in store.alarms():
        counts[alarm.severity] = counts.get(alarm.severity, 0) + 1
    for severity in ("critical", "major", "minor", "warning", "indeterminate"):
        lines.append(f'qkdn_alarms_open{{severity="{severity}"}} {counts.get(severity, 0)}')
    return "\n".join(lines) + "\n"


def encode(reply: Reply, *, close: bool) -> bytes:
    head = [f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Unknown')}"]
    headers = {**SECURITY_HEADERS, "content-type": reply.kind, **(reply.headers or {})}
    headers["content-length"] = str(len(reply.body))
    if close:
        headers["connection"] = "close"
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body


class WebServer:
    """HTTPS for :class:`WebApp`, and the server-sent events stream."""

    def __init__(self, cfg: ManagerConfig, base: Path, store: Store, manager: Manager) -> None:
        assert cfg.web is not None
        self.cfg, self.base, self.store = cfg, base, store
        self.app = WebApp(cfg, store, Sessions(cfg.session_s))
        self.streams: set[asyncio.Queue[str]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        manager.changed.append(self.changed)
        self.app.on_change = self.changed

    def tls(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        assert self.cfg.cert is not None and self.cfg.key is not None
        ctx.load_cert_chain(self.base / self.cfg.cert, self.base / self.cfg.key)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def start(self) -> int:
        assert self.cfg.web is not None
        host, port = host_port(self.cfg.web)
        self.server = await asyncio.start_server(self._serve, host, port, ssl=self.tls())
        self.port = int(self.server.sockets[0].getsockname()[1])
        print(f"manager: web on https://{host}:{self.port}/", flush=True)
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    def changed(self, what: str) -> None:
        for queue in list(self.streams):
            if queue.empty():
                queue.put_nowait(what)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = RequestParser()
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), 60)
                if not data:
                    return
                for msg in parser.feed(data):
                    if urlsplit(msg.target).path == "/api/events":
                        await self._events(msg, writer)
                        return
                    reply = self.app.handle(msg)
                    writer.write(encode(reply, close=not msg.keep_alive))
                    await writer.drain()
                    if not msg.keep_alive:
                        return
        except MalformedRequest as exc:
            writer.write(encode(_error(exc.status, "MGMT-HTTP", str(exc)), close=True))
        except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _events(self, msg: Message, writer: asyncio.StreamWriter) -> None:
        session = self.app.sessions.get(cookie_of(msg.headers))
        if session is None or len(self.streams) >= MAX_STREAMS:
            status = 401 if session is None else 503
            writer.write(encode(_error(status, "MGMT-SESSION", "no stream"), close=True))
            return
        head = {"content-type": "text/event-stream", "cache-control": "no-store"}
        lines = ["HTTP/1.1 200 OK", *(f"{k}: {v}" for k, v in head.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        self.streams.add(queue)
        try:
            queue.put_nowait("hello")
            while True:
                if self.app.sessions.get(cookie_of(msg.headers)) is None:
                    return  # the session expired: the page must log in again
                try:
                    await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    writer.write(b": keep-alive\n\n")
                    await writer.drain()
                    continue
                doc = json.dumps(self.app.state(session))
                writer.write(f"event: state\ndata: {doc}\n\n".encode())
                await writer.drain()
        finally:
            self.streams.discard(queue)
