"""``qkdn net up|status|down``: the network as 16 supervised OS processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.kms.test_network_inprocess import call, free_base_port, sae_conn

QKDN = [sys.executable, "-m", "appliance.cli"]
SLOW_START = ("--timeout", "240")
"""A loaded 2-core machine starts the 16 nodes and AAA slowly."""


def qkdn(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QKDN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[2],
    )


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    out = tmp_path_factory.mktemp("net")
    base = free_base_port()
    up = qkdn(
        "net", "up", "demoquandt", "--dir", str(out), "--base-port", str(base), "--json",
        *SLOW_START, timeout=300,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    yield out, json.loads(up.stdout)
    qkdn("net", "down", "--dir", str(out))


def ports(doc: dict) -> tuple[int, int]:
    urls = {s["id"]: s["etsi014_base_url"] for s in doc["saes"]}
    port = lambda u: int(u.split(":")[2].split("/")[0])  # noqa: E731
    return port(urls["sae-berlin-1"]), port(urls["sae-bonn-1"])


def get_key_pair(out: Path, doc: dict) -> None:
    pa, pb = ports(doc)
    status, keys = call(
        sae_conn(out, "sae-berlin-1", pa), "GET", "/api/v1/keys/sae-bonn-1/enc_keys?number=2"
    )
    assert status == 200, keys
    ids = ",".join(k["key_ID"] for k in keys["keys"])
    status, got = call(
        sae_conn(out, "sae-bonn-1", pb),
        "POST",
        "/api/v1/keys/sae-berlin-1/dec_keys",
        {"key_IDs": [{"key_ID": i} for i in ids.split(",")]},
    )
    assert status == 200 and got["keys"] == keys["keys"]


def test_every_node_runs_and_status_lists_endpoints(net):
    out, doc = net
    status = json.loads(qkdn("net", "status", "--dir", str(out), "--json").stdout)
    assert len(status["nodes"]) == 16 and all(n["alive"] for n in status["nodes"])
    ukms = [n for n in status["nodes"] if "etsi014_base_url" in n]
    assert {n["name"] for n in ukms} == {"ukms-berlin", "ukms-bonn"}
    for sae in status["saes"]:
        assert (
            Path(sae["cert"]).exists()
            and Path(sae["key"]).exists()
            and Path(sae["ca_cert"]).exists()
        )
    get_key_pair(out, doc)


def test_without_a_controller_no_node_serves_an_sdn_agent(net):
    # gNMI is for the QKDN Controller (`net up --controller`, tests/control): a plain
    # network's CKMS processes leave their configured gnmi ports closed, and status says so
    out, _doc = net
    status = json.loads(qkdn("net", "status", "--dir", str(out), "--json").stdout)
    assert not any("gnmi" in n["endpoints"] for n in status["nodes"])
    rendered = [tomllib.loads(p.read_text()) for p in sorted((out / "nodes").glob("*.toml"))]
    gnmi = [c["listen"]["gnmi"] for c in rendered if "gnmi" in c.get("listen", {})]
    assert len(gnmi) == 15  # every CKMS and the controller's own (not started)
    for address in gnmi:
        host, port = address.rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=10).close()


def test_a_killed_node_is_restarted_and_relays_resume(net):
    out, doc = net
    victim = next(n for n in doc["nodes"] if n["name"] == "ckms-hannover")
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = json.loads(qkdn("net", "status", "--dir", str(out), "--json").stdout)
        node = next(n for n in status["nodes"] if n["name"] == "ckms-hannover")
        if node["alive"] and node["restarts"] >= 1 and node["pid"] != victim["pid"]:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the killed node was not restarted")
    for _ in range(40):  # the restarted node needs a moment to listen again
        try:
            get_key_pair(out, doc)
            return
        except AssertionError:
            time.sleep(0.5)
    pytest.fail("relays did not resume after the restart")


def test_down_stops_every_process(tmp_path):
    """(Started with --no-aaa: the operator's opt-out leaves the AAA device out.)"""
    base = free_base_port()
    up = qkdn(
        "net", "up", "--dir", str(tmp_path), "--base-port", str(base), "--json", "--no-aaa",
        *SLOW_START, timeout=300,
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    doc = json.loads(up.stdout)
    assert doc["aaa"] is None and not (tmp_path / "aaa").exists()
    pids = [n["pid"] for n in doc["nodes"]]
    again = qkdn("net", "up", "--dir", str(tmp_path), "--base-port", str(base))
    assert again.returncode == 1 and "already running" in again.stderr
    assert qkdn("net", "down", "--dir", str(tmp_path)).returncode == 0
    for pid in pids:  # down returns once every node has exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_split_access_nodes_serve_keys_and_a_removed_directory_stops_all(tmp_path):
    """With --split-access each access node runs its AKMS and CKMS as two processes, and
    keys cross end to end. A test run that then deletes its temporary directory must not
    leave node processes behind."""
    import shutil

    from appliance.tkey import endpoints, measure

    net_dir = tmp_path / "net"
    base = str(free_base_port())
    up = qkdn(
        "net",
        "up",
        "--dir",
        str(net_dir),
        "--base-port",
        base,
        "--split-access",
        "--stock",
        "0",
        "--json",
        *SLOW_START,
        timeout=300,
    )
    assert up.returncode == 0, up.stderr
    doc = json.loads(up.stdout)
    assert {n["name"]: len(n["pids"]) for n in doc["nodes"] if "akms" in n["role"]} == {
        "akms-berlin": 2,
        "akms-bonn": 2,
    }
    result = measure(*endpoints(doc, "sae-berlin-1", "sae-bonn-1"), 3)
    assert result["keys_matched"] == 3 and result["failed_requests"] == 0
    pids = [pid for n in doc["nodes"] for pid in n["pids"]]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        shutil.rmtree(net_dir, ignore_errors=True)  # nodes may still write while it goes
        time.sleep(0.2)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie awaiting its parent is gone too
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_third_party_014_client_gets_the_same_key_at_both_ends(net):
    """Interoperability: etsi-qkd-014-client (PyPI), unmodified, as SAE Berlin and SAE Bonn."""
    out, doc = net
    client = Path(sys.executable).with_name("qkd014-client")
    if not client.exists():
        pytest.fail("etsi-qkd-014-client is a dev dependency; it should be installed")
    pa, pb = ports(doc)
    saes = out / "pki" / "saes"

    def run(sae: str, port: int, *args: str, code: int = 200) -> str:
        result = subprocess.run(
            [
                str(client),
                "-H",
                f"127.0.0.1:{port}",
                "-c",
                str(saes / f"{sae}.pem"),
                "-k",
                str(saes / f"{sae}.key"),
                "-r",
                str(out / "pki" / "ca.pem"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert f"Response code : {code}" in result.stdout, (result.stdout, result.stderr)
        assert code != 200 or result.returncode == 0, result.stderr
        return result.stdout

    assert "target_KME_ID : ukms-bonn" in run("sae-berlin-1", pa, "get_status", "sae-bonn-1")
    issued = run("sae-berlin-1", pa, "get_key", "sae-bonn-1")
    key_id = issued.split("Key id : ")[1].split()[0]
    key = issued.split("Key : ")[1].split()[0]
    fetched = run("sae-bonn-1", pb, "get_key_with_id", key_id, "sae-berlin-1")
    assert f"Key id : {key_id}" in fetched and f"Key : {key}" in fetched
    # issue 16 A2, A3: itself as its peer, and a key it was not given (or not any more)
    run("sae-berlin-1", pa, "get_status", "sae-berlin-1", code=401)
    run("sae-berlin-1", pa, "get_key_with_id", key_id, "sae-bonn-1", code=401)
    run("sae-bonn-1", pb, "get_key_with_id", key_id, "sae-berlin-1", code=401)


def test_the_sae_command_gets_keys_and_reports_errors_in_one_line(net):
    out, _ = net
    got = qkdn(
        "sae",
        "get",
        "--dir",
        str(out),
        "--sae",
        "sae-berlin-1",
        "--slave",
        "sae-bonn-1",
        "--number",
        "2",
        "--json",
    )
    assert got.returncode == 0, got.stderr
    keys = json.loads(got.stdout)["keys"]
    ids = [k["key_ID"] for k in keys]
    table = qkdn(
        "sae",
        "get-by-id",
        "--dir",
        str(out),
        "--sae",
        "sae-bonn-1",
        "--master",
        "sae-berlin-1",
        *ids,
    )
    assert table.returncode == 0 and ids[0] in table.stdout
    assert keys[0]["key"] not in table.stdout  # people see fingerprints, not keys
    again = qkdn(
        "sae",
        "get-by-id",
        "--dir",
        str(out),
        "--sae",
        "sae-bonn-1",
        "--master",
        "sae-berlin-1",
        ids[0],
    )
    assert again.returncode == 1 and again.stderr.startswith("qkdn: error [SAE-HTTP-401]: ")
    assert again.stderr.count("\n") == 1
    unknown = qkdn("sae", "status", "--dir", str(out), "--sae", "sae-nowhere", "--slave", "x")
    assert unknown.returncode == 1 and "unknown SAE" in unknown.stderr
