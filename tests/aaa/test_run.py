"""``qkdn aaa run`` as its own process: net-snmp asks for quota as an AKMS; after
``kill -9`` and a restart the grants are still charged (no second grant of the same
quota), and the config's errors are one coded line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from appliance.aaa import mib
from appliance.aaa.registry import Registry
from tests.aaa.agent_fixture import AKMS, OPERATOR, needs_netsnmp
from tests.aaa.registry_fixture import populate

EXIT_S = 60
"""Bound on the device's exit after a signal (a loaded CI machine: 10 s was once too short)."""
CONFIG = """listen = "127.0.0.1:0"
[operator]
user = "{o.user}"
auth = "{o.auth}"
priv = "{o.priv}"
[[akms]]
id = 2
user = "{a.user}"
auth = "{a.auth}"
priv = "{a.priv}"
"""


def start(folder: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "aaa",
            "--dir",
            str(folder),
            "run",
            "--config",
            str(folder / "aaa.toml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "udp port" in line, proc.stderr.read() if proc.stderr else line
    return proc, int(line.split()[-1])


def ask(port: int, rid: int, keys: int) -> str:
    index = mib.encode_index(
        [mib.load()[n] for n in mib.load()["aaaQuotaEntry"].index],
        [1, rid, b"alice-a", b"alice-b", keys, keys * 256],
    )
    a = AKMS[2]
    out = subprocess.run(
        [
            "snmpget",
            "-v3",
            "-l",
            "authPriv",
            "-u",
            a.user,
            "-a",
            "SHA-256",
            "-A",
            a.auth,
            "-x",
            "AES",
            "-X",
            a.priv,
            "-m",
            "",
            "-Oqv",
            "-t",
            "3",
            "-r",
            "1",
            f"127.0.0.1:{port}",
            "." + ".".join(map(str, mib.oid("aaaQuotaAnswer") + index)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().strip('"')


@needs_netsnmp
def test_grants_survive_kill_9_and_are_never_granted_twice(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    populate(reg, keys_per_day=100, bits_per_day=25_600)
    reg.close()
    (tmp_path / "aaa.toml").write_text(CONFIG.format(o=OPERATOR, a=AKMS[2]))
    proc, port = start(tmp_path)
    try:
        first = ask(port, 1, 100).split()
        assert first[0] == "0" and first[2] == "100" and first[12:] == ["alice-2026", "1"]
        assert ask(port, 2, 1).split()[0] == "5"  # quota(5): all of today's is granted
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(EXIT_S)
    proc, port = start(tmp_path)
    try:
        assert ask(port, 3, 1).split()[0] == "5"  # still charged after the crash
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(EXIT_S)


def test_a_bad_config_is_one_coded_line(tmp_path):
    (tmp_path / "aaa.toml").write_text(
        'listen = "127.0.0.1:0"\n[operator]\nuser = "op"\nauth = "short"\npriv = "also-short"\n'
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "aaa",
            "--dir",
            str(tmp_path),
            "run",
            "--config",
            str(tmp_path / "aaa.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "[CFG-" in out.stderr and "operator.auth" in out.stderr


def test_snmp_user_names_must_be_distinct(tmp_path):
    text = CONFIG.format(o=OPERATOR, a=AKMS[2]).replace(
        'user = "akms-2"', f'user = "{OPERATOR.user}"'
    )
    (tmp_path / "aaa.toml").write_text(text)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "aaa",
            "--dir",
            str(tmp_path),
            "run",
            "--config",
            str(tmp_path / "aaa.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "distinct" in out.stderr and out.stderr.count("\n") == 1
