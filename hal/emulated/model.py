"""The physics of an emulated QKD link: secret key rate and QBER over time.

Time is cut into epochs (1 s by default). In each epoch the link distils at a rate drawn
from a log-normal whose mean is the configured SKR, and shows a QBER drawn around the
configured QBER; both fluctuate as Ornstein-Uhlenbeck processes with correlation time
``tau`` (slow drifts, as on a real fibre). The noise comes from AES-256-CTR under a key
derived from the link secret, indexed by epoch number, so both ends compute the same
numbers in the same order whenever and however often they look.

An epoch distils nothing when a fault says the link is down, or when its QBER is above
the abort threshold. The module's *state* shows a fault from the fault's start, not from
the next epoch (:meth:`LinkModel.reading`): a real module sees a loss of signal at once.
The key of the epoch the fault began in is still delivered (its block was already in
post-processing), so both ends count the same bits whenever they learnt of the fault.

The rate is capped at ``skr_max``, the module's physical limit, so
no window ever sees more key than ``skr_max`` times its length.

Epochs are computed in aligned blocks; only the current block is kept. The model never
goes back in time. It does no I/O besides asking its :class:`FaultWatcher` to poll.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from numpy.typing import NDArray

from hal.emulated.faults import Fault, FaultWatcher
from hal.emulated.noise import ar1
from hal.qkdm import LinkState

BLOCK = 4096
"""Epochs computed at a time."""
_ROW = 64
"""Epochs per row of the vectorised AR(1) (fixed, so blocks are bit-reproducible)."""

Floats = NDArray[np.float64]


@dataclass(frozen=True, kw_only=True, slots=True)
class LinkParams:
    """Configured behaviour of one emulated link (rates in bit/s, QBER as a fraction)."""

    skr: float
    """Mean secret key rate."""
    skr_std: float = 0.0
    """Standard deviation of the SKR around its mean."""
    skr_max: float
    """Hard ceiling on the SKR: the module's physical limit."""
    qber: float = 0.02
    """Mean QBER."""
    qber_std: float = 0.0
    """Standard deviation of the QBER."""
    qber_abort: float = 0.11
    """QBER above which the protocol aborts and distils nothing."""
    tau: float = 300.0
    """Correlation time of the fluctuations, seconds (0 for white noise)."""
    epoch: float = 1.0
    """Time resolution of the model, seconds."""
    start: float = 0.0
    """Clock time at which the link started distilling."""


@dataclass(slots=True)
class _Block:
    index: int
    base: float  # distilled bits at the block's first epoch
    rate: Floats  # SKR per epoch before faults
    qber: Floats  # QBER per epoch before faults
    z_end: tuple[float, float]
    fault_version: int = -1
    eff: Floats | None = None  # SKR after faults
    qber_eff: Floats | None = None
    down: NDArray[np.bool_] | None = None
    cum: Floats | None = None  # distilled bits at the start of each epoch


class LinkModel:
    """SKR and QBER of one link as a function of time, identical at both ends."""

    def __init__(self, params: LinkParams, noise_key: bytes, faults: FaultWatcher) -> None:
        self.p = params
        self._noise_key = noise_key
        self._faults = faults
        self._phi = math.exp(-params.epoch / params.tau) if params.tau > 0 else 0.0
        cv = params.skr_std / params.skr if params.skr > 0 else 0.0
        self._sigma = math.sqrt(math.log1p(cv * cv))
        self._block = self._make_block(0, 0.0, None)

    # -- public -----------------------------------------------------------------
    def bits_at(self, t: float) -> float:
        """Key bits distilled from the link start up to time ``t``."""
        blk, e, frac = self._locate(t)
        if blk is None:
            return 0.0
        assert blk.cum is not None and blk.eff is not None
        return float(blk.cum[e] + blk.eff[e] * frac)

    def reading(self, t: float) -> tuple[LinkState, float, float | None]:
        """(state, SKR in bit/s, QBER or None) in the epoch containing ``t``."""
        blk, e, _ = self._locate(t)
        if blk is None:
            return LinkState.DOWN, 0.0, None
        assert blk.eff is not None and blk.qber_eff is not None and blk.down is not None
        now = self._fault_at(t)
        if blk.down[e] or (now is not None and now.kind == "down"):
            return LinkState.DOWN, 0.0, None
        qber = float(blk.qber_eff[e]) if now is None or now.qber is None else now.qber
        if qber > self.p.qber_abort:
            return LinkState.ABORT, 0.0, qber
        return LinkState.UP, float(blk.eff[e]), qber

    def boundaries(self, after: float) -> list[float]:
        """The clock times after ``after`` at which a fault may change :meth:`reading`:
        each fault's start and end, and the first epoch start after its end (sorted)."""
        times: set[float] = set()
        for f in self._faults.faults:
            times.add(f.start)
            if f.end is not None:
                times.add(f.end)
                since = f.end - self.p.start
                times.add(self.p.start + math.ceil(since / self.p.epoch) * self.p.epoch)
        return sorted(x for x in times if x > after)

    # -- internals --------------------------------------------------------------
    def _fault_at(self, t: float) -> Fault | None:
        """The fault in force at ``t`` (a ``down`` one first), if any."""
        hit = [f for f in self._faults.faults if f.start <= t and (f.end is None or t < f.end)]
        return min(hit, key=lambda f: f.kind != "down", default=None)

    def _locate(self, t: float) -> tuple[_Block | None, int, float]:
        """The block, epoch-in-block and seconds-into-epoch for time ``t``."""
        since = t - self.p.start
        if since < 0:
            return None, 0, 0.0
        epoch_abs = int(since // self.p.epoch)
        index, e = divmod(epoch_abs, BLOCK)
        if index < self._block.index:
            raise ValueError("the link model cannot go back in time")
        changed = self._faults.poll()
        while self._block.index < index:
            self._advance_block()
        if changed or self._block.fault_version != self._faults.version:
            self._apply_faults(self._block)
        return self._block, e, since - epoch_abs * self.p.epoch

    def _advance_block(self) -> None:
        old = self._block
        if old.fault_version != self._faults.version:
            self._apply_faults(old)
        assert old.cum is not None and old.eff is not None
        end_bits = float(old.cum[-1] + old.eff[-1] * self.p.epoch)
        self._block = self._make_block(old.index + 1, end_bits, old.z_end)

    def _noise(self, index: int) -> Floats:
        """Standard normal pairs for each epoch of a block (Box-Muller on AES-CTR output)."""
        counter = (index * BLOCK).to_bytes(16, "big")
        enc = Cipher(algorithms.AES(self._noise_key), modes.CTR(counter)).encryptor()
        raw = np.frombuffer(enc.update(bytes(16 * BLOCK)), dtype=">u8").reshape(BLOCK, 2)
        u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
        radius, angle = np.sqrt(-2.0 * np.log(u[:, 0])), 2.0 * np.pi * u[:, 1]
        return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)

    def _make_block(self, index: int, base: float, z_prev: tuple[float, float] | None) -> _Block:
        eps = self._noise(index)
        z_skr = ar1(eps[:, 0], self._phi, None if z_prev is None else z_prev[0], _ROW)
        z_qber = ar1(eps[:, 1], self._phi, None if z_prev is None else z_prev[1], _ROW)
        p = self.p
        rate = p.skr * np.exp(self._sigma * z_skr - 0.5 * self._sigma**2)
        rate = np.minimum(rate, p.skr_max)
        qber = np.clip(p.qber + p.qber_std * z_qber, 0.0, 0.5)
        blk = _Block(index, base, rate, qber, (float(z_skr[-1]), float(z_qber[-1])))
        self._apply_faults(blk)
        return blk

    def _apply_faults(self, blk: _Block) -> None:
        """Effective SKR and QBER of a block under the current fault schedule."""
        p = self.p
        starts = p.start + (blk.index * BLOCK + np.arange(BLOCK)) * p.epoch
        down = np.zeros(BLOCK, dtype=bool)
        qber = blk.qber.copy()
        for f in self._faults.faults:
            hit = (starts >= f.start) & (starts < (math.inf if f.end is None else f.end))
            if f.kind == "down":
                down |= hit
            elif f.qber is not None:
                qber[hit] = f.qber
        eff = np.where(down | (qber > p.qber_abort), 0.0, blk.rate)
        cum = np.empty(BLOCK)
        cum[0] = blk.base
        np.cumsum(eff[:-1] * p.epoch, out=cum[1:])
        cum[1:] += blk.base
        blk.eff, blk.qber_eff, blk.down, blk.cum = eff, qber, down, cum
        blk.fault_version = self._faults.version
