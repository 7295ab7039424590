"""Emulated QKD modules: real drivers behind the same interface as hardware.

``emulated://`` opens one end of an emulated QKD link (see :mod:`hal.emulated.driver`
for the URL format). Faults for a link live in a shared file (:mod:`hal.emulated.faults`).
"""

from hal.emulated.driver import EmulatedQkdm, open_qkdm
from hal.emulated.faults import Fault, add_fault, read_faults, write_faults

__all__ = ["EmulatedQkdm", "Fault", "add_fault", "open_qkdm", "read_faults", "write_faults"]
