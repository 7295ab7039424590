"""Fixtures for the driver tests: emulated links behind a pty, a fake USB bus, a 014 KME."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import hal
from hal.emulated.firmware_host import PtyDevice, make_device
from hal.emulated.kme014 import EmulatedKme
from hal.emulated.pki import Pki, make_pki
from hal.emulated.usb_backend import FakeUsbBackend, FakeUsbDevice
from hal.usb_driver import register_backend

LINK = "emulated://link-d-1?skr=25600&seed=drivers&end={end}"
QRNG = "emulated-qrng://board?seed=drivers&bits={bits}"
FAST = "timeout=0.25&retries=1&backoff=0.01&backoff_max=0.05"


@dataclass
class Bench:
    """An emulated link whose end A sits behind a device, end B opened directly."""

    clock: hal.ManualClock
    a: hal.Qkdm
    b_url: str

    def b(self) -> hal.Qkdm:
        return hal.open_qkdm(self.b_url, clock=self.clock)


@pytest.fixture
def bench() -> Bench:
    clock = hal.ManualClock(0.0)
    a = hal.open_qkdm(LINK.format(end="a"), clock=clock)
    clock.advance(5)
    return Bench(clock, a, LINK.format(end="b"))


@pytest.fixture
def pty_device(bench: Bench, tmp_path: Path) -> Iterator[PtyDevice]:
    qrng = hal.open_entropy_source(QRNG.format(bits=8))
    with PtyDevice(make_device("emu-serial", qkdm=bench.a, qrng=qrng), tmp_path / "ttyQKDM") as d:
        yield d


@pytest.fixture
def usb_device(bench: Bench) -> Iterator[FakeUsbDevice]:
    qrng = hal.open_entropy_source(QRNG.format(bits=12))
    dev = FakeUsbDevice(
        make_device("emu-usb", qkdm=bench.a, qrng=qrng), vid=0x1209, pid=0x0A51, serial="EMU-1"
    )
    unregister = register_backend("fake-test", FakeUsbBackend([dev]))
    yield dev
    unregister()


USB_URL = f"usb://1209:0a51?serial=EMU-1&backend=fake-test&{FAST}"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["kms-a", "kms-b", "mallory"])


@pytest.fixture
def kme(bench: Bench, pki: Pki) -> Iterator[EmulatedKme]:
    with EmulatedKme(
        master=bench.a,
        slave=bench.b(),
        master_sae="kms-a",
        slave_sae="kms-b",
        server_pem=pki.server,
        ca_pem=pki.ca,
    ) as server:
        yield server


def etsi_url(
    kme: EmulatedKme,
    pki: Pki,
    sae: str,
    peer: str,
    cert: str | None = None,
    timeout: float = 1,
    batch: int = 32,
) -> str:
    return (
        f"etsi014+https://127.0.0.1:{kme.port}?sae={sae}&peer_sae={peer}"
        f"&cert={pki.clients[cert or sae]}&ca={pki.ca}&timeout={timeout}&backoff=0.01"
        f"&batch={batch}"
    )
