"""The AKMS part of a KMS node: KSA keys made between access nodes, over their channel.

AKMS A checks a UKMS's request and asks AKMS B (``POST /v1/cn``) on the PSK-bootstrapped
channel (:mod:`channel`), opened and re-keyed here; AKMS B draws the keys and the CN key,
hands the CN key to the relay (its CKMS part, :mod:`ckms`), delivers the slave's keys to
UKMS B and answers with the keys under the CN key. Keys and channel keys are erased once
used and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.kms import channel, keyids, ksa
from appliance.kms.channel import CalleeChannel, CallerChannel
from appliance.kms.ckms import CkmsPart
from appliance.kms.errors import (
    IntegrityFailure,
    KeyUnavailable,
    KmsError,
    ProtocolError,
    UnknownChannel,
)
from appliance.kms.nodebase import _b64, _body, _field, _unb64, log
from appliance.kms.relay import Mode
from appliance.net.h2 import Request, Response, TransportError
from hsm.errors import HsmError
from hsm.psk import PskSource, open_psk_source

CALLER_CHANNELS = 4
"""Open channels a callee keeps per calling access node (older ones are closed)."""


@dataclass
class AkmsPart(CkmsPart):
    """The AKMS services of a node; CN keys leave through its relay part."""

    _psk: dict[str, PskSource] = field(init=False, default_factory=dict)
    _out_channels: dict[int, CallerChannel] = field(init=False, default_factory=dict)
    _in_channels: dict[int, dict[str, CalleeChannel]] = field(init=False, default_factory=dict)
    _channel_locks: dict[int, asyncio.Lock] = field(init=False, default_factory=dict)
    _rekeying: dict[int, asyncio.Task[None]] = field(init=False, default_factory=dict)

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
