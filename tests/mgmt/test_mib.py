"""QKDN-MIB: it passes smilint -l 4, net-snmp loads it without a warning, and the code
reads the same OIDs from it that net-snmp does."""

from __future__ import annotations

import subprocess

from appliance.mgmt import mib
from appliance.snmp import smi

NOTIFICATIONS = (
    "qkdnLinkDown",
    "qkdnLinkUp",
    "qkdnQberHigh",
    "qkdnKeyStoreLow",
    "qkdnRngHealthFailure",
    "qkdnCardRemoved",
    "qkdnAuthFailure",
    "qkdnIntegrityAlarm",
    "qkdnSlotRollback",
)


def test_smilint_level_4_is_silent():
    out = subprocess.run(
        ["smilint", "-l", "4", "-s", str(smi.MIB_DIR / "QKDN-MIB.txt")],
        env={"SMIPATH": str(smi.MIB_DIR), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout + out.stderr == ""


def _translate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["snmptranslate", "-M", f"+:{smi.MIB_DIR}", "-m", "QKDN-MIB", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_net_snmp_prints_the_tree_without_a_warning_and_agrees_on_every_oid():
    tree = _translate("-Tp")
    assert tree.returncode == 0 and tree.stderr == ""
    assert "qkdnLinkTable(1)" in tree.stdout and "qkdnLinkKeysConsumed(10)" in tree.stdout
    objects = [o for o in mib.load().values() if o.macro != "OBJECT IDENTIFIER"]
    names = [f"QKDN-MIB::{o.name}" for o in objects]
    out = _translate("-On", *names)
    assert out.stderr == ""
    assert out.stdout.split() == ["." + ".".join(map(str, o.oid)) for o in objects]


def test_the_arc_is_one_constant_and_every_notification_is_there():
    assert mib.QKDN_ARC == (1, 3, 6, 1, 4, 1, smi.ENTERPRISE, 1) == mib.oid("qkdnMIB")
    assert all(o.oid[: len(mib.QKDN_ARC)] == mib.QKDN_ARC for o in mib.load().values())
    m = mib.load()
    assert all(m[n].macro == "NOTIFICATION-TYPE" for n in NOTIFICATIONS)
    assert m["qkdnLinkEntry"].index == ("qkdnLinkPeer",)
    assert m["qkdnLinkQber"].syntax == "Gauge32" and m["qkdnLinkQber"].hi == 500_000
    assert m["qkdnNotifySeverity"].enums["cleared"] == 1
    assert m["qkdnNotifySeverity"].access == "accessible-for-notify"
