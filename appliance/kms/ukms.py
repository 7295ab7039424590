"""The UKMS part of a KMS node: the KSA keys of the SAEs served here.

A master's keys are made through the network (``request_ksa``, via our AKMS) or taken from
the pair's stock, refilled in the background; a slave's copies arrive from its AKMS
(AKMS B, ``POST /v1/ksa/deliver``) into the pair's store, behind a group committer, until
its SAE takes them with dec_keys. :class:`UkmsKeyService` is what the ETSI 014 API
(:mod:`etsi014`) calls. Key material is erased once handed on and never logged.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from appliance.config.topology import Sae
from appliance.kms import ksa
from appliance.kms.errors import KeyUnavailable, KmsError, ProtocolError
from appliance.kms.etsi014 import Limits
from appliance.kms.groupcommit import GroupCommitter
from appliance.kms.nodebase import NodeBase, _field, _unb64, log
from appliance.kms.stocklease import StockLease
from appliance.kms.store import KeyStore
from appliance.net.h2 import TransportError


@dataclass
class UkmsPart(NodeBase):
    """The UKMS services of a node: KSA stores, their committers, the stock."""

    _ksa_stores: dict[tuple[str, str], KeyStore] = field(init=False, default_factory=dict)
    _stock_task: asyncio.Task[None] | None = field(init=False, default=None)
    _leases: dict[tuple[str, str], StockLease] = field(init=False, default_factory=dict)
    _committers: dict[tuple[str, str], GroupCommitter] = field(init=False, default_factory=dict)

    # -- UKMS ---------------------------------------------------------------------------
    def sae_pair(self, master: str, slave: str) -> tuple[Sae, Sae] | None:
        """The registered pair, if ``master`` is served here and both share a user."""
        m, s = self.saes.get(master), self.saes.get(slave)
        if m is None or s is None or m.node != self.config.node.id or m.user != s.user:
            return None
        return m, s

    async def request_ksa(
        self, master: str, slave: str, number: int, size: int
    ) -> list[tuple[str, bytes]]:
        """UKMS A: new KSA keys for (master, slave) through the network."""
        akms = self._akms_of(self.config.node.id)
        reply = await self._call(
            akms,
            "akms",
            "/v1/ksa",
            {
                "master": master,
                "slave": slave,
                "number": number,
                "size": size,
                "epoch": self.links[akms].epoch,
            },
        )
        _, batch = self._open_from(akms, _unb64(reply.get("sealed")), reply.get("epoch"))
        keys = ksa.decode_batch(batch)
        batch[:] = bytes(len(batch))
        return [(key_id, bytes(key)) for key_id, key in keys]

    async def _on_deliver(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        """UKMS B: store the slave's keys, received under the link keys of our AKMS."""
        master, slave = _field(doc, "master", str), _field(doc, "slave", str)
        if (
            caller not in self.links
            or self.saes.get(slave) is None
            or self.saes[slave].node != self.config.node.id
        ):
            raise ProtocolError("delivery for an SAE that is not served here")
        _, batch = self._open_from(caller, _unb64(doc.get("sealed")), doc.get("epoch"))
        keys = ksa.decode_batch(batch)
        batch[:] = bytes(len(batch))
        try:
            await self.committer(master, slave).put_many(keys)  # fsync off the loop, grouped
        finally:
            for _, key in keys:
                key[:] = bytes(len(key))
        return {"stored": len(keys)}

    def _store(self, master: str, slave: str) -> KeyStore:
        store = self._ksa_stores.get((master, slave))
        if store is None:
            path = self._data / f"ksa-{master}-{slave}.db"
            store = self._ksa_stores[(master, slave)] = KeyStore(
                path, f"ksa/{master}/{slave}", self.node_key
            )
        return store

    def committer(self, master: str, slave: str) -> GroupCommitter:
        """The pair's KSA store for the event loop: puts and takes queued together share one
        transaction and one fsync (groupcommit.py)."""
        committer = self._committers.get((master, slave))
        if committer is None:
            store = self._store(master, slave)
            committer = self._committers[(master, slave)] = GroupCommitter(store)
        return committer

    # -- UKMS: the KSA stock ("keys may be buffered in advance") --------------------------
    def stock(self, master: str, slave: str) -> KeyStore:
        """Keys made for (master, slave) ahead of demand; the slave's copies wait at its UKMS."""
        key = (f"stock:{master}", slave)
        store = self._ksa_stores.get(key)
        if store is None:
            path = self._data / f"stock-{master}-{slave}.db"
            store = self._ksa_stores[key] = KeyStore(path, f"stock/{master}/{slave}", self.node_key)
        return store

    def stock_lease(self, master: str, slave: str) -> StockLease:
        """Keys of the pair's stock leased ahead, handed out from memory (stocklease.py)."""
        lease = self._leases.get((master, slave))
        if lease is None:
            lease = self._leases[(master, slave)] = StockLease(self.stock(master, slave))
        return lease

    def stock_level(self, master: str, slave: str) -> int:
        """Keys ready for the pair: in its stock store and leased."""
        lease = self._leases.get((master, slave))
        return self.stock(master, slave).count() + (len(lease) if lease else 0)

    def _stocked_pairs(self) -> list[tuple[str, str]]:
        return [
            (m, s)
            for m in self.saes
            for s in self.saes
            if m != s and self.sae_pair(m, s) is not None
        ]

    async def _keep_stock(self) -> None:
        """Refill every pair's stock through the network, a batch at a time."""
        backoff = 0.1
        while True:
            short = [
                (m, s, self.policy.stock - self.stock_level(m, s)) for m, s in self._stocked_pairs()
            ]
            short = [x for x in short if x[2] > 0]
            if not short:
                await asyncio.sleep(0.05)
                continue
            for master, slave, missing in short:
                n = min(missing, self.policy.stock_batch)
                try:
                    keys = await self.request_ksa(master, slave, n, self.policy.key_size)
                    await asyncio.to_thread(self.stock(master, slave).put_many, keys)
                    backoff = 0.1
                except (KmsError, TransportError) as exc:
                    log.warning("stock refill failed", extra={"node": self.name, "error": exc.code})
                    await asyncio.sleep(backoff)
                    backoff = min(5.0, backoff * 2)


class UkmsKeyService:
    """The ETSI 014 key service of a UKMS node."""

    def __init__(self, node: UkmsPart) -> None:
        self.node = node

    def limits(self, master: str, slave: str, *, caller_is_master: bool) -> Limits | None:
        if caller_is_master:
            pair = self.node.sae_pair(master, slave)
        else:
            pair = self._reverse(master, slave)
        if pair is None:
            return None
        target = self.node.topology.node(
            pair[1].node if pair[0].node == self.node.config.node.id else pair[0].node
        )
        return Limits(
            source_kme=self.node.name,
            target_kme=target.name,
            key_size=self.node.policy.key_size,
            max_key_per_request=self.node.policy.max_key_per_request,
        )

    def _reverse(self, master: str, slave: str) -> tuple[Sae, Sae] | None:
        """For dec_keys the caller is the slave, served here; the master is elsewhere."""
        m, s = self.node.saes.get(master), self.node.saes.get(slave)
        if m is None or s is None or s.node != self.node.config.node.id or m.user != s.user:
            return None
        return s, m

    def stored(self, master: str, slave: str) -> int:
        if self.node.policy.stock <= 0 or self.node.sae_pair(master, slave) is None:
            return 0
        return self.node.stock_level(master, slave)

    async def enc_keys(
        self, master: str, slave: str, number: int, size: int
    ) -> list[tuple[str, bytes]]:
        """From the pair's stock when it holds enough keys of this size, else end to end."""
        if self.node.sae_pair(master, slave) is None:
            raise KeyUnavailable("not a pair served as master here")
        if self.node.policy.stock > 0 and size == self.node.policy.key_size:
            try:
                taken = await self.node.stock_lease(master, slave).take(number)
                return [(k.key_id, bytes(k.material)) for k in taken]
            except KeyUnavailable:
                pass  # stock too low right now: make them end to end
        return await self.node.request_ksa(master, slave, number, size)

    async def dec_keys(
        self, slave: str, master: str, key_ids: list[str]
    ) -> list[tuple[str, bytes]]:
        """UKMS B: each key once, only for the pair it was made for (the pair's store,
        through its group committer)."""
        taken = await self.node.committer(master, slave).take_many(key_ids)
        try:
            return [(k.key_id, bytes(k.material)) for k in taken]
        finally:
            for k in taken:
                k.material[:] = bytes(len(k.material))
