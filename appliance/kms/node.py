"""A KMS node: the services of its roles (UKMS, AKMS, CKMS) over HTTP/2 and ETSI 014.

This is the adapter layer: it owns sockets, TLS, stores and QKDM handles, and drives the
protocol pieces (:mod:`relay`, :mod:`ksa`, :mod:`links`, :mod:`etsi014`) along the flow in
the package docstring. It logs request IDs and key IDs, never key material.

Endpoints (HTTP/2 between nodes, JSON bodies, binary fields in base64):

* ``POST /v1/ksa``         UKMS A -> AKMS A: KSA keys for an SAE pair.
* ``POST /v1/cn``          AKMS A -> AKMS B: make CN and KSA keys, relay the CN key towards
  AKMS A, deliver the KSA keys to UKMS B, answer with the KSA batch under the CN key.
* ``POST /v1/relay``       CKMS -> next CKMS: hops of CN keys along their paths, as
  ``{"items": [...]}``: the messages for one neighbour that are ready in the same
  event-loop turn, or while a batch is in flight, travel in one request (each item
  keeps its own result; a batch of one answers with its item's status). A hop
  answers once it has opened and checked the message, and forwards it in the background
  (the chain is pipelined, not nested); a hop that cannot forward sends
* ``POST /v1/relay/abort`` back along the path to the first hop, whose access node tells
* ``POST /v1/cn/abort``    the requesting access node, which fails the request at once
  (a clean 503) instead of waiting for a CN key that will not come.
* ``POST /v1/ksa/deliver`` AKMS B -> UKMS B: the slave's KSA keys, under link keys.
* ``POST /v1/link/grant``  slave -> master end of a link: key IDs for the slave's direction.
* ``POST /v1/channel/open`` AKMS A -> AKMS B: open the PSK-bootstrapped channel
  (:mod:`channel`); ``/v1/cn`` requests and answers carry its tags.
* ``POST /v1/status``      the QKDN manager (or any node): key counts per link at this end.

An access node runs its AKMS and CKMS in one process, or in two (``only="akms"`` /
``only="ckms"``, same certificate and data directory): the AKMS process then owns the
links to user nodes, the CKMS process the carrier links, and a CN key crosses between
them in clear over the node's own mutual-TLS loopback connection (DESIGN.md, interfaces):

* ``POST /v1/relay/local`` AKMS -> its CKMS: start relaying a CN key along a path;
* ``POST /v1/cn/local``    CKMS -> its AKMS: a CN key arrived for a request of ours.

Until the hsm issue lands the node key is a file; until the mgmt/controller issues land,
contracts and SAE homes come from the topology and paths are shortest by length.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hal
from appliance.config.node import NodeConfig
from appliance.config.render import SERVICE_OFFSETS
from appliance.config.topology import Sae, Topology
from appliance.kms import channel, keyids, ksa
from appliance.kms.batching import RelayBatcher, error_from
from appliance.kms.channel import CalleeChannel, CallerChannel
from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    KmsError,
    ProtocolError,
    StaleGrant,
    StaleKey,
    UnknownChannel,
)
from appliance.kms.etsi014 import Etsi014Api, Limits
from appliance.kms.groupcommit import GroupCommitter
from appliance.kms.links import GRANT_BATCH, LinkKeys, Role, role_of
from appliance.kms.relay import (
    MAC_KEY_BYTES,
    Direction,
    Hop,
    Mode,
    Segment,
    decode,
    open_gcm,
    open_otp,
    seal_gcm,
    seal_otp,
)
from appliance.kms.routing import shortest_path
from appliance.kms.stocklease import StockLease
from appliance.kms.store import KeyStore, NodeKey, RecordKey
from appliance.net.h2 import H2Client, H2Server, Request, Response, TransportError
from appliance.net.http1 import H1Server
from appliance.pki import client_context, server_context
from hsm.errors import HsmError
from hsm.psk import PskSource, open_psk_source

log = logging.getLogger("qkdn.kms")
RandomBytes = Callable[[int], bytes]
CALLER_CHANNELS = 4
HOUSEKEEPING_S = 60.0
"""Period of the housekeeping task: store checkpoints and expiry, link ledger sweeps."""
"""Open channels a callee keeps per calling access node (older ones are closed)."""


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How keys cross the network. ``mode`` is the network's relay mode; a contract's
    ``relay_mode`` in the topology overrides it for that user's keys."""

    mode: Mode = Mode.GCM
    key_size: int = 256
    max_key_per_request: int = 1024
    """Keys one enc_keys may ask for (ETSI 014's max_key_per_request); one CN key carries
    them all (an OTP CN key for 1024 keys of 256 bits is 32 KiB)."""
    stock_batch: int = 128
    """Keys per request when a UKMS refills its stock (smaller: a batch waits for the
    slowest link's keys as a whole)."""
    stock: int = 0
    """KSA keys each UKMS keeps ready per SAE pair it serves as master (0: none)."""
    patience: float = 10.0
    """Seconds a hop may wait for link keys still being distilled; a request waits up to
    twice this for its CN key (with the default, 20 s: a clean 503 before an SAE's usual
    30 s client timeout). Raise it for links running at their physical rates."""

    @property
    def cn_timeout(self) -> float:
        return 2 * self.patience


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError("invalid base64") from None


def _json(status: int, doc: dict[str, Any]) -> Response:
    return Response(status, json.dumps(doc).encode(), {"content-type": "application/json"})


def _body(request: Request) -> dict[str, Any]:
    try:
        doc = json.loads(request.body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProtocolError("request body is not JSON") from None
    if not isinstance(doc, dict):
        raise ProtocolError("request body must be a JSON object")
    return doc


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"field {name!r} missing or not {kind.__name__}")
    return value


@dataclass
class KmsNode:
    """One node's KMS services, wired to its QKDMs, PTG.3 generator and stores."""

    config: NodeConfig
    topology: Topology
    rng: RandomBytes
    qkdms: dict[str, hal.Qkdm]
    policy: Policy = field(default_factory=Policy)
    only: str | None = None
    """``akms`` or ``ckms``: this process runs that service of an access node alone."""
    links: dict[int, LinkKeys] = field(init=False, default_factory=dict)
    _servers: list[H2Server | H1Server] = field(init=False, default_factory=list)
    _clients: dict[str, H2Client] = field(init=False, default_factory=dict)
    _cn_waiting: dict[bytes, asyncio.Future[bytearray]] = field(init=False, default_factory=dict)
    _ksa_stores: dict[tuple[str, str], KeyStore] = field(init=False, default_factory=dict)
    _stock_task: asyncio.Task[None] | None = field(init=False, default=None)
    _psk: dict[str, PskSource] = field(init=False, default_factory=dict)
    _out_channels: dict[int, CallerChannel] = field(init=False, default_factory=dict)
    _in_channels: dict[int, dict[str, CalleeChannel]] = field(init=False, default_factory=dict)
    _channel_locks: dict[int, asyncio.Lock] = field(init=False, default_factory=dict)
    _rekeying: dict[int, asyncio.Task[None]] = field(init=False, default_factory=dict)
    _forwarding: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _housekeeping: asyncio.Task[None] | None = field(init=False, default=None)
    _batchers: dict[int, RelayBatcher] = field(init=False, default_factory=dict)
    _leases: dict[tuple[str, str], StockLease] = field(init=False, default_factory=dict)
    _routes: dict[int, list[int]] = field(init=False, default_factory=dict)
    """Paths from here by destination node; under -ID, the AKMS of a UKMS (topology lookups)."""
    _committers: dict[tuple[str, str], GroupCommitter] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        me = self.config.node.id
        if self.only not in (None, "akms", "ckms") or (
            self.only and self.config.node.role != "akms+ckms"
        ):
            raise ProtocolError("only an access node (akms+ckms) splits, into akms or ckms")
        for nb in self.config.neighbours:
            if self.only is not None and (self.only == "akms") != ("ukms" in nb.role.split("+")):
                continue  # that link belongs to the other process of this node
            a, b = (int(x) for x in nb.link.split("-")[1:])
            self.links[nb.node] = LinkKeys(nb.link, role_of(me, a, b), self.qkdms[nb.link])
        paths = self.config.paths
        self._tls = (Path(paths.cert), Path(paths.key), Path(paths.ca_cert))
        self._client_ctx = client_context(*self._tls, ("h2",))
        self._data = Path(paths.data_dir)
        self.node_key = self._record_key()
        self.saes = {s.id: s for s in self.topology.spec.saes}
        self.contracts = {c.id: c for c in self.topology.spec.contracts}

    def _record_key(self) -> RecordKey:
        """The key sealing the stores at rest: the node's PKCS#11 token when configured
        (``devices.keystore = "pkcs11:token=..."``), else a key file in the data directory."""
        url = self.config.devices.keystore
        if url is None:
            return NodeKey.from_file(self._data / "node.key", create_with=self.rng)
        from hsm.keystore import open_node_key

        return open_node_key(url)

    @property
    def name(self) -> str:
        return self.config.node.name

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self.only != "ckms":
            self._open_psk_sources()
        for service in ("ukms", "akms", "ckms"):
            if service in self.config.listen and self.only in (None, service):
                server = H2Server(self._handle, server_context(*self._tls, ("h2",)))
                await server.start(*self._host_port(self.config.listen[service]))
                self._servers.append(server)
        if "etsi014" in self.config.listen:
            api = Etsi014Api(UkmsKeyService(self))
            h1 = H1Server(api.handle, server_context(*self._tls, ("http/1.1",)))
            await h1.start(*self._host_port(self.config.listen["etsi014"]))
            self._servers.append(h1)
            if self.policy.stock > 0:
                self._stock_task = asyncio.create_task(self._keep_stock())
        self._housekeeping = asyncio.create_task(self._keep_house())
        log.info("node started", extra={"node": self.name})

    async def _keep_house(self) -> None:
        """Every HOUSEKEEPING_S: delete expired keys and fold each store's WAL into its
        zeroed database (see :mod:`store`), and sweep link keys a peer will never use."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                await asyncio.to_thread(self._tidy_stores)
            except KmsError as exc:
                log.warning(
                    "store housekeeping failed", extra={"node": self.name, "error": exc.code}
                )
            swept = sum(link.housekeeping() for link in self.links.values())
            if swept:
                log.info("link keys swept", extra={"node": self.name, "keys": swept})

    def _tidy_stores(self) -> None:
        for store in list(self._ksa_stores.values()):
            store.purge_expired()
            store.checkpoint()

    async def close(self) -> None:
        for task in [*self._forwarding, *([self._housekeeping] if self._housekeeping else [])]:
            task.cancel()
        if self._stock_task is not None:
            self._stock_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stock_task
        for server in self._servers:
            await server.close()
        for client in self._clients.values():
            await client.close()
        for lease in self._leases.values():
            with contextlib.suppress(KmsError):
                lease.give_back()  # a graceful stop keeps the leased keys
        for committer in self._committers.values():
            committer.close()  # runs the operations still queued, before the stores close
        for store in self._ksa_stores.values():
            with contextlib.suppress(KmsError):
                store.checkpoint()  # the WAL's old page images go at shutdown too
            store.close()
        for out in self._out_channels.values():
            out.close()
        for chans in self._in_channels.values():
            for chan in chans.values():
                chan.close()
        for source in self._psk.values():
            source.close()

    def _open_psk_sources(self) -> None:
        """The PSK source of each peer AKMS; one that cannot be opened is an alarm, and the
        channel to that peer stays closed (fail closed) until the node restarts."""
        base = Path(self.config.paths.data_dir)
        for peer, url in self.config.psk.items():
            try:
                self._psk[peer] = open_psk_source(url, base=base)
            except HsmError as exc:
                log.error(
                    "PSK source unavailable",
                    extra={
                        "node": self.name,
                        "peer": peer,
                        "error": exc.code,
                        "reason": exc.message,
                    },
                )

    @staticmethod
    def _host_port(address: str) -> tuple[str, int]:
        host, port = address.rsplit(":", 1)
        return host, int(port)

    # -- plumbing -----------------------------------------------------------------------
    def address(self, node_id: int, service: str) -> str:
        """host:port of another node's service, from the port plan that rendered us."""
        plan = self.config.plan
        return f"{plan.host}:{plan.base_port + SERVICE_OFFSETS[service] + node_id}"

    async def _call(
        self, node_id: int, service: str, path: str, doc: dict[str, Any]
    ) -> dict[str, Any]:
        body, _ = await self._exchange(node_id, service, path, json.dumps(doc).encode())
        return body

    async def _exchange(
        self,
        node_id: int,
        service: str,
        path: str,
        raw: bytes,
        headers: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], Response]:
        """POST ``raw`` to a node; the JSON answer and the response (KmsError unless 200)."""
        address = self.address(node_id, service)
        client = self._clients.get(address)
        if client is None:
            host, port = self._host_port(address)
            peer = self.topology.node(node_id).name
            client = self._clients[address] = H2Client(
                host, port, self._client_ctx, expect_peer=peer, timeout=self.policy.cn_timeout + 5
            )
        response = await client.request("POST", path, raw, headers)
        try:
            body: dict[str, Any] = json.loads(response.body or b"{}")
        except json.JSONDecodeError:
            raise ProtocolError(f"node {node_id}{path}: answer is not JSON") from None
        if response.status != 200:
            reason = f"node {node_id}{path}: {body.get('message', response.status)}"
            raise error_from(body.get("code"), reason)
        return body, response

    async def _handle(self, request: Request) -> Response:
        routes: dict[str, Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]] = {
            "/v1/ksa": self._on_ksa,
            "/v1/relay": self._on_relay,
            "/v1/relay/abort": self._on_relay_abort,
            "/v1/cn/abort": self._on_cn_abort,
            "/v1/ksa/deliver": self._on_deliver,
            "/v1/link/grant": self._on_grant,
            "/v1/channel/open": self._on_channel_open,
            "/v1/status": self._on_status,
            "/v1/relay/local": self._on_relay_local,
            "/v1/cn/local": self._on_cn_local,
        }
        handler = routes.get(request.path)
        if (handler is None and request.path != "/v1/cn") or request.method != "POST":
            return _json(404, {"message": "no such endpoint"})
        caller = self._node_named(request.peer)
        if caller is None:  # e.g. an SAE certificate: authenticated, but not a node
            return _json(403, {"message": "only nodes of this network may call this endpoint"})
        try:
            if request.path == "/v1/cn":
                return await self._tagged(request, caller)
            assert handler is not None
            return _json(200, await handler(_body(request), caller))
        except IntegrityFailure as exc:
            log.error("integrity alarm", extra={"node": self.name, "error": exc.code})
            return _json(400, {"message": exc.message, "code": exc.code})
        except (KmsError, TransportError) as exc:
            log.warning(
                "request failed",
                extra={
                    "node": self.name,
                    "path": request.path,
                    "error": exc.code,
                    "reason": exc.message,
                },
            )
            return _json(503, {"message": exc.message, "code": exc.code})

    def _node_named(self, name: str | None) -> int | None:
        return next((n.id for n in self.topology.spec.nodes if n.name == name), None)

    # -- link keys ----------------------------------------------------------------------
    def mode_for(self, master: str | None) -> Mode:
        """The relay mode for keys of an SAE: its contract's, else the network's."""
        sae = self.saes.get(master or "")
        contract = self.contracts.get(sae.contract) if sae else None
        if contract is not None and contract.relay_mode is not None:
            return Mode[contract.relay_mode.upper()]
        return self.policy.mode

    def _hop(self, peer: int, request_id: bytes, index: int, mode: Mode) -> Hop:
        """The header of a hop message to ``peer`` (keys and counter are filled in on sealing)."""
        return Hop(
            request_id=request_id,
            hop=index,
            direction=Direction.TO_REQUESTER,
            link=self.links[peer].link,
            mode=mode,
            segments=(),
        )

    async def _seal_for(self, peer: int, hop: Hop, payload: bytearray) -> bytes:
        """A hop message to a neighbour, under link keys, in the header's mode."""
        if hop.mode is Mode.OTP:
            segments, pad = await self._with_grant(
                peer, lambda: self.links[peer].pad(len(payload) + MAC_KEY_BYTES)
            )
            return seal_otp(
                dataclasses.replace(hop, mode=Mode.OTP, segments=segments), payload, pad
            )
        key_id, key, counter = await self._with_grant(peer, self.links[peer].gcm)
        hop = dataclasses.replace(
            hop, mode=Mode.GCM, counter=counter, segments=(Segment(key_id, 0, len(key)),)
        )
        return seal_gcm(hop, payload, key)

    async def _with_grant(self, peer: int, take: Callable[[], Any]) -> Any:
        """Take link keys. A slave end out of granted keys asks the master for more; an end
        whose link has not distilled enough yet waits for it, up to the policy's patience,
        so a relay runs at the pace of its slowest link instead of failing (and spending
        the keys of the hops before it for nothing)."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + self.policy.patience, 0.01
        link = self.links[peer]
        while True:
            try:
                return take()
            except KeyUnavailable:
                if loop.time() >= deadline:
                    raise
            if link.role is Role.SLAVE and link.granted_left() == 0:
                with contextlib.suppress(KeyUnavailable):  # the master has none yet either
                    await self._ask_grant(peer)
                    continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _ask_grant(self, peer: int) -> None:
        nb = next(x for x in self.config.neighbours if x.node == peer)
        service = (
            "ukms"
            if "ukms" in self.topology.node(peer).roles
            else ("akms" if "ukms" in self.config.node.role else "ckms")
        )
        reply = await self._call(
            peer, service, "/v1/link/grant", {"link": nb.link, "n": GRANT_BATCH}
        )
        self.links[peer].accept_grant(
            [str(k) for k in _field(reply, "key_ids", list)], _field(reply, "epoch", str)
        )

    def _open_from(self, peer: int, message: bytes, epoch: Any) -> tuple[Hop, bytearray]:
        """Open a neighbour's hop message. ``epoch`` is the sender's link epoch: a master end
        refuses another run's grants (StaleGrant) before touching anything; a slave end
        learns that its master restarted and drops its grants."""
        link = self.links[peer]
        epoch = epoch if isinstance(epoch, str) else None
        if link.role is Role.MASTER:
            link.check_grant_epoch(epoch)
        else:
            link.seen_master_epoch(epoch)
        hop, header, body = decode(message)
        material = link.receive(hop)
        if hop.mode is Mode.OTP:
            return hop, open_otp(header, body, material)
        return hop, open_gcm(hop, header, body, material)

    async def _on_grant(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        link, n = self.links.get(caller), _field(doc, "n", int)
        if link is None or link.link != doc.get("link") or not 0 < n <= 4096:
            raise ProtocolError("grant request from a node that is not this link's peer")
        return {"key_ids": link.grant(n), "epoch": link.epoch}

    async def _on_status(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        """Key counts of this end of each link (no key material, no key IDs)."""
        links: dict[str, dict[str, Any]] = {}
        for peer, link in self.links.items():
            try:
                status = link.qkdm.status()
                keys, produced, key_size = status.key_count, status.keys_produced, status.key_size
            except hal.HalError:
                keys = produced = key_size = -1
            links[link.link] = {
                "peer": peer,
                "role": link.role.value,
                "qkdm_keys": keys,
                "keys_produced": produced,
                "key_size": key_size,
            }
            batcher = self._batchers.get(peer)
            if batcher is not None:
                links[link.link]["relay_sent"] = {
                    "batches": batcher.batches,
                    "messages": batcher.messages,
                }
        return {"node": self.name, "links": links}

    # -- UKMS ---------------------------------------------------------------------------
    def sae_pair(self, master: str, slave: str) -> tuple[Sae, Sae] | None:
        """The registered pair, if ``master`` is served here and both share a user."""
        m, s = self.saes.get(master), self.saes.get(slave)
        if m is None or s is None or m.node != self.config.node.id or m.user != s.user:
            return None
        return m, s

    def _akms_of(self, ukms: int) -> int:
        found = self._routes.get(-ukms)
        if found is None:
            nbs = self.topology.neighbours(ukms)
            found = self._routes[-ukms] = [next(p.id for _, p in nbs if "akms" in p.roles)]
        return found[0]

    def _path_to(self, node: int) -> list[int]:
        """The relay path from us to ``node`` (the topology is fixed while a node runs)."""
        path = self._routes.get(node)
        if path is None:
            path = self._routes[node] = shortest_path(self.topology, self.config.node.id, node)
        return path

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

    # -- AKMS A: the requesting side ----------------------------------------------------
    async def _on_ksa(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        master, slave = _field(doc, "master", str), _field(doc, "slave", str)
        number, size = _field(doc, "number", int), _field(doc, "size", int)
        m, s = self.saes.get(master), self.saes.get(slave)
        if m is None or s is None or m.node != caller or m.user != s.user:
            raise ProtocolError("no contract covers this SAE pair from this user node")
        if not (
            0 < number <= self.policy.max_key_per_request and size % 8 == 0 and 0 < size <= 8192
        ):
            raise ProtocolError("request outside the contract's limits")
        request = {"master": master, "slave": slave, "number": number, "size": size}
        request_id, batch = await self._keys_from(
            self._akms_of(s.node), {**request, "ukms_b": s.node}, self.mode_for(master)
        )
        hop = self._hop(caller, request_id, 0, self.mode_for(master))
        self.links[caller].seen_master_epoch(
            doc.get("epoch") if isinstance(doc.get("epoch"), str) else None
        )
        sealed = await self._seal_for(caller, hop, batch)
        return {"sealed": _b64(sealed), "epoch": self.links[caller].epoch}

    async def _keys_from(
        self, remote: int, request: dict[str, Any], mode: Mode, chan: CallerChannel | None = None
    ) -> tuple[bytes, bytearray]:
        """AKMS A: ask AKMS B for keys; they come back in a batch under a CN key that is
        relayed to us hop by hop. Returns the request ID and the opened batch."""
        request_id = uuid.uuid4().bytes
        waiting = asyncio.get_running_loop().create_future()
        self._cn_waiting[request_id] = waiting
        doc = {"request_id": _b64(request_id), **request, "deliver_to": self.config.node.id}
        try:
            reply = await self._akms_call(remote, "/v1/cn", doc, chan)
            cn_key = await asyncio.wait_for(waiting, self.policy.cn_timeout)
        except TimeoutError:
            raise KeyUnavailable("the CN key did not arrive in time") from None
        except BaseException:  # the CN key may have arrived for a request that failed
            if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
                waiting.result()[:] = bytes(len(waiting.result()))
            raise
        finally:
            self._cn_waiting.pop(request_id, None)
        sealed = _unb64(reply.get("batch"))
        return request_id, ksa.open_batch(mode, cn_key, request_id, sealed)

    # -- the AKMS-AKMS channel (PSK bootstrap, then QKDN keys) ---------------------------
    async def _akms_call(
        self, peer: int, path: str, doc: dict[str, Any], chan: CallerChannel | None = None
    ) -> dict[str, Any]:
        """A request to a peer AKMS, tagged on the channel; a callee that lost the channel
        (it restarted) makes us open a new one, once."""
        raw = json.dumps(doc).encode()
        for attempt in (1, 2):
            current = chan or await self._channel_to(peer)
            try:
                tag = current.tag_request(path, raw)
                body, response = await self._exchange(
                    peer, "akms", path, raw, {channel.HEADER: tag}
                )
            except UnknownChannel:
                if attempt == 2 or chan is not None:
                    raise
                if self._out_channels.get(peer) is current:
                    self._out_channels.pop(peer).close()
                continue
            current.check_response(path, response.body, response.headers.get(channel.HEADER))
            return body
        raise AssertionError("unreachable")

    async def _channel_to(self, peer: int) -> CallerChannel:
        """The open channel to a peer AKMS: opened from the PSK and re-keyed at once from
        QKDN keys (the PSK-derived key protects that one exchange); later re-keys run in
        the background while requests continue under the current key."""
        chan = self._out_channels.get(peer)
        if chan is None:
            async with self._channel_locks.setdefault(peer, asyncio.Lock()):
                chan = self._out_channels.get(peer)
                if chan is None:
                    chan = await self._open_channel(peer)
                    try:
                        await self._rekey(peer, chan)
                    except BaseException:
                        chan.close()
                        raise
                    self._out_channels[peer] = chan
        if chan.needs_rekey() and peer not in self._rekeying:
            self._rekeying[peer] = asyncio.create_task(self._rekey_later(peer, chan))
        return chan

    async def _open_channel(self, peer: int) -> CallerChannel:
        name = self.topology.node(peer).name
        source = self._psk.get(name)
        if source is None:
            raise KeyUnavailable(f"no PSK source for the channel to {name}")
        nonce_a = self.rng(channel.NONCE_BYTES)
        reply = await self._call(peer, "akms", "/v1/channel/open", {"nonce": _b64(nonce_a)})
        channel_id, nonce_b = _field(reply, "channel_id", str), _unb64(reply.get("nonce"))
        key = await self._derive(
            source, channel.context(self.name, name, channel_id), nonce_a + nonce_b
        )
        if not hmac.compare_digest(
            str(reply.get("confirm")), channel.confirmation(key, nonce_a, nonce_b)
        ):
            key[:] = bytes(len(key))
            raise IntegrityFailure(f"the AKMS {name} does not hold our PSK")
        return CallerChannel(channel_id, key)

    async def _derive(self, source: PskSource, context: bytes, nonces: bytes) -> bytearray:
        """A channel key from a PSK source (a card may take a while: off the event loop)."""
        try:
            return await asyncio.to_thread(source.derive, context, nonces)
        except HsmError as exc:
            log.error("PSK source failed", extra={"node": self.name, "error": exc.code})
            raise KeyUnavailable(f"PSK source unavailable ({exc.code})") from None

    async def _rekey(self, peer: int, chan: CallerChannel) -> None:
        """A fresh channel key over the QKDN, relayed like any KSA key."""
        request = {"purpose": "channel", "number": 1, "size": channel.KEY_BYTES * 8}
        _, batch = await self._keys_from(peer, request, self.policy.mode, chan)
        ((_, key),) = ksa.decode_batch(batch)
        batch[:] = bytes(len(batch))
        chan.rekey(key)

    async def _rekey_later(self, peer: int, chan: CallerChannel) -> None:
        try:
            await self._rekey(peer, chan)
        except (KmsError, TransportError) as exc:
            log.warning("channel re-key failed", extra={"node": self.name, "error": exc.code})
        finally:
            self._rekeying.pop(peer, None)

    async def _on_channel_open(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        name = self.topology.node(caller).name
        source = self._psk.get(name)
        nonce_a = _unb64(doc.get("nonce"))
        if source is None or len(nonce_a) != channel.NONCE_BYTES:
            raise ProtocolError("no PSK channel is provisioned for this caller")
        channel_id, nonce_b = self.rng(8).hex(), self.rng(channel.NONCE_BYTES)
        key = await self._derive(
            source, channel.context(name, self.name, channel_id), nonce_a + nonce_b
        )
        chans = self._in_channels.setdefault(caller, {})
        while len(chans) >= CALLER_CHANNELS:
            chans.pop(next(iter(chans))).close()
        chans[channel_id] = CalleeChannel(channel_id, {0: key})
        confirm = channel.confirmation(key, nonce_a, nonce_b)
        return {"channel_id": channel_id, "nonce": _b64(nonce_b), "confirm": confirm}

    async def _tagged(self, request: Request, caller: int) -> Response:
        """A ``/v1/cn`` request: its channel tag is checked first, its answer tagged."""
        header = request.headers.get(channel.HEADER)
        channel_id, _, _ = channel.parse_header(header)
        chan = self._in_channels.get(caller, {}).get(channel_id)
        if chan is None:
            raise UnknownChannel("no such channel here; open the channel again")
        epoch = chan.verify_request(request.path, request.body, header)
        body = json.dumps(await self._on_cn(_body(request), caller, chan, epoch)).encode()
        tag = chan.tag_response(epoch, request.path, body)
        return Response(200, body, {"content-type": "application/json", channel.HEADER: tag})

    # -- AKMS B: the responding side ----------------------------------------------------
    async def _on_cn(
        self, doc: dict[str, Any], caller: int, chan: CalleeChannel, epoch: int
    ) -> dict[str, Any]:
        request_id = _unb64(doc.get("request_id"))
        number, size = _field(doc, "number", int), _field(doc, "size", int)
        deliver_to = _field(doc, "deliver_to", int)
        for_channel = doc.get("purpose", "ksa") == "channel"
        if (
            len(request_id) != 16
            or deliver_to != caller
            or not 0 < number <= self.policy.max_key_per_request
            or size % 8
            or size <= 0
            or (for_channel and (number, size) != (1, channel.KEY_BYTES * 8))
        ):
            raise ProtocolError("malformed CN request")
        mode = self.policy.mode if for_channel else self.mode_for(doc.get("master"))
        width = size // 8
        # one PTG.3 request (one reseed) for the keys and the CN key that carries them
        drawn = bytearray(self.rng(number * width + ksa.cn_key_bytes(mode, number, width)))
        batch = ksa.pack_batch(keyids.new_raw(number), memoryview(drawn)[: number * width], width)
        cn_key = drawn[number * width :]
        drawn[:] = bytes(len(drawn))
        path = self._path_to(deliver_to)
        steps = [self.relay(request_id, path, 0, bytearray(cn_key), mode)]
        if for_channel:
            chan.add_next(epoch, batch[20 : 20 + width])  # the one key, after count and ID
        else:
            steps.append(self._deliver(doc, request_id, bytearray(batch), mode))
        try:
            for outcome in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
            sealed = ksa.seal_batch(mode, cn_key, request_id, batch)  # erases both
        finally:
            cn_key[:] = bytes(len(cn_key))
            batch[:] = bytes(len(batch))
        return {"batch": _b64(sealed)}

    async def _deliver(
        self, doc: dict[str, Any], request_id: bytes, batch: bytearray, mode: Mode
    ) -> None:
        """AKMS B: the slave's copies of the keys (an encoded batch, erased here), to its
        UKMS under our link keys."""
        try:
            master, slave = _field(doc, "master", str), _field(doc, "slave", str)
            ukms_b = _field(doc, "ukms_b", int)
            if ukms_b not in self.links:
                raise ProtocolError("malformed CN request")
            hop = self._hop(ukms_b, request_id, 0, mode)
            fields = {"master": master, "slave": slave}
            await self._send_sealed(ukms_b, "ukms", "/v1/ksa/deliver", hop, batch, "sealed", fields)
        finally:
            batch[:] = bytes(len(batch))

    # -- CKMS: hop by hop ---------------------------------------------------------------
    async def relay(
        self, request_id: bytes, path: list[int], index: int, cn_key: bytearray, mode: Mode
    ) -> None:
        """Carry the CN key from ``path[index]`` (this node) on to the end of the path."""
        me = self.config.node.id
        if index == len(path) - 1 and self.only == "ckms":  # our AKMS process waits for it
            try:
                local = {"request_id": _b64(request_id), "cn_key": _b64(cn_key)}
                await self._call(me, "akms", "/v1/cn/local", local)
            finally:
                cn_key[:] = bytes(len(cn_key))
            return
        if index < len(path) - 1 and path[index + 1] not in self.links and self.only == "akms":
            try:  # the carrier links are our CKMS process's
                doc: dict[str, Any] = {
                    "request_id": _b64(request_id),
                    "path": path,
                    "index": index,
                    "cn_key": _b64(cn_key),
                    "mode": mode.name,
                }
                await self._call(me, "ckms", "/v1/relay/local", doc)
            finally:
                cn_key[:] = bytes(len(cn_key))
            return
        if index == len(path) - 1:
            waiting = self._cn_waiting.get(request_id)
            if waiting is None or waiting.done():
                cn_key[:] = bytes(len(cn_key))
                raise ProtocolError("no access node is waiting for this CN key")
            waiting.set_result(cn_key)
            return
        nxt = path[index + 1]
        hop = self._hop(nxt, request_id, index, mode)
        try:
            fields = {"path": path, "index": index + 1}
            await self._send_sealed(nxt, "ckms", "/v1/relay", hop, cn_key, "message", fields)
        finally:
            cn_key[:] = bytes(len(cn_key))

    async def _send_sealed(
        self,
        peer: int,
        service: str,
        path: str,
        hop: Hop,
        payload: bytearray,
        name: str,
        fields: dict[str, Any],
    ) -> dict[str, Any]:
        """POST ``payload`` sealed under link keys to a neighbour. When the neighbour
        refuses our link keys (grants from its earlier run, or keys it lost in a restart),
        drop them and try once more with fresh ones; the payload itself is left as is."""
        for attempt in (1, 2):
            message = await self._seal_for(peer, hop, bytearray(payload))
            doc = {**fields, name: _b64(message), "epoch": self.links[peer].epoch}
            try:
                if path == "/v1/relay":
                    return await self._batcher(peer).submit(doc)
                return await self._call(peer, service, path, doc)
            except (StaleGrant, StaleKey):
                if attempt == 2:
                    raise
                self.links[peer].drop_sending()
        raise AssertionError("unreachable")

    def _batcher(self, peer: int) -> RelayBatcher:
        batcher = self._batchers.get(peer)
        if batcher is None:

            async def send(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
                reply = await self._call(peer, "ckms", "/v1/relay", {"items": items})
                results = reply.get("results")
                if not isinstance(results, list) or len(results) != len(items):
                    raise ProtocolError("relay batch answered with the wrong number of results")
                return results

            batcher = self._batchers[peer] = RelayBatcher(send)
        return batcher

    async def _on_relay(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        """A batch of hop messages: each is opened and handled on its own, in order (an
        intermediate hop does not wait: it hands the message to a forwarding task)."""
        items = _field(doc, "items", list)
        if not 0 < len(items) <= RelayBatcher.MAX_ITEMS:
            raise ProtocolError("a relay batch holds 1 to 256 messages")
        results = []
        for item in items:
            try:
                results.append(await self._relay_item(item, caller))
            except (KmsError, TransportError) as exc:
                if len(items) == 1:
                    raise  # a batch of one fails as a whole: the usual error answer
                if isinstance(exc, IntegrityFailure):
                    log.error("integrity alarm", extra={"node": self.name, "error": exc.code})
                results.append({"message": exc.message, "code": exc.code})
        return {"results": results}

    async def _relay_item(self, doc: Any, caller: int) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise ProtocolError("a relay item must be a JSON object")
        path, index = _field(doc, "path", list), _field(doc, "index", int)
        if (
            not 0 < index < len(path)
            or path[index] != self.config.node.id
            or path[index - 1] != caller
        ):
            raise ProtocolError("relay message off its path")
        hop, cn_key = self._open_from(caller, _unb64(doc.get("message")), doc.get("epoch"))
        if hop.hop != index - 1 or hop.direction is not Direction.TO_REQUESTER:
            cn_key[:] = bytes(len(cn_key))
            raise IntegrityFailure("relay hop number or direction does not match the path")
        nodes = [int(x) for x in path]
        if index == len(nodes) - 1:  # we are the requesting access node
            await self.relay(hop.request_id, nodes, index, cn_key, hop.mode)
        else:
            task = asyncio.create_task(
                self._forward(hop.request_id, nodes, index, cn_key, hop.mode)
            )
            self._forwarding.add(task)
            task.add_done_callback(self._forwarding.discard)
        return {"ok": True}

    def _local(self, caller: int) -> None:
        if caller != self.config.node.id or self.only is None:
            raise ProtocolError("a local hand-over comes from the other process of this node")

    async def _on_relay_local(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        self._local(caller)
        path, index = [int(x) for x in _field(doc, "path", list)], _field(doc, "index", int)
        mode_name, request_id = _field(doc, "mode", str), _unb64(doc.get("request_id"))
        if path[index] != self.config.node.id or mode_name not in Mode.__members__:
            raise ProtocolError("local relay request off its path")
        cn_key = bytearray(_unb64(doc.get("cn_key")))
        await self.relay(request_id, path, index, cn_key, Mode[mode_name])
        return {"ok": True}

    async def _on_cn_local(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        self._local(caller)
        waiting = self._cn_waiting.get(_unb64(doc.get("request_id")))
        cn_key = bytearray(_unb64(doc.get("cn_key")))
        if waiting is None or waiting.done():
            cn_key[:] = bytes(len(cn_key))
            raise ProtocolError("no request of ours is waiting for this CN key")
        waiting.set_result(cn_key)
        return {"ok": True}

    async def _forward(
        self, request_id: bytes, path: list[int], index: int, cn_key: bytearray, mode: Mode
    ) -> None:
        """Relay on in the background; on failure, tell the path's start to give up."""
        try:
            await self.relay(request_id, path, index, cn_key, mode)
        except Exception as exc:  # whatever it was, the request must fail now, not hang
            code = getattr(exc, "code", type(exc).__name__)
            level = logging.WARNING if isinstance(exc, KmsError | TransportError) else logging.ERROR
            log.log(
                level,
                "relay failed; aborting the request",
                extra={"node": self.name, "request": request_id.hex(), "error": code},
            )
            await self._abort_back(request_id, path, index)

    async def _abort_back(self, request_id: bytes, path: list[int], index: int) -> None:
        """One step of an abort towards the path's start (index 0: the responding AKMS)."""
        doc: dict[str, Any] = {"request_id": _b64(request_id)}
        try:
            if index == 0:
                await self._call(path[-1], "akms", "/v1/cn/abort", doc)
            else:
                await self._call(
                    path[index - 1],
                    "ckms",
                    "/v1/relay/abort",
                    {**doc, "path": path, "index": index - 1},
                )
        except (KmsError, TransportError) as exc:  # the request then fails by its timeout
            log.warning("abort not delivered", extra={"node": self.name, "error": exc.code})

    async def _on_relay_abort(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        path, index = _field(doc, "path", list), _field(doc, "index", int)
        request_id = _unb64(doc.get("request_id"))
        if (
            not 0 <= index < len(path) - 1
            or path[index] != self.config.node.id
            or path[index + 1] != caller
            or len(request_id) != 16
        ):
            raise ProtocolError("relay abort off its path")
        await self._abort_back(request_id, [int(x) for x in path], index)
        return {"ok": True}

    async def _on_cn_abort(self, doc: dict[str, Any], caller: int) -> dict[str, Any]:
        """AKMS A: the CN key of one of our requests was lost on its way; fail it now."""
        if "akms" not in self.topology.node(caller).roles:
            raise ProtocolError("only an access node aborts a CN request")
        waiting = self._cn_waiting.get(_unb64(doc.get("request_id")))
        if waiting is not None and not waiting.done():
            waiting.set_exception(KeyUnavailable("the CN key was lost on its way"))
        return {"ok": True}


class UkmsKeyService:
    """The ETSI 014 key service of a UKMS node."""

    def __init__(self, node: KmsNode) -> None:
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
