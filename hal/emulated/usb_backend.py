"""A pyusb backend that presents emulated devices: no kernel USB needed.

:class:`FakeUsbBackend` implements the part of ``usb.backend.IBackend`` that pyusb's
``usb.core.find(..., backend=...)``, descriptor iteration, string descriptors and bulk
transfers use. Each :class:`FakeUsbDevice` has one configuration with one vendor-class
interface holding a bulk OUT endpoint (0x01) and a bulk IN endpoint (0x81), and runs the
device firmware (:mod:`hal.firmware`) on what the host writes. Devices can be unplugged,
plugged back, reset, muted and fed garbage, for the fault tests.

Descriptor getters raise IndexError past the last index, as libusb's backend does:
pyusb's descriptor iterators stop only on that. Test and bench equipment only.
"""

from __future__ import annotations

import array
import errno
import threading
from types import SimpleNamespace
from typing import Any

import usb.backend
import usb.core

from hal.firmware.device import Device

EP_OUT = 0x01
EP_IN = 0x81
_BULK = 0x02
_GET_DESCRIPTOR = 0x06
_STRING = 0x03
_LANG_EN_US = 0x0409


class FakeUsbDevice:
    """One emulated USB device running the firmware."""

    def __init__(
        self,
        device: Device,
        *,
        vid: int,
        pid: int,
        serial: str,
        product: str = "QKDN emulated device",
        manufacturer: str = "QKDN",
        address: int = 1,
        packet_size: int = 512,
    ) -> None:
        self.device = device
        self.vid, self.pid, self.serial = vid, pid, serial
        self.strings = {1: manufacturer, 2: product, 3: serial}
        self.address, self.packet_size = address, packet_size
        self.plugged = True
        self.muted = False
        self.lose_replies = 0  # answers computed, then lost on the wire
        self.generation = 0  # bumps on unplug: handles from before are stale
        self._in = bytearray()
        self._ready = threading.Condition()

    # -- fault injection ------------------------------------------------------------------
    def unplug(self) -> None:
        """The cable is pulled: every open handle fails with ENODEV."""
        with self._ready:
            self.plugged = False
            self.generation += 1
            self._in.clear()
            self._ready.notify_all()

    def replug(self) -> None:
        """Plugged back in; the firmware reboots."""
        self.reset()
        self.plugged = True

    def reset(self) -> None:
        """The microcontroller reboots: new parser, empty reply cache, BOOT frame queued."""
        d = self.device
        self.device = Device(d.name, qkdm=d.qkdm, qrng=d.qrng, max_payload=d.max_payload)
        self.inject(self.device.boot())

    def mute(self, muted: bool = True) -> None:
        """The firmware hangs: writes are accepted, nothing is answered."""
        self.muted = muted

    def inject(self, data: bytes) -> None:
        """Queue raw bytes on the IN endpoint (garbage, torn frames)."""
        with self._ready:
            self._in += data
            self._ready.notify_all()

    # -- endpoints ------------------------------------------------------------------------
    def host_wrote(self, data: bytes) -> None:
        if self.muted:
            return
        reply = self.device.receive(data)
        if reply and self.lose_replies:
            self.lose_replies -= 1
            return
        self.inject(reply)

    def host_reads(self, buff: Any, timeout_ms: int, generation: int) -> int:
        with self._ready:
            self._ready.wait_for(
                lambda: bool(self._in) or self.generation != generation, timeout_ms / 1000
            )
            if self.generation != generation:
                raise usb.core.USBError("No such device", -4, errno.ENODEV)
            if not self._in:
                raise usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
            n = min(len(buff), len(self._in))
            buff[:n] = array.array("B", self._in[:n])
            del self._in[:n]
            return n

    # -- descriptors ----------------------------------------------------------------------
    def device_descriptor(self) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=18, bDescriptorType=1, bcdUSB=0x0200, bDeviceClass=0,
            bDeviceSubClass=0, bDeviceProtocol=0, bMaxPacketSize0=64,
            idVendor=self.vid, idProduct=self.pid, bcdDevice=0x0100,
            iManufacturer=1, iProduct=2, iSerialNumber=3, bNumConfigurations=1,
            address=self.address, bus=1, port_number=self.address, port_numbers=(self.address,),
            speed=3,
        )  # fmt: skip

    def configuration_descriptor(self) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=9, bDescriptorType=2, wTotalLength=32, bNumInterfaces=1,
            bConfigurationValue=1, iConfiguration=0, bmAttributes=0x80, bMaxPower=50,
            extra_descriptors=[],
        )  # fmt: skip

    def interface_descriptor(self) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=9, bDescriptorType=4, bInterfaceNumber=0, bAlternateSetting=0,
            bNumEndpoints=2, bInterfaceClass=0xFF, bInterfaceSubClass=0,
            bInterfaceProtocol=0, iInterface=0, extra_descriptors=[],
        )  # fmt: skip

    def endpoint_descriptor(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(
            bLength=7, bDescriptorType=5, bEndpointAddress=(EP_OUT, EP_IN)[index],
            bmAttributes=_BULK, wMaxPacketSize=self.packet_size, bInterval=0, bRefresh=0,
            bSynchAddress=0, extra_descriptors=[],
        )  # fmt: skip

    def string_descriptor(self, index: int) -> bytes:
        if index == 0:
            return bytes([4, _STRING]) + _LANG_EN_US.to_bytes(2, "little")
        text = self.strings[index].encode("utf-16-le")
        return bytes([2 + len(text), _STRING]) + text


class _Handle:
    """An open device: valid until the device is unplugged."""

    def __init__(self, dev: FakeUsbDevice) -> None:
        self.dev, self.generation = dev, dev.generation

    def check(self) -> FakeUsbDevice:
        if not self.dev.plugged or self.dev.generation != self.generation:
            raise usb.core.USBError("No such device", -4, errno.ENODEV)
        return self.dev


class FakeUsbBackend(usb.backend.IBackend):  # type: ignore[misc]
    """The pyusb backend for a list of emulated devices (pass as ``backend=``)."""

    def __init__(self, devices: list[FakeUsbDevice]) -> None:
        self.devices = devices

    def enumerate_devices(self) -> list[FakeUsbDevice]:
        return [d for d in self.devices if d.plugged]

    def get_device_descriptor(self, dev: FakeUsbDevice) -> SimpleNamespace:
        return dev.device_descriptor()

    def get_configuration_descriptor(self, dev: FakeUsbDevice, config: int) -> SimpleNamespace:
        if config != 0:
            raise IndexError("configuration index out of range")
        return dev.configuration_descriptor()

    def get_interface_descriptor(
        self, dev: FakeUsbDevice, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        if (config, intf, alt) != (0, 0, 0):
            raise IndexError("interface index out of range")
        return dev.interface_descriptor()

    def get_endpoint_descriptor(
        self, dev: FakeUsbDevice, ep: int, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        if (config, intf, alt) != (0, 0, 0) or not 0 <= ep < 2:
            raise IndexError("endpoint index out of range")
        return dev.endpoint_descriptor(ep)

    def open_device(self, dev: FakeUsbDevice) -> _Handle:
        if not dev.plugged:
            raise usb.core.USBError("No such device", -4, errno.ENODEV)
        return _Handle(dev)

    def close_device(self, dev_handle: _Handle) -> None:
        pass  # nothing held

    def set_configuration(self, dev_handle: _Handle, config_value: int) -> None:
        dev_handle.check()

    def get_configuration(self, dev_handle: _Handle) -> int:
        dev_handle.check()
        return 1

    def claim_interface(self, dev_handle: _Handle, intf: int) -> None:
        dev_handle.check()

    def release_interface(self, dev_handle: _Handle, intf: int) -> None:
        pass  # releasing a gone device's interface is not an error

    def clear_halt(self, dev_handle: _Handle, ep: int) -> None:
        dev_handle.check()

    def is_kernel_driver_active(self, dev_handle: _Handle, intf: int) -> bool:
        return False

    def bulk_write(self, dev_handle: _Handle, ep: int, intf: int, data: Any, timeout: int) -> int:
        dev = dev_handle.check()
        if ep != EP_OUT:
            raise usb.core.USBError("Invalid parameter", -2, errno.EINVAL)
        dev.host_wrote(bytes(data))
        return len(data)

    def bulk_read(self, dev_handle: _Handle, ep: int, intf: int, buff: Any, timeout: int) -> int:
        dev = dev_handle.check()
        if ep != EP_IN:
            raise usb.core.USBError("Invalid parameter", -2, errno.EINVAL)
        return dev.host_reads(buff, timeout, dev_handle.generation)

    def ctrl_transfer(
        self,
        dev_handle: _Handle,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: Any,
        timeout: int,
    ) -> int:
        dev = dev_handle.check()
        kind, index = wValue >> 8, wValue & 0xFF
        if bmRequestType != 0x80 or bRequest != _GET_DESCRIPTOR or kind != _STRING:
            raise usb.core.USBError("Pipe error", -9, errno.EPIPE)
        if index and index not in dev.strings:
            raise usb.core.USBError("Pipe error", -9, errno.EPIPE)
        desc = dev.string_descriptor(index)[: len(data)]
        data[: len(desc)] = array.array("B", desc)
        return len(desc)
