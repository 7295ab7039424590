"""The README's operator session on the AAA device, run as written: every ``$AAA ...`` line
of its "Users, contracts and accounting" block (show and add contracts, suspend and resume
a user, export a month of accounting, verify the chain) against a registry seeded from
DemoQuanDT (``qkdn aaa init``, as ``qkdn net up`` seeds ``<net>/aaa``) whose accounting
holds requests of that month; the export bills them."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shlex
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.aaa.accounting import Accounting, Report
from tests.cli_run import run

README = Path(__file__).resolve().parents[2] / "README.md"
NET_AAA = ".qkdn/net/aaa"


def readme_session() -> list[list[str]]:
    """The ``$AAA`` command lines of the README's AAA block, as argument lists."""
    text = README.read_text()
    start = text.index("## Users, contracts and accounting")
    block = text[start:].split("```sh\n", 1)[1].split("```", 1)[0]
    assert f'AAA="qkdn aaa --dir {NET_AAA}"' in block
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split(" #", 1)[0])[1:] for line in lines if line.startswith("$AAA ")]


def december(acct: Accounting) -> None:
    """Requests of December 2026 as the AKMSs report them: two delivered, one refused."""
    at = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC).timestamp()
    pairs = {"demo-2026": ("demo-encryptors", "sae-berlin-1", "sae-bonn-1")}
    pairs["bank-2026"] = ("example-bank", "sae-berlin-2", "sae-bonn-2")
    for i, (contract, (user, master, slave)) in enumerate(sorted(pairs.items())):
        report = Report(
            request=f"1:{i}",
            contract=contract,
            user=user,
            master=master,
            slave=slave,
            outcome="delivered",
            keys=4,
            bits=1024,
            grant=1,
        )
        assert acct.record(report, at + i)


def test_the_readme_operator_session_runs_as_written(capsys, tmp_path):
    d = tmp_path / "aaa"
    assert run(capsys, "aaa", "--dir", str(d), "init", "--topology", "demoquandt")[0] == 0
    acct = Accounting(d / "accounting.db")
    try:
        december(acct)
    finally:
        acct.close()
    key = Ed25519PrivateKey.generate()  # the data centre's key pair, as net up makes it
    (d / "dc.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (d / "dc.pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    session = readme_session()
    said = [" ".join(argv[:2]) for argv in session]
    for wanted in ("contract add", "user suspend", "accounting --from"):
        assert wanted in said, f"the README no longer shows {wanted!r}"
    exported = ""
    for argv in session:
        argv = [a.replace(NET_AAA, str(d)) for a in argv]
        if ">" in argv:  # `... > december.csv`: the test reads what would be written
            argv = argv[: argv.index(">")]
        status, out, err = run(capsys, "aaa", "--dir", str(d), *argv)
        assert status == 0, (argv, err)
        if argv[0] == "accounting" and "--format" in argv:
            exported = out
    status, out, _ = run(capsys, "aaa", "--dir", str(d), "contract", "show", "bank-otp", "--json")
    (otp,) = json.loads(out)
    assert (otp["relay_mode"], otp["pairs"]) == ("otp", [["sae-berlin-2", "sae-bonn-2"]])
    status, out, _ = run(capsys, "aaa", "--dir", str(d), "user", "show", "example-bank", "--json")
    assert json.loads(out)[0]["suspended"] is False  # suspended, then resumed
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert {(r["contract"], r["keys"], r["bits"]) for r in rows} == {
        ("bank-2026", "4", "1024"),
        ("demo-2026", "4", "1024"),
    }
    assert {r["period"] for r in rows} == {"2026-12"}
