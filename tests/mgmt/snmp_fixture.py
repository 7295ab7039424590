"""Real net-snmp peers for the management tests: command helpers, and an snmptrapd on a
free UDP port with its own configuration, persistent directory and log."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.snmp import smi
from appliance.snmp.usm import Credentials
from tests.kms.conftest import poll


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def v3(user: Credentials, level: str = "authPriv") -> list[str]:
    return [
        "-v3",
        "-l",
        level,
        "-u",
        user.user,
        "-a",
        "SHA-256",
        "-A",
        user.auth,
        "-x",
        "AES",
        "-X",
        user.priv,
    ]


def snmp(
    tool: str,
    address: str,
    *args: str,
    user: Credentials,
    level: str = "authPriv",
    options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """A net-snmp command as ``user`` with QKDN-MIB loaded (names, no warnings)."""
    cmd = [
        tool,
        *v3(user, level),
        "-M",
        f"+:{smi.MIB_DIR}",
        "-m",
        "QKDN-MIB",
        "-t",
        "2",
        "-r",
        "1",
        *options,
        address,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@dataclass
class TrapDaemon:
    address: str
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        """Bounded polling of the daemon's log for ``needle``."""

        def logged() -> str | None:
            text = self.text()
            return text if needle in text else None

        return poll(logged, f"snmptrapd logging {needle!r}", timeout)


@contextmanager
def snmptrapd(
    tmp: Path, informs: list[Credentials], traps: list[tuple[Credentials, bytes]]
) -> Iterator[TrapDaemon]:
    """snmptrapd accepting INFORMs from ``informs`` and traps from ``traps`` (user, the
    sender's engine ID), authPriv only; everything it receives goes to its log."""
    port = free_udp_port()
    conf = tmp / "snmptrapd.conf"
    lines = []
    for u in informs:
        lines.append(f"createUser {u.user} SHA-256 {u.auth} AES {u.priv}")
        lines.append(f"authUser log {u.user} authPriv")
    for u, engine in traps:
        lines.append(f"createUser -e 0x{engine.hex()} {u.user} SHA-256 {u.auth} AES {u.priv}")
        lines.append(f"authUser log {u.user} authPriv")
    conf.write_text("\n".join(lines) + "\n")
    log = tmp / "snmptrapd.log"
    persist = tmp / "snmp-persist"
    persist.mkdir()
    proc = subprocess.Popen(
        [
            "snmptrapd",
            "-f",
            "-C",
            "-c",
            str(conf),
            "-Lf",
            str(log),
            "-M",
            f"+:{smi.MIB_DIR}",
            "-m",
            "QKDN-MIB",
            f"udp:127.0.0.1:{port}",
        ],
        env={"SNMP_PERSISTENT_DIR": str(persist), "PATH": "/usr/bin:/bin:/usr/sbin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon = TrapDaemon(f"127.0.0.1:{port}", log)
    try:
        daemon.wait_for("NET-SNMP version", timeout=30)
        yield daemon
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
