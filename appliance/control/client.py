"""A gNMI client of the SDN agents (grpcio, mutual TLS), with every read bounded.

Used by the controller and ``qkdn`` commands. A Subscribe stream is read by a thread of
its own into a queue, so that :meth:`Subscription.next` waits at most its timeout: reading
past a closed or silent stream would otherwise block until the call's deadline.
:class:`StreamSubscription` is the same STREAM on grpc's asyncio API, for the controller's
event loop: no thread per stream (grpc's blocking reader wakes every 100 ms to look for
signals, and each message crosses two threads), and the JSON_IETF text is handed over
undecoded, so that a repeated document costs a byte comparison, not a parse.
:class:`AsyncAgentSets` is the controller's Set side on grpc.aio, one kept channel per
agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pygnmi.spec.v080 import gnmi_pb2 as pb
from pygnmi.spec.v080 import gnmi_pb2_grpc as pb_grpc

from appliance.control import model
from appliance.control.errors import ControlError, PathError

MAX_PATH_TEXT = 1024
MAX_MESSAGE = 4 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
"""Every channel to an agent: a channel whose agent was not up yet (the controller starts
beside the nodes) or restarted tries again within a second, not after grpc's default
back-off of up to two minutes, during which its calls fail at once."""
WARM_ROUTE = (0, 0, 0)
"""The route the controller's warming Set removes at every agent at its start: from node
0 to node 0, slot 0, which no node installs (node IDs start at 1), so the Set changes
nothing there (no route, no table version, no next hop readied)."""
_ELEM = re.compile(r"([^/\[\]]+)((?:\[[^=\[\]]+=[^\]]*\])*)")
_KEY = re.compile(r"\[([^=\[\]]+)=([^\]]*)\]")
_END = object()


class AgentUnavailable(ControlError):
    """The agent did not answer, refused the call, or the stream ended."""

    code = "CTL-AGENT"


def parse_path(text: str) -> Any:
    """A gNMI Path from ``/a/b[k=v]/c`` (PathError if malformed or too long)."""
    if len(text) > MAX_PATH_TEXT or not text.startswith("/"):
        raise PathError("a path is '/elem[key=value]/...' of at most 1024 characters")
    elems = []
    for part in _split(text[1:]) if text != "/" else []:
        match = _ELEM.fullmatch(part)
        if match is None:
            raise PathError(f"bad path element {part[:40]!r}", code="CTL-PATH-BAD")
        keys = dict(_KEY.findall(match.group(2)))
        elems.append(pb.PathElem(name=match.group(1), key=keys))
    model.elems([(e.name, dict(e.key)) for e in elems])  # the agent's bounds, checked here
    return pb.Path(elem=elems)


def _split(text: str) -> list[str]:
    """``text`` split at the slashes outside brackets (key values may hold slashes)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if c == "/" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


@dataclass(frozen=True, slots=True)
class Event:
    """One message of a Subscribe stream: an update, a delete, or the sync marker."""

    path: str
    value: Any = None
    deleted: bool = False
    sync: bool = False
    raw: bytes = b""
    """The update's JSON_IETF text (:class:`StreamSubscription` leaves ``value`` None)."""


class PendingSet:
    """A gNMI Set in flight."""

    def __init__(self, future: Any) -> None:
        self._future = future

    async def confirmed(self) -> None:
        """:meth:`wait` without a thread: the event loop is woken when the answer is in."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def wake(_future: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(settle)

        self._future.add_done_callback(wake)
        await done
        self.wait()

    def wait(self) -> None:
        """Until the agent confirmed (AgentUnavailable if it refused or did not answer
        within the client's timeout)."""
        try:
            self._future.result()
        except grpc.RpcError as exc:
            raise _error(exc) from exc


class AgentClient:
    def __init__(self, address: str, *, cert: Path, key: Path, ca: Path, timeout: float = 5.0):
        self.address = address
        self.channel = grpc.secure_channel(address, *_channel_args(cert, key, ca))
        self.stub = pb_grpc.gNMIStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def capabilities(self) -> Any:
        try:
            return self.stub.Capabilities(pb.CapabilityRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    def get(self, *paths: str) -> list[Any]:
        """The JSON_IETF value at each path."""
        request = pb.GetRequest(path=[parse_path(p) for p in paths], encoding=pb.JSON_IETF)
        try:
            answer = self.stub.Get(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
        return [json.loads(n.update[0].val.json_ietf_val) for n in answer.notification]

    def set_route(self, route: model.Route) -> None:
        """Install ``route`` at this agent's node (AgentUnavailable if it refuses)."""
        self.set_route_started(route).wait()

    def set_route_started(self, route: model.Route) -> PendingSet:
        """Send the Set that installs ``route`` and return at once: several hops' Sets are
        then in flight together, without a thread each (:meth:`PendingSet.wait`)."""
        return PendingSet(self.stub.Set.future(route_request(route), timeout=self.timeout))

    def set_use_started(self, src: int, dst: int, slots: dict[int, bool]) -> PendingSet:
        """Send one Set that switches installed slots of route (src, dst) in (True) or out
        of use (``qkdl_status`` ACTIVE / PASSIVE), all or none; return at once."""
        request = use_request(src, dst, slots)
        return PendingSet(self.stub.Set.future(request, timeout=self.timeout))

    def delete_route(self, src: int, dst: int, slot: int = 0) -> None:
        self.delete_route_started(src, dst, slot).wait()

    def delete_route_started(self, src: int, dst: int, slot: int = 0) -> PendingSet:
        request = delete_request(src, dst, slot)
        return PendingSet(self.stub.Set.future(request, timeout=self.timeout))

    def _set(self, request: Any) -> None:
        try:
            self.stub.Set(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    def subscribe(
        self,
        *paths: str,
        mode: str = "stream",
        on_change: bool = True,
        sample_ms: int = 0,
        heartbeat_ms: int = 0,
    ) -> Subscription:
        """A Subscribe call (``mode``: stream, once or poll); read it with ``next``."""
        return Subscription(self.stub, _request(paths, mode, on_change, sample_ms, heartbeat_ms))


class AsyncAgentSets:
    """gNMI Sets to one agent on grpc.aio, awaited on the running event loop (the
    controller's): no thread per Set and no thread hop, so a path's Sets at every hop are
    in flight at once (``asyncio.gather``) for the price of a few coroutines. Its channel
    is opened once and kept: :meth:`connect` at the controller's start, so that the first
    path's Sets pay no TLS handshake. Create it inside the loop."""

    def __init__(self, address: str, *, cert: Path, key: Path, ca: Path, timeout: float = 5.0):
        self._channel = grpc.aio.secure_channel(address, *_channel_args(cert, key, ca))
        self._stub = pb_grpc.gNMIStub(self._channel)
        self.timeout = timeout

    async def connect(self, timeout: float) -> bool:
        """Open the channel (TLS handshake) now and make one harmless Set on it (see
        :data:`WARM_ROUTE`), so that the first path's Sets find the channel's and the
        agent's Set side warm (grpc's first call on a channel sets up its call machinery;
        the agent's first Set its handler); False if the channel is not ready within
        ``timeout`` seconds (the Sets then open it themselves) or the Set fails."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
            await self._set(delete_request(*WARM_ROUTE))
        except (TimeoutError, AgentUnavailable):
            return False
        return True

    async def set_route(self, route: model.Route) -> None:
        """Install ``route`` at this agent's node (AgentUnavailable if it refuses)."""
        await self._set(route_request(route))

    async def set_use(self, src: int, dst: int, slots: dict[int, bool]) -> None:
        """Switch installed slots of route (src, dst) in (True) or out of use, all or none."""
        await self._set(use_request(src, dst, slots))

    async def delete_route(self, src: int, dst: int, slot: int = 0) -> None:
        await self._set(delete_request(src, dst, slot))

    async def _set(self, request: Any) -> None:
        try:
            await self._stub.Set(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc) from exc

    async def close(self, timeout: float = 2.0) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._channel.close(), timeout)


def _channel_args(cert: Path, key: Path, ca: Path) -> tuple[Any, list[tuple[str, int]]]:
    """The mutual TLS credentials and the options of a channel to an agent."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    return creds, CHANNEL_OPTIONS


def route_request(route: model.Route) -> Any:
    """The SetRequest that installs ``route`` at a node."""
    value = pb.TypedValue(json_ietf_val=model.route_value(route))
    update = pb.Update(path=_route_pb(route.src, route.dst, route.slot), val=value)
    return pb.SetRequest(update=[update])


def use_request(src: int, dst: int, slots: dict[int, bool]) -> Any:
    """The SetRequest that switches slots of route (src, dst) in (True) or out of use
    (``qkdl_status`` ACTIVE / PASSIVE)."""
    updates = [
        pb.Update(
            path=_route_pb(src, dst, slot, "qkdl_status"),
            val=pb.TypedValue(json_ietf_val=json.dumps(
                f"{model.TYPES}:{'ACTIVE' if active else 'PASSIVE'}"
            ).encode()),
        )
        for slot, active in sorted(slots.items())
    ]  # fmt: skip
    return pb.SetRequest(update=updates)


def delete_request(src: int, dst: int, slot: int = 0) -> Any:
    return pb.SetRequest(delete=[_route_pb(src, dst, slot)])


def _route_pb(src: int, dst: int, slot: int, *leaf: str) -> Any:
    """The gNMI Path of a route's VIRT link (or of one of its leaves), built directly: the
    same Path as ``parse_path`` of its text, without the parsing."""
    elems = [
        pb.PathElem(name="qkd_node"),
        pb.PathElem(name="qkd_links"),
        pb.PathElem(name="qkd_link", key={"qkdl_id": model.route_uuid(src, dst, slot)}),
    ]
    return pb.Path(elem=elems + [pb.PathElem(name=name) for name in leaf])


def _request(
    paths: tuple[str, ...], mode: str, on_change: bool, sample_ms: int, heartbeat_ms: int
) -> Any:
    sub_mode = pb.SubscriptionMode.ON_CHANGE if on_change else pb.SubscriptionMode.SAMPLE
    subs = [
        pb.Subscription(
            path=parse_path(p),
            mode=sub_mode,
            sample_interval=sample_ms * 1_000_000,
            heartbeat_interval=heartbeat_ms * 1_000_000,
        )
        for p in paths
    ]
    modes = {"stream": 0, "once": 1, "poll": 2}
    return pb.SubscribeRequest(
        subscribe=pb.SubscriptionList(subscription=subs, mode=modes[mode], encoding=pb.JSON_IETF)
    )


class StreamSubscription:
    """A Subscribe STREAM (ON_CHANGE with a heartbeat) on grpc.aio, read from the running
    event loop; :meth:`next` waits at most its timeout. Open it inside the loop."""

    def __init__(
        self, address: str, path: str, *, cert: Path, key: Path, ca: Path, heartbeat_ms: int
    ) -> None:
        self._channel = grpc.aio.secure_channel(address, *_channel_args(cert, key, ca))
        self._first: Any = _request((path,), "stream", True, 0, heartbeat_ms)
        self._call = pb_grpc.gNMIStub(self._channel).Subscribe()
        self._pending: list[Event] = []

    async def next(self, timeout: float) -> Event:
        """The next event, its value undecoded (``raw``); AgentUnavailable if none came
        within ``timeout`` seconds or the stream ended."""
        while not self._pending:
            try:
                async with asyncio.timeout(timeout):  # a timer, not a task, per read
                    if self._first is not None:  # the request stream stays open, as gNMI's
                        await self._call.write(self._first)
                        self._first = None
                    answer = await self._call.read()
            except TimeoutError:
                raise AgentUnavailable(f"no gNMI message within {timeout} s") from None
            except grpc.RpcError as exc:
                raise _error(exc) from exc
            if answer is grpc.aio.EOF:
                raise AgentUnavailable("the stream ended")
            self._pending = list(_events(answer, raw=True))[::-1]
        return self._pending.pop()

    async def close(self, timeout: float = 2.0) -> None:
        """Cancel the call and close the channel (waiting at most ``timeout`` seconds)."""
        self._call.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._channel.close(), timeout)


class Subscription:
    """A running Subscribe call; :meth:`next` waits at most its timeout."""

    def __init__(self, stub: Any, first: Any) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._requests.put(first)
        self._events: queue.Queue[Any] = queue.Queue()
        self._call = stub.Subscribe(self._outgoing())
        self._thread = threading.Thread(target=self._read, daemon=True, name="gnmi-sub")
        self._thread.start()

    def _outgoing(self) -> Iterator[Any]:
        while (request := self._requests.get()) is not _END:
            yield request

    def _read(self) -> None:
        try:
            for answer in self._call:
                for event in _events(answer):
                    self._events.put(event)
            self._events.put(AgentUnavailable("the stream ended"))
        except grpc.RpcError as exc:
            self._events.put(_error(exc))

    def next(self, timeout: float) -> Event:
        """The next event; AgentUnavailable if none came within ``timeout`` seconds or the
        stream ended (the error the agent gave, with its code)."""
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            raise AgentUnavailable(f"no gNMI message within {timeout} s") from None
        if isinstance(item, ControlError):
            self._events.put(item)  # every later read sees the end too
            raise item
        event: Event = item
        return event

    def poll(self) -> None:
        self._requests.put(pb.SubscribeRequest(poll=pb.Poll()))

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()


def _events(answer: Any, *, raw: bool = False) -> Iterator[Event]:
    """The events of one Subscribe answer; each update's value decoded, or (``raw``) its
    JSON_IETF text left undecoded."""
    if answer.HasField("sync_response"):
        yield Event("", sync=True)
        return
    note = answer.update
    for update in note.update:
        text = update.val.json_ietf_val
        if raw:
            yield Event(path_text(update.path), raw=text)
        else:
            yield Event(path_text(update.path), json.loads(text))
    for path in note.delete:
        yield Event(path_text(path), deleted=True)


def path_text(path: Any) -> str:
    """``/a/b[k=v]`` of a gNMI Path."""
    parts = [e.name + "".join(f"[{k}={v}]" for k, v in sorted(e.key.items())) for e in path.elem]
    return "/" + "/".join(parts)


def _error(exc: grpc.RpcError) -> AgentUnavailable:
    details = str(exc.details() or "") if hasattr(exc, "details") else ""
    status = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    code, sep, message = details.partition(": ")
    if sep and code.startswith("CTL-"):
        return AgentUnavailable(f"{status}: {message}"[:300], code=code)
    return AgentUnavailable(f"{status}: {details}"[:300])
