"""The SNMPv3 agent of a KMS node (QKDN-MIB), a thin pysnmp 7 (asyncio) adapter.

It runs in a process beside the node (``qkdn node agent``, started by ``qkdn node run
--mgmt FILE``: :mod:`appliance.mgmt.sidecar`, :mod:`appliance.mgmt.feed`), on the node's
``snmp`` address, and reads the node through a callable (in tests, in-process):

* SNMPv3 only, authPriv only (HMAC-SHA-256, AES-128, :mod:`appliance.snmp.usm`). No
  community is configured: v1/v2c requests are dropped and counted
  (snmpInBadCommunityNames); noAuth requests, unknown users and wrong keys are refused by
  USM and counted (usmStatsUnsupportedSecLevels, usmStatsUnknownUserNames,
  usmStatsWrongDigests).
* VACM per role: a ``manager`` user reads QKDN-MIB and the SNMP engine's own counters; a
  ``monitor`` user reads the node's identity and its link table only. Nobody writes.
* Values are live: each PDU takes a fresh reading of the node
  (:class:`appliance.mgmt.nodestate.NodeReader`, in the node, asked over the node's query
  socket) and answers from it.
* When something may have changed, the agent compares the node's reading with the last
  one (:mod:`appliance.mgmt.detect`) and sends each notice as an INFORM to the manager,
  retried until acknowledged (a bounded queue), and as a trap to every other receiver. It
  looks at once (:meth:`Agent.look`) when a QKD module's link state changes
  (:class:`appliance.mgmt.nodestate.LinkWatch`), when the node raises an alarm, and after
  each request pysnmp refused (its USM and SNMP counters grew); and every :data:`POLL_S` for
  what moves without telling (key levels, QBER, the generator's health, smartcards, the
  boot record). Nothing else runs while nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pysnmp.entity import config
from pysnmp.entity.rfc3413 import ntforg
from pysnmp.proto import rfc1902, rfc1905

from appliance.mgmt import mib
from appliance.mgmt.agentconfig import AgentConfig as AgentConfig
from appliance.mgmt.agentconfig import AgentUser as AgentUser
from appliance.mgmt.agentconfig import Receiver as Receiver
from appliance.mgmt.agentconfig import load_config as load_config
from appliance.mgmt.channel import NodeGone
from appliance.mgmt.detect import Detector, Notice
from appliance.mgmt.nodeview import NodeReading, Snapshot, Value
from appliance.snmp import engines, responder
from appliance.snmp.usm import SNMP_TRAP_OID, bind_udp, host_port

log = logging.getLogger("qkdn.mgmt")

POLL_S = 5.0
"""Seconds between two looks at what does not tell of its changes; a QKD module's state
change, an alarm of the node and a refused request are looked at at once
(:meth:`Agent.look`)."""
INFORM_TIMEOUT_S, INFORM_RETRIES = 0.5, 2
"""One INFORM attempt: pysnmp's own retransmissions; then :data:`RETRY_S` and again."""
RETRY_S = 1.0
IDLE_TICK_S, TICK_S = 10.0, 0.1
"""pysnmp's dispatchers wake every tick (TICK_S, 0.1 s, by default) to expire what waits
for an answer. The agent's responder ticks every IDLE_TICK_S (the longest pysnmp allows: it
waits for nothing, and its expiries are counted in seconds). The notifier's own timer loop
is stopped: while an INFORM waits for its acknowledgement, the agent ticks it every TICK_S
(pysnmp counts the INFORM's timeout and retransmissions in ticks), and nothing else."""
MAX_PENDING = 1000
"""Notifications waiting for the manager's acknowledgement; the oldest go beyond this."""
REFUSALS = (
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsUnsupportedSecLevels"),
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsUnknownUserNames"),
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsWrongDigests"),
    ("__SNMP-USER-BASED-SM-MIB", "usmStatsDecryptionErrors"),
    ("__SNMPv2-MIB", "snmpInBadCommunityNames"),
)
"""The engine's counters of refused requests (pysnmp's instances, counted in place)."""
MONITOR_VIEW = ("qkdnNode", "qkdnLinks")
MANAGER_VIEW: tuple[tuple[int, ...], ...] = (
    mib.QKDN_ARC,
    (1, 3, 6, 1, 6, 3),
    (1, 3, 6, 1, 2, 1, 11),
)
VIEW_DEPTH = max(len(s) for s in (*MANAGER_VIEW, *(mib.oid(n) for n in MONITOR_VIEW)))
"""The longest subtree of any view family: VACM's decision for an OID (families without
masks) depends on no sub-identifier beyond it."""
ACCESS_KEPT = 4096
"""VACM decisions kept (:meth:`Instrumentation._denied`); beyond, they are forgotten."""
SYNTAX: dict[str, Any] = {
    "Unsigned32": rfc1902.Unsigned32,
    "Gauge32": rfc1902.Gauge32,
    "Counter64": rfc1902.Counter64,
    "OCTET STRING": rfc1902.OctetString,
    "INTEGER": rfc1902.Integer32,
}


def engine_id(name: str, kind: str = "a") -> bytes:
    """An RFC 3411 snmpEngineID for a node: enterprise 32473, format 4 (text), the node
    name; ``kind`` ``a`` for the agent, ``n`` for its notifier (receivers of its traps
    configure users under this ID)."""
    return bytes.fromhex("80007ed904") + f"qkdn-{kind}-{name}".encode()[:27]


def _typed(value: Value) -> Any:
    return SYNTAX[value[0]](value[1])


class Agent:
    """QKDN-MIB over SNMPv3 for one node; ``reader`` reads the node now."""

    def __init__(self, name: str, reader: Callable[[], NodeReading], cfg: AgentConfig) -> None:
        self.name, self.reader, self.cfg = name, reader, cfg
        self.engine = engines.new_engine(engine_id(name))
        self.notifier = engines.new_engine(engine_id(name, "n"))
        self.detector = Detector()
        self.port = 0
        self.sent = self.acked = self.dropped = 0
        self.pending: deque[list[Any]] = deque()
        self._wake = asyncio.Event()
        self._look = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._originator = ntforg.NotificationOriginator()
        self._refused: list[Any] = []
        self.served: responder.Served | None = None

    # -- start and stop ------------------------------------------------------------------
    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        sock = bind_udp(self.cfg.listen)
        self.port = int(sock.getsockname()[1])
        self._users()
        self.served = responder.serve(
            self.engine, sock, self.cfg.users, lambda default: Instrumentation(self, default)
        )
        builder = self.engine.get_mib_builder()
        self._refused = [builder.import_symbols(m, name)[0] for m, name in REFUSALS]
        self.served.fast.passed = self._passed
        self._receivers()
        # pysnmp's timers (IDLE_TICK_S): the responder's ticks slowed, the notifier's own
        # loop stopped (the agent ticks it while an INFORM waits)
        self.engine.transport_dispatcher.set_timer_resolution(IDLE_TICK_S)
        self.notifier.transport_dispatcher.loopingcall.cancel()
        self._tasks = [asyncio.ensure_future(self._watch())]
        if self.cfg.inform is not None:
            self._tasks.append(asyncio.ensure_future(self._deliver()))
        return self.port

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for eng in (self.engine, self.notifier):
            if eng.transport_dispatcher is not None:
                eng.close_dispatcher()

    def _users(self) -> None:
        config.add_context(self.engine, "")
        for subtree in MANAGER_VIEW:
            config.add_vacm_view(self.engine, "manager", "included", subtree, "")
        for name in MONITOR_VIEW:
            config.add_vacm_view(self.engine, "monitor", "included", mib.oid(name), "")
        for role in ("manager", "monitor"):
            config.add_vacm_access(self.engine, role, "", 3, "authPriv", "exact", role, "", "none")
        for user in self.cfg.users:
            engines.add_user(self.engine, user)
            config.add_vacm_group(self.engine, user.role, 3, user.user)

    def _receivers(self) -> None:
        responder.client_transport(self.notifier)
        targets = [("inform", self.cfg.inform)] if self.cfg.inform else []
        targets += [(f"trap-{i}", r) for i, r in enumerate(self.cfg.traps)]
        for name, rx in targets:
            kind = "inform" if name == "inform" else "trap"
            responder.add_notification_target(
                self.notifier,
                name,
                kind,
                rx,
                host_port(rx.address),
                timeout_s=INFORM_TIMEOUT_S,
                retries=INFORM_RETRIES,
            )

    # -- faults ------------------------------------------------------------------------
    def refusals(self) -> int:
        """The engine's refusal counters (USM and SNMP), summed."""
        return sum(int(counter.syntax) for counter in self._refused)

    def _passed(self) -> None:
        """A request went to pysnmp: look at once if it was refused."""
        if self.refusals() > self.detector.refusals:
            self.look()

    async def _watch(self) -> None:
        while True:
            try:
                self.check()
            except NodeGone as exc:  # the node stopped or died: nothing is left to watch
                log.info("mgmt: %s; the agent of %s stops watching", exc, self.name)
                return
            except Exception as exc:  # a reading that fails must not stop the watch
                log.error("mgmt: reading the node failed: %s", exc, exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._look.wait(), self.cfg.poll_s or POLL_S)
            self._look.clear()

    def look(self) -> None:
        """Read the node now, not at the next period (a link's state changed); safe from
        any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._look.set)

    def check(self) -> list[Notice]:
        """Read the node now; send what changed."""
        notices = self.detector.observe(self.reader(), self.refusals())
        for notice in notices:
            self.notify(notice)
        return notices

    def notify(self, notice: Notice) -> None:
        binds = self.varbinds(notice)
        for i in range(len(self.cfg.traps)):
            self._originator.send_varbinds(self.notifier, f"trap-{i}", None, b"", binds)
        if self.cfg.inform is None:
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
            self.dropped += 1
            log.error("mgmt: notification queue full, the oldest is dropped")
        self.pending.append(binds)
        self._wake.set()

    def varbinds(self, notice: Notice) -> list[Any]:
        m = mib.load()
        binds: list[Any] = [
            (SNMP_TRAP_OID, rfc1902.ObjectIdentifier(m[notice.name].oid)),
        ]
        reading = self.detector.last
        if notice.peer and reading is not None:
            snap = Snapshot(reading)
            for column in ("qkdnLinkName", "qkdnLinkState", "qkdnLinkQber", "qkdnLinkKeyLevel"):
                oid = (*m[column].oid, notice.peer)
                value = snap.get(oid)
                if value is not None:
                    binds.append((oid, _typed(value)))
        if notice.name == "qkdnSlotRollback" and reading is not None:  # its MIB OBJECTS
            snap = Snapshot(reading)
            for name in ("qkdnNodeImageSlot", "qkdnNodeSoftware"):
                value = snap.get((*m[name].oid, 0))
                if value is not None:
                    binds.append(((*m[name].oid, 0), _typed(value)))
        severity = m["qkdnNotifySeverity"].enums[notice.severity]
        binds += [
            ((*m["qkdnNotifySeverity"].oid, 0), rfc1902.Integer32(severity)),
            ((*m["qkdnNotifyResource"].oid, 0), rfc1902.OctetString(notice.resource[:64])),
            ((*m["qkdnNotifyText"].oid, 0), rfc1902.OctetString(notice.text[:255])),
        ]
        return binds

    async def _deliver(self) -> None:
        """INFORMs to the manager in order, each until acknowledged."""
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            binds = self.pending[0]
            if await self._inform(binds):
                self.acked += 1
                if self.pending and self.pending[0] is binds:
                    self.pending.popleft()
            else:
                await asyncio.sleep(RETRY_S)

    async def _inform(self, binds: list[Any]) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def acked(_e: Any, _h: Any, error: Any, _st: Any, _ix: Any, _vb: Any, _c: Any) -> None:
            if not done.done():
                done.set_result(error is None)

        self.sent += 1
        ticks = self.notifier.transport_dispatcher  # its timeout is counted in ticks
        self._originator.send_varbinds(self.notifier, "inform", None, b"", binds, acked)
        while not done.done():
            await asyncio.wait([done], timeout=TICK_S)
            ticks.handle_timer_tick(time.time())
        return done.result()


class Instrumentation:
    """pysnmp's MIB instrumentation interface (read, next) over one reading per PDU;
    OIDs outside QKDN-MIB go to pysnmp's own (SNMP engine and USM counters).

    pysnmp's GETBULK responder asks for each repetition in a call of its own, all within
    one PDU's handling (no await between them, and one ``acFun`` object per PDU): the
    reading taken at the PDU's first call answers its later calls, so a walk of the MIB
    reads the node once per PDU, not once per repetition. pysnmp's own tree holds nothing
    from QKDN-MIB's arc up to :attr:`beyond` (looked up once: the tree's instances are the
    engine's, fixed at start), so a GETNEXT inside the arc that finds our next instance
    before it does not walk pysnmp's tree."""

    def __init__(self, agent: Agent, default: Any) -> None:
        self.agent, self.default = agent, default
        self._pdu: Any = None
        self._snap: Snapshot | None = None
        after = default.read_next_variables((rfc1902.ObjectName(mib.QKDN_ARC), rfc1902.Null()))
        self.beyond: tuple[int, ...] = tuple(after[0][0])
        """pysnmp's first instance after the start of QKDN-MIB's arc."""
        self.access = responder.AccessCache(ACCESS_KEPT, VIEW_DEPTH)

    def _denied(self, oid: tuple[int, ...], i: int, ctx: dict[str, Any]) -> bool:
        """True if ``oid`` is outside the user's view (raises on other ACM refusals);
        decided once per user and OID prefix (the views are set at start, never changed)."""
        who = self.agent.engine.observer.get_execution_context(responder.REQUEST)
        user = (who["securityModel"], str(who["securityName"]), who["securityLevel"])
        return self.access.denied(user, "read", oid, i, ctx)

    def snapshot(self, ctx: dict[str, Any]) -> Snapshot:
        """The node read now, or at this PDU's first call (the same ``acFun`` object)."""
        pdu = ctx.get("acFun")
        if self._snap is None or pdu is None or pdu is not self._pdu:
            self._snap, self._pdu = Snapshot(self.agent.reader()), pdu
        return self._snap

    def read_variables(self, *binds: Any, **ctx: Any) -> list[Any]:
        snap: Snapshot | None = None
        out = []
        for i, (name, val) in enumerate(binds):
            oid = tuple(name)
            if oid[: len(mib.QKDN_ARC)] != mib.QKDN_ARC:
                out += self.default.read_variables((name, val), **ctx)
                continue
            if self._denied(oid, i, ctx):
                out.append((name, rfc1905.noSuchObject))
                continue
            snap = snap or self.snapshot(ctx)
            value = snap.get(oid)
            out.append((name, rfc1905.noSuchInstance if value is None else _typed(value)))
        return out

    def read_next_variables(self, *binds: Any, **ctx: Any) -> list[Any]:
        snap = self.snapshot(ctx)
        out = []
        for i, (name, val) in enumerate(binds):
            oid = tuple(name)
            ours = snap.next(oid)
            while ours is not None and self._denied(ours[0], i, ctx):
                ours = snap.next(ours[0])
            if ours is not None and oid >= mib.QKDN_ARC and ours[0] < self.beyond:
                out.append((rfc1902.ObjectName(ours[0]), _typed(ours[1])))
                continue
            theirs = self.default.read_next_variables((name, val), **ctx)[0]
            out.append(responder.next_of(theirs, ours, _typed))
        return out

    def write_variables(self, *binds: Any, **ctx: Any) -> list[Any]:
        from pysnmp.smi import error as smi_error

        raise smi_error.NoAccessError(name=binds[0][0], idx=0)
