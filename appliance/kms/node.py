"""A KMS node: the adapter that runs the role engines' actions over real I/O.

The protocol lives in the engines (:mod:`appliance.kms.engines`), which do no I/O. A
:class:`KmsNode` composes the engines of its node's roles (a user node: a UKMS engine; an
access node: an AKMS and a CKMS engine in one process, or one of them when the node runs
split in two processes, ``only="akms"|"ckms"``; a carrier node: a CKMS engine) and does
what their actions ask:

* calls to other nodes over HTTP/2 with mutual TLS, one self-reconnecting connection per
  peer service; relay messages for one neighbour leave in batches (:mod:`batching`); a
  call to an engine of this same process is handed over in memory. On an open connection
  a call or batch is sent at once and its answer fed back from the response's callback
  (no task, no coroutine: :meth:`H2Client.start`); a task only while connecting;
* requests from other nodes (one HTTP/2 server per service), decoded into typed messages
  (:mod:`messages`) and answered with the engine's reply or refusal (an answer given
  within the engine's step, as most relay hops' are, needs no future);
* reads of the QKD modules (synchronous driver calls), derivations by the PSK sources
  (in a thread: a smartcard may be slow), key-store operations (:mod:`shards`, group
  committed), the seams (request validator, path provider), timers on the event loop;
* ETSI GS QKD 014 for the SAEs at a UKMS (:mod:`etsi014` over :mod:`appliance.net.http1`),
  and ETSI GS QKD 004 key streams on a port of their own (:mod:`etsi004`).

Endpoints (``POST``, MessagePack bodies, see :data:`messages.ENDPOINTS`): ``/v1/ksa``,
``/v1/ksa/stocked`` (a request served from a UKMS's stock, allowed by its AKMS), ``/v1/cn``,
``/v1/relay``, ``/v1/relay/abort``, ``/v1/cn/abort``, ``/v1/ksa/deliver``,
``/v1/link/grant``, ``/v1/channel/open``, ``/v1/relay/local``, ``/v1/cn/local`` (the two
processes of a split access node) and ``/v1/status`` (key counts per link, answered here).

It logs request IDs, key IDs and codes, never key material.

**Test seam.** :data:`EXIT_AFTER_TAKE` (an environment variable, read at start) lets a
test kill a UKMS at the worst moment of a dec_keys: right after the take has committed,
before the answer is written. Unset in any real deployment, it costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hal
from appliance.config.addresses import join_host_port, split_host_port
from appliance.config.node import NodeConfig
from appliance.config.render import SERVICE_OFFSETS
from appliance.config.topology import Topology
from appliance.kms import messages as m
from appliance.kms.batching import RelayBatcher, error_from
from appliance.kms.counters import NodeCounters
from appliance.kms.engines import AkmsEngine, CkmsEngine, EngineBase, UkmsEngine
from appliance.kms.engines.config import EngineConfig, Policy
from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    KmsError,
    MessageError,
    ReplayDetected,
)
from appliance.kms.etsi014 import Etsi014Api, Limits, Taken
from appliance.kms.events import (
    Action,
    Alarm,
    Answered,
    Call,
    CallFailed,
    CancelTimer,
    DerivePsk,
    FindPath,
    Housekeep,
    Input,
    Levels,
    LinkKeysRead,
    LinkWanted,
    Notice,
    PathFound,
    PskDerived,
    ReadLinkKeys,
    Received,
    Refuse,
    Reply,
    SaeAnswerWritten,
    SaeDecKeys,
    SaeEncKeys,
    SaeKeys,
    SaeRefused,
    SetTimer,
    StoreDone,
    StoreOp,
    TimerFired,
    Validate,
    Validated,
)
from appliance.kms.linkend import Role
from appliance.kms.seams import (
    ContractValidator,
    Denied,
    PathProvider,
    RequestValidator,
    SessionRegistry,
    TopologyPaths,
    TopologySessions,
    Verdict,
)
from appliance.kms.shards import ShardedStore
from appliance.kms.store import NodeKey, RecordKey, private_dir
from appliance.kms.storeops import Put, Release, Take
from appliance.net.h2 import H2Client, H2Server, Request, Response, TlsServer, TransportError
from appliance.net.http1 import H1Server
from appliance.pki import client_context, sae_server_context, server_context
from hsm.errors import HsmError
from hsm.psk import PskSource, open_psk_source

if TYPE_CHECKING:
    from appliance.control.nodeagent import NodeAgent
    from appliance.kms.etsi004 import StreamService

__all__ = ["KmsNode", "Policy", "Unreachable"]

log = logging.getLogger("qkdn.kms")
RandomBytes = Callable[[int], bytes]
Answer = Callable[["m.Message | KmsError"], None]
"""Told a node's answer to a request, or the error the request ended in."""
MSGPACK = {"content-type": "application/msgpack"}
INTEGRITY_CODES = {IntegrityFailure.code, ReplayDetected.code}
TERMS_TTL_S = 2.0
"""How long a UKMS keeps a pair's contract terms before it asks its AKMS again (a changed
contract shows in Status within this; the AKMS enforces it at once)."""
MAX_TERMS = 100_000
EXIT_AFTER_TAKE = "QKDN_TEST_EXIT_AFTER_TAKE"
"""Test seam: a directory. A node started with it set exits at once (``os._exit``, as a
crash: no clean-up, no release) right after a dec_keys take commits, whenever the file
``<directory>/<node name>`` exists; it deletes the file first, so each file the test
creates is one crash (the supervisor restarts the node with the same environment)."""
OPEN_ROUNDS, OPEN_PAUSE_S = 60, 0.5
"""A node tries to open its callees' connections this many times, so far apart."""


class Unreachable(KmsError):
    """A peer node could not be reached or broke the connection: the service is
    unavailable for now (a clean 503 to an SAE, never an internal error)."""

    code = "KMS-UNREACHABLE"


class KmsNode:
    """One node's KMS services, wired to its QKDMs, PTG.3 generator and stores."""

    def __init__(
        self,
        config: NodeConfig,
        topology: Topology,
        rng: RandomBytes,
        qkdms: dict[str, hal.Qkdm],
        policy: Policy | None = None,
        only: str | None = None,
        *,
        nonce: RandomBytes = os.urandom,
        validator: RequestValidator | None = None,
        paths: PathProvider | None = None,
        sdn: bool = False,
    ) -> None:
        self.config, self.topology, self.qkdms = config, topology, qkdms
        self.sdn = sdn
        """Serve the SDN agent (gNMI) on the config's ``gnmi`` address, for the QKDN
        Controller: only in a network whose controller runs (``node run --gnmi``)."""
        self.policy = policy or Policy()
        self.me, self.name = config.node.id, config.node.name
        roles = config.node.role.split("+")
        if only not in (None, "akms", "ckms") or (only and config.node.role != "akms+ckms"):
            raise KmsError("only an access node (akms+ckms) splits, into akms or ckms")
        self.only = only
        self.sessions: SessionRegistry = TopologySessions(topology, self.me)
        self.validator = validator or ContractValidator(
            topology, mode=self.policy.mode, max_keys=self.policy.max_key_per_request
        )
        self.paths = paths or TopologyPaths(topology)
        self._completed: Callable[[int, bool], None] | None = getattr(
            self.validator, "completed", None
        )
        """A validator that accounts for requests hears how each one it allowed ended,
        before the answer leaves (:class:`appliance.aaa.client.AaaValidator`)."""
        self.engines: dict[str, EngineBase] = {}
        for service in ("ukms", "akms", "ckms"):
            if service in roles and only in (None, service):
                cfg = EngineConfig.of(topology, self.me, service, self.policy)
                self.engines[service] = self._engine(cfg, rng, nonce)
        paths_ = config.paths
        self._tls = (Path(paths_.cert), Path(paths_.key), Path(paths_.ca_cert))
        self._client_ctx = client_context(*self._tls, ("h2",))
        self._data = Path(paths_.data_dir)
        private_dir(self._data)  # every node keeps state there (QKD modules' at least): fail now
        self.counters = NodeCounters()
        """What the management agent reads (:mod:`appliance.mgmt.agent`); before the stores,
        whose opening may already raise an alarm."""
        self.stores: ShardedStore | None = None
        if "ukms" in self.engines:
            self.stores = ShardedStore(self._data, self._record_key(rng), alarm=self._store_alarm)
        self._names = {n.name: n.id for n in topology.spec.nodes}
        self._psk: dict[str, PskSource] = {}
        self._clients: dict[str, H2Client] = {}
        self._batchers: dict[int, RelayBatcher] = {}
        self._servers: list[TlsServer] = []
        self.streams: StreamService | None = None
        self.agent: NodeAgent | None = None
        """The SDN agent (gNMI) of a CKMS node started with ``sdn`` (``gnmi`` address)."""
        self.on_put: Callable[[Put], None] | None = None
        """Told of every put that committed (the 004 streams wake their waiting GET_KEYs)."""
        self._timers: dict[tuple[str, Any], asyncio.TimerHandle] = {}
        self._replies: dict[int, _Slot | tuple[str, int]] = {}
        self._sae: dict[int, asyncio.Future[list[tuple[str, bytearray]]]] = {}
        self._tasks: set[asyncio.Future[Input]] = set()
        self._opening: asyncio.Future[None] | None = None
        self._work: deque[tuple[str, Input]] = deque()
        self._feeding = False
        self._closing = False
        self._numbers = iter(range(1, 1 << 62))
        self._loop: asyncio.AbstractEventLoop | None = None
        seam = os.environ.get(EXIT_AFTER_TAKE)
        self._exit_marker = Path(seam) / self.name if seam else None
        self._runners: dict[type, Callable[[str, Any], None]] = {
            Call: self._call,
            Reply: self._answer,
            Refuse: self._answer,
            ReadLinkKeys: self._read_keys,
            DerivePsk: self._derive,
            StoreOp: self._store_op,
            Validate: self._validate,
            FindPath: self._find_path,
            SetTimer: self._set_timer,
            CancelTimer: self._cancel_timer,
            SaeKeys: self._sae_answer,
            SaeRefused: self._sae_answer,
            Alarm: self._alarm,
            Notice: self._notice,
        }

    def _engine(self, cfg: EngineConfig, rng: RandomBytes, nonce: RandomBytes) -> EngineBase:
        if cfg.service == "ukms":
            return UkmsEngine(cfg, rng, nonce, self.sessions)
        if cfg.service == "akms":
            return AkmsEngine(cfg, rng, nonce)
        return CkmsEngine(cfg, rng, nonce)

    def _record_key(self, rng: RandomBytes) -> RecordKey:
        """The key sealing the stores at rest: the node's PKCS#11 token when configured
        (``devices.keystore = "pkcs11:token=..."``), else a key file in the data directory,
        created only for a fresh data directory."""
        url = self.config.devices.keystore
        if url is None:
            return NodeKey.from_file(self._data / "node.key", create_with=rng)
        from hsm.keystore import open_node_key

        return open_node_key(url)

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if "akms" in self.engines:
            self._open_psk_sources()
        for service in self.engines:
            if service in self.config.listen:
                handler = self._handler(service)
                server = H2Server(handler, server_context(*self._tls, ("h2",)))
                await server.start(*split_host_port(self.config.listen[service]))
                self._servers.append(server)
        if "ukms" in self.engines and "etsi004" in self.config.listen:
            await self._start_etsi004(self.config.listen["etsi004"])
        if "ukms" in self.engines and "etsi014" in self.config.listen:
            api = Etsi014Api(UkmsKeyService(self))
            versions = tuple(self.config.etsi014.tls_versions)
            alpn = ("h2", "http/1.1")  # HTTP/2 for SAEs that multiplex, on the same port
            ctx = sae_server_context(*self._tls, alpn, versions)
            h1 = H1Server(api.handle, ctx, h2=True, handler_now=api.handle_now)
            await h1.start(*split_host_port(self.config.listen["etsi014"]))
            self._servers.append(h1)
        if self.sdn and "ckms" in self.engines and "gnmi" in self.config.listen:
            self._start_agent(self.config.listen["gnmi"])
        now = self._loop.time()
        for service, engine in self.engines.items():
            self._run_all(service, engine.start(now))
        m.prepare()
        self._prepare_qkdms()
        self._opening = asyncio.ensure_future(self._open_callees())
        log.info("node started", extra={"node": self.name})

    def _prepare_qkdms(self) -> None:
        """Ready the QKD modules of the links this node takes keys from in order (their
        master end) now, not on a fresh path's first read (an emulated module's first
        reservation is an fsync'd write)."""
        for engine in self.engines.values():
            for link in engine.links.values():
                if link.role is Role.MASTER:
                    with contextlib.suppress(hal.HalError):
                        self.qkdms[link.link].prepare()

    @property
    def callees(self) -> set[tuple[int, str]]:
        """The (node, service) pairs this node's engines call over the network, from the
        topology: every engine its links' peers (grants; a CKMS's relays), an AKMS also its
        node's CKMS (the hand-over) and every other AKMS (the end-to-end channel and its
        requests). Engines of this process are called in-process, not listed."""
        out: set[tuple[int, str]] = set()
        for service, engine in self.engines.items():
            out.update((spec.peer, spec.peer_service) for spec in engine.config.links)
            if service == "akms":
                out.add((self.me, "ckms"))
                out.update((n.id, "akms") for n in self.topology.spec.nodes if "akms" in n.roles)
        return {(node, svc) for node, svc in out if not (node == self.me and svc in self.engines)}

    async def _open_callees(self) -> None:
        """Open this node's connections to its :attr:`callees` once they listen, so that
        the first request over a fresh path (its relay, the link grants, the AKMS's and the
        UKMS's calls) pays no TLS handshake per hop (BENCHMARKS.md, issue 15, the cold
        path). Best effort and bounded: a callee not listening within :data:`OPEN_ROUNDS`
        rounds is connected to by its first message, as before."""
        todo = {callee: self._client(*callee) for callee in self.callees}
        for _ in range(OPEN_ROUNDS):
            for callee, client in list(todo.items()):
                with contextlib.suppress(TransportError):
                    await client.connect()
                    del todo[callee]
            if not todo:
                return
            await asyncio.sleep(OPEN_PAUSE_S)

    async def _start_etsi004(self, address: str) -> None:
        """ETSI 004 key streams for the SAEs (:mod:`etsi004`), on their own port."""
        from appliance.kms.etsi004 import Etsi004Server, StreamService
        from appliance.kms.streamstore import StreamStore

        self.streams = StreamService(self, StreamStore(self._data))
        self.on_put = self.streams.stored
        await self.streams.start()
        versions = tuple(self.config.etsi014.tls_versions)
        server = Etsi004Server(self.streams, sae_server_context(*self._tls, (), versions))
        await server.start(*split_host_port(address))
        self._servers.append(server)

    def _start_agent(self, address: str) -> None:
        from appliance.control.nodeagent import NodeAgent

        links = [(link.link, peer) for peer, link in self.engines["ckms"].links.items()]
        self.agent = NodeAgent(
            self.me, links, self.qkdms, self.relay_counters,
            next_hop=lambda peer: self.feed("ckms", LinkWanted(peer=peer)),
        )  # fmt: skip
        self.agent.start(address, self._tls)

    def relay_counters(self) -> tuple[int, int]:
        """Relay messages and batches this node has sent to its neighbours."""
        batchers = self._batchers.values()
        return sum(b.messages for b in batchers), sum(b.batches for b in batchers)

    async def close(self) -> None:
        self._closing = True  # answers still coming are not fed to the engines
        if self.agent is not None:
            self.agent.close()
        if self.streams is not None:
            await self.streams.close()
            self.streams.store.close()
        ukms = self.engines.get("ukms")
        if isinstance(ukms, UkmsEngine) and self.stores is not None:
            for action in ukms.stop():  # a graceful stop gives the leased keys back
                if isinstance(action, StoreOp) and not isinstance(action.op, Levels | Housekeep):
                    with contextlib.suppress(KmsError):
                        self.stores.run(action.op)
        for handle in self._timers.values():
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._opening is not None:
            self._opening.cancel()
        for batcher in self._batchers.values():
            batcher.close()
        for server in self._servers:
            await server.close()
        for client in self._clients.values():
            await client.close()
        if self.stores is not None:
            self.stores.close()
        akms = self.engines.get("akms")
        if isinstance(akms, AkmsEngine):
            akms.close()
        for source in self._psk.values():
            source.close()

    def _open_psk_sources(self) -> None:
        """The PSK source of each peer AKMS; one that cannot be opened is an alarm, and the
        channel to that peer stays closed (fail closed) until the node restarts."""
        for peer, url in self.config.psk.items():
            try:
                self._psk[peer] = open_psk_source(url, base=self._data)
            except HsmError as exc:
                extra = {"node": self.name, "peer": peer, "error": exc.code, "reason": exc.message}
                log.error("PSK source unavailable", extra=extra)

    def psk_state(self) -> tuple[int, int, int]:
        """PSK sources opened, configured, and configured on a smartcard (``pcsc://``):
        what the management agent reports as the card's state."""
        cards = sum(1 for url in self.config.psk.values() if url.startswith("pcsc:"))
        return len(self._psk), len(self.config.psk), cards

    def psk_sources(self) -> list[Any]:
        """The PSK sources opened (the management agent probes smartcards among them)."""
        return list(self._psk.values())

    def relay_messages(self) -> int:
        """Relay messages sent to neighbours so far (the batchers' counts)."""
        return sum(b.messages for b in self._batchers.values())

    # -- driving the engines ----------------------------------------------------------------
    def feed(self, service: str, event: Input) -> None:
        """Hand ``event`` to an engine and carry out its actions, and theirs in turn."""
        self._work.append((service, event))
        if self._feeding:
            return
        self._feeding = True
        try:
            while self._work:
                svc, ev = self._work.popleft()
                engine = self.engines[svc]
                try:
                    actions = engine.handle(ev, self._now())
                except KmsError as exc:  # an engine refused an input it cannot place: a bug
                    extra = {"node": self.name, "error": exc.code, "reason": exc.message}
                    log.error("engine error", extra=extra)
                    continue
                self._run_all(svc, actions)
        finally:
            self._feeding = False

    def _run_all(self, service: str, actions: list[Action]) -> None:
        for action in actions:
            self._runners[type(action)](service, action)
        if not self._feeding and self._work:
            self.feed(*self._work.popleft())

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def _later(self, service: str, work: Coroutine[Any, Any, Input]) -> None:
        """Feed the outcome of ``work`` to an engine when it is done."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(service, t))

    def _done(self, service: str, task: asyncio.Future[Input]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # a bug in an adapter step: its engine's request fails by timeout
            log.error("adapter error", extra={"node": self.name, "error": repr(error)})
            return
        self.feed(service, task.result())

    # -- calls between nodes ----------------------------------------------------------------
    def _call(self, service: str, call: Call) -> None:
        node, target = call.to
        if node == self.me and target in self.engines:  # an engine of this process
            req = next(self._numbers)
            self._replies[req] = (service, call.call)
            self._work.append((target, Received(req=req, caller=self.me, message=call.message)))
            return
        if isinstance(call.message, m.RelayItem):  # no future, no task per hop message
            self._batcher(node).send(call.message, functools.partial(self._relayed, service, call))
            return
        if not self._post_now(service, call):
            self._later(service, self._post(call))

    def _relayed(self, service: str, call: Call, outcome: m.ItemResult | BaseException) -> None:
        self.feed(service, _relay_outcome(call.call, outcome))

    async def _post(self, call: Call) -> Input:
        node, service = call.to
        assert isinstance(call.message, m.Message)  # relay items go through the batcher
        try:
            answer = await self.request(node, service, call.message)
        except KmsError as exc:
            return CallFailed(call=call.call, error=exc)
        return Answered(call=call.call, message=answer)

    async def request(self, node: int, service: str, message: m.Message) -> m.Message:
        """POST ``message`` to a node's service; its answer (a refusal raises its error)."""
        path, answer_type = m.endpoint_of(message)
        client = self._client(node, service)
        body = _encoded(message)
        try:
            response = await client.request("POST", path, bytes(body), MSGPACK)
        except TransportError as exc:
            raise Unreachable(f"node {node} {service}: unreachable ({exc.code})") from exc
        finally:
            _wipe(body)
        return _answer_of(node, path, answer_type, response.body)

    def _post_now(self, service: str, call: Call) -> bool:
        """Start an engine's call to another node at once, its outcome fed back from the
        response's callback (no task, no coroutine); False if the connection cannot take
        it now (not yet open, or no free stream)."""
        node, target = call.to
        assert isinstance(call.message, m.Message)  # relay items go through the batcher
        then = functools.partial(self._call_done, service, call.call)
        return self._start_post(node, target, call.message, then)

    def _call_done(self, service: str, number: int, outcome: m.Message | KmsError) -> None:
        if isinstance(outcome, KmsError):
            self.feed(service, CallFailed(call=number, error=outcome))
        else:
            self.feed(service, Answered(call=number, message=outcome))

    def _start_post(self, node: int, service: str, message: m.Message, then: Answer) -> bool:
        """POST ``message`` to a node's service on its open connection; ``then`` hears the
        answer or the error (as :meth:`request` would return or raise it); False if the
        connection cannot take it now (nothing was sent)."""
        try:
            path, answer_type = m.endpoint_of(message)
            body = _encoded(message)
        except KmsError as exc:
            then(exc)
            return True
        try:
            future = self._client(node, service).start("POST", path, bytes(body), MSGPACK)
        finally:
            _wipe(body)
        if future is None:
            return False
        where = (node, service, path, answer_type)
        future.add_done_callback(functools.partial(self._posted, where, then))
        return True

    def _posted(
        self,
        where: tuple[int, str, str, type[m.Message]],
        then: Answer,
        future: asyncio.Future[Response],
    ) -> None:
        if self._closing:
            return
        node, service, path, answer_type = where
        try:
            body = future.result().body
        except (TransportError, TimeoutError, asyncio.CancelledError) as exc:
            code = exc.code if isinstance(exc, TransportError) else "no answer in time"
            then(Unreachable(f"node {node} {service}: unreachable ({code})"))
            return
        try:
            answer = _answer_of(node, path, answer_type, body)
        except KmsError as exc:
            then(exc)
            return
        then(answer)

    def _client(self, node: int, service: str) -> H2Client:
        plan = self.config.plan
        address = join_host_port(plan.host, plan.base_port + SERVICE_OFFSETS[service] + node)
        client = self._clients.get(address)
        if client is None:
            host, port = split_host_port(address)
            peer = self.topology.node(node).name
            client = self._clients[address] = H2Client(
                host, port, self._client_ctx, expect_peer=peer, timeout=self.policy.cn_timeout + 5
            )
        return client

    def _batcher(self, peer: int) -> RelayBatcher:
        batcher = self._batchers.get(peer)
        if batcher is None:

            async def send(items: list[m.RelayItem]) -> list[m.ItemResult]:
                answer = await self.request(peer, "ckms", m.RelayBatch(items=items))
                return _results(peer, answer, len(items))

            def start(items: list[m.RelayItem], done: Callable[[Any], None]) -> bool:
                def then(answer: m.Message | KmsError) -> None:
                    try:
                        done(answer if isinstance(answer, KmsError) else _results(peer, answer, n))
                    except KmsError as exc:
                        done(exc)

                n = len(items)
                return self._start_post(peer, "ckms", m.RelayBatch(items=items), then)

            batcher = self._batchers[peer] = RelayBatcher(send, start=start)
        return batcher

    # -- requests from other nodes ----------------------------------------------------------
    def _handler(self, service: str) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            return await self._handle(service, request)

        return handle

    async def _handle(self, service: str, request: Request) -> Response:
        endpoint = m.ENDPOINTS.get(request.path)
        if endpoint is None or request.method != "POST":
            return _refused(404, KmsError("no such endpoint"))
        caller = self._names.get(request.peer or "")
        if caller is None:  # e.g. an SAE certificate: authenticated, but not a node
            return _refused(403, KmsError("only nodes of this network may call this endpoint"))
        self.counters.requests += 1
        try:
            message = m.decode(request.body, endpoint[0])
        except MessageError as exc:
            return _refused(400, exc)
        if isinstance(message, m.StatusRequest):
            return _ok(self._status())
        if isinstance(message, m.TermsRequest):
            return await self._terms(service, caller, message)
        if isinstance(message, m.RelayBatch):
            return await self._relay_batch(service, caller, message)
        req = next(self._numbers)
        slot = self._receive(service, caller, message, req)
        outcome = slot.outcome if slot.done else await slot.wait()
        if isinstance(outcome, KmsError):
            self._log_refusal(request.path, outcome)
            response = _refused(400 if isinstance(outcome, IntegrityFailure) else 503, outcome)
        else:
            response = _ok(outcome)
        if self._completed is not None and isinstance(message, (m.KsaRequest, m.KsaStocked)):
            # (a request that crossed the network, or one served from the UKMS's stock)
            # the request's report is on disk before its answer leaves, and the answer
            # leaves in this same step (no other task runs in between): only a kill -9
            # within these microseconds bills an answer that never left
            self._completed(req, not isinstance(outcome, KmsError))
            response.at_once = True
        return response

    async def _terms(self, service: str, caller: int, ask: m.TermsRequest) -> Response:
        """A UKMS of ours asks for the terms of a pair it serves (its ETSI 014 Status): the
        validator's, when it knows contracts (AAA), else the network's limits."""
        engine = self.engines.get("akms")
        if service != "akms" or engine is None or caller not in engine.links:
            return _refused(403, KmsError("only a UKMS of this access node asks for terms"))
        terms = getattr(self.validator, "terms", None)
        if terms is None:
            answer = m.TermsAnswer(
                max_key_size=Limits.max_key_size,
                max_key_per_request=self.policy.max_key_per_request,
            )
            return _ok(answer)
        try:
            held = await terms(caller, ask.master, ask.slave)
        except KmsError as exc:
            return _refused(503, exc)
        answer = m.TermsAnswer(
            max_key_size=held.max_key_size,
            max_key_per_request=held.keys_per_request,
            max_key_count=held.keys_per_period,
        )
        return _ok(answer)

    def _receive(
        self, service: str, caller: int, message: m.Sendable, req: int | None = None
    ) -> _Slot:
        """Hand a node's request to an engine; its slot holds the answer when it comes
        (most hop messages are answered within this very call: no future for them)."""
        slot = _Slot()
        req = next(self._numbers) if req is None else req
        self._replies[req] = slot
        self.feed(service, Received(req=req, caller=caller, message=message))
        return slot

    async def _relay_batch(self, service: str, caller: int, batch: m.RelayBatch) -> Response:
        """Each item is handled on its own and keeps its own result (a batch of one that
        fails answers with the usual error status)."""
        slots = [self._receive(service, caller, item) for item in batch.items]
        results: list[m.ItemResult] = []
        for slot in slots:
            outcome = slot.outcome if slot.done else await slot.wait()
            if isinstance(outcome, KmsError):
                self._log_refusal("/v1/relay", outcome)
                if len(slots) == 1:
                    return _refused(400 if isinstance(outcome, IntegrityFailure) else 503, outcome)
                refused = m.refused(outcome)
                results.append(m.ItemResult(ok=False, code=refused.code, message=refused.message))
            else:
                results.append(_ITEM_OK)
        return _ok(m.RelayResults(results=results))

    def _answer(self, service: str, action: Reply | Refuse) -> None:
        waiting = self._replies.pop(action.req, None)
        outcome = action.message if isinstance(action, Reply) else action.error
        if isinstance(waiting, tuple):  # the caller is an engine of this process
            origin, call = waiting
            event: Input = (
                Answered(call=call, message=action.message)
                if isinstance(action, Reply)
                else CallFailed(call=call, error=action.error)
            )
            self._work.append((origin, event))
        elif waiting is not None:
            waiting.answer(outcome)

    def _log_refusal(self, path: str, error: KmsError) -> None:
        self.counters.failed(error.code)
        extra = {"node": self.name, "path": path, "error": error.code, "reason": error.message}
        log.warning("request failed", extra=extra)

    def _status(self) -> m.StatusAnswer:
        """Key counts of this end of each link (no key material, no key IDs)."""
        links = []
        for engine in self.engines.values():
            for peer, link in engine.links.items():
                try:
                    status = self.qkdms[link.link].status()
                    counts = (status.key_count, status.keys_produced, status.key_size)
                except hal.HalError:
                    counts = (-1, -1, -1)
                batcher = self._batchers.get(peer)
                links.append(
                    m.LinkStatus(
                        link=link.link,
                        peer=peer,
                        role=link.role.value,
                        qkdm_keys=counts[0],
                        keys_produced=counts[1],
                        key_size=counts[2],
                        relay_batches=batcher.batches if batcher else 0,
                        relay_messages=batcher.messages if batcher else 0,
                    )
                )
        return m.StatusAnswer(node=self.name, links=links)

    # -- devices, stores, seams, timers -----------------------------------------------------
    def _read_keys(self, service: str, read: ReadLinkKeys) -> None:
        """Read the QKD module at once (its drivers answer from their key buffers)."""
        qkdm = self.qkdms[read.link]
        keys: list[tuple[str, bytearray]] = []
        gone: list[str] = []
        error: KmsError | None = None
        try:
            want = read.count
            while want > 0:  # one module call per run of keys (hal.Qkdm.get_keys)
                run = qkdm.get_keys(want)
                keys.extend((key.key_id, key.material) for key in run)
                want -= len(run)
            for key_id in read.ids:
                try:
                    key = qkdm.get_key_by_id(key_id)
                except hal.KeyNotFound:
                    gone.append(key_id)
                    continue
                keys.append((key.key_id, key.material))
        except hal.HalError as exc:  # empty, down, not yet distilled: what was read so far
            error = KeyUnavailable(f"{read.link}: no link key ({exc.code})")
        self.counters.keys_taken[read.link] += len(keys)
        event = LinkKeysRead(ticket=read.ticket, keys=keys, gone=tuple(gone), error=error)
        self._work.append((service, event))

    def _derive(self, service: str, action: DerivePsk) -> None:
        source = self._psk.get(action.peer)
        if source is None:
            error = KeyUnavailable(f"no PSK source for the channel to {action.peer}")
            self._work.append((service, PskDerived(ticket=action.ticket, error=error)))
            return

        async def derive() -> Input:
            try:
                key = await asyncio.to_thread(source.derive, action.context, action.nonces)
            except HsmError as exc:
                log.error("PSK source failed", extra={"node": self.name, "error": exc.code})
                error = KeyUnavailable(f"PSK source unavailable ({exc.code})")
                return PskDerived(ticket=action.ticket, error=error)
            return PskDerived(ticket=action.ticket, key=key)

        self._later(service, derive())

    def _store_op(self, service: str, action: StoreOp) -> None:
        stores, op = self.stores, action.op
        if stores is None:
            error = KmsError("this node keeps no key stores")
            self._work.append((service, StoreDone(ticket=action.ticket, result=error)))
            return
        if isinstance(op, Release):  # rides on the shard's next group; nobody waits
            stores.queue(op)
            self._work.append((service, StoreDone(ticket=action.ticket, result=0)))
            return

        if isinstance(op, Levels | Housekeep):

            async def run() -> Input:
                try:
                    if isinstance(op, Levels):
                        result: Any = await asyncio.to_thread(stores.levels, op.kind)
                    else:
                        result = await asyncio.to_thread(_housekeep, stores)
                except KmsError as exc:
                    result = exc
                return StoreDone(ticket=action.ticket, result=result)

            self._later(service, run())
            return
        # the key path's operations: a callback on the group commit's future, no task
        future = stores.start(op)
        future.add_done_callback(lambda f: self._stored(service, action, f))

    def _stored(self, service: str, action: StoreOp, future: asyncio.Future[Any]) -> None:
        if future.cancelled():  # the node is closing
            return
        error = future.exception()
        if error is not None and not isinstance(error, KmsError):  # a bug in the store
            log.error("adapter error", extra={"node": self.name, "error": repr(error)})
            return
        if isinstance(action.op, Take) and self._exit_marker is not None:
            _exit_if_marked(self._exit_marker)
        result = error if error is not None else future.result()
        if error is None and isinstance(action.op, Put) and self.on_put is not None:
            self.on_put(action.op)
        self.feed(service, StoreDone(ticket=action.ticket, result=result))

    def _validate(self, service: str, action: Validate) -> None:
        verdict = self.validator.validate(action.query)
        # the common case (a Verdict at once) told apart first, before the dearer ABC test
        if not isinstance(verdict, Verdict) and inspect.isawaitable(verdict):

            async def later() -> Input:
                return Validated(ticket=action.ticket, verdict=await verdict)

            self._later(service, later())
            return
        self._work.append((service, Validated(ticket=action.ticket, verdict=verdict)))

    def _find_path(self, service: str, action: FindPath) -> None:
        try:
            path = self.paths.find(action.src, action.dst, action.route_policy)
        except KmsError as exc:
            self._work.append((service, PathFound(ticket=action.ticket, error=exc)))
            return
        if not isinstance(path, tuple) and inspect.isawaitable(path):  # (as in _validate)

            async def later() -> Input:
                try:
                    return PathFound(ticket=action.ticket, path=tuple(await path))
                except KmsError as exc:
                    return PathFound(ticket=action.ticket, error=exc)

            self._later(service, later())
            return
        self._work.append((service, PathFound(ticket=action.ticket, path=tuple(path))))

    def _set_timer(self, service: str, action: SetTimer) -> None:
        assert self._loop is not None
        old = self._timers.pop((service, action.key), None)
        if old is not None:
            old.cancel()
        self._timers[(service, action.key)] = self._loop.call_at(
            action.at, self._fire, service, action.key
        )

    def _fire(self, service: str, key: Any) -> None:
        self._timers.pop((service, key), None)
        self.feed(service, TimerFired(key=key))

    def _cancel_timer(self, service: str, action: CancelTimer) -> None:
        handle = self._timers.pop((service, action.key), None)
        if handle is not None:
            handle.cancel()

    def _alarm(self, service: str, alarm: Alarm) -> None:
        event = "integrity alarm" if alarm.code in INTEGRITY_CODES else "alarm"
        self.counters.alarm(alarm.code, alarm.reason, integrity=alarm.code in INTEGRITY_CODES)
        log.error(event, extra={"node": self.name, "error": alarm.code, "reason": alarm.reason})

    def _store_alarm(self, code: str, reason: str) -> None:
        self._alarm("ukms", Alarm(code=code, reason=reason))

    def _notice(self, service: str, notice: Notice) -> None:
        level = logging.WARNING if notice.warning else logging.INFO
        log.log(level, notice.event, extra={"node": self.name, **notice.fields})

    # -- the SAEs (ETSI 014) ------------------------------------------------------------------
    async def sae(self, event: SaeEncKeys | SaeDecKeys) -> list[tuple[str, bytearray]]:
        """Hand an SAE's request to the UKMS engine and wait for its keys (or its error)."""
        assert self._loop is not None
        future: asyncio.Future[list[tuple[str, bytearray]]] = self._loop.create_future()
        self._sae[event.req] = future
        self.feed("ukms", event)
        expiry = self._loop.call_later(self.policy.cn_timeout + 10, _too_late, future)
        try:
            return await future
        finally:
            expiry.cancel()

    def from_lease_now(
        self, master: str, slave: str, number: int, size: int
    ) -> list[tuple[str, bytearray]] | None:
        """A stocked enc_keys served at once from the pair's lease (the direct path: no
        event, no future, no task; :meth:`UkmsEngine.from_lease_now`), the actions that
        follow carried out; None if it cannot be (nothing was taken)."""
        engine = self.engines["ukms"]
        assert isinstance(engine, UkmsEngine)
        got = engine.from_lease_now(master, slave, number, size, self._now())
        if got is None:
            return None
        keys, actions = got
        self._run_all("ukms", actions)
        return [(k.key_id, k.material) for k in keys]

    def _sae_answer(self, service: str, action: SaeKeys | SaeRefused) -> None:
        future = self._sae.pop(action.req, None)
        if future is None or future.done():  # the SAE gave up meanwhile
            if isinstance(action, SaeKeys):
                for _, material in action.keys:
                    material[:] = bytes(len(material))
                self._work.append((service, SaeAnswerWritten(req=action.req, ok=False)))
            return
        if isinstance(action, SaeKeys):
            future.set_result(action.keys)
        else:
            future.set_exception(action.error)

    def new_req(self) -> int:
        return next(self._numbers)

    def ukms_akms(self) -> int:
        """The AKMS this node's UKMS hangs off."""
        engine = self.engines["ukms"]
        assert isinstance(engine, UkmsEngine)
        return engine.akms


_ITEM_OK = m.ItemResult(ok=True)


class _Slot:
    """Where the answer to a node's request lands: at once, or later for an awaiting
    handler (a future is made only then)."""

    __slots__ = ("done", "future", "outcome")

    def __init__(self) -> None:
        self.done = False
        self.outcome: Any = None
        self.future: asyncio.Future[Any] | None = None

    def answer(self, outcome: Any) -> None:
        if self.done:
            return
        self.done, self.outcome = True, outcome
        if self.future is not None and not self.future.done():
            self.future.set_result(outcome)

    async def wait(self) -> Any:
        """The answer, once it comes."""
        if not self.done:
            self.future = asyncio.get_running_loop().create_future()
            return await self.future
        return self.outcome


class UkmsKeyService:
    """The ETSI 014 key service of a UKMS node (:class:`etsi014.KeyService`)."""

    def __init__(self, node: KmsNode) -> None:
        self.node = node
        engine = node.engines["ukms"]
        assert isinstance(engine, UkmsEngine)
        self.engine = engine
        self.saes = {s.id: s for s in node.topology.spec.saes}
        self._terms: dict[tuple[str, str], tuple[float, m.TermsAnswer]] = {}
        self._limits: dict[str, Limits] = {}
        """The network's limits towards each SAE (frozen; built once, at its first request)."""

    def limits(
        self, master: str, slave: str, *, caller_is_master: bool
    ) -> Limits | Awaitable[Limits] | None:
        """The pair's limits: the network's, or (``policy.terms_from_akms``) the contract's
        as our AKMS answers them, kept for TERMS_TTL_S."""
        limits = self._network_limits(master, slave, caller_is_master=caller_is_master)
        policy = self.node.policy
        if limits is None or not (policy.terms_from_akms and caller_is_master):
            return limits
        cached = self._terms.get((master, slave))
        now = time.monotonic()
        if cached is not None and now - cached[0] < TERMS_TTL_S:
            return _contract_limits(limits, cached[1])
        return self._fetch_terms(limits, master, slave, now)

    def limits_now(self, master: str, slave: str) -> Limits | None:
        """The limits of a master's request that may be served at once: the network's,
        unless the contracts live at the AKMS (AAA), whose say every request needs, or
        the pair's lease in memory is empty (the request goes the full way: relayed, or
        the stock's keys leased first)."""
        if self.node.policy.terms_from_akms or not self.engine.leased(master, slave):
            return None
        return self._network_limits(master, slave, caller_is_master=True)

    def _network_limits(self, master: str, slave: str, *, caller_is_master: bool) -> Limits | None:
        sessions = self.node.sessions
        if caller_is_master:
            ok, other = sessions.session_014(master, slave), slave
        else:
            ok, other = sessions.session_014_slave(slave, master), master
        if ok is None:
            return None
        limits = self._limits.get(other)
        if limits is None:  # one per SAE of the topology: the same every time
            target = self.node.topology.node(self.saes[other].node)
            policy = self.node.policy
            limits = self._limits[other] = Limits(
                source_kme=self.node.name,
                target_kme=target.name,
                key_size=policy.key_size,
                max_key_per_request=policy.max_key_per_request,
                max_sae_id_count=m.MAX_SLAVES,
            )
        return limits

    async def _fetch_terms(self, limits: Limits, master: str, slave: str, now: float) -> Limits:
        """Ask our AKMS for the pair's terms. If it denies the pair (suspended, unknown,
        outside its window), the network's limits stand: the request itself then goes to
        the AKMS, which refuses it *and accounts for the refusal*."""
        try:
            answer = await self.node.request(
                self.engine.akms, "akms", m.TermsRequest(master=master, slave=slave)
            )
        except Denied:
            return limits
        if not isinstance(answer, m.TermsAnswer):
            raise KeyUnavailable("the terms were answered with another message")
        if len(self._terms) >= MAX_TERMS:
            self._terms.clear()
        self._terms[(master, slave)] = (now, answer)
        return _contract_limits(limits, answer)

    def stored(self, master: str, slave: str) -> int:
        return self.engine.stored(master, slave)

    async def enc_keys(
        self, master: str, slave: str, number: int, size: int, *, also: tuple[str, ...] = ()
    ) -> list[tuple[str, bytes]]:
        req = self.node.new_req()
        event = SaeEncKeys(req=req, master=master, slave=slave, number=number, size=size, also=also)
        t0 = time.perf_counter()
        keys = await self.node.sae(event)
        self.node.counters.served(time.perf_counter() - t0)  # T_key, for QKDN-MIB
        return _copied(keys)

    def enc_keys_now(
        self, master: str, slave: str, number: int, size: int
    ) -> list[tuple[str, bytes]] | None:
        """The keys at once from the pair's lease, or None (then :meth:`enc_keys`)."""
        t0 = time.perf_counter()
        keys = self.node.from_lease_now(master, slave, number, size)
        if keys is None:
            return None
        self.node.counters.served(time.perf_counter() - t0)  # T_key, for QKDN-MIB
        return _copied(keys)

    async def dec_keys(
        self, slave: str, master: str, key_ids: list[str]
    ) -> list[tuple[str, bytes]]:
        """The keys, pending in the store until the answer has left (then released) or
        could not leave (then restored for the slave: its connection was gone)."""
        req = self.node.new_req()
        event = SaeDecKeys(req=req, slave=slave, master=master, key_ids=tuple(key_ids))
        keys = _copied(await self.node.sae(event))

        def written(ok: bool) -> None:
            self.node.feed("ukms", SaeAnswerWritten(req=req, ok=ok))

        return Taken(keys, written)


def _contract_limits(limits: Limits, terms: m.TermsAnswer) -> Limits:
    """The network's limits narrowed to a contract's terms (Status stays consistent:
    min_key_size <= key_size <= max_key_size)."""
    size = terms.max_key_size
    return dataclasses.replace(
        limits,
        max_key_size=size,
        key_size=min(limits.key_size, size),
        min_key_size=min(limits.min_key_size, size),
        max_key_per_request=min(limits.max_key_per_request, terms.max_key_per_request),
        max_key_count=min(limits.max_key_count, terms.max_key_count or limits.max_key_count),
    )


def _copied(keys: list[tuple[str, bytearray]]) -> list[tuple[str, bytes]]:
    """Keys for the 014 answer; the engine's copies are erased."""
    try:
        return [(key_id, bytes(material)) for key_id, material in keys]
    finally:
        for _, material in keys:
            material[:] = bytes(len(material))


def _too_late(future: asyncio.Future[Any]) -> None:
    """An SAE's keys did not come in time: it is told so (keys coming later are erased)."""
    if not future.done():
        future.set_exception(KeyUnavailable("the keys did not come in time"))


def _relay_outcome(call: int, result: m.ItemResult | BaseException) -> Input:
    if isinstance(result, KmsError):
        return CallFailed(call=call, error=result)
    if isinstance(result, BaseException):  # a transport error, a cancel; a bug is logged too
        if not isinstance(result, TransportError | asyncio.CancelledError):
            log.error("relay batch failed", extra={"error": repr(result)})
        return CallFailed(call=call, error=Unreachable(f"relay batch not delivered ({result})"))
    if result.ok:
        return Answered(call=call, message=m.Ok())
    return CallFailed(call=call, error=error_from(result.code, result.message))


def _exit_if_marked(marker: Path) -> None:
    """The :data:`EXIT_AFTER_TAKE` test seam: die now if the test left the marker."""
    try:
        marker.unlink()
    except FileNotFoundError:
        return
    os._exit(75)


def _housekeep(stores: ShardedStore) -> int:
    """Delete expired keys and fold every shard's WAL (see :mod:`store`)."""
    purged = stores.purge_expired()
    stores.checkpoint()
    return purged


def _results(peer: int, answer: m.Message, items: int) -> list[m.ItemResult]:
    """The results of a relay batch of ``items`` messages, one for each."""
    if not isinstance(answer, m.RelayResults) or len(answer.results) != items:
        raise Unreachable(f"node {peer}: relay batch answered out of step")
    return list(answer.results)


def _encoded(message: m.Message) -> bytes | bytearray:
    """The body of a request; one that holds key material is a bytearray (see _wipe)."""
    if message.holds_key:
        buffer = bytearray()
        m.encode_into(message, buffer)
        return buffer
    return m.encode(message)


def _wipe(body: bytes | bytearray) -> None:
    """Erase a request body that held key material, once it is sent."""
    if isinstance(body, bytearray):
        body[:] = bytes(len(body))


def _answer_of(node: int, path: str, answer_type: type[m.Message], body: bytes) -> m.Message:
    """A node's answer to a request; a refusal raises its error."""
    answer = m.decode_answer(body, answer_type)
    if isinstance(answer, m.Refused):
        denied = Denied.from_code(answer.code, answer.message)  # for the SAE: no node named
        if denied is not None:
            raise denied
        raise error_from(answer.code, f"node {node}{path}: {answer.message}")
    return answer


def _ok(message: m.Message) -> Response:
    return Response(200, m.encode(message), dict(MSGPACK))


def _refused(status: int, error: KmsError) -> Response:
    return Response(status, m.encode(m.refused(error)), dict(MSGPACK))
