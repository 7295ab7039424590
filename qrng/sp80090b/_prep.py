"""Input validation and the tool's data preparation (sample width, symbol map, bitstring)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qrng.errors import QrngUsageError
from qrng.sp80090b._core import U8

MIN_SAMPLES = 20  # below this several estimators have nothing to work with


@dataclass(frozen=True)
class Prepared:
    """What the tool derives from the file: width, mapped symbols and the bitstring."""

    bits_per_sample: int
    symbols: U8  # the samples mapped onto 0..alphabet_size-1 in increasing order
    alphabet_size: int
    bits: U8  # every sample as bits_per_sample bits, most significant first


def _raw_samples(samples: object) -> U8:
    if isinstance(samples, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(samples), dtype=np.uint8)
    if not isinstance(samples, np.ndarray):
        raise QrngUsageError(
            f"samples must be bytes or a numpy integer array, not {type(samples).__name__}"
        )
    if samples.dtype.kind not in "ui":
        raise QrngUsageError(f"samples must have an integer dtype, not {samples.dtype}")
    flat = samples.ravel()
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) > 255):
        raise QrngUsageError("sample values must lie in 0..255 (one sample per byte)")
    return flat.astype(np.uint8)


def prepare(samples: object, bits_per_sample: int | None) -> Prepared:
    """Mirror the tool's read_file: infer or check the width, map symbols, expand to bits."""
    raw = _raw_samples(samples)
    if raw.size == 0:
        raise QrngUsageError("no samples: the input is empty")
    if raw.size < MIN_SAMPLES:
        raise QrngUsageError(f"too few samples: need at least {MIN_SAMPLES}, got {raw.size}")
    used = int(np.bitwise_or.reduce(raw)).bit_length()  # highest bit set in any sample
    if bits_per_sample is None:
        width = used
    else:
        if isinstance(bits_per_sample, bool) or not isinstance(bits_per_sample, int):
            raise QrngUsageError("bits_per_sample must be an int in 1..8")
        if not 1 <= bits_per_sample <= 8:
            raise QrngUsageError(f"bits_per_sample must be in 1..8, got {bits_per_sample}")
        if used > bits_per_sample:
            raise QrngUsageError(
                f"sample values need {used} bits, more than bits_per_sample={bits_per_sample}"
            )
        width = bits_per_sample
    present = np.flatnonzero(np.bincount(raw, minlength=256))
    if present.size < 2:
        raise QrngUsageError("all samples are the same symbol: no entropy can be assessed")
    table = np.zeros(256, dtype=np.uint8)
    table[present] = np.arange(present.size, dtype=np.uint8)
    bits = np.unpackbits(raw[:, None], axis=1)[:, 8 - width :].ravel()
    return Prepared(
        bits_per_sample=width, symbols=table[raw], alphabet_size=int(present.size), bits=bits
    )
