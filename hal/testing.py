"""Conformance kit: one suite that every QKDM and entropy-source driver must pass.

``check_qkdm(target)`` checks what one end can check alone (status shape, key sizes,
UUID key IDs, no key twice, errors for unknown IDs); with ``peer=`` (the other end of
the link) it also checks that both ends yield identical bits under each ID, once.
``check_entropy_source(target)`` checks sample shape, range, accounting and the mean
against the model. Targets are URLs (opened with :func:`hal.open_qkdm` /
:func:`hal.open_entropy_source`) or zero-argument openers.

The kit never prints or returns key bits; a failure names key IDs only. It raises
:class:`ConformanceError` (an AssertionError, so pytest reports it as a failure).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable

import numpy as np

import hal
from hal.entropy import EntropySource
from hal.errors import HalError, KeyNotFound, KeyNotYetAvailable, NoKeyAvailable
from hal.qkdm import LinkState, QkdKey, Qkdm, QkdmStatus

QkdmTarget = str | Callable[[], Qkdm]
SourceTarget = str | Callable[[], EntropySource]


class ConformanceError(AssertionError):
    """A driver broke the contract of :class:`~hal.qkdm.Qkdm` or ``EntropySource``."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


def _open_qkdm(target: QkdmTarget) -> Qkdm:
    return hal.open_qkdm(target) if isinstance(target, str) else target()


def check_status_shape(status: QkdmStatus) -> None:
    """Types and ranges of every status field."""
    _require(isinstance(status, QkdmStatus), f"status() returned {type(status).__name__}")
    _require(isinstance(status.link, str) and bool(status.link), "status.link must be a name")
    _require(isinstance(status.state, LinkState), "status.state must be a LinkState")
    _require(status.skr_bps >= 0 and math.isfinite(status.skr_bps), "skr_bps must be >= 0")
    _require(status.qber is None or 0 <= status.qber <= 0.5, "qber must be None or in [0, 0.5]")
    _require(0 <= status.key_count <= status.max_key_count, "0 <= key_count <= max_key_count")
    _require(status.key_size > 0 and status.key_size % 8 == 0, "key_size: positive, whole bytes")
    _require(status.keys_produced >= 0, "keys_produced must be >= 0")


def _take(qkdm: Qkdm, advance: Callable[[float], None] | None, deadline: float) -> QkdKey:
    """The next key, advancing emulated time (or waiting) while the buffer is empty."""
    while True:
        try:
            return qkdm.get_key()
        except NoKeyAvailable:
            _require(time.monotonic() < deadline, "no key arrived before the timeout")
            if advance is not None:
                advance(1.0)
            else:
                time.sleep(0.1)


def _check_key(key: QkdKey, key_size: int, seen: set[str]) -> None:
    _require(isinstance(key, QkdKey), f"get_key() returned {type(key).__name__}")
    _require(isinstance(key.material, bytearray), "key material must be a bytearray")
    _require(key.size_bits == key_size, f"key {key.key_id}: {key.size_bits} bits, not {key_size}")
    try:
        parsed = uuid.UUID(key.key_id)
    except ValueError:
        raise ConformanceError(f"key ID {key.key_id!r} is not a UUID") from None
    _require(str(parsed) == key.key_id, f"key ID {key.key_id!r} is not a canonical UUID")
    _require(key.key_id not in seen, f"key {key.key_id} delivered twice")
    _require("redacted" in repr(key), "repr(QkdKey) must hide the key bits")
    seen.add(key.key_id)


def _expect_not_found(qkdm: Qkdm, key_id: str, why: str) -> None:
    try:
        key = qkdm.get_key_by_id(key_id)
    except (KeyNotFound, KeyNotYetAvailable):
        return
    except HalError as exc:
        raise ConformanceError(f"{why}: expected KeyNotFound, got {exc.code}") from None
    key.erase()
    raise ConformanceError(f"{why}: a key was returned for {key_id}")


def check_qkdm(
    target: QkdmTarget,
    *,
    peer: QkdmTarget | None = None,
    keys: int = 8,
    advance: Callable[[float], None] | None = None,
    timeout: float = 30.0,
) -> None:
    """Run the QKDM contract against ``target`` (and ``peer``, the other end, if given).

    ``advance(seconds)`` moves emulated time forward when the buffer is empty; without it
    the kit waits in real time, as on bench hardware. Keys taken are erased."""
    deadline = time.monotonic() + timeout
    qkdm = _open_qkdm(target)
    other = _open_qkdm(peer) if peer is not None else None
    try:
        status = qkdm.status()
        check_status_shape(status)
        _require(status.state is LinkState.UP, f"link is {status.state}, the kit needs it up")
        _require(isinstance(qkdm.key_count(), int), "key_count() must be an int")
        seen: set[str] = set()
        for _ in range(keys):
            key = _take(qkdm, advance, deadline)
            _check_key(key, status.key_size, seen)
            if other is not None:
                _check_peer(other, key)
            _expect_not_found(qkdm, key.key_id, "a key taken by get_key, asked for again")
            key.erase()
        _expect_not_found(qkdm, str(uuid.uuid4()), "an unknown key ID")
        _expect_not_found(qkdm, "not-a-uuid", "a malformed key ID")
        check_status_shape(qkdm.status())
        _check_notifications(qkdm)
    finally:
        qkdm.close()
        if other is not None:
            other.close()


def _check_peer(other: Qkdm, key: QkdKey) -> None:
    twin = other.get_key_by_id(key.key_id)
    try:
        _require(twin.key_id == key.key_id, f"peer returned {twin.key_id} for {key.key_id}")
        _require(twin.material == key.material, f"key {key.key_id}: the two ends differ")
    finally:
        twin.erase()
    _expect_not_found(other, key.key_id, "a key taken by ID at the peer, asked for again")


def _check_notifications(qkdm: Qkdm) -> None:
    events: list[object] = []
    unsubscribe = qkdm.subscribe(events.append)
    state = qkdm.poll_state()
    _require(isinstance(state, LinkState), "poll_state() must return a LinkState")
    unsubscribe()


def check_entropy_source(target: SourceTarget, *, n: int = 200_000) -> None:
    """Run the entropy-source contract against ``target``."""
    source = hal.open_entropy_source(target) if isinstance(target, str) else target()
    try:
        status = source.status()
        bits = status.bits_per_sample
        _require(1 <= bits <= 16 and bits == source.bits_per_sample, "bits_per_sample 1..16")
        _require(0 < status.model_min_entropy <= bits, "model min-entropy in (0, bits]")
        _require(status.fault is None, f"source reports a fault: {status.fault}")
        _require(len(source.read(0)) == 0, "read(0) must return no samples")
        try:
            source.read(-1)
        except (ValueError, HalError):
            pass
        else:
            raise ConformanceError("read(-1) must raise")
        before = source.status().samples_read
        samples = source.read(n)
        _check_samples(samples, bits, n, status.expected_mean, status.expected_std)
        after = source.status().samples_read
        _require(after - before == n, f"samples_read grew by {after - before}, not {n}")
    finally:
        source.close()


def _check_samples(samples: np.ndarray, bits: int, n: int, mean: float, std: float) -> None:
    _require(isinstance(samples, np.ndarray) and samples.shape == (n,), "read(n) shape (n,)")
    want = np.uint8 if bits <= 8 else np.uint16
    _require(samples.dtype == want, f"dtype {samples.dtype}, expected {np.dtype(want)}")
    _require(int(samples.max()) < (1 << bits), "a sample exceeds bits_per_sample")
    # A loose bound (30 standard errors): catches a wrong byte order or width, not physics.
    tolerance = 30 * std / math.sqrt(n) + 1.0
    _require(abs(float(samples.mean()) - mean) < tolerance, "sample mean far from the model")
