"""The PTG.3 generator (BSI AIS 20/31): the only source of keys on a node.

Pipeline: physical noise source (``hal``) -> health tests on every raw sample
(:mod:`qrng.health`) -> vetted conditioning to full-entropy blocks
(:mod:`qrng.conditioning`) -> CTR_DRBG (AES-256, df) with memory (:mod:`qrng.drbg`).

PTG.3 rules kept here: every output request is preceded by a reseed with fresh
conditioned entropy at least as long as the request (compression rate >= 1); no request
exceeds 2^19 bits; a health failure stops output at once (no sample of the failing block
is conditioned) and the generator refuses to run on its DRBG alone: it fails closed until
:meth:`Ptg3Generator.recover` passes a new start-up test. Start-up also runs the
known-answer tests of the post-processing.

Thread-safe (one lock around the pipeline); :meth:`Ptg3Generator.arandom_bytes` serves
asyncio code from a worker thread. One generator per node: see :func:`qrng.node_generator`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from hal.entropy import EntropySource
from qrng.conditioning import make_conditioner
from qrng.drbg import MAX_REQUEST_BITS, CtrDrbg
from qrng.errors import EntropySourceFailure, GeneratorTimeout, QrngUsageError
from qrng.health import ONLINE_WINDOW, STARTUP_SAMPLES, HealthConfig, HealthMonitor, HealthState
from qrng.selftest import run_kats

log = logging.getLogger("qkdn.qrng")

MAX_REQUEST_BYTES = MAX_REQUEST_BITS // 8
SEED_BYTES = 48
"""Entropy input of at least the CTR_DRBG seed length (384 bits) for every (re)seed."""


class Ptg3Generator:
    """Random bytes of functionality class PTG.3 from one noise source."""

    def __init__(
        self,
        source: EntropySource,
        *,
        claimed_entropy: float | None = None,
        conditioner: str = "cbcmac",
        alpha_exp: int = 40,
        block_samples: int = 4 * ONLINE_WINDOW,
        timeout: float = 10.0,
    ) -> None:
        status = source.status()
        h = status.model_min_entropy if claimed_entropy is None else claimed_entropy
        if h > status.model_min_entropy:
            raise QrngUsageError(
                f"claimed entropy {h} exceeds the source model's "
                f"{status.model_min_entropy:.4f} bits per sample"
            )
        if block_samples <= 0 or block_samples % ONLINE_WINDOW:
            raise QrngUsageError(f"block_samples must be a positive multiple of {ONLINE_WINDOW}")
        self.source, self.timeout, self._block = source, timeout, block_samples
        self.monitor = HealthMonitor(
            HealthConfig(
                bits=status.bits_per_sample,
                claimed_entropy=h,
                mean=status.expected_mean,
                std=status.expected_std,
                rho=status.expected_rho,
                alpha_exp=alpha_exp,
            )
        )
        self.conditioner = make_conditioner(conditioner, h, status.bits_per_sample)
        self._drbg = CtrDrbg(256)
        self._pool = bytearray()
        self._lock = threading.Lock()
        self.kats: dict[str, bool] = {}
        self.bytes_out = self.requests = self.reseeds = 0
        self.recover()

    # -- output -----------------------------------------------------------------------
    def random_bytes(self, n: int, timeout: float | None = None) -> bytes:
        """``n`` random bytes; blocks up to ``timeout`` seconds for healthy entropy."""
        if n < 0:
            raise QrngUsageError(f"cannot produce {n} bytes")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise GeneratorTimeout("generator busy: timed out waiting for it")
        try:
            out = bytearray()
            while len(out) < n:
                request = min(n - len(out), MAX_REQUEST_BYTES)
                self._reseed(max(request, SEED_BYTES), deadline)
                out += self._drbg.generate(request)
                self.requests += 1
            self.bytes_out += n
            return bytes(out)
        finally:
            self._lock.release()

    async def arandom_bytes(self, n: int, timeout: float | None = None) -> bytes:
        """:meth:`random_bytes` for asyncio code, without blocking the event loop."""
        return await asyncio.to_thread(self.random_bytes, n, timeout)

    # -- health -----------------------------------------------------------------------
    @property
    def state(self) -> HealthState:
        return self.monitor.state

    def health(self) -> dict[str, Any]:
        """State, reason, counters and the tests' parameters, for status reports."""
        m = self.monitor
        return {
            "state": str(m.state),
            "reason": m.reason,
            "counters": asdict(m.counters),
            "claimed_entropy": m.config.claimed_entropy,
            "rct_cutoff": m.rct_cutoff,
            "apt_cutoff": m.apt_cutoff,
            "apt_window": m.apt_window,
            "alpha": f"2^-{m.config.alpha_exp}",
            "conditioner": self.conditioner.name,
            "drbg": self._drbg.name,
            "kats": self.kats,
            "bytes_out": self.bytes_out,
            "requests": self.requests,
            "reseeds": self.reseeds,
            "source": asdict(self.source.status()),
        }

    def recover(self) -> None:
        """Known-answer tests, a fresh start-up test, and a new DRBG instance."""
        with self._lock:
            self.kats = run_kats()
            failed = [name for name, ok in self.kats.items() if not ok]
            if failed:
                self.monitor.state = HealthState.FAILED
                self.monitor.reason = "known-answer test failed: " + ", ".join(failed)
                raise EntropySourceFailure(self.monitor.reason)
            self._wipe_pool()
            self._drbg.uninstantiate()
            if not self.monitor.startup(self.source.read(STARTUP_SAMPLES)):
                log.warning("qrng start-up test failed", extra={"reason": self.monitor.reason})
                raise EntropySourceFailure(self.monitor.reason)
            deadline = time.monotonic() + self.timeout
            entropy = self._take(SEED_BYTES, deadline)
            nonce = self._take(16, deadline)
            self._drbg.instantiate(entropy, nonce, b"qkdn PTG.3")
            log.info("qrng healthy", extra={"claimed_entropy": self.monitor.config.claimed_entropy})

    # -- internals --------------------------------------------------------------------
    def _reseed(self, n: int, deadline: float) -> None:
        self._drbg.reseed(self._take(n, deadline))
        self.reseeds += 1

    def _take(self, n: int, deadline: float) -> bytes:
        """``n`` bytes of fresh conditioned entropy; the pool keeps none of them."""
        while len(self._pool) < n:
            self._refill(deadline)
        taken = bytes(self._pool[:n])
        self._pool[:n] = bytes(n)
        del self._pool[:n]
        return taken

    def _refill(self, deadline: float) -> None:
        if self.monitor.state is HealthState.FAILED:
            raise EntropySourceFailure(
                f"noise source failed ({self.monitor.reason}); "
                "output refused until a new start-up test passes"
            )
        rate = self.source.status().sample_rate
        if time.monotonic() + (self._block / rate if rate > 0 else 0.0) > deadline:
            raise GeneratorTimeout("not enough healthy entropy before the timeout")
        block = self.source.read(self._block)
        finding = self.monitor.check(block)
        if finding is not None and finding.fatal:
            self._wipe_pool()
            log.warning(
                "qrng health test failed", extra={"test": finding.test, "reason": finding.detail}
            )
            raise EntropySourceFailure(f"noise source failed: {finding.detail}")
        usable = self.conditioner.usable(len(block))
        self.monitor.counters.samples_discarded += len(block) - usable
        self._pool += self.conditioner.condition(block[:usable])

    def _wipe_pool(self) -> None:
        self._pool[:] = bytes(len(self._pool))
        self._pool.clear()
