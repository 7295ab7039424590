"""The AKMS's SNMPv3 client of the AAA device, and a request validator on top of it.

:class:`AaaClient` speaks QKDN-AAA-MIB with pysnmp's low-level command generator (raw
OIDs, no MIB resolution per call): an *ask* is one GET of the aaaQuotaTable row whose
index is the question, a *close* and a *report* are one SET each. Once pysnmp has talked
to AAA (engine discovery and the first request), these GETs and SETs are coded, sent and
their responses checked by the fast path (:class:`appliance.snmp.requester.Requester`,
no pyasn1), with the same timeout, retries and error codes; a Report from AAA (restarted,
or the request not in the time window) hands the request back to pysnmp, which learns
the engine again. ``QKDN_AAA_SNMP_FAST=0`` in the environment leaves every request to
pysnmp (the baseline of ``bench/aaa_path.py``). It also runs a notification receiver
for the AAA's ``aaaQuotaRevoked`` INFORMs (port 0 by default).

:class:`AaaValidator` implements the key path's :class:`RequestValidator` seam
(``appliance.kms.seams``) with a :class:`~appliance.aaa.wallet.Wallet`: it allows from
quota held locally, asks ahead of need in the background, settles finished grants and
reports each request's outcome for accounting: :meth:`AaaValidator.completed` commits
it to a durable :class:`~appliance.aaa.outbox.Outbox` before the AKMS answers its UKMS, and
a sender replays the outbox to AAA until each report is acknowledged.

UKMS stocks: a request served from a stock is validated and accounted exactly as one that
crosses the network (the UKMS asks with a ``KsaStocked`` before the keys leave; the AKMS
answers from the wallet and commits the report before its ``Ok``). A refill of a stock
(``ValidationQuery.refill``) is only looked up: it spends no quota and is never billed,
since no SAE holds its keys until a request carries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdgen, ntfrcv

from appliance.aaa import mib
from appliance.aaa.agent import bind_udp, host_port
from appliance.aaa.errors import AaaError, SnmpError
from appliance.aaa.ledger import Reason, Refusal
from appliance.aaa.outbox import CHECKPOINT_WRITES, Outbox, Pending
from appliance.aaa.view import U32, record
from appliance.aaa.wallet import Spent, Terms, Wallet
from appliance.config.schema import load_model, read_toml
from appliance.config.topology import RoutePolicy, Topology
from appliance.kms.relay import Mode
from appliance.kms.seams import Denial, Denied, TopologySessions, ValidationQuery, Verdict
from appliance.snmp import fastpath
from appliance.snmp.requester import Requester, Unanswered, pysnmp_value
from appliance.snmp.responder import encoded
from appliance.snmp.usm import AUTH, PRIV, Credentials

log = logging.getLogger("qkdn.aaa.client")

TIMEOUT_S, RETRIES = 0.5, 2
FAST_ENV = "QKDN_AAA_SNMP_FAST"
"""``0`` in the environment: no fast path, every request coded by pysnmp."""
NO_ANSWER = "AAA did not answer: No SNMP response received before timeout"
REPORT_BATCH = 32
"""Accounting reports per SET (one variable binding each, 7 for an SAE name that
aaaUsageRecord cannot carry)."""
PLAIN = re.compile(r"[!-~]{1,32}", re.ASCII)
"""SAE names an aaaUsageRecord carries (printable ASCII, no space, as aaaUsageMaster)."""
SEND_BATCH_S = 0.2
"""How long the sender lets reports gather before it sends them."""
SEND_IDLE_S, SEND_BACKOFF_MAX_S = 0.05, 2.0
WAITS_KEPT = 100_000
ASK_KEYS = 1000
"""Keys a wallet asks for at a time (AAA may grant less)."""
ASK_AHEAD = 256
"""Pairs an AKMS asks quota for when it starts (the others ask at their first request)."""
MAX_KEY_BITS = 8192
"""Bits per key a first ask reserves, before the contract's largest key is known."""
NULL = (0x05, b"")
MISSING = frozenset((0x80, 0x81, 0x82))
"""noSuchObject, noSuchInstance, endOfMibView (RFC 3416)."""
Bind = tuple[tuple[int, ...], tuple[int, bytes]]
"""A variable binding as the fast path codes it: OID, (BER identifier octet, content)."""
DENIAL = {
    Reason.LIMITS: Denial.LIMITS,
    Reason.QUOTA: Denial.QUOTA,
    Reason.RATE: Denial.QUOTA,
    Reason.UNREACHABLE: Denial.QUOTA,
}
"""How a reason reaches the SAE (ETSI 014 status 400/401/503); any other reason: 401."""
REASON_TEXT = {
    Reason.UNKNOWN_PAIR: "no contract covers this SAE pair",
    Reason.WRONG_NODE: "the master SAE is not served by this KME",
    Reason.SUSPENDED: "the user's service is suspended",
    Reason.OUTSIDE_WINDOW: "outside the contract's validity window",
    Reason.QUOTA: "the contract's quota is used up for now",
    Reason.LIMITS: "outside the contract's size or count limits",
    Reason.RATE: "the contract's rate is exceeded",
    Reason.UNREACHABLE: "keys cannot be authorised at the moment",
}
"""What the SAE reads for each reason: the contract's rule, never a device or node."""


class AkmsAaaConfig(Credentials):
    """What one AKMS needs to reach AAA (``qkdn node run --aaa FILE``; ``qkdn net up``
    writes one per AKMS, mode 0600): its SNMPv3 user, where AAA listens, and where this
    AKMS receives AAA's revocation INFORMs."""

    aaa: str
    inform: str


def load_akms_config(path: Path) -> AkmsAaaConfig:
    return load_model(AkmsAaaConfig, read_toml(path), str(path))


class AaaClient:
    """Commands to AAA from one SNMP engine; after a timeout the next command uses a fresh
    engine (a restarted AAA has a new engine ID and clock: the old engine's discovered
    ones would keep its requests unanswered)."""

    def __init__(self, address: str, creds: Credentials, *, fast: bool | None = None) -> None:
        self.creds, self.address = creds, address
        if fast is None:
            fast = os.environ.get(FAST_ENV, "1") != "0"
        self.fast = (
            Requester(host_port(address), creds, timeout_s=TIMEOUT_S, retries=RETRIES)
            if fast
            else None
        )
        self.engine = self._engine()
        self._stale = False
        self._get, self._set = cmdgen.GetCommandGenerator(), cmdgen.SetCommandGenerator()
        self._rx: engine.SnmpEngine | None = None
        self.m = mib.load()
        self._quota_index = [self.m[n] for n in self.m["aaaQuotaEntry"].index]
        self._ids = itertools.count(secrets.randbelow(2**31))

    def _engine(self) -> engine.SnmpEngine:
        eng = engine.SnmpEngine()
        creds = self.creds
        config.add_v3_user(eng, creds.user, AUTH, creds.auth, PRIV, creds.priv)
        config.add_target_parameters(eng, "aaa-params", creds.user, "authPriv")
        config.add_transport(
            eng, config.SNMP_UDP_DOMAIN, udp.UdpAsyncioTransport().open_client_mode()
        )
        config.add_target_address(
            eng,
            "aaa",
            config.SNMP_UDP_DOMAIN,
            host_port(self.address),
            "aaa-params",
            timeout=int(TIMEOUT_S * 100),
            retryCount=RETRIES,
        )
        if self.fast is not None:
            self.fast.watch(eng)
        return eng

    def _fresh(self) -> engine.SnmpEngine:
        """The engine for the next command: a new one after a timeout (the old one is
        closed once the commands still in flight on it have timed out too)."""
        if self._stale:
            self._stale = False
            old, self.engine = self.engine, self._engine()
            grace = TIMEOUT_S * (RETRIES + 1) + 1
            asyncio.get_running_loop().call_later(grace, _close_engine, old)
        return self.engine

    def fast_summary(self) -> dict[str, int]:
        """Requests answered on the fast path, handed to pysnmp by a Report, discarded."""
        f = self.fast
        if f is None:
            return {}
        return {
            "snmp_fast": f.answered,
            "snmp_fallbacks": f.fallbacks,
            "snmp_discarded": f.discarded,
        }

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
        for eng in (self.engine, self._rx):
            if eng is not None and eng.transport_dispatcher is not None:
                eng.close_dispatcher()

    # -- commands -------------------------------------------------------------------------
    async def _call(self, pdu: int, binds: list[Bind]) -> list[Bind]:
        """The variable bindings of AAA's response to a GET or SET (:data:`fastpath.GET`,
        ``SET``): on the fast path if the engine is known, else (or after a Report) pysnmp's."""
        fast = self.fast
        if fast is not None and fast.known is not None and not self._stale:
            try:
                answer = await fast.request(pdu, binds)
            except fastpath.Fallback as exc:
                log.info("aaa: request left to pysnmp: %s", exc)
            except Unanswered as exc:
                self._stale = True
                raise SnmpError(NO_ANSWER, code="AAA-UNREACHABLE") from exc
            else:
                if answer.status:
                    name = fastpath.ERROR_STATUS[answer.status : answer.status + 1]
                    status = name[0] if name else str(answer.status)
                    raise SnmpError(f"AAA refused: {status} at {answer.index}")
                return answer.binds
        try:
            typed = [(oid, pysnmp_value(tag, raw)) for oid, (tag, raw) in binds]
        except (KeyError, ValueError) as exc:
            raise SnmpError(f"no SNMP type for a value: {exc}", code="AAA-VALUE") from exc
        return [(tuple(oid), encoded(v)) for oid, v in await self._slow(pdu, typed)]

    async def _slow(self, pdu: int, binds: list[tuple[tuple[int, ...], Any]]) -> list[Any]:
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def answered(
            _e: Any, _h: Any, error: Any, status: Any, index: Any, vbs: Any, _c: Any
        ) -> None:
            if done.done():
                return
            if error:
                self._stale = True
                done.set_exception(
                    SnmpError(f"AAA did not answer: {error}", code="AAA-UNREACHABLE")
                )
                return
            if self.fast is not None:
                self.fast.learnt()  # an authenticated response: the engine is AAA's
            if status:
                done.set_exception(SnmpError(f"AAA refused: {status.prettyPrint()} at {index}"))
            else:
                done.set_result(list(vbs))

        generator = self._get if pdu == fastpath.GET else self._set
        generator.send_varbinds(self._fresh(), "aaa", None, "", binds, answered)
        return await done

    async def get(self, oids: list[tuple[int, ...]]) -> list[Any]:
        """A plain GET of ``oids`` (values in order, as pysnmp's types)."""
        got = await self._call(fastpath.GET, [(o, NULL) for o in oids])
        try:
            return [pysnmp_value(tag, raw) for _, (tag, raw) in got]
        except (KeyError, ValueError) as exc:
            raise SnmpError("AAA's answer is malformed", code="AAA-ANSWER") from exc

    async def ask(
        self, ukms: int, master: str, slave: str, keys: int, bits: int
    ) -> Terms | Refusal:
        """Ask for quota for one SAE pair (one GET)."""
        rid = next(self._ids) % 2**32
        suffix = mib.encode_index(
            self._quota_index, [ukms, rid, master.encode(), slave.encode(), keys, bits]
        )
        values = await self._call(fastpath.GET, [(self.m["aaaQuotaAnswer"].oid + suffix, NULL)])
        tag, raw = values[0][1] if values else (0x80, b"")
        if tag in MISSING:
            raise SnmpError("AAA gave no answer for this ask (not in our view?)", code="AAA-DENIED")
        if tag != 0x04:
            raise SnmpError("AAA's answer is malformed", code="AAA-ANSWER")
        return parse_answer(ukms, raw)

    async def close_grant(self, ukms: int, grant: int, used_keys: int, used_bits: int) -> None:
        suffix = (ukms, grant)
        await self._call(
            fastpath.SET,
            [
                (self.m["aaaGrantUsedKeys"].oid + suffix, unsigned(used_keys)),
                (self.m["aaaGrantUsedBits"].oid + suffix, unsigned(min(used_bits, U32))),
                (self.m["aaaGrantState"].oid + suffix, (0x02, fastpath.integer(3))),
            ],
        )

    async def report(self, ukms: int, request: str, **fields: Any) -> None:
        """One request's outcome, for accounting (a retry with the same ID counts once)."""
        await self.report_many([Pending(ukms=ukms, request=request, **fields)])

    async def report_many(self, reports: list[Pending]) -> None:
        """Several requests' outcomes in one SET: a row each, as one aaaUsageRecord (or,
        for SAE names it cannot carry, as the row's columns, those at 0 left out)."""
        m = self.m
        binds: list[Bind] = []
        for p in reports:
            rid = p.request.encode()
            suffix = (p.ukms, len(rid), *rid)
            outcome = m["aaaUsageOutcome"].enums[p.outcome]
            if PLAIN.fullmatch(p.master) and PLAIN.fullmatch(p.slave):
                fields = (p.master, p.slave, outcome, int(p.reason), p.keys, min(p.bits, U32))
                value = record(*fields, p.grant)
                binds.append((m["aaaUsageRecord"].oid + suffix, (0x04, value)))
                continue
            binds += [
                (m["aaaUsageMaster"].oid + suffix, (0x04, p.master.encode("iso-8859-1"))),
                (m["aaaUsageSlave"].oid + suffix, (0x04, p.slave.encode("iso-8859-1"))),
                (m["aaaUsageOutcome"].oid + suffix, (0x02, fastpath.integer(outcome))),
            ]
            if p.reason:
                reason = (0x02, fastpath.integer(int(p.reason)))
                binds.append((m["aaaUsageReason"].oid + suffix, reason))
            for column, count in (
                ("aaaUsageKeys", p.keys),
                ("aaaUsageBits", min(p.bits, U32)),
                ("aaaUsageGrant", p.grant),
            ):
                if count:
                    binds.append((m[column].oid + suffix, unsigned(count)))
        await self._call(fastpath.SET, binds)

    # -- revocations ----------------------------------------------------------------------
    def listen(self, address: str, on_revoke: Callable[[str, int], None]) -> int:
        """Receive aaaQuotaRevoked INFORMs on ``address``; return the UDP port."""
        sock = bind_udp(address)
        port = int(sock.getsockname()[1])
        self._rx = rx = engine.SnmpEngine()
        config.add_transport(
            rx, config.SNMP_UDP_DOMAIN, udp.UdpAsyncioTransport().open_server_mode(sock=sock)
        )
        config.add_v3_user(rx, self.creds.user, AUTH, self.creds.auth, PRIV, self.creds.priv)
        contract_oid = (*self.m["aaaNotifyContract"].oid, 0)
        grant_oid = (*self.m["aaaNotifyGrant"].oid, 0)

        def received(_e: Any, _s: Any, _ce: Any, _cn: Any, binds: Any, _c: Any) -> None:
            got = {tuple(name): value for name, value in binds}
            if contract_oid in got and grant_oid in got:
                on_revoke(bytes(got[contract_oid]).decode("ascii", "replace"), int(got[grant_oid]))

        ntfrcv.NotificationReceiver(rx, received)
        return port


def unsigned(n: int) -> tuple[int, bytes]:
    """An Unsigned32 (Gauge32) value, coded."""
    return 0x42, fastpath.integer(n)


def served_pairs(topology: Topology, akms: int) -> list[tuple[int, str, str]]:
    """(UKMS, master, slave) of every pair whose master sits at a UKMS of this AKMS and
    whose keys cross the network: what the AKMS will validate."""
    ukms = [p.id for _, p in topology.neighbours(akms) if "ukms" in p.roles]
    return [
        (u, master, slave)
        for u in ukms
        for master, slave in TopologySessions(topology, u).master_pairs()
    ]


def _close_engine(eng: engine.SnmpEngine) -> None:
    if eng.transport_dispatcher is not None:
        eng.close_dispatcher()


def parse_answer(ukms: int, text: bytes) -> Terms | Refusal:
    """aaaQuotaAnswer: twelve decimal numbers (QUOTA_COLUMNS' order), then the contract,
    then (a grant) aaaQuotaRoutePolicy's number (absent from an older AAA: balanced)."""
    fields = text.decode("ascii", "replace").split(" ")
    try:
        n = [int(x) for x in fields[:12]]
        contract = fields[12] if len(fields) > 12 else ""
        reason = Reason(n[0])
        if len(n) < 12:
            raise ValueError("short")
    except (ValueError, IndexError) as exc:
        raise SnmpError("AAA's answer is malformed", code="AAA-ANSWER") from exc
    if reason != Reason.NONE:
        return Refusal(reason=reason, message=REASON_TEXT.get(reason, "not authorised"))
    return Terms(
        ukms=ukms,
        grant=n[1],
        contract=contract,
        keys=n[2],
        bits=n[3],
        lifetime_s=n[4] / 1000,
        ukms_b=n[5],
        akms_b=n[6],
        mode={1: "gcm", 2: "otp"}.get(n[7], "gcm"),
        max_key_size=n[8],
        keys_per_request=n[9],
        max_rate=n[10],
        keys_per_period=n[11],
        route_policy=route_policy(fields[13] if len(fields) > 13 else ""),
    )


POLICY_OF: dict[str, RoutePolicy] = {"1": "balanced", "2": "fewest-hops", "3": "most-key"}
"""aaaQuotaRoutePolicy's enumeration, as aaaQuotaAnswer spells it."""


def route_policy(text: str) -> RoutePolicy:
    """A routing policy class from aaaQuotaAnswer (balanced when absent or unknown)."""
    return POLICY_OF.get(text, "balanced")


class AaaValidator:
    """A RequestValidator for the AKMS: allow from local quota, ask ahead, fail closed;
    account for every request it decided (through ``outbox``, when given)."""

    def __init__(
        self,
        client: AaaClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        outbox: Outbox | None = None,
    ) -> None:
        self.client, self.clock, self.outbox = client, clock, outbox
        self.wallet = Wallet()
        self._open: dict[int, dict[str, tuple[ValidationQuery, Spent]]] = {}
        """Requests allowed and not yet completed, by the AKMS's request number, then by
        slave (a request with additional slaves is validated for each; a pair validated
        again for the same request replaces its entry, so it is accounted once)."""
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self.reported = 0
        self.waits: deque[float] = deque(maxlen=WAITS_KEPT)
        """Seconds each recent validation waited on AAA (0: served from held quota)."""
        self.decide_s: deque[float] = deque(maxlen=WAITS_KEPT)
        self.account_s: deque[float] = deque(maxlen=WAITS_KEPT)
        """Seconds of the key path's own time each recent request spent here, waits on AAA
        aside: deciding (the wallet, the refusal's report) and accounting (the report's
        commit before the answer leaves)."""
        self._asking: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._known: dict[tuple[str, str], Terms] = {}
        """The terms AAA last granted per pair: asks reserve no more bits than its largest
        key, and Status keeps its terms while only the quota is spent."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.alarms = 0

    def ask_ahead(self, pairs: list[tuple[int, str, str]]) -> None:
        """Ask for quota for these (UKMS, master, slave) pairs now, in the background, so
        that a pair's first request does not wait on AAA (at most :data:`ASK_AHEAD`)."""
        for ukms, master, slave in pairs[:ASK_AHEAD]:
            self._ask_soon(ukms, (master, slave))

    def revoked(self, contract: str, grant: int) -> None:
        """An INFORM arrived: drop the grant (0: every grant of the contract) at once."""
        dropped = self.wallet.revoke(grant=grant or None, contract=contract if grant == 0 else None)
        log.info("aaa: quota revoked", extra={"contract": contract, "grants": dropped})
        self._settle()

    def validate(self, query: ValidationQuery) -> Verdict | Awaitable[Verdict]:
        """The verdict at once when the wallet can decide (quota held, or a refusal still
        remembered): no task, no await on the key path; else an awaitable that asks AAA
        first (the request waits one SNMP round trip, counted in :attr:`waits`)."""
        if query.refill:
            return self._route(query)
        began = time.perf_counter()
        pair = (query.master, query.slave)
        result = self.wallet.spend(
            query.master, query.slave, query.number, query.size, self.clock()
        )
        if result is None:
            return self._validate_after_ask(query)
        self.waits.append(0.0)
        if self.wallet.wants(*pair, self.clock()):
            self._ask_soon(query.ukms, pair)
        return self._decided(query, result, began)

    async def _validate_after_ask(self, query: ValidationQuery) -> Verdict:
        pair = (query.master, query.slave)
        began = time.perf_counter()
        await self._ask(query.ukms, pair)
        asked = time.perf_counter()
        self.waits.append(asked - began)
        result = self.wallet.spend(*pair, query.number, query.size, self.clock())
        if result is None:
            result = Refusal(reason=Reason.QUOTA, message="no quota left for this request")
        return self._decided(query, result, asked)

    def _decided(self, query: ValidationQuery, result: Spent | Refusal, began: float) -> Verdict:
        self._settle()
        if self.outbox is not None:
            result = self._account(query, result)
        self.decide_s.append(time.perf_counter() - began)
        return verdict(result)

    async def _route(self, query: ValidationQuery) -> Verdict:
        """A stock refill: where the slave is and how keys cross, from the pair's terms
        (a grant held, else a fresh ask); nothing spent, nothing accounted. A pair AAA
        refuses (suspended, unknown, outside its window) gets no stock; a pair whose quota
        is used up keeps its stock (its requests are refused one by one)."""
        try:
            t = await self.terms(query.ukms, query.master, query.slave)
        except Denied as exc:
            return Verdict(denied=exc)
        return Verdict(
            mode=Mode[t.mode.upper()],
            ukms_b=t.ukms_b,
            akms_b=t.akms_b,
            route_policy=t.route_policy,
        )

    async def terms(self, ukms: int, master: str, slave: str) -> Terms:
        """The contract's terms for a pair: from a grant held, else from a fresh ask (which
        the next requests spend). Denied if AAA refuses."""
        pair = (master, slave)
        held = self.wallet.terms(*pair, self.clock())
        if held is None:
            await self._ask(ukms, pair)
            held = self.wallet.terms(*pair, self.clock())
        if held is None:
            refused = self.wallet.refusals.get(pair)
            result = refused[1] if refused else Refusal(reason=Reason.QUOTA, message="no quota")
            if result.reason in (Reason.QUOTA, Reason.RATE):  # the terms stand; only the
                known = self._known.get(pair)  # quota is spent
                if known is not None:
                    return known
            denied = verdict(result).denied
            assert denied is not None
            raise denied
        return held

    # -- accounting --------------------------------------------------------------------------
    def _account(self, query: ValidationQuery, result: Spent | Refusal) -> Spent | Refusal:
        """A refusal is reported at once; an allowed request when it completes. If the
        outbox cannot take the report, the request is refused (no unaccounted keys)."""
        if isinstance(result, Spent):
            self._open.setdefault(query.req, {})[query.slave] = (query, result)
            return result
        try:
            self._report(query, "refused", reason=result.reason)
        except AaaError as exc:
            log.error("aaa: cannot account for a refusal: %s [%s]", exc.message, exc.code)
        return result

    def completed(self, req: int, ok: bool) -> None:
        """The AKMS is about to answer request ``req``: with keys (``ok``) or an error.
        Called before the answer leaves, so that the report is on disk first."""
        found = self._open.pop(req, {}).values()
        if self.outbox is None or not found:
            return
        began = time.perf_counter()
        for query, spent in found:  # each slave's pair is accounted for
            self._completed(query, spent, ok)
        self.account_s.append(time.perf_counter() - began)

    def _completed(self, query: ValidationQuery, spent: Spent, ok: bool) -> None:
        if not ok:
            self.wallet.unspend(query.master, query.slave, spent, query.number, query.size)
        try:
            if ok:
                bits = query.number * query.size
                self._report(query, "delivered", keys=query.number, bits=bits, grant=spent.grant)
            else:
                self._report(query, "failed", grant=spent.grant)
        except AaaError as exc:  # a full or failing disk: an alarm; the answer still leaves
            self.alarms += 1
            log.error("aaa: cannot account for a request: %s [%s]", exc.message, exc.code)

    def _report(self, query: ValidationQuery, outcome: str, **fields: Any) -> None:
        assert self.outbox is not None
        self.outbox.add(
            Pending(
                ukms=query.ukms,
                request=secrets.token_hex(8),
                master=query.master,
                slave=query.slave,
                outcome=outcome,
                **fields,
            )
        )
        self._wake.set()

    def start(self) -> None:
        """Start replaying the outbox to AAA (what an earlier run left there first)."""
        if self.outbox is not None and self._sender is None:
            self._sender = asyncio.ensure_future(self._send_loop())

    def wait_summary(self) -> dict[str, float]:
        """How long recent validations waited on AAA: count, waits, p50, p99, max (ms);
        and the key path's own time here per request, p50 and p99 (µs): deciding, and
        accounting (the outbox commit)."""
        waits = sorted(self.waits)
        if not waits:
            return {"validations": 0}
        out = {
            "validations": len(waits),
            "waited": sum(1 for w in waits if w > 0),
            "p50_ms": round(_at(waits, 0.50) * 1e3, 3),
            "p99_ms": round(_at(waits, 0.99) * 1e3, 3),
            "max_ms": round(waits[-1] * 1e3, 3),
        }
        for name, kept in (("decide", self.decide_s), ("account", self.account_s)):
            if kept:
                ordered = sorted(kept)
                out[f"{name}_p50_us"] = round(_at(ordered, 0.50) * 1e6, 1)
                out[f"{name}_p99_us"] = round(_at(ordered, 0.99) * 1e6, 1)
        return out

    async def close(self) -> None:
        log.info("aaa: validations", extra={**self.wait_summary(), **self.client.fast_summary()})
        if self._sender is not None:
            self._sender.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)  # let the cancelled tasks unwind before the outbox closes
        if self.outbox is not None:
            self.outbox.close()

    async def _send_loop(self) -> None:
        """Reports leave in batches, a little after they are committed (accounting is not
        on the key path: one SET of many rows costs the AKMS's loop far less than one
        each); a batch AAA refuses is retried row by row, a silent AAA with back-off."""
        assert self.outbox is not None
        backoff = SEND_IDLE_S
        while True:
            if self.outbox.writes >= CHECKPOINT_WRITES:
                await self._checkpoint()
            rows = self.outbox.due(REPORT_BATCH)
            if not rows:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                await asyncio.sleep(SEND_BATCH_S)  # let the batch fill
                continue
            if await self._send(rows) or (len(rows) > 1 and await self._one_by_one(rows)):
                backoff = SEND_IDLE_S
                continue
            await asyncio.sleep(backoff)
            backoff = min(SEND_BACKOFF_MAX_S, backoff * 2)

    async def _checkpoint(self) -> None:
        assert self.outbox is not None
        try:
            await asyncio.to_thread(self.outbox.checkpoint)
        except AaaError as exc:
            log.warning("aaa: outbox checkpoint: %s [%s]", exc.message, exc.code)

    async def _one_by_one(self, rows: list[Pending]) -> bool:
        sent = [await self._send([p]) for p in rows]
        return any(sent)

    async def _send(self, rows: list[Pending]) -> bool:
        assert self.outbox is not None
        try:
            await self.client.report_many(rows)
        except SnmpError as exc:
            log.warning("aaa: %d report(s) not acknowledged yet: %s", len(rows), exc.message)
            return False
        self.outbox.done([(p.ukms, p.request) for p in rows])
        self.reported += len(rows)
        return True

    def _ask_soon(self, ukms: int, pair: tuple[str, str]) -> None:
        if pair not in self._asking:
            self._spawn(self._ask(ukms, pair))

    async def _ask(self, ukms: int, pair: tuple[str, str]) -> None:
        running = self._asking.get(pair)
        if running is not None:
            await asyncio.shield(running)
            return
        task = asyncio.ensure_future(self._fetch(ukms, pair))
        self._asking[pair] = task
        try:
            await asyncio.shield(task)
        finally:
            self._asking.pop(pair, None)

    async def _fetch(self, ukms: int, pair: tuple[str, str]) -> None:
        sent = self.clock()
        try:
            known = self._known.get(pair)
            size = known.max_key_size if known else MAX_KEY_BITS
            answer = await self.client.ask(ukms, *pair, ASK_KEYS, ASK_KEYS * size)
        except SnmpError as exc:
            self.alarms += 1
            log.error("aaa: unreachable, failing closed for new quota: %s", exc.message)
            answer = Refusal(reason=Reason.UNREACHABLE, message=REASON_TEXT[Reason.UNREACHABLE])
        if isinstance(answer, Terms):
            self._known[pair] = answer
        self.wallet.add(pair, answer, sent)

    def _settle(self) -> None:
        for _master, _slave, held in self.wallet.to_close(self.clock()):
            t = held.terms
            self._spawn(self.client.close_grant(t.ukms, t.grant, held.used_keys, held.used_bits))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("aaa: %s", task.exception())


def _at(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def verdict(result: Spent | Refusal) -> Verdict:
    """A wallet's answer as the key path's seam takes it."""
    if isinstance(result, Refusal):
        why = DENIAL.get(result.reason, Denial.UNAUTHORISED)
        return Verdict(denied=Denied(result.message, why=why))
    return Verdict(
        mode=Mode[result.mode.upper()],
        ukms_b=result.ukms_b,
        akms_b=result.akms_b,
        route_policy=result.route_policy,
    )
