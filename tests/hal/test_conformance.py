"""One conformance kit, every transport: emulated, serial over a pty, USB, ETSI 014 over TLS.

With ``--device-url`` the same kit runs against bench hardware instead.
"""

from __future__ import annotations

import pytest

import hal
import hal.spy
from hal.testing import ConformanceError, check_entropy_source, check_qkdm
from tests.hal.conftest import FAST, QRNG, USB_URL, etsi_url


def test_emulated(bench):
    check_qkdm(lambda: bench.a, peer=bench.b, advance=bench.clock.advance, keys=20)
    check_entropy_source(QRNG.format(bits=8))
    check_entropy_source(QRNG.format(bits=14))


def test_serial_over_a_pty(bench, pty_device):
    url = f"serial://{pty_device.path}?{FAST}"
    check_qkdm(url, peer=bench.b, advance=bench.clock.advance, keys=20)
    check_entropy_source(url)


def test_usb_over_the_fake_backend(bench, usb_device):
    check_qkdm(USB_URL, peer=bench.b, advance=bench.clock.advance, keys=20)
    check_entropy_source(USB_URL)


def test_etsi014_over_mutual_tls(bench, kme, pki):
    master = etsi_url(kme, pki, "kms-a", "kms-b")
    slave = etsi_url(kme, pki, "kms-b", "kms-a")
    check_qkdm(master, peer=slave, advance=bench.clock.advance, keys=10)


def test_spy_wrapped_drivers_conform(bench, pty_device, usb_device):
    lines: list[str] = []
    check_qkdm(
        lambda: hal.spy.SpyQkdm(hal.open_qkdm(f"serial://{pty_device.path}?{FAST}"), lines.append),
        peer=bench.b,
        advance=bench.clock.advance,
        keys=3,
    )
    check_qkdm(f"spy://{USB_URL}", peer=bench.b, advance=bench.clock.advance, keys=3)
    assert any("GET_KEY response" in line for line in lines)


def test_the_kit_catches_a_driver_that_returns_a_key_twice(bench):
    class Replaying(hal.Qkdm):
        def __init__(self) -> None:
            self.key: hal.QkdKey | None = None

        def get_key(self) -> hal.QkdKey:
            self.key = self.key or bench.a.get_key()
            return hal.QkdKey(self.key.key_id, bytearray(self.key.material))

        def get_key_by_id(self, key_id: str) -> hal.QkdKey:
            return bench.a.get_key_by_id(key_id)

        def key_count(self) -> int:
            return bench.a.key_count()

        def status(self) -> hal.QkdmStatus:
            return bench.a.status()

    with pytest.raises(ConformanceError, match="delivered twice"):
        check_qkdm(Replaying, keys=3)


def test_bench_hardware(request):
    """``pytest tests/hal --device-url URL[,PEER] --device-url entropy:URL``."""
    specs = request.config.getoption("--device-url")
    if not specs:
        pytest.skip("no --device-url given")
    for spec in specs:
        if spec.startswith("entropy:"):
            check_entropy_source(spec.removeprefix("entropy:"))
        else:
            url, _, peer = spec.partition(",")
            check_qkdm(url, peer=peer or None)
