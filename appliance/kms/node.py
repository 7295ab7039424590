"""A KMS node: the services of its roles (UKMS, AKMS, CKMS) over HTTP/2 and ETSI 014.

This is the adapter layer: it owns sockets, TLS, stores and QKDM handles, and drives the
protocol pieces (:mod:`relay`, :mod:`ksa`, :mod:`links`, :mod:`etsi014`) along the flow in
the package docstring. It logs request IDs and key IDs, never key material.

:class:`KmsNode` is composed of role parts, dataclass mixins over :class:`nodebase.NodeBase`
(configuration, calls between nodes, link keys, ``/v1/link/grant``): :mod:`ukms` (KSA
stores and stock, ``/v1/ksa/deliver``, the ETSI 014 key service), :mod:`ckms` (the relay,
its aborts and local hand-overs) and :mod:`akms` (both AKMS sides and their channel, on
top of the relay part). This module adds the life cycle, ``/v1/status`` and the routing
of the endpoints below to the parts.

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
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import hal
from appliance.kms.akms import AkmsPart
from appliance.kms.errors import IntegrityFailure, KmsError
from appliance.kms.etsi014 import Etsi014Api
from appliance.kms.nodebase import Policy, _body, _json, log
from appliance.kms.ukms import UkmsKeyService, UkmsPart
from appliance.net.h2 import H2Server, Request, Response, TransportError
from appliance.net.http1 import H1Server
from appliance.pki import server_context

__all__ = ["KmsNode", "Policy", "UkmsKeyService"]

HOUSEKEEPING_S = 60.0
"""Period of the housekeeping task: store checkpoints and expiry, link ledger sweeps."""


@dataclass
class KmsNode(UkmsPart, AkmsPart):
    """One node's KMS services, wired to its QKDMs, PTG.3 generator and stores."""

    _servers: list[H2Server | H1Server] = field(init=False, default_factory=list)
    _housekeeping: asyncio.Task[None] | None = field(init=False, default=None)

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

    # -- endpoints ----------------------------------------------------------------------
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
