"""``qkdn aaa``: registry management with one-line coded errors, accounting export and
verification, and the canary: nothing key-like in AAA's storage or output."""

from __future__ import annotations

import base64
import json
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.aaa.accounting import Accounting, Report
from appliance.aaa.ledger import Reason
from tests.aaa.registry_fixture import NOW
from tests.cli_run import run


@pytest.fixture
def d(tmp_path):
    return str(tmp_path / "aaa")


def aaa(capsys, d, *argv):
    return run(capsys, "aaa", "--dir", d, *argv)


def test_an_operator_adds_a_contract_and_suspends_a_user(capsys, d):
    assert aaa(capsys, d, "init", "--topology", "demoquandt")[0] == 0
    assert aaa(capsys, d, "user", "add", "acme", "--customer", "ACME", "--billing", "A-1")[0] == 0
    for sae, ukms in (("acme-a", "1"), ("acme-b", "15")):
        assert aaa(capsys, d, "sae", "add", sae, "--user", "acme", "--ukms", ukms)[0] == 0
    status, out, _ = aaa(
        capsys,
        d,
        "contract",
        "add",
        "acme-2027",
        "--user",
        "acme",
        "--pair",
        "acme-a:acme-b",
        "--keys-per-day",
        "50000",
        "--max-key-size",
        "512",
        "--relay-mode",
        "otp",
        "--route-policy",
        "fewest-hops",
        "--json",
    )
    doc = json.loads(out)
    assert status == 0 and doc["keys_per_day"] == 50000 and doc["bits_per_day"] == 25_600_000
    assert doc["relay_mode"] == "otp" and doc["pairs"] == [["acme-a", "acme-b"]]
    assert doc["route_policy"] == "fewest-hops"
    status, out, _ = aaa(capsys, d, "contract", "set", "acme-2027", "--route-policy", "most-key")
    status, out, _ = aaa(capsys, d, "contract", "show", "acme-2027", "--json")
    assert status == 0 and json.loads(out)[0]["route_policy"] == "most-key"
    assert aaa(capsys, d, "user", "suspend", "acme")[0] == 0
    status, out, _ = aaa(capsys, d, "user", "show", "acme", "--json")
    assert json.loads(out)[0]["suspended"] is True
    assert aaa(capsys, d, "user", "resume", "acme")[0] == 0
    status, out, _ = aaa(capsys, d, "contract", "show", "demo-2026", "--json")
    assert json.loads(out)[0]["pairs"] == [
        ["sae-berlin-1", "sae-bonn-1"],
        ["sae-bonn-1", "sae-berlin-1"],
    ]


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (("user", "add", "Bad Name", "--customer", "x"), "AAA-VALUE"),
        (("user", "suspend", "ghost"), "AAA-UNKNOWN"),
        (("sae", "add", "s", "--user", "ghost", "--ukms", "1"), "AAA-UNKNOWN"),
        (("contract", "add", "c", "--user", "alice", "--pair", "x:y"), "AAA-UNKNOWN"),
        (("contract", "add", "c", "--user", "alice"), "USAGE"),
        (("contract", "set", "c", "--max-key-size", "99999"), "USAGE"),
        (("contract", "set", "c", "--route-policy", "cheapest"), "USAGE"),
        (("contract", "add", "c", "--user", "a", "--pair", "a-b"), "USAGE"),
        (
            ("contract", "add", "c", "--user", "a", "--pair", "a:b", "--valid-from", "2026-13-01"),
            "USAGE",
        ),
        (("sae", "add", "s", "--user", "u", "--ukms", "1000"), "USAGE"),
        (("accounting", "--from", "2026-06-02", "--to", "2026-06-01"), "AAA-DB"),
    ],
)
def test_bad_input_is_one_coded_line(capsys, d, argv, code):
    aaa(capsys, d, "init")
    aaa(capsys, d, "user", "add", "alice", "--customer", "Alice")
    status, out, err = aaa(capsys, d, *argv)
    assert status in (1, 2) and out == ""
    assert err.count("\n") == 1 and f"[{code}]" in err and "Traceback" not in err


def _accounting(d: str) -> Accounting:
    acct = Accounting(__import__("pathlib").Path(d) / "accounting.db")
    for i in range(3):
        acct.record(
            Report(
                request=f"1:{i}",
                contract="bank-2026",
                user="example-bank",
                master="sae-berlin-2",
                slave="sae-bonn-2",
                outcome="delivered",
                keys=4,
                bits=1024,
                grant=1,
            ),
            NOW + i * 86_400,
        )
    acct.record(
        Report(
            request="1:9",
            contract="bank-2026",
            user="example-bank",
            master="sae-berlin-2",
            slave="sae-bonn-2",
            outcome="refused",
            reason=Reason.QUOTA,
        ),
        NOW,
    )
    return acct


def test_a_month_of_accounting_exports_and_verifies(capsys, d, tmp_path):
    aaa(capsys, d, "init", "--topology", "demoquandt")
    acct = _accounting(d)
    acct.close()
    key = Ed25519PrivateKey.generate()
    priv, pub = tmp_path / "dc.pem", tmp_path / "dc.pub.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    status, out, _ = aaa(
        capsys,
        d,
        "accounting",
        "--from",
        "2026-06-01",
        "--to",
        "2026-06-30",
        "--by",
        "month",
        "--format",
        "csv",
    )
    lines = out.splitlines()
    assert status == 0 and len(lines) == 2
    assert lines[1] == "2026-06,bank-2026,example-bank,sae-berlin-2,sae-bonn-2,3,0,0,1,12,3072,0,"
    status, out, _ = aaa(
        capsys,
        d,
        "accounting",
        "--from",
        "2026-06-15",
        "--to",
        "2026-06-15",
        "--user",
        "example-bank",
        "--format",
        "json",
    )
    assert json.loads(out)[0]["keys"] == 4
    assert aaa(capsys, d, "accounting", "seal", "--key", str(priv))[0] == 0
    status, out, _ = aaa(capsys, d, "accounting", "verify", "--public-key", str(pub))
    assert status == 0 and "4 records, 3 signed heads" in out
    other = tmp_path / "other.pem"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    status, _, err = aaa(capsys, d, "accounting", "verify", "--public-key", str(other))
    assert status == 1 and "[AAA-ACCOUNTING]" in err and "signature" in err


KEYLIKE = re.compile(rb"[A-Za-z0-9+/]{43}=|[0-9a-f]{64}")


def test_canary_no_key_material_in_aaa_storage(capsys, d):
    """AAA deals in counts and names: its databases hold no key-like value other than the
    hash chain's own digests (which are recomputed from counts and names)."""
    aaa(capsys, d, "init", "--topology", "demoquandt")
    acct = _accounting(d)
    digests = {r[0].encode() for r in acct.db.execute("SELECT hash FROM records")}
    digests |= {r[0].encode() for r in acct.db.execute("SELECT prev FROM records")}
    acct.close()
    canary = base64.b64encode(b"\x5a" * 32)
    for name in ("registry.db", "accounting.db"):
        blob = (__import__("pathlib").Path(d) / name).read_bytes()
        assert canary not in blob
        found = set(KEYLIKE.findall(blob)) - digests
        assert not found, f"{name} holds key-like values {found}"
