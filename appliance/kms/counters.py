"""What a KMS node counts for its management agent (QKDN-MIB's ``qkdnKms`` and link
columns): requests from other nodes, failures by error code, integrity alarms, link keys
taken per link, and the service times of the last enc_keys a UKMS served (T_key, in
microseconds: a bounded window). Plain integers bumped by
:class:`appliance.kms.node.KmsNode`; reading them costs the key path nothing. Never a
key, a key ID or a count per SAE."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_CODES = 64
TKEY_WINDOW = 1000
"""enc_keys service times kept for QKDN-MIB's T_key percentiles."""
"""Distinct failure codes kept (codes are the project's own, a few dozen at most)."""

AlarmHook = Callable[[str, str], None]
"""Told of every alarm the node raises: its code and reason (no key material)."""


@dataclass
class NodeCounters:
    requests: int = 0
    """Requests from other nodes (every endpoint but status and terms)."""
    integrity: int = 0
    """Integrity failures and replays detected."""
    failures: Counter[str] = field(default_factory=Counter)
    """Failed requests by error code."""
    keys_taken: Counter[str] = field(default_factory=Counter)
    """Link keys taken from each link's QKD module, by link name."""
    alarm_hooks: list[AlarmHook] = field(default_factory=list)
    tkey_us: deque[int] = field(default_factory=lambda: deque(maxlen=TKEY_WINDOW))
    """Service times of the last enc_keys served with keys, microseconds."""
    tkey_requests: int = 0

    def failed(self, code: str) -> None:
        if code in self.failures or len(self.failures) < MAX_CODES:
            self.failures[code] += 1
        else:
            self.failures["OTHER"] += 1

    def served(self, seconds: float) -> None:
        """An enc_keys answered with keys after ``seconds``."""
        self.tkey_us.append(int(seconds * 1_000_000))
        self.tkey_requests += 1

    def alarm(self, code: str, reason: str, *, integrity: bool) -> None:
        if integrity:
            self.integrity += 1
        for hook in self.alarm_hooks:
            hook(code, reason)
