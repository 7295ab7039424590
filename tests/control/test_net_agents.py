"""Every CKMS node of a running DemoQuanDT network serves its SDN agent: gNMI over mutual
TLS with the network's certificates, a document valid under the 015 model and our augment,
the node's physical links with their peers, and relay counters that move with relays."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.control import model
from appliance.control.client import AgentClient, AgentUnavailable
from tests.control.agentfix import data_model, validate
from tests.kms.conftest import Net, poll, running_net


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    with running_net(tmp_path_factory) as network:
        yield network


def agents(net: Net) -> dict[str, tuple[int, str]]:
    """CKMS node name -> (node ID, gNMI address), from the rendered configurations."""
    out = {}
    for entry in net.status()["nodes"]:
        cfg = net.config(entry["name"])
        if "gnmi" in cfg.get("listen", {}):
            out[entry["name"]] = (cfg["node"]["id"], cfg["listen"]["gnmi"])
    return out


def client(net: Net, name: str, address: str) -> AgentClient:
    cert, key, ca = net.pki("nodes", name)
    return AgentClient(address, cert=cert, key=key, ca=ca, timeout=30.0)


def test_every_ckms_node_serves_a_valid_015_document(net):
    found = agents(net)
    carriers = {n["name"] for n in net.status()["nodes"] if "ckms" in n["role"]}
    assert carriers and set(found) == carriers
    dm = data_model()
    for name, (node, address) in found.items():
        doc = read(net, name, address)
        validate(dm, {"etsi-qkd-sdn-node:qkd_node": doc})
        assert doc["qkdn_id"] == model.node_uuid(node)
        links = doc["qkd_links"]["qkd_link"]
        assert links and all(x["qkdl_local"]["qkdn_id"] == model.node_uuid(node) for x in links)
        statuses = {x["qkdl_status"] for x in links}
        assert statuses <= {f"etsi-qkd-node-types:{s}" for s in ("ACTIVE", "PASSIVE", "OFF")}
    virtual = read(net, "ckms-virtual", found["ckms-virtual"][1])
    peers = {x["qkdl_remote"]["qkdn_id"] for x in virtual["qkd_links"]["qkd_link"]}
    assert peers == {model.node_uuid(8), model.node_uuid(10)}


def read(net: Net, name: str, address: str):  # type: ignore[no-untyped-def]
    """The node's whole document, once its agent answers (bounded polling)."""
    c = client(net, name, address)
    try:
        return poll(lambda: _get(c), f"{name}'s agent answers")[0]
    finally:
        c.close()


def _get(c: AgentClient):  # type: ignore[no-untyped-def]
    try:
        return c.get("/qkd_node")
    except AgentUnavailable:
        return None


def test_relay_counters_move_with_relays(net):
    found = agents(net)

    def relayed() -> int:
        docs = [read(net, name, address) for name, (_, address) in found.items()]
        return sum(int(d["qkdn-control:relay_counters"]["relayed"]) for d in docs)

    before = relayed()
    net.wait_for_relays("sae-berlin-1", "sae-bonn-1")
    poll(lambda: relayed() > before, "relay counters move")


def test_a_node_certificate_of_another_network_is_refused(net, pki):
    name, (_, address) = next(iter(agents(net).items()))
    who = pki["intruder"]
    c = AgentClient(address, cert=who.cert, key=who.key, ca=net.pki("nodes", name)[2],
                    timeout=10.0)  # fmt: skip
    try:
        with pytest.raises(AgentUnavailable):
            c.get("/qkd_node/qkdn_id")
    finally:
        c.close()
