"""What the RNG pipeline sees of a physical noise source (a QRNG), whatever the transport.

A source hands out raw ADC samples, as unsigned integers of ``bits_per_sample`` bits
(``uint8`` up to 8 bits, ``uint16`` above), and reports its status, including the
min-entropy per sample that its stochastic model predicts. Health testing, conditioning
and the DRBG are :mod:`qrng`'s business, never the driver's.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Samples = NDArray[np.unsignedinteger[Any]]
"""Raw samples: ``uint8`` up to 8 bits, ``uint16`` above."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceStatus:
    """A status reading of an entropy source."""

    name: str
    """The source's name from its URL."""
    bits_per_sample: int
    """Width of each raw sample."""
    sample_rate: float
    """Samples per second the device delivers; 0 for an unthrottled emulator."""
    model_min_entropy: float
    """Min-entropy per sample predicted by the stochastic model, bits."""
    expected_mean: float
    """Mean of the raw samples according to the model (for the online health test)."""
    expected_std: float
    """Standard deviation of the raw samples according to the model."""
    expected_rho: float
    """Lag-1 autocorrelation of the raw samples according to the model."""
    samples_read: int
    """Samples handed out since the source was opened."""
    fault: str | None
    """The active injected fault (emulators only), or None."""


class EntropySource(abc.ABC):
    """A raw noise source. Drivers implement this; :mod:`qrng` uses nothing else."""

    bits_per_sample: int

    @abc.abstractmethod
    def read(self, n: int) -> Samples:
        """The next ``n`` raw samples (blocks until they are there)."""

    @abc.abstractmethod
    def status(self) -> SourceStatus:
        """Model entropy, sample count, rate and fault state."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device."""

    def __enter__(self) -> EntropySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sample_dtype(bits: int) -> type[np.uint8] | type[np.uint16]:
    """The numpy type holding samples of ``bits`` bits."""
    return np.uint8 if bits <= 8 else np.uint16
