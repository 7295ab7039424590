"""A light QKD module pair for the simulation: the :class:`hal.Qkdm` contract, fast.

A simulation opens 32 module ends per schedule and reads thousands of keys; the emulated
driver (``emulated://``) models SKR and QBER fluctuations from a noise process, which
costs milliseconds to open and ~0.2 ms per key. :class:`SimLink` keeps what the engines
rely on and nothing else: keys distilled at a constant rate on the virtual clock, the same
bits under the same ID at both ends (SHAKE-256 of the link seed and the index of a block
of keys), the master end taking keys in order, either end
taking each key by ID once, "not yet distilled" for IDs ahead of the link, and a link
that can be taken down or run dry. ``tests/kms/test_sim.py`` holds both ends to
:func:`hal.testing.check_qkdm`. Simulated keys are not secret; they are still handed out
in ``bytearray`` copies that their holder erases, as a driver's are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from appliance.kms import keyids
from hal.errors import KeyNotFound, KeyNotYetAvailable, LinkDownError, NoKeyAvailable
from hal.qkdm import LinkState, QkdKey, Qkdm, QkdmStatus

BLOCK = 64
"""Keys derived at once (one SHAKE-256 call for their IDs and bits)."""


class SimLink:
    """The shared state of a link's two ends: rate, clock, faults, key derivation."""

    def __init__(
        self, name: str, seed: str, *, rate: float, key_bytes: int, clock: Callable[[], float]
    ) -> None:
        self.name, self.rate, self.key_bytes, self.clock = name, rate, key_bytes, clock
        self._seed = seed.encode()
        self.down = False
        self.dry_since: float | None = None
        """When production stopped (a module running dry), or None."""
        self._ids: dict[str, int] = {}
        self._blocks: dict[int, tuple[str, bytes]] = {}

    def produced(self) -> int:
        """Keys distilled so far (none are produced while the module is dry)."""
        now = self.clock() if self.dry_since is None else min(self.clock(), self.dry_since)
        return max(0, int(now * self.rate))

    def key(self, index: int) -> QkdKey:
        """Key number ``index`` of the link (the same ID and bits at both ends)."""
        block, slot = divmod(index, BLOCK)
        derived = self._blocks.get(block)
        if derived is None:
            derived = self._derive(block)
        ids, bits = derived
        key_id = keyids.from_hex(ids[slot * 32 : slot * 32 + 32])
        self._ids[key_id] = index
        width = self.key_bytes
        return QkdKey(key_id, bytearray(bits[slot * width : slot * width + width]))

    def _derive(self, block: int) -> tuple[str, bytes]:
        """One block of keys: their IDs (version-4 UUIDs, in hex) and their bits."""
        raw = hashlib.shake_256(self._seed + block.to_bytes(8, "big")).digest(
            BLOCK * (16 + self.key_bytes)
        )
        ids = keyids.new_raw(BLOCK, lambda n: raw[:n]).hex()
        derived = self._blocks[block] = (ids, raw[BLOCK * 16 :])
        return derived

    def index_of(self, key_id: str) -> int | None:
        return self._ids.get(key_id)

    def end(self, master: bool) -> SimQkdm:
        return SimQkdm(self, master)


class SimQkdm(Qkdm):
    """One end of a :class:`SimLink`."""

    def __init__(self, link: SimLink, master: bool) -> None:
        self.link, self.master = link, master
        self._next = 0  # the master's next key in order
        self._taken: set[int] = set()

    def get_key(self) -> QkdKey:
        link, taken = self.link, self._taken
        if link.down:
            raise LinkDownError(f"{link.name}: link down")
        index = self._next
        while index in taken:
            index += 1
        if index >= link.produced():
            self._next = index
            raise NoKeyAvailable(f"{link.name}: no key distilled yet")
        taken.add(index)
        self._next = index + 1
        return link.key(index)

    def get_key_by_id(self, key_id: str) -> QkdKey:
        link = self.link
        index = link.index_of(key_id)
        if index is None or index in self._taken:
            raise KeyNotFound(f"{link.name}: no key {key_id!r} here")
        if index >= link.produced():
            raise KeyNotYetAvailable(f"{link.name}: key {key_id} not distilled yet")
        self._taken.add(index)
        return link.key(index)

    def key_count(self) -> int:
        return max(0, self.link.produced() - len(self._taken))

    def status(self) -> QkdmStatus:
        link = self.link
        return QkdmStatus(
            link=link.name,
            state=LinkState.DOWN if link.down else LinkState.UP,
            skr_bps=0.0 if link.down else link.rate * link.key_bytes * 8,
            qber=None if link.down else 0.01,
            key_count=self.key_count(),
            max_key_count=1 << 40,
            key_size=link.key_bytes * 8,
            keys_produced=link.produced(),
        )
