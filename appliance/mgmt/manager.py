"""``qkdn manager run``: the QKDN Manager process (FCAPS over SNMPv3).

* It receives the nodes' INFORMs and traps on its ``traps`` address (pysnmp's notification
  receiver; INFORMs are acknowledged by it). Only configured SNMPv3 users are accepted, in
  authPriv: each agent's notify user, and the operator's extra ``senders``. A refused
  sender is counted by USM; the manager records the counters' growth as security events.
* It polls every agent (a GETBULK walk of ``qkdnObjects``) every ``poll_s`` seconds: link
  states and levels go to the history, identity and software to the inventory; an agent
  that does not answer raises a ``node`` alarm, cleared when it answers again. A walk
  goes through pysnmp until pysnmp has learnt the agent's engine (discovery, time), then
  on the fast path (:class:`appliance.snmp.requester.Requester`: GETBULKs sealed and
  opened without pyasn1, answered on the agent's fast path too); a Report or no answer
  hands the agent back to pysnmp.
* With an ``[aaa]``, it walks the AAA device's accounting at every poll round
  (:mod:`appliance.mgmt.accounting`).
* With a ``[controller]``, it tells the QKDN Controller which links and nodes it finds down
  and raises the controller's telemetry's link alarms as the same alarms as the agents'
  (:mod:`appliance.mgmt.control`).
* It keeps everything in SQLite (:mod:`appliance.mgmt.store`) and tells its web page
  (:mod:`appliance.mgmt.web`) of every change.

It never sees a key or a key ID: QKDN-MIB carries none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from pydantic import Field
from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import ntfrcv
from pysnmp.hlapi.v3arch.asyncio import (
    ContextData,
    ObjectIdentity,
    ObjectType,
    UdpTransportTarget,
    UsmUserData,
    bulk_walk_cmd,
)
from pysnmp.proto import rfc1902

from appliance.config.schema import Strict, load_model, read_toml
from appliance.mgmt import accounting, mib
from appliance.mgmt.control import ControllerLink, ControlView, ttl
from appliance.mgmt.errors import MgmtError
from appliance.mgmt.nodeview import instance_count
from appliance.mgmt.store import LinkSample, Store
from appliance.snmp import fastpath
from appliance.snmp.requester import Learner, Requester, Unanswered, pysnmp_value
from appliance.snmp.usm import AUTH, PRIV, SNMP_TRAP_OID, Credentials, bind_udp, host_port

log = logging.getLogger("qkdn.mgmt")
POLL_TIMEOUT_S, POLL_RETRIES = 1.0, 1
MAX_REPETITIONS = 64
"""pysnmp's GETBULK responder answers at most 64 variable bindings."""
RETRY_SILENT_S = 2.0
"""Seconds to the next poll round while an agent does not answer."""
IDLE_TICK_S, TICK_S = 10.0, 0.1
"""pysnmp's dispatchers wake every tick (TICK_S by default) to expire what waits for an
answer. The receiver waits for nothing: it ticks every IDLE_TICK_S. The poller's own timer
loop is stopped: while a walk goes through pysnmp, the manager ticks it every TICK_S (its
timeouts are counted in ticks), and nothing else: polls on the fast path need no tick."""
MANAGER_REFUSALS = (
    (1, 3, 6, 1, 6, 3, 15, 1, 1, 1, 0),
    (1, 3, 6, 1, 6, 3, 15, 1, 1, 3, 0),
    (1, 3, 6, 1, 6, 3, 15, 1, 1, 5, 0),
    (1, 3, 6, 1, 6, 3, 15, 1, 1, 6, 0),
    (1, 3, 6, 1, 2, 1, 11, 4, 0),
)


class AgentEntry(Strict):
    """One node's agent, as the manager reaches it."""

    name: str = Field(max_length=64)
    id: int = Field(ge=1, le=999)
    role: str = Field(max_length=16)
    address: str
    poll: Credentials
    """The manager's user at the agent (role manager)."""
    notify: Credentials
    """The user the agent sends its INFORMs as."""
    cert: str | None = None
    """The node's certificate (its expiry goes to the inventory)."""


class Sender(Credentials):
    """Another authorised sender of notifications (an operator's tool)."""

    engine: str | None = Field(default=None, pattern=r"^([0-9a-fA-F]{2}){5,32}$")
    """The sender's snmpEngineID in hex, needed for its traps (not for its INFORMs)."""


class Operator(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,31}$")
    role: Literal["read", "ack"]
    password: str = Field(max_length=256)
    """``scrypt$N$r$p$salt$hash`` (hex), :func:`appliance.mgmt.web.hash_password`."""


class MapLink(Strict):
    """A link of the topology, for the map."""

    a: int = Field(ge=1, le=999)
    b: int = Field(ge=1, le=999)
    name: str = Field(max_length=32)


class ControllerEntry(Strict):
    """The QKDN Controller the manager reports to (:mod:`appliance.mgmt.control`)."""

    address: str = Field(max_length=300)
    """Its HTTP/2 API (host:port)."""
    name: str = Field(max_length=64)
    """The name its certificate must carry."""


class AaaEntry(Credentials):
    """The AAA device's agent and its operator user (the accounting view)."""

    address: str = Field(max_length=300)


class ManagerConfig(Strict):
    traps: str = "127.0.0.1:0"
    web: str | None = None
    """HTTPS address of the operator's page and /metrics; none: no web server."""
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    """The network's CA (the controller link's mutual TLS)."""
    controller: ControllerEntry | None = None
    aaa: AaaEntry | None = None
    """The network's AAA device: its accounting is walked at every poll round."""
    db: str = "manager.db"
    poll_s: float = Field(default=5.0, ge=0.2, le=3600)
    session_s: float = Field(default=8 * 3600, ge=1, le=7 * 86400)
    agents: list[AgentEntry] = Field(default_factory=list, max_length=999)
    senders: list[Sender] = Field(default_factory=list, max_length=32)
    operators: list[Operator] = Field(default_factory=list, max_length=32)
    links: list[MapLink] = Field(default_factory=list, max_length=4000)
    """The topology's links (node ID, node ID, name) for the map."""


def load_config(path: Path) -> tuple[ManagerConfig, Path]:
    return load_model(ManagerConfig, read_toml(path), str(path)), path.parent


@dataclass
class Polled:
    """What one walk of an agent returned, by MIB name (links by peer)."""

    scalars: dict[str, Any] = field(default_factory=dict)
    links: dict[int, dict[str, Any]] = field(default_factory=dict)


def parse_walk(binds: list[tuple[tuple[int, ...], Any]]) -> Polled:
    out = Polled()
    m = mib.load()
    entry = m["qkdnLinkEntry"].oid
    for oid, value in binds:
        if oid[: len(entry)] == entry and len(oid) == len(entry) + 2:
            column = mib.name_of(oid[:-1])
            if column:
                out.links.setdefault(oid[-1], {})[column] = _plain(value)
        elif oid[-1] == 0:
            name = mib.name_of(oid[:-1])
            if name:
                out.scalars[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, rfc1902.OctetString):
        return bytes(value).decode("ascii", "replace")
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def samples(node: str, polled: Polled) -> list[LinkSample]:
    out = []
    for peer, cols in sorted(polled.links.items()):
        out.append(
            LinkSample(
                node=node,
                link=str(cols.get("qkdnLinkName", f"peer-{peer}")),
                peer=peer,
                state=mib.enum("qkdnLinkState", int(cols.get("qkdnLinkState", 4))),
                skr=int(cols.get("qkdnLinkSkr", 0)),
                qber_ppm=int(cols.get("qkdnLinkQber", 0)),
                level=int(cols.get("qkdnLinkKeyLevel", 0)),
                capacity=int(cols.get("qkdnLinkKeyCapacity", 0)),
                consumed=int(cols.get("qkdnLinkKeysConsumed", 0)),
            )
        )
    return out


def cert_expiry(path: str | None) -> float | None:
    if not path:
        return None
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


class Manager:
    """The manager's SNMP side over a :class:`Store`; ``changed`` hears of every change."""

    def __init__(self, cfg: ManagerConfig, store: Store) -> None:
        self.cfg, self.store = cfg, store
        self.changed: list[Callable[[str], None]] = []
        self.rx = engine.SnmpEngine()
        self.poller = engine.SnmpEngine()
        self.users = {a.notify.user: a.name for a in cfg.agents}
        self.users.update({s.user: f"sender:{s.user}" for s in cfg.senders})
        self.received = 0
        self.port = 0
        self._refusals = 0
        self._down: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.view = ControlView(
            names={frozenset((x.a, x.b)): x.name for x in cfg.links},
            ids={a.name: a.id for a in cfg.agents},
        )
        self.controller: ControllerLink | None = None
        self.fast: dict[tuple[str, int], Requester] = {}
        """The fast path's requester of each polled address (agents, the AAA device)."""
        Learner(self.poller, self.fast)
        self._walking = 0
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> int:
        sock = bind_udp(self.cfg.traps)
        self.port = int(sock.getsockname()[1])
        config.add_transport(
            self.rx, config.SNMP_UDP_DOMAIN, udp.UdpAsyncioTransport().open_server_mode(sock=sock)
        )
        for a in self.cfg.agents:
            n = a.notify
            config.add_v3_user(self.rx, n.user, AUTH, n.auth, PRIV, n.priv)
        for s in self.cfg.senders:  # INFORMs: our engine is authoritative; traps: theirs
            config.add_v3_user(self.rx, s.user, AUTH, s.auth, PRIV, s.priv)
            if s.engine:
                theirs = rfc1902.OctetString(hexValue=s.engine)
                config.add_v3_user(
                    self.rx, s.user, AUTH, s.auth, PRIV, s.priv, securityEngineId=theirs
                )
        self.rx.transport_dispatcher.set_timer_resolution(IDLE_TICK_S)
        ntfrcv.NotificationReceiver(self.rx, self._received)
        self._start_controller()
        self._tasks.append(asyncio.ensure_future(self._poll_loop()))
        return self.port

    def _start_controller(self) -> None:
        c, cfg = self.cfg.controller, self.cfg
        if c is None:
            return
        if not (cfg.cert and cfg.key and cfg.ca):
            raise MgmtError("[controller] needs cert, key and ca", code="MGMT-CONFIG")
        tls = (Path(cfg.cert), Path(cfg.key), Path(cfg.ca))
        self.controller = ControllerLink(
            self.view,
            c.address,
            c.name,
            tls,
            ttl_s=ttl(cfg.poll_s),
            on_change=self._from_controller,
        )
        self.controller.start()

    def _from_controller(self, notification: str, link: str) -> None:
        """A link the controller's telemetry finds down (or up again): the same alarm as
        the agents' reports of that link (key: kind ``link``, the link's name)."""
        name = self.cfg.controller.name if self.cfg.controller else "controller"
        down = notification == "qkdnLinkDown"
        severity, text = (
            ("major", "controller: link unusable")
            if down
            else ("cleared", "controller: link usable")
        )
        self.store.notify(notification, name, severity, link, text)
        log.info("mgmt: %s from the controller: %s", notification, link)
        self._tell("alarms")

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._ticker] if self._ticker else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.controller is not None:
            await self.controller.close()
        for eng in (self.rx, self.poller):
            if eng.transport_dispatcher is not None:
                eng.close_dispatcher()
        for requester in self.fast.values():
            requester.close()

    def _tell(self, what: str) -> None:
        for hook in self.changed:
            hook(what)

    # -- notifications -----------------------------------------------------------------
    def _received(self, eng: Any, _ref: Any, _ce: Any, _cn: Any, binds: Any, _c: Any) -> None:
        ctx = eng.observer.get_execution_context("rfc3412.receiveMessage:request")
        who = self.users.get(str(ctx.get("securityName", "")), "unknown")
        got = {tuple(name): value for name, value in binds}
        trap = got.get(SNMP_TRAP_OID)
        name = mib.name_of(tuple(trap)) if trap is not None else None
        self.received += 1
        if name is None:
            self.store.security(who, "unknown-notification", str(trap)[:64])
            return
        self.handle(who, name, got)

    def handle(self, who: str, name: str, got: dict[tuple[int, ...], Any]) -> None:
        m = mib.load()
        sev = _plain(got.get((*m["qkdnNotifySeverity"].oid, 0)))
        severity = mib.enum("qkdnNotifySeverity", sev) if isinstance(sev, int) else "indeterminate"
        resource = str(_plain(got.get((*m["qkdnNotifyResource"].oid, 0))) or who)
        text = str(_plain(got.get((*m["qkdnNotifyText"].oid, 0))) or name)
        if name == "qkdnAuthFailure":
            self.store.security(who, "snmp-refused", text)
        else:
            self.store.notify(name, who, severity, resource, text)
        column = m["qkdnLinkState"].oid
        moved = False
        for oid, value in got.items():
            if oid[:-1] == column and isinstance(_plain(value), int):
                state = mib.enum("qkdnLinkState", int(value))
                self.store.link_state(who, oid[-1], state)
                moved |= self.view.end(who, oid[-1], state)
        if moved and self.controller is not None:
            self.controller.tell()
        log.info("mgmt: %s from %s: %s %s (%s)", name, who, resource, severity, text)
        self._tell("alarms")

    # -- polling -------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        rounds = 0
        while True:
            try:
                await self.poll_all()
                rounds += 1
                if rounds % 100 == 0:
                    self.store.downsample()
            except Exception as exc:  # one failed round must not end polling
                log.error("mgmt: poll round failed: %s", exc)
            # a silent agent is looked for again soon (a node starting or restarting)
            await asyncio.sleep(
                min(self.cfg.poll_s, RETRY_SILENT_S) if self._down else self.cfg.poll_s
            )

    async def poll_all(self) -> None:
        if self.cfg.aaa is not None:
            await self.poll_accounting(self.cfg.aaa)
        walked = await asyncio.gather(*(self._walk_agent(a) for a in self.cfg.agents))
        with self.store.transaction():  # the round's rows in one sync to disk
            results = [self._polled(a, *w) for a, w in zip(self.cfg.agents, walked, strict=True)]
            rows = [s for r in results if r is not None for s in r]
            self.store.record(rows)
        for row in rows:
            self.view.end(row.node, row.peer, row.state)
        if self.controller is not None:  # every round: the report's time to live renewed
            self.controller.tell()
        self._own_refusals()
        self._tell("links")

    def repetitions(self, agent: AgentEntry) -> int:
        """A poll's max-repetitions at ``agent``: its instances, by its links in the map,
        and one more (repetitions past QKDN-MIB walk the agent's pysnmp tree: the costly
        part of a poll; a node with more, failure rows, is walked on in a second PDU)."""
        links = sum(1 for x in self.cfg.links if agent.id in (x.a, x.b))
        return min(MAX_REPETITIONS, instance_count(links) + 1)

    async def poll(self, agent: AgentEntry) -> list[LinkSample] | None:
        """Walk ``agent`` and record what it answered (or its silence)."""
        return self._polled(agent, *await self._walk_agent(agent))

    async def _walk_agent(self, agent: AgentEntry) -> tuple[list[Any], str]:
        """The agent's instances, and why there are none if so."""
        try:
            binds = await self.walk(agent, mib.oid("qkdnObjects"), self.repetitions(agent))
        except (OSError, RuntimeError, ValueError) as exc:
            return [], str(exc)
        return binds, "no answer"

    def _polled(self, agent: AgentEntry, binds: list[Any], why: str) -> list[LinkSample] | None:
        """One walk recorded: the inventory (or the node's alarm); its link samples."""
        if not binds:
            self._unreachable(agent, why)
            return None
        polled = parse_walk(binds)
        self._reachable(agent, polled)
        return samples(agent.name, polled)

    async def poll_accounting(self, aaa: AaaEntry) -> None:
        """The AAA device's accounting (a walk of its two subtrees); kept as it was when the
        device does not answer or refuses (a walk that returns nothing at all)."""
        binds: list[Any] = []
        for root in accounting.roots():
            try:
                got = await self.walk_at(aaa.address, aaa, root)
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("mgmt: the AAA device's accounting: %s", exc)
                return
            binds += got
        if not binds:
            return
        self.store.set_accounting(accounting.parse(binds))
        self._tell("accounting")

    async def walk(
        self, agent: AgentEntry, root: tuple[int, ...], repetitions: int = 40
    ) -> list[Any]:
        return await self.walk_at(agent.address, agent.poll, root, repetitions)

    async def walk_at(
        self, address: str, p: Credentials, root: tuple[int, ...], repetitions: int = 40
    ) -> list[Any]:
        """The instances under ``root`` at the agent at ``address`` (empty: no answer, or
        an error), on the fast path once the agent's engine is known."""
        where = host_port(address)
        fast = self.fast.get(where)
        if fast is None or fast.creds != p:
            if fast is not None:
                fast.close()
            fast = self.fast[where] = Requester(
                where, p, timeout_s=POLL_TIMEOUT_S, retries=POLL_RETRIES
            )
        if fast.known is not None:
            try:
                got = await fast.walk(root, repetitions)
            except fastpath.Fallback as exc:  # pysnmp walks it, and learns the engine again
                log.debug("mgmt: walk of %s left to pysnmp: %s", address, exc)
            except Unanswered:
                return []
            else:
                with contextlib.suppress(KeyError, ValueError):  # a type for pysnmp to decode
                    return [(oid, pysnmp_value(tag, raw)) for oid, (tag, raw) in got]
        self._walking += 1
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())
        try:
            return await self._pysnmp_walk(address, p, root, repetitions)
        finally:
            self._walking -= 1

    async def _tick(self) -> None:
        """The poller's timer, while a walk goes through pysnmp (:data:`IDLE_TICK_S`)."""
        while self._walking:
            dispatcher = self.poller.transport_dispatcher
            if dispatcher is not None:
                own = dispatcher.loopingcall  # started with the poller's first transport
                if own is not None and not own.done():
                    own.cancel()
            await asyncio.sleep(TICK_S)
            if dispatcher is not None:
                dispatcher.handle_timer_tick(time.time())

    async def _pysnmp_walk(
        self, address: str, p: Credentials, root: tuple[int, ...], repetitions: int
    ) -> list[Any]:
        auth = UsmUserData(p.user, p.auth, p.priv, authProtocol=AUTH, privProtocol=PRIV)
        target = await UdpTransportTarget.create(
            host_port(address), timeout=POLL_TIMEOUT_S, retries=POLL_RETRIES
        )
        out = []
        async for error, status, _index, binds in bulk_walk_cmd(
            self.poller,
            auth,
            target,
            ContextData(),
            0,
            repetitions,
            ObjectType(ObjectIdentity(root)),
            lexicographicMode=False,
            lookupMib=False,
        ):
            if error or status:
                return []
            out += [(tuple(name), value) for name, value in binds]
        return out

    def _reachable(self, agent: AgentEntry, polled: Polled) -> None:
        s = polled.scalars
        served = int(s.get("qkdnKmsTkeyRequests") or 0)
        if served:  # a node that serves enc_keys: its T_key history
            p50, p99 = int(s.get("qkdnKmsTkeyP50") or 0), int(s.get("qkdnKmsTkeyP99") or 0)
            self.store.record_tkey(agent.name, p50, p99, served)
        self.store.seen(
            agent.name,
            id=agent.id,
            role=mib.enum("qkdnNodeRole", int(s.get("qkdnNodeRole", 0))),
            software=str(s.get("qkdnNodeSoftware", "")),
            slot=mib.enum("qkdnNodeImageSlot", int(s.get("qkdnNodeImageSlot", 3))),
            address=agent.address,
            cert_expiry=cert_expiry(agent.cert),
            reachable=1,
        )
        if self.view.node(agent.name, reachable=True) and self.controller is not None:
            self.controller.tell()
        if agent.name in self._down:
            self._down.discard(agent.name)
            self.store.notify("qkdnNodeReachable", agent.name, "cleared", agent.name, "answers")
            self._tell("alarms")

    def _unreachable(self, agent: AgentEntry, why: str) -> None:
        self.store.seen(
            agent.name,
            id=agent.id,
            role=agent.role,
            software="",
            slot="none",
            address=agent.address,
            cert_expiry=cert_expiry(agent.cert),
            reachable=0,
        )
        if self.view.node(agent.name, reachable=False) and self.controller is not None:
            self.controller.tell()
        if agent.name not in self._down:
            self._down.add(agent.name)
            text = f"the node's agent does not answer ({why[:80]})"
            self.store.notify("qkdnNodeUnreachable", agent.name, "major", agent.name, text)
            self._tell("alarms")

    def _own_refusals(self) -> None:
        """USM's counters of the receiver: refused senders become a security event."""
        total = 0
        instrum = self.rx.message_dispatcher.mib_instrum_controller
        for oid in MANAGER_REFUSALS:
            with contextlib.suppress(Exception):
                total += int(instrum.read_variables((oid, None))[0][1])
        if total > self._refusals:
            self.store.security(
                "snmp", "refused-sender", f"{total - self._refusals} notification(s) refused"
            )
            self._tell("security")
        self._refusals = total


async def serve(config_path: Path, *, ready: asyncio.Event | None = None) -> None:
    """Run the manager of a configuration file until cancelled."""
    cfg, base = load_config(config_path)
    store = Store(base / cfg.db)
    manager = Manager(cfg, store)
    port = await manager.start()
    web = None
    if cfg.web is not None:
        from appliance.mgmt.web import WebServer

        web = WebServer(cfg, base, store, manager)
        await web.start()
    print(f"manager: listening on udp port {port}", flush=True)
    log.info("mgmt: manager receiving on %s (udp %d)", cfg.traps, port)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        if web is not None:
            await web.close()
        await manager.close()
        store.close()
