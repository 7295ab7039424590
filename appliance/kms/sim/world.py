"""A whole KMS network in one process, on a seeded scheduler with a virtual clock.

Every KMS node of the topology runs its real engines (:mod:`appliance.kms.engines`); what
the node adapter does with real I/O, the world does with models: messages cross a network
that delays, reorders, loses and duplicates them (each encoded and decoded by the real
codec, :mod:`appliance.kms.messages`); QKD modules are :mod:`~appliance.kms.sim.qkdm`
pairs on the virtual clock (the :class:`hal.Qkdm` contract); key stores are
:class:`~appliance.kms.sim.models.ModelStore`, whose state is what was committed. Nodes
crash at any step and restart with new engines and only their committed stores; links go
down; modules run dry. SAEs ask for keys over the engines' ETSI 014 inputs and fetch them
at the slave's UKMS; a slave sometimes sends its dec_keys twice at once (a client retry),
and other SAEs try to fetch keys that are not theirs. An answer to an SAE is written one
step after the engine gives it, so a crash can fall between the two. Everything the world
decides comes from one seed, so a run replays exactly (:func:`run`); what it saw goes to
:mod:`appliance.kms.sim.checks`, and with ``story=True`` it also tells every step
(:mod:`appliance.kms.sim.story`, which never prints key bits).

The world never uses ``random`` for key material: engines draw from a SHAKE-256 stream
of the seed (it stands for the PTG.3 generator), and ``random.Random(seed)`` only decides
the schedule. What depends on the topology alone (engine configurations, sessions, paths,
the validator) is made once per topology (:func:`network_of`) and shared by schedules.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import hal
from appliance.config.topology import ResolvedLink, Sae, Topology, load_topology
from appliance.kms import messages as m
from appliance.kms.batching import error_from
from appliance.kms.engines import AkmsEngine, CkmsEngine, EngineBase, EngineConfig, UkmsEngine
from appliance.kms.engines.config import Policy
from appliance.kms.errors import KeyUnavailable, KmsError
from appliance.kms.events import (
    Action,
    Alarm,
    Answered,
    Call,
    CallFailed,
    CancelTimer,
    DerivePsk,
    FindPath,
    Input,
    LinkKeysRead,
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
from appliance.kms.relay import Mode
from appliance.kms.seams import ContractValidator, TopologyPaths, TopologySessions
from appliance.kms.sim import story
from appliance.kms.sim.checks import Observations
from appliance.kms.sim.models import ModelStore
from appliance.kms.sim.qkdm import SimLink, SimQkdm
from hsm.psk import kdf

START = 3600.0
"""Seconds of distillation before the run starts (the links' key buffers fill)."""
FAULTS_END = 25.0
"""Messages are lost, duplicated or delayed only before this time; crashes, link failures
and dry modules all happen and end before it too."""
RECOVERED = 60.0
"""When every fault is over and one request per SAE pair must succeed (faults end by
25 s; re-keys, grants and abort timeouts settle well within the rest)."""
SERVICES = ("ukms", "akms", "ckms")


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What may go wrong in one schedule (probabilities per message, counts per run)."""

    loss: float = 0.0
    """A request, or its answer, is lost (the caller times out)."""
    duplicate: float = 0.0
    """A request is delivered twice (its second answer goes nowhere)."""
    max_delay: float = 0.005
    """Latency of a message, uniformly up to this (seconds): reordering comes with it."""
    crashes: int = 0
    """Node crashes, each at a random step, each followed by a restart."""
    links_down: int = 0
    """Links that go down for a while."""
    dry: int = 0
    """QKD modules whose master end stops producing keys."""
    sae_drops: float = 0.0
    """An answer to an SAE is lost with its connection (the SAE asks again)."""

    @classmethod
    def pick(cls, rand: random.Random) -> Faults:
        """A random mix of faults for one schedule."""
        return cls(
            loss=rand.choice((0.0, 0.0, 0.01, 0.03)),
            duplicate=rand.choice((0.0, 0.0, 0.02)),
            max_delay=rand.choice((0.0005, 0.005, 0.05)),
            crashes=rand.choice((0, 0, 1, 2, 3)),
            links_down=rand.choice((0, 0, 1)),
            dry=rand.choice((0, 0, 1)),
            sae_drops=rand.choice((0.0, 0.1)),
        )


class Stream:
    """Deterministic bytes (SHAKE-256 of a label and a counter), recorded for the checks."""

    def __init__(self, label: str, record: list[bytes] | None = None) -> None:
        self.label, self.count, self.record = label.encode(), 0, record

    def __call__(self, n: int) -> bytes:
        self.count += 1
        out = hashlib.shake_256(self.label + self.count.to_bytes(8, "big")).digest(n)
        if self.record is not None:
            self.record.append(out)
        return out


class Network:
    """What a world derives from its topology alone, made once and shared by every
    schedule on that topology (none of it changes while a schedule runs)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        kms = [n for n in topology.spec.nodes if n.is_kms]
        self.nodes = {n.id: (n.name, tuple(s for s in SERVICES if s in n.roles)) for n in kms}
        self.saes: dict[str, Sae] = {s.id: s for s in topology.spec.saes}
        access = ContractValidator(topology, mode=Mode.GCM, max_keys=1).akms_of
        self.pairs = [  # across access nodes (keys for a pair behind one cross no network)
            (a.id, b.id)
            for a in topology.spec.saes
            for b in topology.spec.saes
            if a.user == b.user and a.id != b.id and access(a.node) != access(b.node)
        ]
        self.links: list[ResolvedLink] = [
            link for link in topology.links if link.a in self.nodes and link.b in self.nodes
        ]
        self.paths = TopologyPaths(topology)
        self.sessions = {node: TopologySessions(topology, node) for node in self.nodes}
        self._configs: dict[tuple[int, str, Policy], EngineConfig] = {}
        self._validators: dict[tuple[Mode, int], ContractValidator] = {}

    def config(self, node: int, service: str, policy: Policy) -> EngineConfig:
        key = (node, service, policy)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self._configs[key] = EngineConfig.of(self.topology, node, service, policy)
        return cfg

    def validator(self, policy: Policy) -> ContractValidator:
        key = (policy.mode, policy.max_key_per_request)
        found = self._validators.get(key)
        if found is None:
            found = self._validators[key] = ContractValidator(
                self.topology, mode=policy.mode, max_keys=policy.max_key_per_request
            )
        return found


@functools.lru_cache(maxsize=8)
def network_of(topology: Topology) -> Network:
    return Network(topology)


@dataclass(eq=False)
class SimNode:
    id: int
    name: str
    services: tuple[str, ...]
    engines: dict[str, EngineBase] = field(default_factory=dict)
    gen: int = 0
    up: bool = False
    store: ModelStore | None = None


@dataclass(eq=False)
class Origin:
    """Who waits for the answer to a request: a call of an engine at a node generation."""

    node: int
    service: str
    gen: int
    call: int
    local: bool = False
    lose_answer: bool = False


@dataclass(eq=False)
class Txn:
    """One SAE transaction: enc_keys at the master's UKMS, then dec_keys at the slave's."""

    id: int
    master: str
    slave: str
    number: int
    size: int
    keys: list[tuple[str, bytes]] | None = None
    done: bool = False
    tries: int = 0
    inflight: int = 0
    """dec_keys requests of this transaction not answered yet (a retry and its twin)."""
    outcome: str = ""
    must_succeed: bool = False
    """Asked once every fault is over: the network must have recovered."""
    also: tuple[str, ...] = ()
    """Additional slaves of the enc_keys (ETSI 014 Annex B); each fetches the keys in a
    transaction of its own (``of`` names the one that got them from the master, and its
    ``also`` the request's other slaves, whom no probe impersonates)."""
    of: int | None = None


StepHook = Callable[["World", int, Callable[..., None], tuple[Any, ...]], None]


class World:
    """One seeded schedule of a whole network.

    Tests plant defects by overriding :attr:`engine_classes`, :attr:`store_class` or
    :meth:`recipient` in a subclass; ``step_hook(world, step, fn, args)`` runs before
    every step (the targeted scenarios of :mod:`appliance.kms.sim.scenarios` crash a node
    at a chosen step with it)."""

    CALL_TIMEOUT_EXTRA = 5.0
    MAX_TRIES = 12
    engine_classes: ClassVar[dict[str, type[EngineBase]]] = {
        "ukms": UkmsEngine,
        "akms": AkmsEngine,
        "ckms": CkmsEngine,
    }
    store_class: ClassVar[type[ModelStore]] = ModelStore

    def __init__(
        self,
        seed: int,
        *,
        topology: Topology | None = None,
        policy: Policy | None = None,
        faults: Faults | None = None,
        requests: int = 3,
        must_succeed: bool = True,
        probes: float = 0.3,
        twins: float = 0.2,
        story: bool = False,
        step_hook: StepHook | None = None,
        shared: float = 0.0,
    ) -> None:
        self.seed, self.rand = seed, random.Random(seed)
        self.net = network_of(topology or _demoquandt())
        self.topology = self.net.topology
        self.policy = policy or Policy(
            patience=2.0,
            stock=self.rand.choice((0, 0, 4)),
            mode=self.rand.choice((Mode.GCM, Mode.GCM, Mode.OTP)),
        )
        self.faults = faults if faults is not None else Faults.pick(self.rand)
        self.probes, self.twins, self.shared = probes, twins, shared
        self.story: list[str] | None = [] if story else None
        self.step_hook = step_hook
        self.now = 0.0
        self.obs = Observations()
        self._queue: list[tuple[float, float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._numbers = itertools.count(1)
        self._inbox: dict[int, tuple[int, int, Origin | None]] = {}  # req -> (node, gen, origin)
        self._saes: dict[tuple[int, int], tuple[Txn, str, int]] = {}  # (node, req) -> txn
        self._timers: dict[tuple[int, str, Any], int] = {}
        self.validator = self.net.validator(self.policy)
        self.saes = self.net.saes
        self.nodes = {
            node: SimNode(node, name, services) for node, (name, services) in self.net.nodes.items()
        }
        self._links: dict[str, SimLink] = {}
        self._qkdms = self._open_qkdms()
        self._psk = hashlib.sha256(f"sim-psk-{seed}".encode()).digest()
        for node in self.nodes.values():
            if "ukms" in node.services:
                node.store = self.store_class(lambda: self.now)
        self._actors: dict[type, Callable[[SimNode, str, Any], None]] = {
            Call: self._send,
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
            Notice: _ignore,
        }
        self._open = 0  # transactions not done yet
        self.txns = self._plan(requests, must_succeed=must_succeed)

    # -- the scheduler ---------------------------------------------------------------------
    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._queue, (when, self.rand.random(), next(self._seq), fn, args))

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run(self, *, horizon: float = 900.0, max_steps: int = 200_000) -> Observations:
        """Boot every node, play the schedule to its end, and return what was seen."""
        self.tell(f"seed {self.seed}: {story.policy(self.policy)}; faults {self.faults}")
        for node in self.nodes.values():
            self._boot(node)
        self._plan_faults()
        queue, pop, hook = self._queue, heapq.heappop, self.step_hook
        steps = 0
        while queue and steps < max_steps:
            when, _, _, fn, args = pop(queue)
            if when > horizon:
                break
            if when > self.now:
                self.now = when
            if hook is not None:
                hook(self, steps, fn, args)
            fn(*args)
            steps += 1
            if not self._open and self._quiet():
                break
        self.obs.steps, self.obs.end = steps, self.now
        self.obs.txns = self.txns
        self.obs.engines = [e for n in self.nodes.values() if n.up for e in n.engines.values()]
        return self.obs

    def _quiet(self) -> bool:
        """Nothing left but the periodic housekeeping, and every node is up."""
        if not all(n.up for n in self.nodes.values()):
            return False
        timer = self._timer_fired
        return all(fn == timer and args[3] == "housekeeping" for _, _, _, fn, args in self._queue)

    def tell(self, text: str) -> None:
        """Add a line to the story (when the world tells one)."""
        if self.story is not None:
            self.story.append(f"{self.now:10.4f}  {text}")

    @staticmethod
    def node_of(fn: Callable[..., None], args: tuple[Any, ...]) -> int | None:
        """The node a scheduled step happens at (None: an SAE or the network decides)."""
        if args and isinstance(args[0], SimNode):
            return args[0].id
        if getattr(fn, "__name__", "") == "_arrive":
            return int(args[0][0])
        return None

    # -- nodes -----------------------------------------------------------------------------
    def _boot(self, node: SimNode) -> None:
        node.gen += 1
        node.up = True
        node.engines = {}
        self.tell(f"{node.name} boots (run {node.gen})")
        if node.store is not None:
            node.store.restart(f"run-{node.gen}")
        for service in node.services:
            cfg = self.net.config(node.id, service, self.policy)
            rng = Stream(f"{self.seed}/rng/{node.id}/{node.gen}/{service}", self.obs.drawn)
            nonce = Stream(f"{self.seed}/nonce/{node.id}/{node.gen}/{service}")
            node.engines[service] = self.engine(node, service, cfg, rng, nonce)
        for service, engine in node.engines.items():
            self._run(node, service, engine.start(self.now))

    def engine(
        self, node: SimNode, service: str, cfg: EngineConfig, rng: Stream, nonce: Stream
    ) -> EngineBase:
        """A fresh engine of ``service`` for a run of ``node``."""
        cls = self.engine_classes[service]
        if issubclass(cls, UkmsEngine):
            return cls(cfg, rng, nonce, self.net.sessions[node.id])
        return cls(cfg, rng, nonce)

    def crash(self, node_id: int) -> None:
        """The node's process dies now (it restarts a moment later)."""
        node = self.nodes[node_id]
        if not node.up:
            return
        self.obs.crashes.append((self.now, node.name))
        self.tell(f"{node.name} CRASHES")
        node.up = False
        node.gen += 1  # everything scheduled for the old process is void
        for req, (target, _, origin) in list(self._inbox.items()):
            if target == node_id:
                del self._inbox[req]
                if origin is not None:
                    self._fail_later(origin, KmsErrorUnreachable())
        for key, (txn, op, _) in list(self._saes.items()):
            if key[0] == node_id:
                del self._saes[key]
                self._sae_failed(txn, op, "connection reset")
        node.engines = {}
        self.after(0.2 + self.rand.random() * 2.0, self._boot, node)

    # -- feeding engines --------------------------------------------------------------------
    def _feed(self, node: SimNode, service: str, event: Input) -> None:
        engine = node.engines.get(service)
        if engine is None:
            return
        try:
            actions = engine.handle(event, self.now)
        except Exception as exc:  # an engine must never raise: a violation
            self.obs.violations.append(f"{node.name}/{service} raised {exc!r} on {event!r}")
            return
        if self.story is not None:
            self.tell(f"{node.name}/{service} <- {story.event(event)}{story.actions(actions)}")
        self._run(node, service, actions)

    def _feed_later(self, delay: float, node: SimNode, service: str, event: Input) -> None:
        self.after(delay, self._feed_gen, node, node.gen, service, event)

    def _feed_gen(self, node: SimNode, gen: int, service: str, event: Input) -> None:
        if node.up and node.gen == gen:
            self._feed(node, service, event)

    def _run(self, node: SimNode, service: str, actions: list[Action]) -> None:
        actors = self._actors
        for action in actions:
            actor = actors.get(type(action))
            if actor is None:
                self.obs.violations.append(f"unknown action {action!r}")
                continue
            actor(node, service, action)

    def _read_keys(self, node: SimNode, service: str, action: ReadLinkKeys) -> None:
        self._feed_later(self._device_delay(), node, service, self._read(node, action))

    def _derive(self, node: SimNode, service: str, action: DerivePsk) -> None:
        key = kdf(self._psk, action.context, action.nonces)
        event = PskDerived(ticket=action.ticket, key=key)
        self._feed_later(self._device_delay(), node, service, event)

    def _store_op(self, node: SimNode, service: str, action: StoreOp) -> None:
        self.after(self._device_delay(), self._commit, node, node.gen, service, action)

    def _validate(self, node: SimNode, service: str, action: Validate) -> None:
        verdict = self.validator.validate(action.query)
        self._feed(node, service, Validated(ticket=action.ticket, verdict=verdict))

    def _find_path(self, node: SimNode, service: str, action: FindPath) -> None:
        try:
            event = PathFound(
                ticket=action.ticket, path=self.net.paths.find(action.src, action.dst)
            )
        except KmsError as exc:
            event = PathFound(ticket=action.ticket, error=exc)
        self._feed(node, service, event)

    def _set_timer(self, node: SimNode, service: str, action: SetTimer) -> None:
        token = next(self._seq)
        self._timers[(node.id, service, action.key)] = token
        self.at(action.at, self._timer_fired, node, node.gen, service, action.key, token)

    def _cancel_timer(self, node: SimNode, service: str, action: CancelTimer) -> None:
        self._timers.pop((node.id, service, action.key), None)

    def _alarm(self, node: SimNode, service: str, action: Alarm) -> None:
        self.obs.alarms.append((node.name, action.code, action.reason))

    def _timer_fired(self, node: SimNode, gen: int, service: str, key: Any, token: int) -> None:
        if self._timers.get((node.id, service, key)) != token:
            return
        del self._timers[(node.id, service, key)]
        self._feed_gen(node, gen, service, TimerFired(key=key))

    def _device_delay(self) -> float:
        return self.rand.choice((0.0, 0.0, 0.0002, 0.002))

    # -- the network -----------------------------------------------------------------------
    def _send(self, node: SimNode, service: str, call: Call) -> None:
        target_id, target_service = call.to
        origin = Origin(node.id, service, node.gen, call.call)
        if target_id == node.id and target_service in node.engines:  # the same process
            origin.local = True
            self.obs.local(call.message)
            req = next(self._numbers)
            self._inbox[req] = (node.id, node.gen, origin)
            received = Received(req=req, caller=node.id, message=call.message)
            self._feed(node, target_service, received)
            return
        data, kind = _wire(call.message)
        self.obs.sent(node.id, target_id, call.message)
        faulty = self.now < FAULTS_END
        if faulty and self.rand.random() < self.faults.loss:
            self.tell(f"{kind.__name__} {node.name} -> {target_id}: LOST")
            self._fail_later(origin, KeyUnavailable("request lost"), timeout=True)
            return
        origin.lose_answer = faulty and self.rand.random() < self.faults.loss
        where = (target_id, target_service, node.id)
        self.after(self._latency(), self._arrive, where, data, kind, origin)
        if faulty and self.rand.random() < self.faults.duplicate:
            self.tell(f"{kind.__name__} {node.name} -> {target_id}: DUPLICATED")
            self.after(self._latency(), self._arrive, where, data, kind, None)

    def _arrive(
        self,
        where: tuple[int, str, int],
        data: bytes,
        kind: type[m.Sendable],
        origin: Origin | None,
    ) -> None:
        """A request reaches its node (``where``: target, service, caller)."""
        target_id, service, caller = where
        target = self.nodes.get(target_id)
        if target is None or not target.up or service not in target.engines:
            if origin is not None:
                self._fail_later(origin, KmsErrorUnreachable())
            return
        message = _unwire(data, kind)
        req = next(self._numbers)
        self._inbox[req] = (target_id, target.gen, origin)
        self._feed(target, service, Received(req=req, caller=caller, message=message))

    def _answer(self, node: SimNode, service: str, action: Reply | Refuse) -> None:
        entry = self._inbox.pop(action.req, None)
        if entry is None:
            return
        _, _, origin = entry
        if origin is None:  # the answer to a duplicate: nobody reads it
            return
        if isinstance(action, Reply):
            answer: Input = Answered(call=origin.call, message=action.message)
        else:
            answer = CallFailed(call=origin.call, error=action.error)
        caller = self.nodes[origin.node]
        if origin.local:
            self._feed_gen(caller, origin.gen, origin.service, answer)
            return
        if origin.lose_answer:
            self.tell(f"answer {node.name} -> {caller.name}: LOST")
            self._fail_later(origin, KeyUnavailable("answer lost"), timeout=True)
            return
        if isinstance(action, Reply):
            data, kind = _wire(action.message)
            echoed = _unwire(data, kind)
            assert not isinstance(echoed, m.RelayItem)  # answers are messages
            answer = Answered(call=origin.call, message=echoed)
        else:
            refused = m.refused(action.error)
            answer = CallFailed(call=origin.call, error=error_from(refused.code, refused.message))
        self.after(self._latency(), self._feed_gen, caller, origin.gen, origin.service, answer)

    def _fail_later(self, origin: Origin, error: KmsError, *, timeout: bool = False) -> None:
        delay = self.policy.cn_timeout + self.CALL_TIMEOUT_EXTRA if timeout else self._latency()
        caller = self.nodes[origin.node]
        failed = CallFailed(call=origin.call, error=error)
        self.after(delay, self._feed_gen, caller, origin.gen, origin.service, failed)

    def _latency(self) -> float:
        if self.now >= FAULTS_END:
            return self.rand.random() * 0.0005
        return self.rand.random() * self.faults.max_delay

    # -- devices ---------------------------------------------------------------------------
    def _open_qkdms(self) -> dict[tuple[str, int], SimQkdm]:
        """Both ends of every link between KMS nodes, at the link's rate."""
        qkdms: dict[tuple[str, int], SimQkdm] = {}
        for link in self.net.links:
            sim = SimLink(
                link.id,
                f"{self.seed}/{link.id}",
                rate=link.skr_kbps * 1000 / link.key_size,
                key_bytes=link.key_size // 8,
                clock=lambda: self.now + START,
            )
            self._links[link.id] = sim
            qkdms[(link.id, min(link.a, link.b))] = sim.end(master=True)
            qkdms[(link.id, max(link.a, link.b))] = sim.end(master=False)
        return qkdms

    def _read(self, node: SimNode, read: ReadLinkKeys) -> LinkKeysRead:
        qkdm = self._qkdms[(read.link, node.id)]
        keys: list[tuple[str, bytearray]] = []
        gone: list[str] = []
        error: KmsError | None = None
        try:
            for _ in range(read.count):
                key = qkdm.get_key()
                keys.append((key.key_id, key.material))
            for key_id in read.ids:
                try:
                    key = qkdm.get_key_by_id(key_id)
                except hal.KeyNotFound:
                    gone.append(key_id)
                    continue
                keys.append((key.key_id, key.material))
        except hal.HalError as exc:
            error = KeyUnavailable(f"{read.link}: no link key ({exc.code})")
        return LinkKeysRead(ticket=read.ticket, keys=keys, gone=tuple(gone), error=error)

    def _commit(self, node: SimNode, gen: int, service: str, action: StoreOp) -> None:
        """Apply a store operation (it is committed from now on), then answer later."""
        if not node.up or node.gen != gen or node.store is None:
            return  # the process died before its transaction began
        try:
            result: Any = node.store.apply(action.op)
        except KmsError as exc:
            result = exc
        if self.story is not None:
            self.tell(f"{node.name} store commits {story.op(action.op)}: {story.result(result)}")
        done = StoreDone(ticket=action.ticket, result=result)
        self._feed_later(self._device_delay(), node, service, done)

    # -- faults ------------------------------------------------------------------------------
    def _plan_faults(self) -> None:
        names = sorted(self.nodes)
        for _ in range(self.faults.crashes):
            self.at(self.rand.random() * 3.0, self.crash, self.rand.choice(names))
        links = [self._links[name] for name in sorted(self._links)]
        for _ in range(self.faults.links_down):
            link = self.rand.choice(links)
            start = self.rand.random() * 2.0
            self.at(start, self._link_down, link, True)
            self.at(start + self.rand.random() * 5.0, self._link_down, link, False)
        for _ in range(self.faults.dry):
            link = self.rand.choice(links)
            self.at(self.rand.random() * 2.0, self._run_dry, link, True)
            self.at(10.0 + self.rand.random() * 10.0, self._run_dry, link, False)

    def _link_down(self, link: SimLink, down: bool) -> None:
        self.tell(f"{link.name} {'DOWN' if down else 'up again'}")
        link.down = down

    def _run_dry(self, link: SimLink, dry: bool) -> None:
        self.tell(f"{link.name} {'RUNS DRY' if dry else 'produces again'}")
        link.dry_since = self.now + START if dry else None

    # -- SAEs --------------------------------------------------------------------------------
    def _plan(self, requests: int, *, must_succeed: bool) -> list[Txn]:
        pairs = self.net.pairs
        txns = []
        for i in range(requests):
            master, slave = self.rand.choice(pairs)
            size = self.rand.choice((self.policy.key_size, self.policy.key_size, 512))
            txn = Txn(i, master, slave, self.rand.choice((1, 1, 2, 5)), size)
            if self.shared and self.rand.random() < self.shared:
                txn.also = self._also(master, slave)
            txns.append(txn)
            self.at(self.rand.random() * (2.0 if i % 2 else 20.0), self._enc, txn)
        if must_succeed:  # once every fault is over, the network must serve again
            for master, slave in pairs:
                txn = Txn(len(txns), master, slave, 1, self.policy.key_size, must_succeed=True)
                txns.append(txn)
                self.at(RECOVERED, self._enc, txn)
        self._open = len(txns)
        return txns

    def _also(self, master: str, slave: str) -> tuple[str, ...]:
        """Additional slaves for master -> slave: SAEs of the user at other UKMSs behind
        the slave's or the master's access node (at most one per UKMS)."""
        akms_of = self.validator.akms_of
        first = self.saes[slave]
        ends = (akms_of(first.node), akms_of(self.saes[master].node))
        taken, also = {first.node}, []
        for sae in self.saes.values():
            if sae.user != first.user or sae.id in (master, slave) or sae.node in taken:
                continue
            if akms_of(sae.node) in ends and self.rand.random() < 0.8:
                taken.add(sae.node)
                also.append(sae.id)
        return tuple(also)

    def _finish(self, txn: Txn, outcome: str) -> None:
        if not txn.done:
            txn.done, txn.outcome = True, outcome
            self._open -= 1

    def _enc(self, txn: Txn) -> None:
        node = self.nodes[self.saes[txn.master].node]
        self.tell(f"{txn.master} asks enc_keys x{txn.number} for {txn.slave} (txn {txn.id})")
        if not node.up:
            self._sae_failed(txn, "enc", "connection refused")
            return
        req = next(self._numbers)
        self._saes[(node.id, req)] = (txn, "enc", node.gen)
        event = SaeEncKeys(
            req=req,
            master=txn.master,
            slave=txn.slave,
            number=txn.number,
            size=txn.size,
            also=txn.also,
        )
        self._feed(node, "ukms", event)

    def _dec(self, txn: Txn) -> None:
        node = self.nodes[self.saes[txn.slave].node]
        txn.tries += 1
        txn.inflight += 1
        self.tell(f"{txn.slave} asks dec_keys (txn {txn.id}, try {txn.tries})")
        if not node.up:
            self._sae_failed(txn, "dec", "connection refused")
            return
        assert txn.keys is not None
        ids = tuple(k for k, _ in txn.keys)
        self._dec_request(node, txn, ids)
        if self.rand.random() < self.twins:  # the same request again, on another connection
            self.after(self.rand.random() * 0.05, self._twin, node, node.gen, txn, ids)
        if self.rand.random() < self.probes:
            self._probe(txn, ids)

    def _dec_request(self, node: SimNode, txn: Txn, ids: tuple[str, ...]) -> None:
        req = next(self._numbers)
        self._saes[(node.id, req)] = (txn, "dec", node.gen)
        event = SaeDecKeys(req=req, slave=txn.slave, master=txn.master, key_ids=ids)
        self._feed(node, "ukms", event)

    def _twin(self, node: SimNode, gen: int, txn: Txn, ids: tuple[str, ...]) -> None:
        """A second dec_keys for the same keys from the same slave, to the same run of its
        UKMS (after a restart the store rightly hands pending keys to their slave again)."""
        if not node.up or node.gen != gen:
            return
        self.tell(f"{txn.slave} sends the same dec_keys again (txn {txn.id})")
        txn.inflight += 1
        self._dec_request(node, txn, ids)

    def _probe(self, txn: Txn, ids: tuple[str, ...]) -> None:
        """Someone else asks for the keys: another SAE at the slave's node, or the master
        (with ``probes`` at 1, every other SAE of the network)."""
        named = (txn.slave, *txn.also)
        others = [s for s in self.saes.values() if s.id not in named]
        thieves = others if self.probes >= 1.0 else [self.rand.choice(others)]
        for thief in thieves:
            node = self.nodes[thief.node]
            if not node.up:
                continue
            self.tell(f"{thief.id} asks for the keys of txn {txn.id}")
            req = next(self._numbers)
            probe = Txn(-1, txn.master, thief.id, len(ids), txn.size)
            self._saes[(node.id, req)] = (probe, "probe", node.gen)
            event = SaeDecKeys(req=req, slave=thief.id, master=txn.master, key_ids=ids)
            self._feed(node, "ukms", event)

    def _sae_answer(self, node: SimNode, service: str, action: SaeKeys | SaeRefused) -> None:
        """The UKMS answers an SAE: a refusal at once, keys one step later (the answer is
        written then, unless the process died in between)."""
        entry = self._saes.pop((node.id, action.req), None)
        if entry is None:
            if isinstance(action, SaeKeys):
                _erase(action.keys)
                self.obs.violations.append(f"{node.name}: keys for an SAE request nobody made")
            return
        txn, op, gen = entry
        if isinstance(action, SaeRefused):
            if not isinstance(action.error, KmsError):
                self.obs.violations.append(f"{node.name}: an SAE refused with {action.error!r}")
            self._sae_failed(txn, op, f"{action.error.code}: {action.error.message}")
            return
        keys = [(k, bytes(v)) for k, v in action.keys]
        _erase(action.keys)
        self.after(self._latency(), self._sae_written, node, gen, action.req, txn, op, keys)

    def _sae_written(
        self,
        node: SimNode,
        gen: int,
        req: int,
        txn: Txn,
        op: str,
        keys: list[tuple[str, bytes]],
    ) -> None:
        if not node.up or node.gen != gen:  # the process died with the answer unwritten
            self._sae_failed(txn, op, "connection reset")
            return
        if op == "enc":
            self.tell(f"{txn.master} gets {len(keys)} keys (txn {txn.id})")
            txn.keys = keys
            self.obs.master_got(txn, keys)
            self.after(0.01 + self.rand.random(), self._dec, txn)
            for extra in txn.also:  # each additional slave fetches them too, on its own
                other = Txn(len(self.txns), txn.master, extra, txn.number, txn.size, keys=keys)
                other.must_succeed, other.of = txn.must_succeed, txn.id
                other.also = tuple(x for x in (txn.slave, *txn.also) if x != extra)
                self.txns.append(other)
                self._open += 1
                self.after(0.01 + self.rand.random(), self._dec, other)
            return
        if op == "dec" and self.now < FAULTS_END and self.rand.random() < self.faults.sae_drops:
            self.tell(f"answer to {txn.slave} LOST with its connection (txn {txn.id})")
            self._feed(node, "ukms", SaeAnswerWritten(req=req, ok=False))
            self._sae_failed(txn, op, "answer lost")
            return
        sae = self.recipient(node, txn, op)
        self.tell(f"{sae} gets {len(keys)} keys of {txn.master} (txn {txn.id})")
        self.obs.slave_got(sae, keys)
        self._feed(node, "ukms", SaeAnswerWritten(req=req))
        if op == "dec":
            txn.inflight -= 1
            self._finish(txn, "fetched")

    def recipient(self, node: SimNode, txn: Txn, op: str) -> str:
        """The SAE whose connection carries a dec_keys answer: the one that asked."""
        return txn.slave

    def _sae_failed(self, txn: Txn, op: str, why: str) -> None:
        if op == "probe":
            return
        if op == "enc":
            self.tell(f"{txn.master}: enc_keys failed: {why} (txn {txn.id})")
            self._finish(txn, f"refused: {why}")
            return
        txn.inflight -= 1
        self.obs.dec_failures.append((txn.id, why))
        self.tell(f"{txn.slave}: dec_keys failed: {why} (txn {txn.id})")
        if txn.done or txn.inflight > 0:  # fetched meanwhile, or a twin still waits
            return
        if txn.tries >= self.MAX_TRIES:
            self._finish(txn, f"gave up: {why}")
            return
        self.after(0.5 + self.rand.random() * 2.0, self._dec, txn)


class KmsErrorUnreachable(KmsError):
    """The simulated peer was down or crashed: the connection was refused or reset."""

    code = "KMS-UNREACHABLE"

    def __init__(self) -> None:
        super().__init__("peer unreachable")


def _ignore(node: SimNode, service: str, action: Notice) -> None:
    """Notices are log lines; the world has no log."""


def _erase(keys: list[tuple[str, bytearray]]) -> None:
    for _, material in keys:
        material[:] = bytes(len(material))


def _wire(message: m.Sendable) -> tuple[bytes, type[m.Sendable]]:
    """The message as it crosses the network (a relay item travels in a batch of one)."""
    if isinstance(message, m.RelayItem):
        return m.encode(m.RelayBatch(items=[message])), m.RelayItem
    if message.holds_key:
        buffer = bytearray()
        m.encode_into(message, buffer)
        return bytes(buffer), type(message)
    return m.encode(message), type(message)


def _unwire(data: bytes, kind: type[m.Sendable]) -> m.Sendable:
    if issubclass(kind, m.RelayItem):
        return m.decode(data, m.RelayBatch).items[0]
    return m.decode(data, kind)


@functools.cache
def _demoquandt() -> Topology:
    return load_topology("demoquandt")


def run(seed: int, **options: Any) -> Observations:
    """One schedule, from its seed alone (the same seed replays it exactly)."""
    return World(seed, **options).run()
