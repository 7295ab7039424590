"""QKDN-AAA-MIB: it passes smilint -l 3, net-snmp loads it, and the code reads the same
OIDs from it that net-snmp does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.aaa import mib
from appliance.snmp import smi

MIB_DIR = Path(mib.__file__).parent / "mib"
SMI_DIR = smi.MIB_DIR
needs_smilint = pytest.mark.skipif(shutil.which("smilint") is None, reason="smitools missing")
needs_netsnmp = pytest.mark.skipif(shutil.which("snmptranslate") is None, reason="snmp missing")


@needs_smilint
def test_smilint_level_3_is_silent():
    out = subprocess.run(
        ["smilint", "-l", "3", "-s", str(MIB_DIR / "QKDN-AAA-MIB.txt")],
        env={"SMIPATH": f"{MIB_DIR}:{SMI_DIR}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout + out.stderr == ""


def _translate(*args: str) -> str:
    out = subprocess.run(
        ["snmptranslate", "-M", f"+:{MIB_DIR}:{SMI_DIR}", "-m", "+QKDN-AAA-MIB", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_netsnmp
def test_net_snmp_loads_the_module_and_agrees_on_every_oid():
    tree = _translate("-Tp")
    assert "qkdnAaaMIB(2)" in tree and "aaaQuotaTable(1)" in tree
    objects = [o for o in mib.load().values() if o.macro != "OBJECT IDENTIFIER"]
    names = [f"QKDN-AAA-MIB::{o.name}" for o in objects]
    lines = _translate("-On", *names).split()
    assert lines == ["." + ".".join(map(str, o.oid)) for o in objects]


def test_the_arc_is_one_constant():
    assert mib.oid("qkdnAaaMIB") == mib.AAA_ARC == (1, 3, 6, 1, 4, 1, mib.ENTERPRISE, 2)
    assert all(o.oid[: len(mib.AAA_ARC)] == mib.AAA_ARC for o in mib.load().values())


def test_syntax_access_and_enumerations_come_from_the_text():
    m = mib.load()
    assert m["aaaUserSuspended"].access == "read-write"
    assert m["aaaUserSuspended"].enums == {"true": 1, "false": 2}
    assert (m["aaaUsageRequest"].syntax, m["aaaUsageRequest"].lo, m["aaaUsageRequest"].hi) == (
        "OCTET STRING",
        1,
        36,
    )
    assert m["aaaAcctKeys"].syntax == "Counter64"
    assert m["aaaQuotaEntry"].index[0] == "aaaQuotaUkms"


def test_index_encoding_round_trips_and_refuses_malformed_suffixes():
    m = mib.load()
    kinds = [m[n] for n in m["aaaQuotaEntry"].index]
    values: list[int | bytes] = [1, 77, b"sae-a", b"sae-b", 10, 2560]
    suffix = mib.encode_index(kinds, values)
    assert suffix[:4] == (1, 77, 5, ord("s"))
    assert mib.decode_index(kinds, suffix) == values
    assert mib.decode_index(kinds, suffix[:-1]) is None
    assert mib.decode_index(kinds, (*suffix, 1)) is None
    assert mib.decode_index(kinds, (1000, *suffix[1:])) is None  # UKMS out of range
    assert mib.decode_index(kinds, (1, 77, 40, *range(40))) is None  # too long a name
