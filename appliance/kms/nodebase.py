"""What every role part of a KMS node stands on; :mod:`node` composes the parts.

:class:`NodeBase` holds the node's configuration and the state all roles share, calls
other nodes over HTTP/2, and keeps the link keys to its neighbours: sealing and opening
hop messages (:mod:`relay`) and granting key IDs (:mod:`links`). The JSON and base64
helpers of the endpoints are here too. It logs request IDs and key IDs, never key material.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hal
from appliance.config.node import NodeConfig
from appliance.config.render import SERVICE_OFFSETS
from appliance.config.topology import Topology
from appliance.kms.batching import error_from
from appliance.kms.errors import KeyUnavailable, ProtocolError
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
from appliance.kms.store import NodeKey, RecordKey
from appliance.net.h2 import H2Client, Request, Response
from appliance.pki import client_context

log = logging.getLogger("qkdn.kms")
RandomBytes = Callable[[int], bytes]


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
class NodeBase:
    """A KMS node's configuration, shared state, calls to other nodes and link keys."""

    config: NodeConfig
    topology: Topology
    rng: RandomBytes
    qkdms: dict[str, hal.Qkdm]
    policy: Policy = field(default_factory=Policy)
    only: str | None = None
    """``akms`` or ``ckms``: this process runs that service of an access node alone."""
    links: dict[int, LinkKeys] = field(init=False, default_factory=dict)
    _clients: dict[str, H2Client] = field(init=False, default_factory=dict)
    _routes: dict[int, list[int]] = field(init=False, default_factory=dict)
    """Paths from here by destination node; under -ID, the AKMS of a UKMS (topology lookups)."""

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

    def _node_named(self, name: str | None) -> int | None:
        return next((n.id for n in self.topology.spec.nodes if n.name == name), None)

    def _akms_of(self, ukms: int) -> int:
        """The AKMS a UKMS hangs off (a topology lookup, kept in ``_routes``)."""
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
