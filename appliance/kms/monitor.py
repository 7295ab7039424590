"""Key-store levels of a running network, sampled as the QKDN manager sees them.

:class:`LevelSampler` polls every KMS node's ``/v1/status`` over HTTP/2 with mutual TLS,
under the manager's certificate, in a background thread, and records for each link the
key count at its master end (the lower node ID). ``qkdn demo --plot`` draws the result.
Only counts cross the wire: no key material, no key IDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from pathlib import Path

from appliance.config.addresses import split_host_port
from appliance.config.node import NodeConfig
from appliance.kms import messages as m
from appliance.kms.errors import KmsError
from appliance.kms.network import is_kms, load_configs
from appliance.kms.node import MSGPACK
from appliance.net.h2 import H2Client, TransportError
from appliance.pki import client_context

Sample = tuple[float, dict[str, int]]
"""(seconds since the sampler started, {link ID: keys at the master end})."""


class LevelSampler:
    """Background sampling of every link's key count, until :meth:`stop`."""

    def __init__(self, net_dir: Path, *, interval: float = 0.5, as_node: str = "qkdn-manager"):
        configs = load_configs(net_dir)
        self._me = configs[as_node]
        self._nodes = [c for c in configs.values() if is_kms(c)]
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="level-sampler", daemon=True)

    def start(self) -> LevelSampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.samples

    def _run(self) -> None:
        asyncio.run(self._sample_until_stopped())

    async def _sample_until_stopped(self) -> None:
        paths = self._me.paths
        ctx = client_context(Path(paths.cert), Path(paths.key), Path(paths.ca_cert), ("h2",))
        clients = {c.node.name: _client(c, ctx) for c in self._nodes}
        start = time.monotonic()
        try:
            while not self._stop.is_set():
                levels = await self._levels(clients)
                self.samples.append((time.monotonic() - start, levels))
                await asyncio.sleep(self.interval)
        finally:
            for client in clients.values():
                with contextlib.suppress(Exception):
                    await client.close()

    async def _levels(self, clients: dict[str, H2Client]) -> dict[str, int]:
        async def one(name: str, client: H2Client) -> dict[str, int]:
            try:
                body = m.encode(m.StatusRequest())
                response = await client.request("POST", "/v1/status", body, MSGPACK)
                answer = m.decode(response.body, m.StatusAnswer)
            except (TransportError, KmsError):
                return {}  # a node restarting: no sample from it this time
            return {link.link: link.qkdm_keys for link in answer.links if link.role == "master"}

        levels: dict[str, int] = {}
        for part in await asyncio.gather(*(one(n, c) for n, c in clients.items())):
            levels.update(part)
        return levels


def _client(cfg: NodeConfig, ctx: ssl.SSLContext) -> H2Client:
    service = next(s for s in ("ukms", "akms", "ckms") if s in cfg.listen)
    host, port = split_host_port(cfg.listen[service])
    return H2Client(host, port, ctx, expect_peer=cfg.node.name, timeout=5.0)
