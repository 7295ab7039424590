"""Vetted conditioning components (SP 800-90B §3.1.5.1.1) turning raw samples into
full-entropy blocks.

Each output block of ``n_out`` bits is computed from a message of raw samples carrying
at least ``n_out + 64`` bits of claimed min-entropy, which SP 800-90B §3.1.5.1.2 treats
as full entropy. Two components:

* ``cbcmac``: CBC-MAC with AES-256 (90B Appendix F), 128-bit blocks. Messages are whole
  AES blocks; the key is a fixed public constant, as 90B allows for conditioning. Each
  message gets its own zero-IV CBC-MAC, yet all are computed together: step *j* of every
  message's chain is one bulk ECB call over all messages, so it runs at AES speed.
* ``sha512``: SHA-512 (an approved hash), 512-bit blocks, one hashlib call per block;
  simpler and more entropy-efficient, but bound by the Python loop (~0.5 M blocks/s).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hal.entropy import Samples
from qrng.errors import QrngUsageError

CBCMAC_KEY = hashlib.sha256(b"qkdn/qrng/cbc-mac-conditioning/v1").digest()
"""The public, fixed AES-256 key of the CBC-MAC conditioner."""
EXTRA_BITS = 64
"""SP 800-90B §3.1.5.1.2: n_in >= n_out + 64 bits of entropy gives full-entropy output."""


class Conditioner(ABC):
    """Raw samples in, full-entropy bytes out."""

    name = ""
    out_bytes = 0

    def __init__(self, claimed_entropy: float, bits: int) -> None:
        if not 0 < claimed_entropy <= bits <= 16:
            raise QrngUsageError(f"claimed entropy {claimed_entropy} for {bits}-bit samples")
        self.sample_bytes = 1 if bits <= 8 else 2
        needed = math.ceil((8 * self.out_bytes + EXTRA_BITS) / claimed_entropy)
        self.samples_per_block = self._round(needed)
        self.input_entropy = self.samples_per_block * claimed_entropy

    def _round(self, samples: int) -> int:
        return samples

    def usable(self, n_samples: int) -> int:
        """How many of ``n_samples`` form whole messages."""
        return n_samples - n_samples % self.samples_per_block

    @abstractmethod
    def condition(self, samples: Samples) -> bytes:
        """Condition whole messages of samples (``len`` a multiple of samples_per_block)."""

    def _messages(self, samples: Samples) -> bytes:
        if len(samples) % self.samples_per_block:
            raise QrngUsageError(
                f"{self.name}: {len(samples)} samples is not a multiple of {self.samples_per_block}"
            )
        dtype = "<u1" if self.sample_bytes == 1 else "<u2"
        return np.ascontiguousarray(samples, dtype=dtype).tobytes()


class CbcMacConditioner(Conditioner):
    """CBC-MAC-AES-256 of each message, all messages at once."""

    name = "CBC-MAC-AES-256"
    out_bytes = 16

    def __init__(self, claimed_entropy: float, bits: int) -> None:
        super().__init__(claimed_entropy, bits)
        self._ecb = Cipher(algorithms.AES(CBCMAC_KEY), modes.ECB()).encryptor()

    def _round(self, samples: int) -> int:
        per_block = 16 // self.sample_bytes  # messages are whole AES blocks
        return -(-samples // per_block) * per_block

    def condition(self, samples: Samples) -> bytes:
        data = self._messages(samples)
        return cbc_mac_many(self._ecb, data, self.samples_per_block * self.sample_bytes // 16)


def cbc_mac_many(ecb: object, data: bytes, blocks_per_message: int) -> bytes:
    """Zero-IV CBC-MAC of each ``blocks_per_message``-block message in ``data``."""
    msgs = np.frombuffer(data, dtype=np.uint8).reshape(-1, blocks_per_message, 16)
    state = np.zeros((msgs.shape[0], 16), dtype=np.uint8)
    for j in range(blocks_per_message):
        np.bitwise_xor(state, msgs[:, j, :], out=state)
        out = ecb.update(state.tobytes())  # type: ignore[attr-defined]
        state = np.frombuffer(out, dtype=np.uint8).reshape(-1, 16).copy()
    return state.tobytes()


class Sha512Conditioner(Conditioner):
    """SHA-512 of each message."""

    name = "SHA-512"
    out_bytes = 64

    def condition(self, samples: Samples) -> bytes:
        data = memoryview(self._messages(samples))
        step = self.samples_per_block * self.sample_bytes
        sha = hashlib.sha512
        return b"".join([sha(data[i : i + step]).digest() for i in range(0, len(data), step)])


CONDITIONERS: dict[str, type[Conditioner]] = {
    "cbcmac": CbcMacConditioner,
    "sha512": Sha512Conditioner,
}


def make_conditioner(name: str, claimed_entropy: float, bits: int) -> Conditioner:
    """A conditioner by name (``cbcmac`` or ``sha512``)."""
    if name not in CONDITIONERS:
        raise QrngUsageError(f"unknown conditioner {name!r} (known: {', '.join(CONDITIONERS)})")
    return CONDITIONERS[name](claimed_entropy, bits)
