"""What a simulated schedule saw, and the invariants it must hold (DESIGN §2).

:class:`Observations` is filled by the world as the schedule runs: keys handed to master
and slave SAEs, the outputs of the random generators, every message that crossed the
network, the CN keys handed over inside access nodes, alarms and crashes.
:func:`violations` then checks, for the whole schedule:

1. each key handed to a master SAE is fetched by the named slave (and by each additional
   slave named with it), exactly once each, with the same bits, and by no other SAE (a
   request whose keys a slave could not fetch is a *lost* key);
2. every key's bits come out of a node's random generator (nothing a user sent is key
   material);
3. every SAE request ended (keys, or a clean refusal with a code), no engine still waits
   for anything, and once every fault is over a request of each SAE pair succeeds (the
   network recovered);
4. no QKD link key is spent twice (no OTP byte, no GCM key and counter, in two different
   messages; the two ends of a link never send with the same key), and no CN key is
   relayed or handed over twice;
5. no integrity alarm unless the schedule duplicated messages (a replay is one).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.kms import messages as m
from appliance.kms.errors import KmsError
from appliance.kms.relay import Mode, decode

if TYPE_CHECKING:
    from appliance.kms.engines import EngineBase
    from appliance.kms.sim.world import Faults, Txn


@dataclass
class Observations:
    drawn: list[bytes] = field(default_factory=list)
    masters: dict[str, tuple[int, str, str, bytes]] = field(default_factory=dict)
    """Key ID -> (transaction, master, slave, bits) as the master got it."""
    shared: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Key ID -> the additional slaves named with it (ETSI 014 Annex B), if any."""
    slaves: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    """Key ID -> (SAE, bits) for every time an SAE got it from dec_keys."""
    otp: dict[tuple[str, str], list[tuple[int, int, bytes]]] = field(default_factory=dict)
    """(link, key ID) -> byte ranges [start, end) spent, each with the digest of the
    message that spent it (a message sent twice spends the same range again)."""
    gcm: dict[tuple[str, str, int], bytes] = field(default_factory=dict)
    senders: dict[tuple[str, str], int] = field(default_factory=dict)
    """(link, key ID) -> the node that sent with it."""
    relayed: set[bytes] = field(default_factory=set)
    handed: set[bytes] = field(default_factory=set)
    alarms: list[tuple[str, str, str]] = field(default_factory=list)
    crashes: list[tuple[float, str]] = field(default_factory=list)
    dec_failures: list[tuple[int, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    txns: list[Txn] = field(default_factory=list)
    engines: list[EngineBase] = field(default_factory=list)
    steps: int = 0
    end: float = 0.0

    def digest(self) -> str:
        """A digest of everything observed (a schedule replayed from its seed gives the
        same one; any difference in keys, bits, spent link keys, alarms, crashes,
        failures, outcomes or step count gives another)."""
        h = hashlib.blake2b(digest_size=16)
        for part in (
            self.drawn,
            sorted(self.masters.items()),
            sorted(self.shared.items()),
            sorted(self.slaves.items()),
            sorted(self.otp.items()),
            sorted(self.gcm.items()),
            sorted(self.senders.items()),
            sorted(self.relayed),
            sorted(self.handed),
            self.alarms,
            self.crashes,
            self.dec_failures,
            self.violations,
            [
                (t.id, t.master, t.slave, t.number, t.size, t.keys, t.tries, t.outcome)
                for t in self.txns
            ],
            (self.steps, self.end),
        ):
            h.update(repr(part).encode())
            h.update(b"\x00")
        return h.hexdigest()

    # -- what the world reports ------------------------------------------------------------
    def master_got(self, txn: Txn, keys: list[tuple[str, bytes]]) -> None:
        for key_id, bits in keys:
            if key_id in self.masters:
                self.violations.append(f"key {key_id} handed to a master twice")
            self.masters[key_id] = (txn.id, txn.master, txn.slave, bits)
            if txn.also:
                self.shared[key_id] = txn.also

    def slave_got(self, sae: str, keys: list[tuple[str, bytes]]) -> None:
        """``sae`` read these keys in a dec_keys answer."""
        for key_id, bits in keys:
            self.slaves.setdefault(key_id, []).append((sae, bits))

    def sent(self, src: int, dst: int, message: m.Message | m.RelayItem) -> None:
        """A message crossed the network: note the link keys its hop messages spend."""
        sealed = _sealed_of(message)
        if sealed is not None:
            self._spent(src, sealed)

    def local(self, message: m.Message | m.RelayItem) -> None:
        """A hand-over inside an access node: CN keys entering and leaving the relay."""
        if isinstance(message, m.RelayLocal):
            key = bytes(message.cn_key)
            if key in self.relayed:
                self.violations.append("a CN key was handed to the relay twice")
            self.relayed.add(key)
        elif isinstance(message, m.CnLocal):
            key = bytes(message.cn_key)
            if key in self.handed:
                self.violations.append("a CN key was handed to the requesting AKMS twice")
            if key not in self.relayed:
                self.violations.append("a CN key arrived that no access node relayed")
            self.handed.add(key)

    def _spent(self, src: int, sealed: bytes) -> None:
        try:
            hop, _, _ = decode(sealed)
        except KmsError:
            return
        digest = hashlib.blake2b(sealed, digest_size=16).digest()
        for seg in hop.segments:
            sender = self.senders.setdefault((hop.link, seg.key_id), src)
            if sender != src:
                self.violations.append(f"both ends of {hop.link} sent with key {seg.key_id}")
            if hop.mode is Mode.GCM:
                seen = self.gcm.setdefault((hop.link, seg.key_id, hop.counter), digest)
                if seen != digest:
                    self.violations.append(f"{hop.link}: GCM key and counter used twice")
                continue
            spans = self.otp.setdefault((hop.link, seg.key_id), [])
            start, end = seg.offset, seg.offset + seg.length
            if any(a < end and start < b and d != digest for a, b, d in spans):
                self.violations.append(f"{hop.link}: OTP key {seg.key_id} bytes reused")
            if (start, end, digest) not in spans:
                spans.append((start, end, digest))


def _sealed_of(message: m.Message | m.RelayItem) -> bytes | None:
    if isinstance(message, m.RelayItem):
        return message.message
    if isinstance(message, m.KsaAnswer | m.Deliver):
        return message.sealed
    return None


def violations(obs: Observations, faults: Faults) -> list[str]:
    """Every broken invariant of a finished schedule (empty: the schedule is sound)."""
    found = list(obs.violations)
    found += _deliveries(obs)
    found += _provenance(obs)
    found += _completion(obs)
    integrity = [a for a in obs.alarms if a[1] in ("KMS-INTEGRITY", "KMS-REPLAY")]
    if integrity and not faults.duplicate:
        found.append(f"integrity alarm without any duplicated message: {integrity[0]}")
    return found


def _deliveries(obs: Observations) -> list[str]:
    found = []
    for key_id, (txn, _, slave, bits) in obs.masters.items():
        got = obs.slaves.get(key_id, [])
        named = (slave, *obs.shared.get(key_id, ()))
        for sae in named:
            times = sum(1 for s, _ in got if s == sae)
            if not times:
                found.append(f"key {key_id} of transaction {txn} lost: {sae} never got it")
            if times > 1:
                found.append(f"key {key_id} delivered {times} times to {sae}")
        for sae, other in got:
            if sae not in named:
                found.append(f"key {key_id} delivered to {sae}, not to {' or '.join(named)}")
            if other != bits:
                found.append(f"key {key_id}: the two ends got different bits")
    for key_id in obs.slaves.keys() - obs.masters.keys():
        found.append(f"key {key_id} delivered to a slave but never to a master")
    return found


def _provenance(obs: Observations) -> list[str]:
    found = []
    for key_id, (_, _, _, bits) in obs.masters.items():
        if not any(bits in draw for draw in obs.drawn):
            found.append(f"key {key_id} is not the output of any random generator")
    return found


def _completion(obs: Observations) -> list[str]:
    found = [f"transaction {t.id} never ended" for t in obs.txns if not t.done]
    found += [
        f"transaction {t.id} after the faults failed: {t.outcome}"
        for t in obs.txns
        if t.must_succeed and t.outcome != "fetched"
    ]
    for engine in obs.engines:
        waiting = len(getattr(engine, "_waiting", {}))
        if waiting:
            found.append(f"{engine.name}/{engine.config.service} still waits for {waiting} inputs")
    return found
