"""The CKMS part of a KMS node: CN keys relayed hop by hop along their paths.

Each hop opens a neighbour's message under the link keys (:mod:`nodebase`), checks it is
on its path, and seals it again for the next neighbour; messages to one neighbour travel
in batches (:mod:`batching`). A hop that cannot forward aborts the request back along the
path. In an access node split in two processes, the CN key crosses between its AKMS and
CKMS over the local hand-overs (``/v1/relay/local``, ``/v1/cn/local``). CN keys are erased
once sent on and never logged.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from appliance.kms.batching import RelayBatcher
from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    KmsError,
    ProtocolError,
    StaleGrant,
    StaleKey,
)
from appliance.kms.nodebase import NodeBase, _b64, _field, _unb64, log
from appliance.kms.relay import Direction, Hop, Mode
from appliance.net.h2 import TransportError


@dataclass
class CkmsPart(NodeBase):
    """The relay services of a node, and the requests of ours waiting for CN keys."""

    _cn_waiting: dict[bytes, asyncio.Future[bytearray]] = field(init=False, default_factory=dict)
    _forwarding: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _batchers: dict[int, RelayBatcher] = field(init=False, default_factory=dict)

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
