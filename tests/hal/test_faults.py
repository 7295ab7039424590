"""Faults on serial (pty, loop://) and USB: typed errors, ``down`` after the configured
attempts (counted as they leave, never timed), recovery, exactly-once keys across
retransmissions, no partial key."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import usb.core
import usb.util

import hal
from hal.emulated.firmware_host import LoopDevicePort, PtyDevice, QkdmAdapter, make_device
from hal.emulated.usb_backend import FakeUsbBackend, FakeUsbDevice
from hal.errors import DeviceDisconnected, DeviceTimeout, DeviceUrlError, ProtocolError
from hal.firmware import protocol as wire
from hal.firmware.device import Device
from hal.framed import ClientOptions, FramedQkdm
from hal.qkdm import LinkState, LinkStateChanged
from hal.serial_driver import SerialTransport
from hal.testing import check_qkdm
from hal.usb_driver import register_backend
from tests.hal.conftest import FAST, USB_URL

GET_KEY = wire.SYNC + bytes((wire.VERSION, wire.T_GET_KEY))
ATTEMPTS = 2  # FAST has retries=1: a request and one retransmission, each 0.25 s at most


def serial_url(dev) -> str:
    return f"serial://{dev.path}?{FAST}"


def watch(qkdm: hal.Qkdm) -> list[LinkState]:
    states: list[LinkState] = []

    def record(event: LinkStateChanged) -> None:
        states.append(event.new)

    qkdm.subscribe(record)
    return states


def wait_until_up(qkdm: hal.Qkdm, limit: float = 3.0) -> None:
    deadline = time.monotonic() + limit
    while qkdm.status().state is not LinkState.UP:
        assert time.monotonic() < deadline, "the driver did not recover"
        time.sleep(0.02)


def key_requests(
    monkeypatch: pytest.MonkeyPatch,
    device: PtyDevice | FakeUsbDevice,
    then: Callable[[], None] | None = None,
) -> list[bytes]:
    """The key requests the driver sends to ``device`` (retransmissions included), recorded
    as they leave the host; ``then`` runs right after the first has gone (pull the cable)."""
    sent: list[bytes] = []

    def record(data: bytes) -> None:
        if data.startswith(GET_KEY):
            sent.append(data)
            if then is not None and len(sent) == 1:
                then()

    if isinstance(device, PtyDevice):
        write = SerialTransport.write

        def spy(transport: SerialTransport, data: bytes) -> None:
            write(transport, data)
            record(data)

        monkeypatch.setattr(SerialTransport, "write", spy)
    else:
        wrote = device.host_wrote
        monkeypatch.setattr(device, "host_wrote", lambda data: (wrote(data), record(data)))
    return sent


# -- serial over a pty ----------------------------------------------------------------------
def test_pty_unplug_mid_request_then_replug(bench, pty_device, monkeypatch):
    q = hal.open_qkdm(serial_url(pty_device))
    states = watch(q)
    assert q.status().state is LinkState.UP
    pty_device.mute()  # the request is in flight, unanswered, when the cable goes
    sent = key_requests(monkeypatch, pty_device, then=pty_device.unplug)
    with pytest.raises((DeviceDisconnected, DeviceTimeout)):
        q.get_key()
    assert 1 <= len(sent) <= ATTEMPTS
    assert q.status().state is LinkState.DOWN
    pty_device.replug()
    wait_until_up(q)
    key = q.get_key()
    assert bench.b().get_key_by_id(key.key_id).material == key.material
    assert states[0] is LinkState.UP and LinkState.DOWN in states and states[-1] is LinkState.UP


def test_pty_peer_stops_answering(bench, pty_device, monkeypatch):
    q = hal.open_qkdm(serial_url(pty_device))
    q.status()
    pty_device.mute()
    sent = key_requests(monkeypatch, pty_device)
    with pytest.raises(DeviceTimeout) as err:
        q.get_key()
    assert err.value.code == "HAL-TIMEOUT" and len(sent) == ATTEMPTS  # then it gave up
    assert q.status().state is LinkState.DOWN
    pty_device.mute(False)
    wait_until_up(q)
    q.get_key()


def test_pty_garbage_and_torn_frames_on_the_line(bench, pty_device):
    q = hal.open_qkdm(serial_url(pty_device))
    peer = bench.b()
    for i in range(5):
        torn = wire.encode(wire.T_GET_KEY | wire.RESPONSE, i, bytes(48))[:17]
        pty_device.inject(b"\x00\xff\xa5 noise \xa5\x5a" + torn)
        key = q.get_key()
        assert peer.get_key_by_id(key.key_id).material == key.material


def test_pty_device_reset(bench, pty_device):
    q = hal.open_qkdm(serial_url(pty_device))
    first = q.get_key()
    pty_device.reset()
    second = q.get_key()
    assert first.key_id != second.key_id
    assert q.client.resets >= 1  # type: ignore[attr-defined]


def test_pty_lost_reply_is_retransmitted_without_a_second_key(bench, pty_device):
    q = hal.open_qkdm(serial_url(pty_device))
    q.status()
    before = bench.a.key_count()
    pty_device.port.lose_replies = 1
    key = q.get_key()  # first answer lost; the retransmission gets the cached answer
    assert bench.a.key_count() == before - 1
    assert bench.b().get_key_by_id(key.key_id).material == key.material


def test_absent_port_is_a_down_status_and_a_typed_error(tmp_path):
    q = hal.open_qkdm(f"serial://{tmp_path}/no-such-tty?{FAST}")
    assert q.status().state is LinkState.DOWN
    with pytest.raises(DeviceDisconnected):
        q.get_key()
    with pytest.raises(DeviceDisconnected):
        hal.open_entropy_source(f"serial://{tmp_path}/no-such-tty?{FAST}")


class ShortKeys(QkdmAdapter):
    """Firmware whose key store hands out a truncated key (a bug or a torn buffer)."""

    def take_key(self) -> tuple[bytes, bytearray]:
        key_id, material = super().take_key()
        return key_id, material[:-1]


def test_a_short_key_is_never_returned(bench):
    port = LoopDevicePort(Device("short", qkdm=ShortKeys(bench.a)))
    q = FramedQkdm("loop", lambda: SerialTransport(port, "loop"), ClientOptions(timeout=0.2))
    with pytest.raises(ProtocolError, match="discarded"):
        q.get_key()


# -- serial over pyserial's loop:// -----------------------------------------------------------
def test_loop_transport_conforms_and_resyncs(bench):
    def open_loop() -> hal.Qkdm:
        port = LoopDevicePort(make_device("loop", qkdm=bench.a))
        return FramedQkdm("loop", lambda: SerialTransport(port, "loop"), ClientOptions())

    check_qkdm(open_loop, peer=bench.b, advance=bench.clock.advance, keys=5)
    port = LoopDevicePort(make_device("loop", qkdm=bench.a))
    options = ClientOptions(timeout=0.2)
    q = FramedQkdm("loop", lambda: SerialTransport(port, "loop"), options)
    port.inject(b"garbage\xa5\x5a\x01\x83")
    key = q.get_key()
    assert bench.b().get_key_by_id(key.key_id).material == key.material


def test_serial_url_forms():
    with pytest.raises(DeviceUrlError):
        hal.open_qkdm("serial://?baud=9600")
    with pytest.raises(DeviceUrlError, match="unknown parameter"):
        hal.open_qkdm("serial:///dev/ttyS0?bauds=9600")


# -- USB over the fake backend ----------------------------------------------------------------
def test_fake_backend_descriptors_iterate_and_print(usb_device):
    backend = FakeUsbBackend([usb_device])
    dev = usb.core.find(idVendor=0x1209, idProduct=0x0A51, backend=backend)
    assert dev is not None and dev.serial_number == "EMU-1"
    text = str(dev)  # walks every descriptor: loops forever without IndexError
    assert "Bulk IN" in text and "Bulk OUT" in text
    assert [ep.bEndpointAddress for ep in dev[0][(0, 0)]] == [0x01, 0x81]
    assert usb.core.find(idVendor=0xDEAD, backend=backend) is None


def test_usb_unplug_and_replug(bench, usb_device):
    q = hal.open_qkdm(USB_URL)
    states = watch(q)
    q.get_key()
    usb_device.unplug()
    with pytest.raises(DeviceDisconnected):
        q.get_key()
    assert q.status().state is LinkState.DOWN
    usb_device.replug()
    wait_until_up(q)
    key = q.get_key()
    assert bench.b().get_key_by_id(key.key_id).material == key.material
    assert states == [LinkState.UP, LinkState.DOWN, LinkState.UP]


def test_usb_unplug_mid_request(bench, usb_device, monkeypatch):
    q = hal.open_qkdm(USB_URL)
    q.status()
    usb_device.mute()  # the request is in flight, unanswered, when the cable goes
    sent = key_requests(monkeypatch, usb_device, then=usb_device.unplug)
    with pytest.raises(DeviceDisconnected):
        q.get_key()
    assert len(sent) == 1  # no retransmission to a device that is gone


def test_usb_stall_reset_garbage_and_lost_reply(bench, usb_device, monkeypatch):
    q = hal.open_qkdm(USB_URL)
    q.status()
    usb_device.mute()
    sent = key_requests(monkeypatch, usb_device)
    with pytest.raises(DeviceTimeout):
        q.get_key()
    assert len(sent) == ATTEMPTS  # then it gave up
    usb_device.mute(False)
    wait_until_up(q)
    usb_device.reset()
    usb_device.inject(b"\xa5\x5a\x01\x83\x00\x01\xff\xff" + b"junk")
    before = bench.a.key_count()
    usb_device.lose_replies = 1
    key = q.get_key()
    assert bench.a.key_count() == before - 1
    assert bench.b().get_key_by_id(key.key_id).material == key.material


def test_usb_url_errors(usb_device):
    with pytest.raises(DeviceUrlError, match="VID:PID"):
        hal.open_qkdm("usb://12:34")
    with pytest.raises(DeviceUrlError, match="no USB backend"):
        hal.open_qkdm("usb://1209:0a51?backend=nope")
    twin = FakeUsbDevice(Device("twin"), vid=0x1209, pid=0x0A51, serial="EMU-2", address=2)
    unregister = register_backend("two", FakeUsbBackend([usb_device, twin]))
    try:
        with pytest.raises(DeviceUrlError, match="add"):
            hal.open_qkdm("usb://1209:0a51?backend=two").get_key()
        assert hal.open_qkdm("usb://1209:0a51?backend=two&serial=EMU-1").get_key()
    finally:
        unregister()
