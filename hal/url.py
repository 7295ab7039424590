"""Parsing of device URLs (``scheme://name?param=value&...``).

Drivers take their parameters through :class:`DeviceUrl`, which converts and range-checks
each one and rejects parameters the driver did not ask for: a typo in a URL is an error,
never a silently ignored setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from hal.errors import DeviceUrlError


@dataclass
class DeviceUrl:
    """A parsed device URL whose query parameters are consumed one by one."""

    raw: str
    scheme: str
    name: str
    path: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> DeviceUrl:
        """Split ``url``; duplicate parameters are an error."""
        if not isinstance(url, str) or "://" not in url:
            raise DeviceUrlError(f"not a device URL (expected scheme://...): {url!r}")
        parts = urlsplit(url)
        params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if key in params:
                raise DeviceUrlError(f"{url}: parameter {key!r} given twice")
            params[key] = value
        return cls(url, parts.scheme.lower(), parts.netloc, parts.path, params)

    def _fail(self, key: str, expected: str, got: str) -> DeviceUrlError:
        return DeviceUrlError(
            f"{self.scheme}://{self.name}: parameter {key!r}: expected {expected}, got {got!r}"
        )

    def take_str(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        """Pop a string parameter; a missing one without default is an error."""
        value = self.params.pop(key, default)
        if value is None:
            raise DeviceUrlError(f"{self.scheme}://{self.name}: missing parameter {key!r}")
        if choices and value not in choices:
            raise self._fail(key, "one of " + ", ".join(choices), value)
        return value

    def take_optional(self, key: str) -> str | None:
        """Pop a parameter that may be absent."""
        return self.params.pop(key, None)

    def take_float(
        self,
        key: str,
        default: float | None = None,
        *,
        lo: float = -math.inf,
        hi: float = math.inf,
        lo_open: bool = False,
    ) -> float:
        """Pop a finite number in [lo, hi] (or (lo, hi] with ``lo_open``)."""
        raw = self.params.pop(key, None)
        if raw is None:
            if default is None:
                raise DeviceUrlError(f"{self.scheme}://{self.name}: missing parameter {key!r}")
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._fail(key, "a number", raw) from None
        too_low = value <= lo if lo_open else value < lo
        if not math.isfinite(value) or too_low or value > hi:
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise self._fail(key, f"a number in {bound}", raw)
        return value

    def take_int(self, key: str, default: int, *, lo: int, hi: int, multiple_of: int = 1) -> int:
        """Pop an integer in [lo, hi] that is a multiple of ``multiple_of``."""
        raw = self.params.pop(key, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._fail(key, "an integer", raw) from None
        if not lo <= value <= hi or value % multiple_of:
            extra = f", a multiple of {multiple_of}" if multiple_of > 1 else ""
            raise self._fail(key, f"an integer in [{lo}, {hi}]{extra}", raw)
        return value

    def finish(self) -> None:
        """Reject any parameter the driver did not consume."""
        if self.params:
            unknown = ", ".join(sorted(self.params))
            raise DeviceUrlError(f"{self.scheme}://{self.name}: unknown parameter(s): {unknown}")
