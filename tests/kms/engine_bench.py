"""A bench for the KMS role engines: the engines of a five-node network, driven by hand.

No network, no event loop, no clock: :class:`Bench` does what the node adapter does with
each action, in one queue, in order. Calls are routed to the target engine (each message
through the real codec when it leaves its node, in memory within a node, as the adapter
does); refusals cross the wire as the adapter maps them (``messages.refused`` then
``batching.error_from``). Link keys come from :class:`~appliance.kms.sim.qkdm.SimLink`
ends, store operations from :class:`~appliance.kms.sim.models.ModelStore`, verdicts and
paths from the real seams, PSK-derived keys from ``hsm.psk.kdf``; timers fire when a test
moves the time on. A test steps in with *rules*: hold a delivery (and release it later,
to choose an order), rewrite it, or refuse a request in its target's stead.

Everything that passes is recorded: every action, the messages sent, the key material
that came into being (link keys read, derived keys, keys drawn, keys handed to SAEs), so
that :meth:`Bench.check_no_key_leaks` can look for key bits where none may be.

The network (:data:`MINI`)::

    ukms-a (1) -- akms-a (2, akms+ckms) -- ckms-mid (3) -- akms-b (4, akms+ckms) -- ukms-b (5)

On every link the lower ID is the master end: UKMS 1 grants to AKMS 2, CKMS 2 to CKMS 3,
CKMS 3 to CKMS 4, AKMS 4 to UKMS 5. SAEs ``sae-a`` (1) and ``sae-b`` (5) share a GCM
contract, ``sae-c`` (1) and ``sae-d`` (5) an OTP one.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hal
from appliance.config.topology import Topology, load_topology
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
from appliance.kms.seams import ContractValidator, Denied, TopologyPaths, TopologySessions
from appliance.kms.sim.models import ModelStore
from appliance.kms.sim.qkdm import SimLink, SimQkdm
from appliance.kms.sim.world import Stream
from appliance.kms.storeops import Put
from hsm.psk import kdf

MINI = """
[network]
name = "mini"
key_size = 256

[[nodes]]
id = 1
name = "ukms-a"
site = "A (user site)"
role = "ukms"

[[nodes]]
id = 2
name = "akms-a"
site = "A"
role = "akms+ckms"

[[nodes]]
id = 3
name = "ckms-mid"
site = "M"
role = "ckms"

[[nodes]]
id = 4
name = "akms-b"
site = "B"
role = "akms+ckms"

[[nodes]]
id = 5
name = "ukms-b"
site = "B (user site)"
role = "ukms"

[[links]]
a = 1
b = 2
length_km = 10.0

[[links]]
a = 2
b = 3
length_km = 50.0

[[links]]
a = 3
b = 4
length_km = 50.0

[[links]]
a = 4
b = 5
length_km = 10.0

[[users]]
id = "user-gcm"
name = "A user whose keys cross in GCM mode"

[[users]]
id = "user-otp"
name = "A user whose keys cross in OTP mode"

[[contracts]]
id = "contract-gcm"
user = "user-gcm"

[[contracts]]
id = "contract-otp"
user = "user-otp"
relay_mode = "otp"
route_policy = "most-key"

[[saes]]
id = "sae-a"
node = 1
user = "user-gcm"
contract = "contract-gcm"

[[saes]]
id = "sae-b"
node = 5
user = "user-gcm"
contract = "contract-gcm"

[[saes]]
id = "sae-c"
node = 1
user = "user-otp"
contract = "contract-otp"

[[saes]]
id = "sae-d"
node = 5
user = "user-otp"
contract = "contract-otp"
"""
SHARED = (  # a second UKMS under B: slaves of one request at two UKMSs
    MINI
    + """
[[nodes]]
id = 6
name = "ukms-b2"
site = "B2 (user site)"
role = "ukms"

[[links]]
a = 4
b = 6
length_km = 10.0

[[saes]]
id = "sae-e"
node = 5
user = "user-gcm"
contract = "contract-gcm"

[[saes]]
id = "sae-f"
node = 6
user = "user-gcm"
contract = "contract-gcm"

[[saes]]
id = "sae-g"
node = 1
user = "user-gcm"
contract = "contract-gcm"
"""
)
START = 3600.0
"""Seconds the QKD links have been distilling when a bench starts."""
PSK = bytes(range(32))
WINDOW = 16
"""Bytes of key material that, found anywhere they must not be, count as a leak."""
HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")

Pred = Callable[["Delivery"], bool]


def mini_topology(directory: Path) -> Topology:
    path = directory / "mini.toml"
    path.write_text(MINI)
    return load_topology(str(path))


@dataclass(eq=False)
class Delivery:
    """One input on its way to an engine."""

    node: int
    service: str
    event: Input
    gen: int | None = None
    """The engine generation an answer or a reading is for (None: a new request)."""


@dataclass(eq=False)
class Origin:
    """Who waits for the answer to a request."""

    node: int
    service: str
    call: int
    gen: int
    local: bool


@dataclass(eq=False)
class Rule:
    pred: Pred
    fn: Callable[[Delivery], Delivery | None]
    once: bool = True


def wired(message: m.Sendable) -> tuple[bytes, m.Sendable]:
    """A message as it crosses the network, and as the receiver decodes it."""
    if isinstance(message, m.RelayItem):
        data = m.encode(m.RelayBatch(items=[message]))
        return data, m.decode(data, m.RelayBatch).items[0]
    if message.holds_key:
        buffer = bytearray()
        m.encode_into(message, buffer)
        return bytes(buffer), m.decode(buffer, type(message))
    data = m.encode(message)
    return data, m.decode(data, type(message))


def wired_error(error: KmsError) -> KmsError:
    """A refusal as the caller's adapter turns it back into an error."""
    refused = m.refused(error)
    denied = Denied.from_code(refused.code, refused.message)  # as KmsNode.request does
    return denied if denied is not None else error_from(refused.code, refused.message)


class Bench:
    """The engines of every KMS node of a topology, and what their adapters would do."""

    def __init__(
        self,
        topology: Topology,
        policy: Policy | None = None,
        *,
        psk: dict[int, bytes] | None = None,
        no_psk: frozenset[int] = frozenset(),
        down: tuple[str, ...] = (),
    ) -> None:
        self.topology = topology
        self.policy = policy or Policy(patience=1.0)
        self.now = 0.0
        self.validator = ContractValidator(
            topology, mode=self.policy.mode, max_keys=self.policy.max_key_per_request
        )
        self.paths = TopologyPaths(topology)
        self.psk, self.no_psk = psk or {}, no_psk
        self.links: dict[str, SimLink] = {}
        self.qkdms: dict[tuple[str, int], SimQkdm] = {}
        for link in topology.links:
            sim = SimLink(
                link.id,
                f"bench/{link.id}",
                rate=link.skr_kbps * 1000 / link.key_size,
                key_bytes=link.key_size // 8,
                clock=lambda: self.now + START,
            )
            sim.down = link.id in down
            self.links[link.id] = sim
            self.qkdms[(link.id, min(link.a, link.b))] = sim.end(master=True)
            self.qkdms[(link.id, max(link.a, link.b))] = sim.end(master=False)
        self.stores = {
            n.id: ModelStore(lambda: self.now) for n in topology.spec.nodes if "ukms" in n.roles
        }
        self.engines: dict[tuple[int, str], EngineBase] = {}
        self.gen: dict[tuple[int, str], int] = {}
        self.queue: deque[Delivery] = deque()
        self.held: list[Delivery] = []
        self.rules: list[Rule] = []
        self.numbers = itertools.count(1)
        self.inbox: dict[int, Origin] = {}
        self.calls: dict[tuple[int, str, int], m.Sendable] = {}
        self.timers: dict[tuple[int, str, Hashable], tuple[float, int]] = {}
        # what passed, for the tests
        self.log: list[tuple[int, str, Action]] = []
        self.delivered: list[Delivery] = []
        self.sae: dict[tuple[int, int], SaeKeys | SaeRefused] = {}
        self.sae_bits: dict[tuple[int, int], list[tuple[str, bytes]]] = {}
        self.draws: list[bytes] = []
        self.secrets: list[bytes] = []
        self.wire: list[tuple[str, bytes]] = []
        self.reads: list[LinkKeysRead] = []
        self.derived: list[tuple[int, bytearray]] = []  # (node, key) of each PSK derivation
        self.puts: list[Put] = []
        for node in topology.spec.nodes:
            for service in ("ukms", "akms", "ckms"):
                if service in node.roles:
                    self.boot(node.id, service)
        self.run()

    # -- engines ---------------------------------------------------------------------------
    def boot(self, node: int, service: str) -> EngineBase:
        """Start (or restart) one engine: a new run with nothing but its node's store."""
        key = (node, service)
        gen = self.gen[key] = self.gen.get(key, 0) + 1
        for timer in [t for t in self.timers if t[:2] == key]:
            del self.timers[timer]
        cfg = EngineConfig.of(self.topology, node, service, self.policy)
        rng = Stream(f"rng/{node}/{service}/{gen}", self.draws)
        nonce = Stream(f"nonce/{node}/{service}/{gen}")
        engine: EngineBase
        if service == "ukms":
            self.stores[node].restart(f"run-{gen}")
            engine = UkmsEngine(cfg, rng, nonce, TopologySessions(self.topology, node))
        elif service == "akms":
            engine = AkmsEngine(cfg, rng, nonce)
        else:
            engine = CkmsEngine(cfg, rng, nonce)
        self.engines[key] = engine
        self.perform(node, service, engine.start(self.now))
        return engine

    def restart(self, node: int, service: str) -> EngineBase:
        engine = self.boot(node, service)
        self.run()
        return engine

    def engine(self, node: int, service: str) -> Any:
        return self.engines[(node, service)]

    # -- the queue -------------------------------------------------------------------------
    def push(self, delivery: Delivery) -> None:
        """Queue a delivery, unless a rule holds, rewrites or answers it first."""
        for rule in list(self.rules):
            if rule.pred(delivery):
                if rule.once:
                    self.rules.remove(rule)
                replaced = rule.fn(delivery)
                if replaced is None:
                    return
                delivery = replaced
        self.queue.append(delivery)

    def run(self, limit: int = 100_000) -> None:
        """Deliver everything queued, and what that causes, until nothing is left."""
        for _ in range(limit):
            if not self.queue:
                return
            d = self.queue.popleft()
            key = (d.node, d.service)
            engine = self.engines.get(key)
            if engine is None or (d.gen is not None and d.gen != self.gen[key]):
                continue  # for a process that is gone
            self.delivered.append(d)
            self.perform(d.node, d.service, engine.handle(d.event, self.now))
        raise AssertionError("the bench did not settle")

    def feed(self, node: int, service: str, event: Input) -> None:
        self.push(Delivery(node, service, event))
        self.run()

    def release(self, delivery: Delivery) -> None:
        """Deliver a held delivery now (past the rules)."""
        self.held.remove(delivery)
        self.queue.append(delivery)
        self.run()

    def advance(self, seconds: float) -> None:
        """Move the time on, firing the timers that come due, in order."""
        end = self.now + seconds
        while True:
            due = [(at, key) for key, (at, _) in self.timers.items() if at <= end]
            if not due:
                break
            at, key = min(due, key=lambda item: item[0])
            _, gen = self.timers.pop(key)
            self.now = max(self.now, at)
            node, service, name = key
            self.push(Delivery(node, service, TimerFired(key=name), gen=gen))
            self.run()
        self.now = end

    # -- rules -----------------------------------------------------------------------------
    def hold(self, pred: Pred, *, once: bool = True) -> None:
        def fn(d: Delivery) -> None:
            self.held.append(d)

        self.rules.append(Rule(pred, fn, once))

    def rewrite(self, pred: Pred, fn: Callable[[Delivery], Delivery | None], *, once=True):
        self.rules.append(Rule(pred, fn, once))

    def refuse(self, pred: Pred, error: KmsError, *, once: bool = True) -> None:
        """A matching request is refused with ``error`` by its target, unread."""

        def fn(d: Delivery) -> None:
            assert isinstance(d.event, Received)
            self.answer(d.node, d.service, Refuse(req=d.event.req, error=error))

        self.rules.append(Rule(pred, fn, once))

    def request_to(self, node: int, service: str, kind: type[Any]) -> Pred:
        def pred(d: Delivery) -> bool:
            return (
                (d.node, d.service) == (node, service)
                and isinstance(d.event, Received)
                and isinstance(d.event.message, kind)
            )

        return pred

    def answer_to(self, node: int, service: str, kind: type[Any]) -> Pred:
        """The answer (or failure) of a call of ``kind`` made by an engine."""

        def pred(d: Delivery) -> bool:
            if (d.node, d.service) != (node, service):
                return False
            if not isinstance(d.event, Answered | CallFailed):
                return False
            return isinstance(self.calls.get((node, service, d.event.call)), kind)

        return pred

    def input_to(self, node: int, service: str, kind: type[Any]) -> Pred:
        def pred(d: Delivery) -> bool:
            return (d.node, d.service) == (node, service) and isinstance(d.event, kind)

        return pred

    # -- what the adapter does -------------------------------------------------------------
    def perform(self, node: int, service: str, actions: list[Action]) -> None:
        for action in actions:
            self.log.append((node, service, action))
            self.act(node, service, action)

    def act(self, node: int, service: str, action: Action) -> None:
        gen = self.gen[(node, service)]
        if isinstance(action, Call):
            self.call(node, service, action)
        elif isinstance(action, Reply | Refuse):
            self.answer(node, service, action)
        elif isinstance(action, ReadLinkKeys):
            self.push(Delivery(node, service, self.read(node, action), gen))
        elif isinstance(action, DerivePsk):
            self.push(Delivery(node, service, self.derive(node, action), gen))
        elif isinstance(action, StoreOp):
            self.push(Delivery(node, service, self.store(node, action), gen))
        elif isinstance(action, Validate):
            verdict = self.validator.validate(action.query)
            self.push(
                Delivery(node, service, Validated(ticket=action.ticket, verdict=verdict), gen)
            )
        elif isinstance(action, FindPath):
            self.push(Delivery(node, service, self.find(action), gen))
        elif isinstance(action, SetTimer):
            self.timers[(node, service, action.key)] = (action.at, gen)
        elif isinstance(action, CancelTimer):
            self.timers.pop((node, service, action.key), None)
        elif isinstance(action, SaeKeys | SaeRefused):
            self.sae[(node, action.req)] = action
            if isinstance(action, SaeKeys):
                bits = [(key_id, bytes(material)) for key_id, material in action.keys]
                self.sae_bits[(node, action.req)] = bits
                self.secrets += [b for _, b in bits]
        else:
            assert isinstance(action, Alarm | Notice), action

    def call(self, node: int, service: str, call: Call) -> None:
        target = call.to
        req = next(self.numbers)
        local = target[0] == node
        self.calls[(node, service, call.call)] = call.message
        self.inbox[req] = Origin(node, service, call.call, self.gen[(node, service)], local)
        if target not in self.engines:
            self.answer(*target, Refuse(req=req, error=KeyUnavailable("no such service")))
            return
        message = call.message
        if local:
            cn_key = getattr(message, "cn_key", None)
            if isinstance(cn_key, bytearray):
                self.secrets.append(bytes(cn_key))
        else:
            data, message = wired(message)
            self.wire.append((f"{node}/{service} -> {target}: {type(message).__name__}", data))
        self.push(Delivery(*target, Received(req=req, caller=node, message=message)))

    def answer(self, node: int, service: str, action: Reply | Refuse) -> None:
        origin = self.inbox.pop(action.req, None)
        if origin is None:
            return  # a request nobody waits for (fed by a test)
        event: Input
        if isinstance(action, Reply):
            message = action.message
            if not origin.local:
                data, message = wired(message)
                self.wire.append((f"{node}/{service} answers {type(message).__name__}", data))
            event = Answered(call=origin.call, message=message)
        else:
            error = action.error if origin.local else wired_error(action.error)
            event = CallFailed(call=origin.call, error=error)
        self.push(Delivery(origin.node, origin.service, event, origin.gen))

    def read(self, node: int, read: ReadLinkKeys) -> LinkKeysRead:
        qkdm = self.qkdms[(read.link, node)]
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
        self.secrets += [bytes(material) for _, material in keys]
        event = LinkKeysRead(ticket=read.ticket, keys=keys, gone=tuple(gone), error=error)
        self.reads.append(event)
        return event

    def derive(self, node: int, action: DerivePsk) -> PskDerived:
        if node in self.no_psk:
            error = KeyUnavailable(f"no PSK source for the channel to {action.peer}")
            return PskDerived(ticket=action.ticket, error=error)
        key = kdf(self.psk.get(node, PSK), action.context, action.nonces)
        self.secrets.append(bytes(key))
        self.derived.append((node, key))
        return PskDerived(ticket=action.ticket, key=key)

    def store(self, node: int, action: StoreOp) -> StoreDone:
        result: Any
        if isinstance(action.op, Put):
            self.puts.append(action.op)
        try:
            result = self.stores[node].apply(action.op)
        except KmsError as exc:
            result = exc
        if isinstance(result, list):
            self.secrets += [bytes(k.material) for k in result]
        return StoreDone(ticket=action.ticket, result=result)

    def find(self, action: FindPath) -> PathFound:
        try:
            path = self.paths.find(action.src, action.dst)
        except KmsError as exc:
            return PathFound(ticket=action.ticket, error=exc)
        return PathFound(ticket=action.ticket, path=path)

    # -- SAEs ------------------------------------------------------------------------------
    def node_of(self, sae: str) -> int:
        return next(s.node for s in self.topology.spec.saes if s.id == sae)

    def enc(self, master: str, slave: str, number: int = 1, size: int = 256) -> int:
        """An enc_keys at the master's UKMS; its request number (see :meth:`outcome`)."""
        req = next(self.numbers)
        event = SaeEncKeys(req=req, master=master, slave=slave, number=number, size=size)
        self.feed(self.node_of(master), "ukms", event)
        return req

    def dec(self, slave: str, master: str, ids: list[str], *, written: bool | None = True) -> int:
        """A dec_keys at the slave's UKMS; the answer is then written (or not)."""
        req, node = next(self.numbers), self.node_of(slave)
        event = SaeDecKeys(req=req, slave=slave, master=master, key_ids=tuple(ids))
        self.feed(node, "ukms", event)
        if written is not None and isinstance(self.sae.get((node, req)), SaeKeys):
            self.feed(node, "ukms", SaeAnswerWritten(req=req, ok=written))
        return req

    def outcome(self, sae: str, req: int) -> SaeKeys | SaeRefused | None:
        return self.sae.get((self.node_of(sae), req))

    def keys(self, sae: str, req: int) -> list[tuple[str, bytes]]:
        """The keys an SAE got (as they were when handed out), or an AssertionError."""
        got = self.outcome(sae, req)
        assert isinstance(got, SaeKeys), got
        return self.sae_bits[(self.node_of(sae), req)]

    # -- what was seen ---------------------------------------------------------------------
    def actions(self, kind: type[Any], node: int | None = None, service: str | None = None):
        return [
            a
            for n, s, a in self.log
            if isinstance(a, kind) and node in (None, n) and service in (None, s)
        ]

    def sent(self, kind: type[Any], node: int | None = None, service: str | None = None):
        """Messages of ``kind`` the engines called other engines with."""
        return [c.message for c in self.actions(Call, node, service) if isinstance(c.message, kind)]

    def received(self, node: int, service: str, kind: type[Any]) -> list[Any]:
        """Messages of ``kind`` delivered to an engine (the very objects it got)."""
        return [
            d.event.message
            for d in self.delivered
            if (d.node, d.service) == (node, service)
            and isinstance(d.event, Received)
            and isinstance(d.event.message, kind)
        ]

    def waiting(self) -> dict[tuple[int, str], int]:
        """Inputs each engine still waits for (none, once every request has ended)."""
        return {k: len(e._waiting) for k, e in self.engines.items() if e._waiting}

    def check_no_key_leaks(self) -> None:
        """No key bits (16 bytes or more of anything secret that passed) in a message that
        crossed the network, nor, as bytes or hex, in a notice, alarm or error text."""
        secret = {
            s[i : i + WINDOW] for s in self.secrets if len(s) >= WINDOW for i in range(len(s) - 15)
        }
        secret |= {
            d[i : i + WINDOW] for d in self.draws if len(d) > WINDOW for i in range(len(d) - 15)
        }
        for what, data in self.wire:
            for i in range(len(data) - WINDOW + 1):
                assert data[i : i + WINDOW] not in secret, f"key bits in {what}"
        for _, _, action in self.log:
            texts: list[str] = []
            if isinstance(action, Notice):
                for name, value in action.fields.items():
                    assert isinstance(value, str | int | float | bool), (action.event, name)
                    texts.append(str(value))
                texts.append(action.event)
            elif isinstance(action, Alarm):
                texts.append(action.reason)
            elif isinstance(action, Refuse | SaeRefused):
                texts.append(action.error.message)
            for text in texts:
                for run in HEX_RUN.findall(text):
                    raw = bytes.fromhex(run[: len(run) // 2 * 2])
                    for i in range(len(raw) - WINDOW + 1):
                        assert raw[i : i + WINDOW] not in secret, f"key bits in {action!r}"
