"""Shared fixtures: emulated QKDM pairs on a manual clock; the suite's Hypothesis profile."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import hal
from hal.emulated.driver import EmulatedQkdm

Pair = tuple[EmulatedQkdm, EmulatedQkdm]

# The suite runs on loaded 2-core machines: how long an example takes to generate or run
# says nothing about the property under test, so neither the deadline nor the too-slow
# health check may fail a test (every other health check stays). A test's own
# @settings only changes what it names.
settings.register_profile("appliance", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("appliance")


def url(end: str, **params: object) -> str:
    """An emulated:// URL for link-t-1 with the given parameters."""
    merged: dict[str, object] = {"skr": 2560, "seed": "test", "end": end, **params}
    name = merged.pop("link", "link-t-1")
    query = "&".join(f"{k}={v}" for k, v in merged.items())
    return f"emulated://{name}?{query}"


@pytest.fixture
def clock() -> hal.ManualClock:
    return hal.ManualClock(0.0)


@pytest.fixture
def make_pair(clock: hal.ManualClock) -> Callable[..., Pair]:
    """Open both ends of one emulated link, independently, with the same parameters."""

    def make(**params: object) -> Pair:
        a = hal.open_qkdm(url("a", **params), clock=clock)
        b = hal.open_qkdm(url("b", **params), clock=clock)
        assert isinstance(a, EmulatedQkdm) and isinstance(b, EmulatedQkdm)
        return a, b

    return make


@pytest.fixture
def faults_file(tmp_path: Path) -> Path:
    return tmp_path / "faults.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device-url",
        action="append",
        default=[],
        metavar="URL",
        help="run the hal conformance kit against bench hardware: a QKDM URL, optionally "
        "'URL,PEER_URL' for both ends of a link, or 'entropy:URL' for a QRNG (repeatable)",
    )
