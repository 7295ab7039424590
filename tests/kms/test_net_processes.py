"""``qkdn net up|status|down``: the network as 16 supervised OS processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kms.test_network_inprocess import call, free_base_port, sae_conn

QKDN = [sys.executable, "-m", "appliance.cli"]


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
    up = qkdn("net", "up", "demoquandt", "--dir", str(out), "--base-port", str(base), "--json")
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
    base = free_base_port()
    up = qkdn("net", "up", "--dir", str(tmp_path), "--base-port", str(base), "--json")
    assert up.returncode == 0, up.stderr
    pids = [n["pid"] for n in json.loads(up.stdout)["nodes"]]
    again = qkdn("net", "up", "--dir", str(tmp_path), "--base-port", str(base))
    assert again.returncode == 1 and "already running" in again.stderr
    assert qkdn("net", "down", "--dir", str(tmp_path)).returncode == 0
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
