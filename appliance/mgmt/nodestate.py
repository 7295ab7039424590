"""Reads a running KMS node into a :class:`appliance.mgmt.nodeview.NodeReading`.

The link columns come from the QKD modules' own status readings (a synchronous driver call
that answers from the driver's state), the counters from the node's
:class:`appliance.kms.counters.NodeCounters`, the generator's health from its monitor.
It reads states and counts, never keys.

:class:`LinkWatch` tells the agent when a QKD module's link state changes: it subscribes
to every module of the node (a driver that reports its changes itself wakes the agent at
once: an emulated module follows its faults file once subscribed, :mod:`hal.emulated.watch`)
and reads the state every :data:`LINK_POLL_S` of those modules only that report a change
only when read (a module that follows its changes is never read by the watch: nothing
runs while nothing changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import hal
from appliance.kms.node import KmsNode
from appliance.mgmt.image import ImageReading, ImageWatch
from appliance.mgmt.nodeview import LinkReading, NodeReading

ROLES = {"ukms": "ukms", "akms": "akms", "ckms": "ckms", "akms+ckms": "akmsCkms"}
RNG_STATES = {"starting", "healthy", "degraded", "failed"}
LINK_POLL_S = 1.0
"""Seconds between two reads of the link state of the modules that do not report their
changes themselves (one status call each)."""
SETTLE_S = 0.15
"""Seconds from a module's report of a link state change to the agent's look. The same
report goes at once to the node's gNMI telemetry, which the QKDN Controller switches the
routes over the link on, and the first relays over the other path pass through this node
within tens of milliseconds; the look (the node answers its agent's readings on its
event loop; the agent, beside the node, compares them and sends its INFORM) comes after
them, not in their way. Measured when the agent still ran in the node's process, its
INFORM held the node's loop 10-17 ms on a loaded machine. A change reaches the manager
this much later (its page's budget is a second)."""
CARD_PROBE_S = 2.0
"""Seconds between two probes of the node's PSK smartcards (a status read through pcscd)."""


def software_version() -> str:
    try:
        return f"qkdn {metadata.version('qkdn')}"
    except metadata.PackageNotFoundError:
        return "qkdn (unpackaged)"


def read_link(peer: int, link: str, qkdm: hal.Qkdm | None, consumed: int) -> LinkReading:
    """One link's row; a module that does not answer is ``unknown``."""
    if qkdm is None:
        return LinkReading(peer=peer, name=link, state="unknown", consumed=consumed)
    try:
        st = qkdm.status()
    except hal.HalError:
        return LinkReading(peer=peer, name=link, state="unknown", consumed=consumed)
    return LinkReading(
        peer=peer,
        name=link,
        state=str(st.state),
        skr=round(st.skr_bps),
        qber_ppm=round((st.qber or 0.0) * 1_000_000),
        level=st.key_count,
        capacity=st.max_key_count,
        key_size=st.key_size,
        produced=st.keys_produced,
        consumed=consumed,
    )


class NodeReader:
    """Reads one node (and its PTG.3 generator, if given) on demand."""

    def __init__(
        self,
        node: KmsNode,
        generator: Any = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        image: Path | None = None,
    ) -> None:
        self.node, self.generator, self.clock = node, generator, clock
        self.image = ImageWatch(image) if image is not None else None
        """The node's target disk (an appliance image's boot state), if it has one."""
        self.started = clock()
        self._probed = -1e18
        self._cards_answer = True
        self.software = software_version()
        role = node.only or node.config.node.role
        self.role = ROLES.get(role, "ckms")

    def links(self) -> tuple[LinkReading, ...]:
        rows: dict[int, LinkReading] = {}
        taken = self.node.counters.keys_taken
        for engine in self.node.engines.values():
            for peer, end in engine.links.items():
                if peer not in rows:
                    qkdm = self.node.qkdms.get(end.link)
                    rows[peer] = read_link(peer, end.link, qkdm, taken[end.link])
        return tuple(rows[p] for p in sorted(rows))

    def read(self) -> NodeReading:
        node, counters = self.node, self.node.counters
        opened, configured, cards = node.psk_state()
        card = self._card(opened, configured, cards)
        keystore = "none"
        if node.stores is not None:
            keystore = "pkcs11" if node.config.devices.keystore else "file"
        image = self.image.read() if self.image is not None else ImageReading()
        tkey = tkey_percentiles(counters.tkey_us)
        return NodeReading(
            id=node.me,
            name=node.name,
            role=self.role,
            software=f"{self.software} image {image.version}" if image.version else self.software,
            slot=image.slot,
            rollback=image.rollback,
            uptime=int(self.clock() - self.started),
            links=self.links(),
            requests=counters.requests,
            relays=node.relay_messages(),
            integrity=counters.integrity,
            tkey_p50_us=tkey[0],
            tkey_p99_us=tkey[1],
            tkey_requests=counters.tkey_requests,
            failures=dict(counters.failures),
            **self._rng(),
            card=card,
            card_locked=opened < configured,
            card_sources=opened,
            keystore=keystore,
            keystore_open=node.stores is not None,
        )

    def _card(self, opened: int, configured: int, cards: int) -> str:
        """``notUsed``, ``present`` (every source opened, every card answering at the last
        probe, at most CARD_PROBE_S ago) or ``absent``."""
        if not cards:
            return "notUsed"
        now = self.clock()
        if now - self._probed >= CARD_PROBE_S:
            self._probed = now
            self._cards_answer = cards_present(self.node.psk_sources())
        return "present" if opened == configured and self._cards_answer else "absent"

    def _rng(self) -> dict[str, Any]:
        gen = self.generator
        if gen is None:
            return {}
        state = str(gen.state)
        return {
            "rng_health": state if state in RNG_STATES else "failed",
            "rng_bytes": int(gen.bytes_out),
            "rng_requests": int(gen.requests),
            "rng_reseeds": int(gen.reseeds),
        }


def cards_present(sources: Iterable[Any]) -> bool:
    """Whether every smartcard among ``sources`` answers (a source without a card, a PSK
    file, has nothing to probe)."""
    return all(src.present() for src in sources if hasattr(src, "present"))


def tkey_percentiles(times: Iterable[int]) -> tuple[int, int]:
    """The median and 99th percentile of the window's enc_keys times (0 if empty)."""
    ordered = sorted(times)
    if not ordered:
        return 0, 0
    n = len(ordered)
    return ordered[n // 2], ordered[min(n - 1, n * 99 // 100)]


class LinkWatch:
    """Calls ``wake`` (on the event loop it was started in) ``settle`` seconds after one of
    ``qkdms`` changed its link state (:data:`SETTLE_S`)."""

    def __init__(
        self, qkdms: list[hal.Qkdm], wake: Callable[[], None], settle: float = SETTLE_S
    ) -> None:
        self.qkdms, self.wake, self.settle = qkdms, wake, settle
        self.pending: set[asyncio.TimerHandle] = set()
        """Wakes due after a change, not yet called."""
        self._unsubscribe: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.polled: list[hal.Qkdm] = []
        """The modules read every LINK_POLL_S: those that do not report their changes."""

    def start(self) -> None:
        for qkdm in self.qkdms:  # the states as they are now are no change
            with contextlib.suppress(hal.HalError):
                qkdm.poll_state()
        loop = asyncio.get_running_loop()

        def changed(_event: object) -> None:  # the module's thread, or the loop
            with contextlib.suppress(RuntimeError):  # the loop is closed: the node stops
                loop.call_soon_threadsafe(self._later, loop)

        for qkdm in self.qkdms:
            self._unsubscribe.append(qkdm.subscribe(changed))
        self.polled = [q for q in self.qkdms if not follows_changes(q)]
        if self.polled:
            self._task = asyncio.ensure_future(self._poll())

    def _later(self, loop: asyncio.AbstractEventLoop) -> None:
        def due() -> None:
            self.pending.discard(handle)
            self.wake()

        handle = loop.call_later(self.settle, due)
        self.pending.add(handle)

    async def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for handle in self.pending:
            handle.cancel()
        self.pending.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            for qkdm in self.polled:
                with contextlib.suppress(hal.HalError):
                    qkdm.poll_state()  # a change notifies the subscription above
            await asyncio.sleep(LINK_POLL_S)


def follows_changes(qkdm: hal.Qkdm) -> bool:
    """Whether a subscribed module reports its state changes itself (an emulated module
    following its faults file by inotify); other modules are read to find them."""
    return getattr(qkdm, "follows_file_changes", False) is True
