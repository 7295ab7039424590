"""``qkdn aaa run``: the AAA device's SNMPv3 agent, a thin pysnmp 7 (asyncio) adapter.

* SNMPv3 only, authPriv only: HMAC-SHA-256 authentication, AES-128 privacy. No community
  is configured, so v1/v2c requests are dropped and counted (snmpInBadCommunityNames);
  noAuth requests, unknown users and wrong keys are refused by USM and counted
  (usmStatsUnsupportedSecLevels, usmStatsUnknownUserNames, usmStatsWrongDigests), all
  readable by the operator.
* VACM: the operator's user reads everything and writes the directory and contracts; the
  SNMP user of each AKMS reads the quota rows and writes the grant and usage rows whose
  first index is one of its own UKMSs (one view family per column and UKMS), nothing
  else. The views follow the registry's UKMS -> AKMS attachments.
* The MIB instances come from :class:`appliance.aaa.view.MibView`; OIDs outside the AAA
  arc go to pysnmp's own instrumentation (SNMP engine and USM counters).
* Every :data:`appliance.aaa.service.POLL_S` the agent takes in registry changes made by
  the ``qkdn aaa`` command; the grants a change revokes are announced to their AKMS with
  an ``aaaQuotaRevoked`` INFORM (sent from a second engine, retried until acknowledged).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import Field, model_validator
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import ntforg
from pysnmp.proto import rfc1902, rfc1905
from pysnmp.smi import error as smi_error

from appliance.aaa import mib
from appliance.aaa.accounting import Accounting
from appliance.aaa.errors import AaaError, SnmpError
from appliance.aaa.ledger import Grant
from appliance.aaa.registry import Registry
from appliance.aaa.service import POLL_S, AaaService
from appliance.aaa.view import MibView, SetFailure
from appliance.config.schema import Strict, load_model, read_toml
from appliance.snmp import responder, usm
from appliance.snmp.usm import AUTH, PRIV, SNMP_TRAP_OID, Credentials

log = logging.getLogger("qkdn.aaa")

INFORM_TIMEOUT_S, INFORM_RETRIES = 0.25, 3
ACCESS_KEPT = 10_000
"""VACM decisions kept (:meth:`Instrumentation._denied`); beyond, they are forgotten."""


class AkmsUser(Credentials):
    id: int = Field(ge=1, le=999)
    inform: str | None = None
    """host:port of the AKMS's notification receiver (aaaQuotaRevoked INFORMs)."""


class AgentConfig(Strict):
    listen: str = "127.0.0.1:16161"
    registry: str = "registry.db"
    accounting: str = "accounting.db"
    signing_key: str | None = None
    """Ed25519 private key (PEM) that signs the accounting's daily heads."""
    operator: Credentials
    akms: list[AkmsUser] = Field(default_factory=list, max_length=999)

    @model_validator(mode="after")
    def _distinct(self) -> AgentConfig:
        users = [self.operator.user, *(a.user for a in self.akms)]
        if len(set(users)) != len(users):
            raise ValueError("every SNMP user name must be distinct")
        if len({a.id for a in self.akms}) != len(self.akms):
            raise ValueError("every AKMS may appear once")
        return self


def load_config(path: Path) -> tuple[AgentConfig, Path]:
    """The agent's configuration; relative paths in it are relative to its folder."""
    return load_model(AgentConfig, read_toml(path), str(path)), path.parent


def signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise AaaError(f"{path}: cannot read the signing key: {exc}", code="AAA-KEY") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AaaError(f"{path}: not an Ed25519 private key", code="AAA-KEY")
    return key


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; port 0 (any free port) is allowed."""
    try:
        return usm.host_port(address)
    except usm.UdpError as exc:
        raise SnmpError(exc.message, code="AAA-VALUE") from exc


def bind_udp(address: str) -> socket.socket:
    try:
        return usm.bind_udp(address)
    except usm.UdpError as exc:
        code = "AAA-LISTEN" if exc.code == "SNMP-LISTEN" else "AAA-VALUE"
        raise SnmpError(exc.message, code=code) from exc


class Agent:
    """The SNMPv3 agent over an :class:`AaaService`."""

    def __init__(self, service: AaaService, cfg: AgentConfig) -> None:
        self.service, self.cfg = service, cfg
        self.view = MibView(service)
        self.users = {a.user: a.id for a in cfg.akms}
        self.engine = engine.SnmpEngine()
        self.notifier = engine.SnmpEngine()
        self.port = 0
        self._views: set[tuple[str, tuple[int, ...]]] = set()
        self._views_of: object = None
        """The registry snapshot the views were made from (the same one: nothing to do)."""
        self.access = responder.AccessCache(ACCESS_KEPT)
        """VACM's decisions while the views stay the same, by AKMS (None: the operator)."""
        """The longest subtree of any view family: VACM's decision for an OID (families
        without masks) depends on no sub-identifier beyond it."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._informer = ntforg.NotificationOriginator()
        self.served: responder.Served | None = None

    # -- start and stop ------------------------------------------------------------------
    async def start(self) -> int:
        """Listen; return the UDP port (useful with port 0)."""
        sock = bind_udp(self.cfg.listen)
        self.port = sock.getsockname()[1]
        self._users()
        self.served = responder.serve(
            self.engine,
            sock,
            [self.cfg.operator, *self.cfg.akms],
            lambda default: Instrumentation(self, default),
            writable=True,
        )
        self._notifier_setup()
        self._poller = asyncio.create_task(self._poll())
        return self.port

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for task in list(self._tasks):
            task.cancel()
        for eng in (self.engine, self.notifier):
            if eng.transport_dispatcher is not None:
                eng.close_dispatcher()

    # -- USM and VACM ------------------------------------------------------------------------
    def _users(self) -> None:
        op = self.cfg.operator
        config.add_context(self.engine, "")
        config.add_v3_user(self.engine, op.user, AUTH, op.auth, PRIV, op.priv)
        config.add_vacm_group(self.engine, "operator", 3, op.user)
        config.add_vacm_access(
            self.engine,
            "operator",
            "",
            3,
            "authPriv",
            "exact",
            "operator-read",
            "operator-write",
            "none",
        )
        config.add_vacm_view(self.engine, "operator-read", "included", (1, 3, 6, 1), "")
        for subtree in ("aaaDirectory", "aaaContracts"):
            config.add_vacm_view(self.engine, "operator-write", "included", mib.oid(subtree), "")
        for a in self.cfg.akms:
            config.add_v3_user(self.engine, a.user, AUTH, a.auth, PRIV, a.priv)
            config.add_vacm_group(self.engine, f"akms-{a.id}", 3, a.user)
            config.add_vacm_access(
                self.engine,
                f"akms-{a.id}",
                "",
                3,
                "authPriv",
                "exact",
                f"akms-{a.id}-read",
                f"akms-{a.id}-write",
                "none",
            )
        self._akms_views()

    def _akms_views(self) -> None:
        """Each AKMS may touch rows of its own UKMSs only (the registry decides which).

        One view family per column and UKMS, without masks: pysnmp 7.1's masked families
        fail on OIDs shorter than the mask (IndexError in its VACM)."""
        snap = self.service.snap
        if snap is self._views_of:  # every SET and every poll asks: most find no change
            return
        self._views_of = snap
        wanted: set[tuple[str, tuple[int, ...]]] = set()
        m = mib.load()
        for ukms, akms in snap.ukms.items():
            for entry in ("aaaQuotaEntry", "aaaGrantEntry", "aaaUsageEntry"):
                for col in m.values():
                    if col.oid[:-1] != m[entry].oid or col.access == "not-accessible":
                        continue
                    wanted.add((f"akms-{akms}-read", (*col.oid, ukms)))
                    if col.access == "read-write":
                        wanted.add((f"akms-{akms}-write", (*col.oid, ukms)))
        if wanted == self._views and self.access.depth:  # unchanged: VACM's decisions stand
            return
        fixed = [(1, 3, 6, 1), mib.oid("aaaDirectory"), mib.oid("aaaContracts")]
        self.access.reset(max(len(s) for s in [*fixed, *(sub for _name, sub in wanted)]))
        for name, subtree in self._views - wanted:
            config.delete_vacm_view(self.engine, name, subtree)
        for name, subtree in wanted - self._views:
            config.add_vacm_view(self.engine, name, "included", subtree, "")
        self._views = wanted

    def who(self) -> int | None:
        """The AKMS behind the request being served (None: the operator)."""
        ctx = self.engine.observer.get_execution_context("rfc3412.receiveMessage:request")
        return self.users.get(str(ctx["securityName"]))

    # -- changes and INFORMs -------------------------------------------------------------
    async def _poll(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(POLL_S)
            try:
                self.revoked(self.service.refresh())
                ticks += 1
                if ticks % 10 == 0:
                    self.service.tick()
            except AaaError as exc:
                log.error("aaa: %s [%s]", exc.message, exc.code)

    def revoked(self, grants: list[Grant]) -> None:
        """Registry changed: refresh the views; tell each AKMS which quota it lost, one
        INFORM per AKMS and contract (naming the grant, or 0 for all of the contract's)."""
        self._akms_views()
        lost: dict[tuple[int, str], list[int]] = {}
        for grant in grants:
            lost.setdefault((grant.akms, grant.contract), []).append(grant.id)
        for (akms, contract), ids in lost.items():
            self._spawn(self._inform(akms, contract, ids[0] if len(ids) == 1 else 0))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notifier_setup(self) -> None:
        responder.client_transport(self.notifier)
        for a in self.cfg.akms:
            if a.inform is not None:
                responder.add_notification_target(
                    self.notifier,
                    f"akms-{a.id}",
                    "inform",
                    a,
                    host_port(a.inform),
                    timeout_s=INFORM_TIMEOUT_S,
                    retries=INFORM_RETRIES,
                )

    async def _inform(self, akms: int, contract: str, grant: int) -> None:
        """One aaaQuotaRevoked INFORM to an AKMS; the ack is counted."""
        target = next((a for a in self.cfg.akms if a.id == akms and a.inform), None)
        if target is None:
            return
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def acked(_e: Any, _h: Any, error: Any, _st: Any, _ix: Any, _vb: Any, _c: Any) -> None:
            if not done.done():
                done.set_result(error is None)

        binds = [
            (SNMP_TRAP_OID, rfc1902.ObjectIdentifier(mib.oid("aaaQuotaRevoked"))),
            ((*mib.oid("aaaNotifyContract"), 0), rfc1902.OctetString(contract)),
            ((*mib.oid("aaaNotifyGrant"), 0), rfc1902.Unsigned32(grant)),
        ]
        self._informer.send_varbinds(self.notifier, f"akms-{target.id}", None, b"", binds, acked)
        self.service.counters.informs_sent += 1
        if await done:
            self.service.counters.informs_acked += 1
        else:
            log.warning("aaa: AKMS %d did not acknowledge a revocation (%s)", akms, contract)
        self.service.generation += 1


# -- the pysnmp instrumentation over MibView ------------------------------------------------
SYNTAX = {
    "Unsigned32": rfc1902.Unsigned32,
    "Counter64": rfc1902.Counter64,
    "OCTET STRING": rfc1902.OctetString,
    "INTEGER": rfc1902.Integer32,
}
SET_ERRORS: dict[str, type[smi_error.SmiError]] = {
    "notWritable": smi_error.NotWritableError,
    "wrongValue": smi_error.WrongValueError,
    "wrongType": smi_error.WrongTypeError,
    "noCreation": smi_error.NoCreationError,
    "inconsistentValue": smi_error.InconsistentValueError,
}


def _in_arc(oid: tuple[int, ...]) -> bool:
    return oid[: len(mib.AAA_ARC)] == mib.AAA_ARC


class Instrumentation:
    """pysnmp's MIB instrumentation interface (read/next/write) over a MibView."""

    def __init__(self, agent: Agent, default: Any) -> None:
        self.agent, self.view, self.default = agent, agent.view, default

    def _denied(self, kind: str, oid: tuple[int, ...], i: int, ctx: dict[str, Any]) -> bool:
        """True if ``oid`` is outside the user's view (raises on other ACM refusals);
        decided once per AKMS, kind and OID prefix while the views stay the same
        (Agent._akms_views resets the cache)."""
        return self.agent.access.denied(self.agent.who(), kind, oid, i, ctx)

    def read_variables(self, *binds: Any, **ctx: Any) -> list[Any]:
        out = []
        who = self.agent.who()
        for i, (name, val) in enumerate(binds):
            oid = tuple(name)
            if not _in_arc(oid):
                out += self.default.read_variables((name, val), **ctx)
                continue
            if self._denied("read", oid, i, ctx):
                out.append((name, rfc1905.noSuchObject))
                continue
            value = self.view.get(oid, who)
            out.append((name, rfc1905.noSuchInstance if value is None else _typed(value)))
        return out

    def read_next_variables(self, *binds: Any, **ctx: Any) -> list[Any]:
        out = []
        for i, (name, val) in enumerate(binds):
            theirs = self.default.read_next_variables((name, val), **ctx)[0]
            ours = self._next(tuple(name), i, ctx)
            out.append(responder.next_of(theirs, ours, _typed))
        return out

    def _next(self, oid: tuple[int, ...], i: int, ctx: dict[str, Any]) -> Any:
        found = self.view.next(oid)
        while found is not None and self._denied("read", found[0], i, ctx):
            found = self.view.next(found[0])
        return found

    def write_variables(self, *binds: Any, **ctx: Any) -> list[Any]:
        plain: list[tuple[tuple[int, ...], int | bytes]] = []
        for i, (name, val) in enumerate(binds):
            oid = tuple(name)
            if not _in_arc(oid) or self._denied("write", oid, i, ctx):
                raise smi_error.NoAccessError(name=name, idx=i)
            found = self.view.locate(oid)
            if found is None:
                raise smi_error.NoCreationError(name=name, idx=i)
            if val.tagSet != SYNTAX[found[0].syntax].tagSet:
                raise smi_error.WrongTypeError(name=name, idx=i)
            plain.append((oid, bytes(val) if found[0].syntax == "OCTET STRING" else int(val)))
        try:
            revoked = self.view.set(plain, self.agent.who())
        except SetFailure as exc:
            raise SET_ERRORS[exc.status](name=binds[exc.index][0], idx=exc.index) from exc
        except AaaError as exc:
            log.warning("aaa: SET refused: %s", exc.message)
            raise smi_error.InconsistentValueError(name=binds[0][0], idx=0) from exc
        self.agent.revoked(revoked)
        return list(binds)


def _typed(value: tuple[str, int | bytes]) -> Any:
    syntax, raw = value
    return SYNTAX[syntax](raw)


async def serve(config_path: Path, *, ready: asyncio.Event | None = None) -> None:
    """Run the agent of a configuration file until cancelled."""
    cfg, base = load_config(config_path)
    registry = Registry(base / cfg.registry)
    accounting = Accounting(base / cfg.accounting)
    key = signing_key(base / cfg.signing_key) if cfg.signing_key else None
    service = AaaService(registry, accounting, signing_key=key)
    agent = Agent(service, cfg)
    port = await agent.start()
    log.info("aaa: SNMPv3 agent on %s (port %d)", cfg.listen, port)
    print(f"aaa: listening on udp port {port}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await agent.close()
        registry.close()
        accounting.close()
