"""Interoperability (issue 5, item 10): ETSI 014 keys with ``curl`` and client certificates.

Nothing of ours on the client side: the endpoints and credentials come from
``qkdn net status --json``, and ``curl --cert --key --cacert`` makes the requests, verifying
the KME's certificate (with its host name) against the network's CA. The third-party
client ``etsi-qkd-014-client`` is exercised in ``test_net_processes.py``.

The network is the smallest with a relay between two user sites (UKMS, AKMS, AKMS, UKMS),
plus a second user site behind the western access node (for keys shared with two slave
SAEs, Annex B), started by ``qkdn net up`` like DemoQuanDT: the 014 server is the same, and
five processes start faster than sixteen.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kms.conftest import Net, qkdn, running_net

MASTER, SLAVE = "sae-east-1", "sae-west-1"
SLAVE_2, SLAVE_3, THIRD = "sae-west-2", "sae-east-2", "sae-west-3"
"""Additional slaves: one at another UKMS behind the first slave's access node, one at the
master's own UKMS; and a third SAE of the user at the first slave's UKMS, never named."""
TOPOLOGY = """
[network]
name = "two-sites"
description = "two user sites, their access nodes, one QKD link between those"
key_size = 256

[link_defaults]
kind = "simulated"
skr_kbps = 10.0
qber_pct = 1.0

[[nodes]]
id = 1
name = "ukms-east"
site = "East (user site)"
role = "ukms"

[[nodes]]
id = 2
name = "akms-east"
site = "East"
role = "akms+ckms"

[[nodes]]
id = 3
name = "akms-west"
site = "West"
role = "akms+ckms"

[[nodes]]
id = 4
name = "ukms-west"
site = "West (user site)"
role = "ukms"

[[links]]
a = 1
b = 2
length_km = 10.0

[[links]]
a = 2
b = 3
length_km = 50.0

[[links]]
a = 3
b = 4
length_km = 10.0

[[nodes]]
id = 5
name = "ukms-west2"
site = "West 2 (user site)"
role = "ukms"

[[links]]
a = 3
b = 5
length_km = 10.0

[[users]]
id = "encryptors"
name = "one SAE at each site"

[[contracts]]
id = "encryptors-2026"
user = "encryptors"
max_key_size = 512
keys_per_day = 1000000

[[saes]]
id = "sae-east-1"
node = 1
user = "encryptors"
contract = "encryptors-2026"

[[saes]]
id = "sae-west-1"
node = 4
user = "encryptors"
contract = "encryptors-2026"

[[saes]]
id = "sae-west-2"
node = 5
user = "encryptors"
contract = "encryptors-2026"

[[saes]]
id = "sae-west-3"
node = 4
user = "encryptors"
contract = "encryptors-2026"

[[saes]]
id = "sae-east-2"
node = 1
user = "encryptors"
contract = "encryptors-2026"
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    if shutil.which("curl") is None:
        pytest.fail("curl not found: the interoperability test needs it (apt-get install curl)")
    topology = tmp_path_factory.mktemp("topology") / "two-sites.toml"
    topology.write_text(TOPOLOGY)
    with running_net(tmp_path_factory, topology=str(topology)) as running:
        yield running


@pytest.fixture(scope="module")
def saes(net: Net) -> dict[str, dict[str, Any]]:
    """Each SAE's entry of ``qkdn net status --json`` (014 base URL and credentials)."""
    return _status(net)


def _status(net: Net) -> dict[str, dict[str, Any]]:
    done = qkdn("net", "status", "--dir", str(net.dir), "--json")
    assert done.returncode == 0, done.stderr
    return {s["id"]: s for s in json.loads(done.stdout)["saes"]}


def curl(sae: dict[str, Any], path: str, body: Any = None) -> tuple[int, Any]:
    """One request as ``sae`` to its KME; (HTTP status, parsed JSON body)."""
    args = ["curl", "--silent", "--show-error", "--max-time", "30"]
    args += ["--cert", sae["cert"], "--key", sae["key"], "--cacert", sae["ca_cert"]]
    args += ["--write-out", "\n%{http_code}"]
    if body is not None:
        args += ["--header", "Content-Type: application/json", "--data", json.dumps(body)]
    done = subprocess.run(
        [*args, sae["etsi014_base_url"] + path], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"curl exit {done.returncode}: {done.stderr}"
    text, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(text)


def test_curl_gets_the_same_keys_at_both_ends(saes):
    master, slave = saes[MASTER], saes[SLAVE]
    code, status = curl(master, f"/{SLAVE}/status")
    assert code == 200 and status["slave_SAE_ID"] == SLAVE and status["master_SAE_ID"] == MASTER
    code, issued = curl(master, f"/{SLAVE}/enc_keys?number=3&size=512")
    assert code == 200 and len(issued["keys"]) == 3, issued
    ids = [k["key_ID"] for k in issued["keys"]]
    code, first = curl(slave, f"/{MASTER}/dec_keys?key_ID={ids[0]}")
    assert code == 200 and first["keys"] == issued["keys"][:1]
    code, rest = curl(slave, f"/{MASTER}/dec_keys", {"key_IDs": [{"key_ID": i} for i in ids[1:]]})
    assert code == 200 and rest["keys"] == issued["keys"][1:]
    code, again = curl(slave, f"/{MASTER}/dec_keys?key_ID={ids[0]}")
    assert code == 401 and set(again) <= {"message", "details"}, again  # handed out: §5.4


def test_curl_sees_the_014_rules_to_the_letter(saes):
    """Issue 16 A2-A5 through curl: URL-encoded SAE IDs, the 401s of §5.4 and of a pair
    not served, and the messages the standard fixes."""
    master, slave = saes[MASTER], saes[SLAVE]
    encoded = SLAVE.replace("-", "%2D")
    code, status = curl(master, f"/{encoded}/status")
    assert code == 200 and status["slave_SAE_ID"] == SLAVE, status
    code, issued = curl(master, f"/{encoded}/enc_keys")
    assert code == 200, issued
    key_id = issued["keys"][0]["key_ID"]
    code, err = curl(master, f"/{MASTER}/status")  # itself as its slave
    assert code == 401 and set(err) == {"message", "details"}, err
    code, err = curl(master, f"/{SLAVE}/dec_keys?key_ID={key_id}")  # not the slave of it
    assert code == 401, err
    code, err = curl(master, f"/{SLAVE}/enc_keys?size=100")
    assert code == 400 and err["message"] == "size shall be a multiple of 8", err
    code, err = curl(master, f"/{SLAVE}/enc_keys", {"extension_mandatory": [{"x_route": 1}]})
    assert code == 400, err
    assert err["message"] == "not all extension_mandatory parameters are supported", err
    code, err = curl(master, "/sae%2/status")
    assert code == 400 and err["details"][0]["code"] == "SAE-ID-ENCODING", err
    code, got = curl(slave, f"/{MASTER.replace('-', '%2d')}/dec_keys?key_ID={key_id}")
    assert code == 200 and got["keys"] == issued["keys"], got


def curl_tls(sae: dict[str, Any], *options: str, cert: bool = True) -> subprocess.CompletedProcess:
    """curl with TLS ``options`` for the SAE's status (with or without its certificate)."""
    args = ["curl", "--silent", "--show-error", "--max-time", "30", "--cacert", sae["ca_cert"]]
    if cert:
        args += ["--cert", sae["cert"], "--key", sae["key"]]
    url = sae["etsi014_base_url"] + f"/{SLAVE}/status"
    return subprocess.run([*args, *options, url], capture_output=True, text=True, timeout=60)


def test_curl_speaks_tls_12_and_13_and_hears_why_it_is_refused(saes):
    """Issue 16 A8 on a running network: TLS 1.2 and 1.3 both served by default; no
    certificate: the certificate_required alert, which curl reports."""
    master = saes[MASTER]
    for options in (("--tlsv1.2", "--tls-max", "1.2"), ("--tlsv1.3",)):
        done = curl_tls(master, *options)
        assert done.returncode == 0 and json.loads(done.stdout)["slave_SAE_ID"] == SLAVE, done
    refused = curl_tls(master, "--tlsv1.3", cert=False)
    assert refused.returncode != 0 and "certificate required" in refused.stderr, refused.stderr


def test_keys_shared_with_more_slaves_are_fetched_once_by_each_and_by_no_one_else(saes):
    """Issue 16 A7 (Annex B): the master names two more slaves, at two other UKMSs (one of
    them its own); all three fetch identical bits (with curl and with etsi-qkd-014-client),
    each once; a third SAE of the user gets 401 (§5.4), and so does a slave asking twice."""
    master, slave, slave_2, third = saes[MASTER], saes[SLAVE], saes[SLAVE_2], saes[THIRD]
    code, status = curl(master, f"/{SLAVE}/status")
    assert code == 200 and status["max_SAE_ID_count"] >= 2, status
    body = {"number": 2, "size": 256, "additional_slave_SAE_IDs": [SLAVE_2, SLAVE_3]}
    code, issued = curl(master, f"/{SLAVE}/enc_keys", body)
    assert code == 200 and len(issued["keys"]) == 2, issued
    ids = [k["key_ID"] for k in issued["keys"]]
    wanted = {"key_IDs": [{"key_ID": i} for i in ids]}
    for who in (slave, saes[SLAVE_3]):
        code, got = curl(who, f"/{MASTER}/dec_keys", wanted)
        assert code == 200 and got["keys"] == issued["keys"], got
    for key in issued["keys"]:  # the second slave, through its own UKMS, unmodified client
        out = qkd014(slave_2, "get_key_with_id", key["key_ID"], MASTER)
        assert f"Key id : {key['key_ID']}" in out and f"Key : {key['key']}" in out, out
    code, err = curl(third, f"/{MASTER}/dec_keys", wanted)
    assert code == 401 and set(err) == {"message", "details"}, err
    for who in (slave, slave_2, saes[SLAVE_3]):
        code, err = curl(who, f"/{MASTER}/dec_keys?key_ID={ids[0]}")
        assert code == 401, err  # each slave fetches a key once
    assert "Response code : 401" in qkd014(slave_2, "get_key_with_id", ids[1], MASTER)
    # a slave the master is not paired with, or named twice: refused before any key is made
    for also, status_code in (([MASTER], 400), ([SLAVE_2, SLAVE_2], 400), (["sae-nowhere"], 401)):
        body = {"additional_slave_SAE_IDs": also}
        code, err = curl(master, f"/{SLAVE}/enc_keys", body)
        assert code == status_code and set(err) == {"message", "details"}, (also, err)


def qkd014(sae: dict[str, Any], *args: str) -> str:
    """``etsi-qkd-014-client`` (PyPI), unmodified, as ``sae``; its standard output."""
    client = Path(sys.executable).with_name("qkd014-client")
    if not client.exists():
        pytest.fail("etsi-qkd-014-client is a dev dependency; it should be installed")
    host = sae["etsi014_base_url"].split("://", 1)[1].split("/", 1)[0]
    command = [str(client), "-H", host, "-c", sae["cert"], "-k", sae["key"], "-r", sae["ca_cert"]]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
    return done.stdout


def curl_many(sae: dict[str, Any], paths: list[str], *options: str) -> list[tuple[str, int, Any]]:
    """Requests as ``sae`` in one curl run (with ``--parallel``: streams of one connection
    when HTTP/2 is chosen); (HTTP version, status, parsed JSON body) for each, in order."""
    args = ["curl", "--silent", "--show-error", "--max-time", "30", *options]
    args += ["--cert", sae["cert"], "--key", sae["key"], "--cacert", sae["ca_cert"]]
    args += ["--write-out", "%{filename_effective} %{http_version} %{http_code}\n"]
    with tempfile.TemporaryDirectory() as tmp:
        for n, path in enumerate(paths):
            args += ["--output", f"{tmp}/{n}.json", sae["etsi014_base_url"] + path]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"curl exit {done.returncode}: {done.stderr}"
        seen = dict(line.split(" ", 1) for line in done.stdout.splitlines())
        out = []
        for n in range(len(paths)):
            name = f"{tmp}/{n}.json"
            version, code = seen[name].split()
            out.append((version, int(code), json.loads(Path(name).read_text())))
    return out


def test_curl_speaks_http2_and_http11_on_the_same_port(saes):
    """Issue 16 A9: HTTP/2 by ALPN beside HTTP/1.1 on the 014 port. Several enc_keys on
    the streams of one HTTP/2 connection; the slave fetches over HTTP/2 and over HTTP/1.1,
    the same bits, each key once."""
    master, slave = saes[MASTER], saes[SLAVE]
    paths = [f"/{SLAVE}/enc_keys?number={n}" for n in (1, 2, 3, 2)]
    issued = curl_many(master, paths, "--http2", "--parallel", "--parallel-immediate")
    assert [(v, c) for v, c, _ in issued] == [("2", 200)] * 4, issued
    keys = [k for _, _, doc in issued for k in doc["keys"]]
    assert len({k["key_ID"] for k in keys}) == 8
    h2_half, h1_half = keys[:4], keys[4:]
    fetched = curl_many(slave, [f"/{MASTER}/dec_keys?key_ID={k['key_ID']}" for k in h2_half],
                        "--http2", "--parallel")  # fmt: skip
    assert [(v, c) for v, c, _ in fetched] == [("2", 200)] * 4, fetched
    assert [doc["keys"][0] for _, _, doc in fetched] == h2_half
    for key in h1_half:
        ((version, code, doc),) = curl_many(
            slave, [f"/{MASTER}/dec_keys?key_ID={key['key_ID']}"], "--http1.1"
        )
        assert (version, code, doc["keys"]) == ("1.1", 200, [key]), doc
    again = curl_many(slave, [f"/{MASTER}/dec_keys?key_ID={h2_half[0]['key_ID']}"], "--http2")
    assert [(v, c) for v, c, _ in again] == [("2", 401)]  # released once written over HTTP/2


def test_the_sae_command_gets_keys_for_additional_slaves(net, saes):
    """``qkdn sae get --also``: the same keys for a second slave, which fetches them with
    ``qkdn sae get-by-id``; an unknown SAE is a usage error in one line."""
    base = ("--dir", str(net.dir), "--json")
    got = qkdn("sae", "get", *base, "--sae", MASTER, "--slave", SLAVE, "--also", SLAVE_2)
    assert got.returncode == 0, got.stderr
    keys = json.loads(got.stdout)["keys"]
    fetched = qkdn("sae", "get-by-id", *base, "--sae", SLAVE_2, "--master", MASTER,
                   keys[0]["key_ID"])  # fmt: skip
    assert fetched.returncode == 0 and json.loads(fetched.stdout)["keys"] == keys, fetched.stderr
    bad = qkdn("sae", "get", *base, "--sae", MASTER, "--slave", SLAVE, "--also", "sae-nowhere")
    assert bad.returncode != 0 and "[USAGE]" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
