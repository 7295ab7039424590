"""The SDN agent of a CKMS node: a gNMI server over mutual TLS (grpcio, pygnmi's stubs).

It serves the node's document (:mod:`model`) at ETSI GS QKD 015 paths in JSON_IETF:

* ``Capabilities``: the 015 modules and our augment, JSON_IETF only, gNMI 0.8.0;
* ``Get``: one notification per path (a container's value is its JSON_IETF subtree);
* ``Subscribe``: ONCE (everything, ``sync_response``, end), POLL (the same again on each
  poll), STREAM with SAMPLE (every ``sample_interval``, at least :data:`MIN_SAMPLE_NS`)
  and ON_CHANGE (whenever the value changes, and ``heartbeat_interval`` after the last
  update if one is given: at least one update per interval, as gNMI asks, and no repeat
  right after a change); TARGET_DEFINED is ON_CHANGE. A path that disappears (a route
  removed) is sent once as a ``delete``.

Bad requests end with a gRPC status whose message starts with our error code: a path
that names nothing is ``NOT_FOUND`` (``CTL-PATH-NOT-FOUND``), a malformed one or another
encoding ``INVALID_ARGUMENT``, too many streams ``RESOURCE_EXHAUSTED`` (grpcio's own).
``Set`` installs and removes routes, when the agent has a :class:`RouteTable`: an update or
replace of ``/qkd_node/qkd_links/qkd_link[qkdl_id=ID]`` with a VIRT link (015
``qkdl_local`` = source, ``qkdl_remote`` = destination, ``virt_prev_hop`` /
``virt_next_hop`` = this node's neighbours on the path, ``qkdl_status`` ACTIVE for the
path in use or PASSIVE for its standby backup; ``ID`` must be the UUID of one of the
route's two slots, :func:`model.route_uuid`), or a delete of that path. An update of
``.../qkd_link[qkdl_id=ID]/qkdl_status`` alone (ACTIVE or PASSIVE) switches an installed
slot in or out of use: the protection switch at a route's head end is one such Set of
both slots. The whole Set applies or nothing does; its answer is the hop's confirmation.
Any other Set path is ``INVALID_ARGUMENT`` (``CTL-SET-BAD``); without a route table,
``UNIMPLEMENTED``. ``qos`` is ignored.

The node publishes its telemetry (:meth:`Telemetry.publish`); the document changes, and
ON_CHANGE streams wake, only when a served value changed. :attr:`Telemetry.streaming`
tells the node whether a STREAM subscription is open (it publishes less often when none
is). Every request is bounded:
:data:`MAX_PATHS` paths, :data:`model.MAX_PATH_ELEMS` elements each, names and keys of
:data:`model.MAX_NAME` characters, :data:`MAX_STREAMS` concurrent calls.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
from pygnmi.spec.v080 import gnmi_pb2 as pb
from pygnmi.spec.v080 import gnmi_pb2_grpc as pb_grpc

from appliance.control import model
from appliance.control.errors import ControlError, PathError

GNMI_VERSION = "0.8.0"
MAX_PATHS = 32
MAX_STREAMS = 14
WORKERS = MAX_STREAMS + 2
MIN_SAMPLE_NS = 10_000_000
MAX_SAMPLE_NS = 3_600_000_000_000
DEFAULT_SAMPLE_NS = 1_000_000_000
WAKE_S = 0.25
"""How often a STREAM checks that its client is still there when nothing is due."""
ORIGINS = ("", model.SDN, "rfc7951")
_MISSING = object()


class Telemetry:
    """The node's latest document, published by the node and read by the gNMI calls."""

    def __init__(self, first: model.NodeTelemetry) -> None:
        self._cond = threading.Condition()
        self._doc = model.document(first)
        self._source = first
        self._version = 0
        self._streams = 0
        self.on_stream: Callable[[], None] | None = None
        """Called (in a gRPC thread) when a STREAM subscription opens."""

    @property
    def streaming(self) -> bool:
        """True while at least one STREAM subscription is open."""
        with self._cond:
            return self._streams > 0

    def stream_opened(self) -> None:
        with self._cond:
            self._streams += 1
        if self.on_stream is not None:
            self.on_stream()

    def stream_closed(self) -> None:
        with self._cond:
            self._streams -= 1

    def publish(self, telemetry: model.NodeTelemetry) -> bool:
        """Replace the document; True (and ON_CHANGE streams wake) if a value changed.
        The same telemetry as the last published (most of a stream's 50 ms ticks, whose
        figures are refreshed once a second) is not turned into a document again."""
        if telemetry == self._source:  # one publisher (the node's loop): no lock needed
            return False
        self._source = telemetry
        doc = model.document(telemetry)
        with self._cond:
            if doc == self._doc:
                return False
            self._doc, self._version = doc, self._version + 1
            self._cond.notify_all()
            return True

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        with self._cond:
            return self._version, self._doc

    def wait_change(self, version: int, timeout: float) -> tuple[int, dict[str, Any]]:
        """The document once its version differs from ``version``, or after ``timeout`` s."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != version, timeout=max(timeout, 0.0))
            return self._version, self._doc


@dataclass(slots=True)
class _Sub:
    """One subscription of a STREAM: its path, mode, and when it is next due."""

    path: pb.Path
    elems: tuple[model.Elem, ...]
    sample: bool
    interval_s: float
    next_due: float
    last: Any = _MISSING


class RouteTable:
    """The routes installed through this node, written by gNMI Set (thread-safe): per
    (source, destination) up to two slots, the path in use and its standby backup."""

    def __init__(self, node: int) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._routes: dict[tuple[int, int, int], model.Route] = {}
        self.version = 0
        """Bumped by every Set that changes a route in use here (one installed, removed or
        switched in or out of use; not a standby backup's install): a path learnt before is
        still the one in use while the version has not moved (the controller installs a
        changed path at its source too, and switches to a backup there)."""
        self.on_next_hop: Callable[[int], None] | None = None
        """Called (:meth:`want`: a Set's, once its answer left) with the next hop of each
        route the Set installed, in use or standby: the node readies that link's key."""

    def apply(
        self, install: list[model.Route], remove: list[str], status: dict[str, bool] | None = None
    ) -> tuple[int, ...]:
        """Install, remove (by VIRT link UUID) and switch in or out of use (``status``: UUID
        -> in use) in one step; ControlError (nothing applied) if a switched UUID is not
        installed here. Returns the next hops of the routes installed (for :meth:`want`)."""
        with self._lock:
            by_id = {model.route_uuid(*k): k for k in self._routes}
            for rid in status or {}:
                if rid not in by_id and not any(model.route_uuid(r.src, r.dst, r.slot) == rid
                                                for r in install):  # fmt: skip
                    raise ControlError("no such route installed here", code="CTL-SET-BAD")
            changed = False
            for route in install:
                key = (route.src, route.dst, route.slot)
                changed |= route.active or (key in self._routes and self._routes[key].active)
                self._routes[key] = route
            for key in [k for k in self._routes if model.route_uuid(*k) in remove]:
                changed |= self._routes.pop(key).active
            by_id = {model.route_uuid(*k): k for k in self._routes}
            for rid, active in (status or {}).items():
                route = self._routes[by_id[rid]]
                changed |= route.active != active
                self._routes[by_id[rid]] = dataclasses.replace(route, active=active)
            if changed:
                self.version += 1
        return tuple(sorted({r.next_hop for r in install if r.next_hop is not None}))

    def want(self, hops: tuple[int, ...]) -> None:
        """Hand the next hops of installed routes to the node (:attr:`on_next_hop`)."""
        if self.on_next_hop is not None:
            for hop in hops:
                self.on_next_hop(hop)

    def routes(self) -> tuple[model.Route, ...]:
        with self._lock:
            return tuple(self._routes[k] for k in sorted(self._routes))

    def in_use(self, src: int, dst: int) -> tuple[int, ...] | None:
        """The whole path of route (src, dst) in use here, if this node is its head end
        (its explicit route), else None."""
        with self._lock:
            for slot in model.SLOTS:
                route = self._routes.get((src, dst, slot))
                if route is not None and route.active and route.explicit:
                    return route.explicit
        return None


class GnmiAgent(pb_grpc.gNMIServicer):  # type: ignore[misc]
    """The gNMI service of one node over its :class:`Telemetry` (and routes, if given)."""

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        routes: RouteTable | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.telemetry, self.routes, self.clock = telemetry, routes, clock

    def Set(self, request: Any, context: Any) -> Any:
        if self.routes is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "CTL-SET: this agent takes no Set")
            return None
        changes = [*request.update, *request.replace]
        if not 0 < len(changes) + len(request.delete) <= MAX_PATHS:
            _abort(context, ControlError(f"expected 1..{MAX_PATHS} changes", code="CTL-SET-BAD"))
        install, remove, status, results = [], [], {}, []
        try:
            for update in changes:
                route_id, leaf = _route_id(request.prefix, update.path)
                if leaf:
                    status[route_id] = _status_of(update.val.json_ietf_val)
                else:
                    install.append(_route_of(self.routes.node, route_id, update.val.json_ietf_val))
                results.append(pb.UpdateResult(path=update.path, op=pb.UpdateResult.UPDATE))
            for path in request.delete:
                route_id, leaf = _route_id(request.prefix, path)
                if leaf:
                    raise ControlError("a route's status cannot be deleted", code="CTL-SET-BAD")
                remove.append(route_id)
                results.append(pb.UpdateResult(path=path, op=pb.UpdateResult.DELETE))
            hops = self.routes.apply(install, remove, status)
        except ControlError as exc:
            _abort(context, exc)
        # the links are readied once the answer left (the call ended), not while it is sent:
        # with a path's 13 Sets in flight, each hop's grant and reads would delay the Sets
        if hops and not context.add_callback(functools.partial(self.routes.want, hops)):
            self.routes.want(hops)
        return pb.SetResponse(response=results, timestamp=time.time_ns())

    def Capabilities(self, request: Any, context: Any) -> Any:
        models = [pb.ModelData(name=n, organization=o, version=v) for n, o, v in model.MODELS]
        models.append(
            pb.ModelData(name=model.AUGMENT, organization="qkdn appliance", version="2026-12-03")
        )
        return pb.CapabilityResponse(
            supported_models=models,
            supported_encodings=[pb.Encoding.JSON_IETF],
            gNMI_version=GNMI_VERSION,
        )

    def Get(self, request: Any, context: Any) -> Any:
        _check_encoding(request.encoding, context)
        if not 0 < len(request.path) <= MAX_PATHS:
            _abort(context, PathError(f"expected 1..{MAX_PATHS} paths", code="CTL-PATH-BAD"))
        _, doc = self.telemetry.snapshot()
        notes = []
        for path in request.path:
            try:
                value = model.select(doc, _elems(request.prefix, path))
            except PathError as exc:
                _abort(context, exc)
            notes.append(_notification(path, value))
        return pb.GetResponse(notification=notes)

    def Subscribe(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        first: Any = next(request_iterator, None)
        if first is None or not first.HasField("subscribe"):
            _abort(
                context, ControlError("the first request must be a subscribe", code="CTL-SUB-BAD")
            )
        sublist = first.subscribe
        _check_encoding(sublist.encoding, context)
        if not 0 < len(sublist.subscription) <= MAX_PATHS:
            _abort(
                context, PathError(f"expected 1..{MAX_PATHS} subscriptions", code="CTL-PATH-BAD")
            )
        subs = self._subs(sublist, context)
        if sublist.mode == pb.SubscriptionList.Mode.ONCE:
            yield from self._all(subs)
        elif sublist.mode == pb.SubscriptionList.Mode.POLL:
            yield from self._poll(subs, request_iterator, context)
        else:
            yield from self._stream(subs, context)

    def _subs(self, sublist: Any, context: Any) -> list[_Sub]:
        _, doc = self.telemetry.snapshot()
        now, subs = self.clock(), []
        for sub in sublist.subscription:
            try:
                elems = _elems(sublist.prefix, sub.path)
                model.select(doc, elems)
            except PathError as exc:
                _abort(context, exc)
            sample = sub.mode == pb.SubscriptionMode.SAMPLE
            ns = sub.sample_interval if sample else sub.heartbeat_interval
            if sample and ns == 0:
                ns = DEFAULT_SAMPLE_NS
            interval = min(max(ns, MIN_SAMPLE_NS), MAX_SAMPLE_NS) / 1e9 if ns else 0.0
            subs.append(_Sub(sub.path, elems, sample, interval, now + interval))
        return subs

    def _all(self, subs: list[_Sub]) -> Iterator[Any]:
        _, doc = self.telemetry.snapshot()
        for sub in subs:
            yield from _update(sub, doc)
        yield pb.SubscribeResponse(sync_response=True)

    def _poll(self, subs: list[_Sub], requests: Iterator[Any], context: Any) -> Iterator[Any]:
        yield from self._all(subs)
        for request in requests:
            if not request.HasField("poll"):
                _abort(context, ControlError("a POLL stream takes polls only", code="CTL-SUB-BAD"))
            yield from self._all(subs)

    def _stream(self, subs: list[_Sub], context: Any) -> Iterator[Any]:
        self.telemetry.stream_opened()
        try:
            yield from self._streaming(subs, context)
        finally:
            self.telemetry.stream_closed()

    def _streaming(self, subs: list[_Sub], context: Any) -> Iterator[Any]:
        version, doc = self.telemetry.snapshot()
        yield from self._all(subs)
        while context.is_active():
            now = self.clock()
            due = [s.next_due for s in subs if s.interval_s]
            wait = min([WAKE_S, *(d - now for d in due)])
            changed, doc = self.telemetry.wait_change(version, wait)
            now, fresh = self.clock(), changed != version
            version = changed
            for sub in subs:
                beat = bool(sub.interval_s) and now >= sub.next_due
                if beat or (fresh and not sub.sample):
                    sent = list(_update(sub, doc, only_changed=not beat))
                    if sent and not sub.sample:  # an update is the heartbeat too
                        sub.next_due = now + sub.interval_s
                    elif beat:
                        sub.next_due = max(sub.next_due + sub.interval_s, now)
                    yield from sent


def _update(sub: _Sub, doc: dict[str, Any], *, only_changed: bool = False) -> Iterator[Any]:
    """The subscription's value as a SubscribeResponse (none if unchanged and so asked)."""
    try:
        value = model.select(doc, sub.elems)
    except PathError:
        value = _MISSING
    if only_changed and value == sub.last:
        return
    gone = value is _MISSING
    if gone and sub.last is _MISSING:
        return
    sub.last = value
    if gone:
        note = pb.Notification(timestamp=time.time_ns(), delete=[sub.path])
        yield pb.SubscribeResponse(update=note)
    else:
        yield pb.SubscribeResponse(update=_notification(sub.path, value))


MAX_SET_VALUE = 4096
MAX_EXPLICIT = 64
EXPLICIT = f"{model.AUGMENT}:explicit_route"
_ROUTE_PATH = ("qkd_node", "qkd_links", "qkd_link")


def _route_id(prefix: Any, path: Any) -> tuple[str, bool]:
    """The route UUID a Set path names, and whether it names the route's ``qkdl_status``
    leaf (CTL-SET-BAD unless it is a qkd_link entry or that leaf)."""
    elems = _elems(prefix, path)
    names = tuple(e.name for e in elems)
    leaf = names == (*_ROUTE_PATH, "qkdl_status")
    if (names != _ROUTE_PATH and not leaf) or [k for k, _ in elems[2].keys] != ["qkdl_id"]:
        raise ControlError(
            "Set takes /qkd_node/qkd_links/qkd_link[qkdl_id=ID] or its qkdl_status",
            code="CTL-SET-BAD",
        )
    return elems[2].keys[0][1], leaf


def _status_of(raw: bytes) -> bool:
    """In use (ACTIVE) or standby (PASSIVE): the value of a route's ``qkdl_status`` Set."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ControlError("qkdl_status: expected a JSON string", code="CTL-SET-BAD") from exc
    status = value.rpartition(":")[2] if isinstance(value, str) and len(value) <= 64 else ""
    if status not in ("ACTIVE", "PASSIVE"):
        raise ControlError("a route's qkdl_status is ACTIVE or PASSIVE", code="CTL-SET-BAD")
    return status == "ACTIVE"


def _route_of(node: int, route_id: str, raw: bytes) -> model.Route:
    """The route a Set value installs at ``node`` (CTL-SET-BAD if it is not one)."""
    if len(raw) > MAX_SET_VALUE:
        raise ControlError("Set value too long", code="CTL-SET-BAD")
    try:
        value = json.loads(raw)
        if not str(value["qkdl_type"]).endswith(":VIRT"):
            raise ControlError("only VIRT links are installed", code="CTL-SET-BAD")
        src = model.node_of(value["qkdl_local"]["qkdn_id"])
        dst = model.node_of(value["qkdl_remote"]["qkdn_id"])
        prev = value.get("virt_prev_hop")
        nxt = value.get("virt_next_hop", [])
        slot = model.slot_of(src, dst, route_id)
        route = model.Route(
            src=src, dst=dst, prev_hop=None if prev is None else model.node_of(prev),
            next_hop=model.node_of(nxt[0]) if nxt else None, slot=slot or 0,
            active=_status_of(json.dumps(value.get("qkdl_status", "ACTIVE")).encode()),
            explicit=tuple(model.node_of(n) for n in value.get(EXPLICIT, [])[:MAX_EXPLICIT + 1]),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ControlError("Set value is not a VIRT qkd_link", code="CTL-SET-BAD") from exc
    if slot is None or node in (route.prev_hop, route.next_hop):
        raise ControlError("route ID or hops do not fit this node", code="CTL-SET-BAD")
    if (route.prev_hop is None) != (node == src) or (route.next_hop is None) != (node == dst):
        raise ControlError("a route's ends have no previous / next hop", code="CTL-SET-BAD")
    path = route.explicit
    if path and (
        node != src or len(path) > MAX_EXPLICIT or len(set(path)) != len(path)
        or (path[0], path[1], path[-1]) != (src, route.next_hop, dst)
    ):  # fmt: skip
        raise ControlError("the explicit route does not fit this head end", code="CTL-SET-BAD")
    return route


def _notification(path: Any, value: Any) -> Any:
    val = pb.TypedValue(json_ietf_val=json.dumps(value, separators=(",", ":")).encode())
    return pb.Notification(timestamp=time.time_ns(), update=[pb.Update(path=path, val=val)])


def _elems(prefix: Any, path: Any) -> tuple[model.Elem, ...]:
    for origin in (prefix.origin, path.origin):
        if origin not in ORIGINS:
            raise PathError(f"unknown origin {origin[:40]!r}", code="CTL-PATH-BAD")
    raw = [(e.name, dict(e.key)) for e in (*prefix.elem, *path.elem)]
    return model.elems(raw)


def _check_encoding(encoding: int, context: Any) -> None:
    if encoding not in (pb.Encoding.JSON_IETF, pb.Encoding.JSON):
        _abort(context, ControlError("only JSON_IETF is served", code="CTL-ENCODING"))


def _abort(context: Any, exc: ControlError) -> NoReturn:
    """End the call with a status whose message starts with the error's code."""
    status = grpc.StatusCode.INVALID_ARGUMENT
    if exc.code == "CTL-PATH-NOT-FOUND":
        status = grpc.StatusCode.NOT_FOUND
    context.abort(status, f"{exc.code}: {exc.message}")
    raise AssertionError("grpc's abort returned")  # it raises: nothing after it runs


def serve(agent: GnmiAgent, address: str, *, cert: Path, key: Path, ca: Path) -> grpc.Server:
    """Start the agent's gNMI server on ``address`` with mutual TLS (clients need a
    certificate of the network's CA). ControlError if the address cannot be bound."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="gnmi"),
        maximum_concurrent_rpcs=MAX_STREAMS,
    )
    pb_grpc.add_gNMIServicer_to_server(agent, server)
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=True,
    )
    try:
        port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise ControlError(f"gNMI: cannot listen on {address}", code="CTL-LISTEN") from exc
    if port == 0:
        raise ControlError(f"gNMI: cannot listen on {address}", code="CTL-LISTEN")
    server.start()
    return server
