"""The path provider of a CKMS under a QKDN Controller (the seam of appliance/kms/seams.py).

:class:`ControllerPaths` asks the controller for a path (``POST /v1/path`` over HTTP/2
with mutual TLS, from the source access node's CKMS): the controller answers only once
the path is installed at every hop. It remembers the last path it was given for each
pair and policy class (a contract's ``route_policy``, passed down by the access node's
AKMS: the controller learns the class, never the contract or its user). A route in use
whose head end is this node carries its whole path in this node's route table
(:class:`appliance.control.agent.RouteTable`, written only by the controller's gNMI Sets:
the explicit route of our 015 augment): that path is used without asking for requests of
the class it was last asked for (one route per pair), and so is the backup's the moment
the controller switches the route to it at this head end (one Set, no request).
Otherwise, while the route table has not changed since the last answer, that path is
still the installed one and is used without asking. While the controller is unreachable,
relays on installed routes go on over the last path; a pair it never had a path for gets
:class:`~appliance.kms.node.Unreachable` (a clean 503 to the SAE). A controller that has
no path answers 503 ``CTL-NO-PATH``: that is :class:`~appliance.kms.routing.NoRoute`.
:meth:`ControllerPaths.start` opens the connection to the controller when the node starts
(best effort, retried while the controller starts), so that the network's first path
request pays no TLS handshake. Asks for one pair and class while one is in flight join it
(one request to the controller: a channel's first re-key and the requests sent under it
ask together), and are answered when the controller answered, even if this head end's
own Set came in before the other hops confirmed (the relay runs only once every hop has).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import ssl
from collections.abc import Awaitable, Callable

from appliance.config.addresses import split_host_port
from appliance.control.agent import RouteTable
from appliance.kms.errors import KmsError
from appliance.kms.messages import RoutePolicy
from appliance.kms.node import Unreachable
from appliance.kms.routing import NoRoute
from appliance.net.h2 import H2Client, TransportError

TIMEOUT_S = 2.0
MAX_PATH = 64
OPEN_ROUNDS, OPEN_PAUSE_S = 60, 0.5
""":meth:`ControllerPaths.start` tries to connect this many times, so far apart."""


class ControllerPaths:
    def __init__(self, address: str, ctx: ssl.SSLContext, *, expect_peer: str | None) -> None:
        host, port = split_host_port(address)
        self.client = H2Client(host, port, ctx, expect_peer=expect_peer, timeout=TIMEOUT_S)
        self.last: dict[tuple[int, int, str], tuple[int, ...]] = {}
        self.table: Callable[[], RouteTable | None] = lambda: None
        """This node's route table, once its agent runs (set by whoever starts the node)."""
        self._learnt: dict[tuple[int, int, str], int] = {}
        self._class: dict[tuple[int, int], str] = {}
        """The class each pair's route was last asked for (the controller installs one
        route per pair, for the last request's class)."""
        self._opening: asyncio.Future[None] | None = None
        self._asking: dict[tuple[int, int, str], asyncio.Future[tuple[int, ...]]] = {}
        """The asks in flight, by pair and class (a second ask joins the first)."""

    def start(self) -> None:
        """Open the connection to the controller in the background (call from the node's
        event loop, after the node started). Best effort and bounded: a controller not
        listening within :data:`OPEN_ROUNDS` rounds is connected to by the first ask."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        for _ in range(OPEN_ROUNDS):
            with contextlib.suppress(TransportError):
                await self.client.connect()
                return
            await asyncio.sleep(OPEN_PAUSE_S)

    def find(
        self, src: int, dst: int, route_policy: RoutePolicy = "balanced"
    ) -> tuple[int, ...] | Awaitable[tuple[int, ...]]:
        table = self.table()
        key = (src, dst, route_policy)
        asking = self._asking.get(key)
        if asking is not None:  # joined, even if this head end holds the route already: the
            return asyncio.shield(asking)  # controller answers once every hop confirmed
        installed = table.in_use(src, dst) if table is not None else None
        if installed is not None and self._class.get((src, dst), "balanced") == route_policy:
            return installed  # the path in use, as the controller installed it here
        known = self.last.get(key)
        if table is not None and known is not None and self._learnt.get(key) == table.version:
            return known
        asking = self._asking[key] = asyncio.ensure_future(self._ask(key, table))
        asking.add_done_callback(functools.partial(self._asked, key))
        return asyncio.shield(asking)  # one asker's cancellation is not the others'

    def _asked(self, key: tuple[int, int, str], done: asyncio.Future[tuple[int, ...]]) -> None:
        del self._asking[key]  # the only ask of its key: a next one starts after this
        if not done.cancelled():
            done.exception()  # retrieved: an ask no one awaits any longer fails quietly

    async def _ask(self, key: tuple[int, int, str], table: RouteTable | None) -> tuple[int, ...]:
        src, dst, policy = key
        version = table.version if table is not None else -1
        body = json.dumps({"src": src, "dst": dst, "route_policy": policy}).encode()
        try:
            answer = await self.client.request("POST", "/v1/path", body)
        except TransportError as exc:
            known = self.last.get(key)
            if known is not None:
                return known
            raise Unreachable("the QKDN controller is unreachable") from exc
        if answer.status == 200:
            path = _path(answer.body)
            self.last[key] = path
            self._learnt[key] = version
            self._class[(src, dst)] = policy
            return path
        code = _code(answer.body)
        if code == "CTL-NO-PATH":
            raise NoRoute(f"no carrier path between nodes {src} and {dst}")
        raise Unreachable(f"the QKDN controller refused the path ({code})")

    async def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._opening
        await self.client.close()


def _path(body: bytes) -> tuple[int, ...]:
    try:
        path = json.loads(body)["path"]
        if not (0 < len(path) <= MAX_PATH and all(isinstance(n, int) for n in path)):
            raise ValueError("bad path")
    except (ValueError, KeyError, TypeError) as exc:
        raise KmsError("the controller's answer is malformed", code="KMS-CONTROLLER") from exc
    return tuple(path)


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body)["code"])[:40]
    except (ValueError, KeyError, TypeError):
        return "CTL"
