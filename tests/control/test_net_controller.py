"""A DemoQuanDT network under its QKDN Controller (``net up --controller --stock 0``:
every enc_keys crosses the network on a path the controller installed).

One network for the module. The fault test takes the primary path's link next to node 8
down in the middle of a run of key requests: no key is lost, duplicated or mismatched,
every request succeeds or gets a clean 503, and new relays go the other way round node 8
(through node 9 or virtual node 16). Then: the controller killed, installed routes go on
and it rebuilds them from the agents; no UKMS talks to the controller. And every CKMS
node's SDN agent serves a valid 015 document over mutual TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.cli.controller import ask_routes
from appliance.control import model
from appliance.control.client import AgentClient, AgentUnavailable
from appliance.control.faultrun import current_cut
from appliance.control.linkfault import inject
from appliance.errors import ApplianceError
from appliance.kms import netproc
from tests.control.agentfix import data_model, validate
from tests.kms.conftest import Net, poll, running_net

REQUESTS = 240
MASTER, SLAVE = "sae-berlin-1", "sae-bonn-1"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    # the key path (AAA included); the node agents and the manager are tests/mgmt's
    with running_net(tmp_path_factory, "--controller", "--stock", "0", "--no-mgmt") as network:
        yield network


def routes(net: Net) -> dict[str, Any]:
    return asyncio.run(ask_routes(net.dir))


def primary(net: Net) -> list[int]:
    """The path installed between the access nodes (2, 14), either way, once there is one:
    the relay runs from the CKMS that serves the keys' way across."""

    def found() -> list[int] | None:
        try:
            doc = routes(net)
        except ApplianceError:  # the controller is (re)starting
            return None
        for r in doc["routes"]:
            if {r["src"], r["dst"]} == {2, 14}:
                return list(r["path"])
        return None

    return poll(found, "a path installed between 2 and 14")


def installed(net: Net) -> dict[tuple[int, int], tuple[int, ...]]:
    """Every installed route the controller knows, by (source, destination)."""
    try:
        doc = routes(net)
    except ApplianceError:  # the controller is (re)starting
        return {}
    return {(r["src"], r["dst"]): tuple(r["path"]) for r in doc["routes"]}


def round_8(path: list[int]) -> int:
    """The node the path takes between 8 and 10: 9, or virtual node 16."""
    return next(n for n in path if n in (9, 16))


def run_requests(
    net: Net, count: int, halfway: Any = None, until: Any = None, most: int = 3000
) -> dict[str, Any]:
    """``count`` enc_keys of one key each, ``halfway()`` before the middle one, and more
    until ``until()`` holds (looked at every ten requests; at most ``most`` in all). Every
    key the master got is then fetched by the slave: the report counts what went wrong."""
    statuses: dict[int, int] = {}
    failed: list[tuple[int, str]] = []
    keys: dict[str, str] = {}
    duplicated = 0
    for i in range(most):
        if i >= count and (until is None or (i % 10 == 0 and until())):
            break
        if halfway is not None and i == count // 2:
            halfway()
        got = net.enc_keys(MASTER, SLAVE)
        statuses[got.status] = statuses.get(got.status, 0) + 1
        if got.status != 200:
            failed.append((got.status, got.body.decode(errors="replace")[:200]))
            continue
        for key in got.json()["keys"]:
            duplicated += key["key_ID"] in keys
            keys[key["key_ID"]] = key["key"]
    lost = mismatched = 0
    ids = list(keys)
    for start in range(0, len(ids), 20):
        batch = ids[start : start + 20]
        answer = net.dec_keys(SLAVE, MASTER, batch)
        if answer.status != 200:
            lost += len(batch)
            continue
        got = {k["key_ID"]: k["key"] for k in answer.json()["keys"]}
        lost += sum(1 for k in batch if k not in got)
        mismatched += sum(1 for k in batch if k in got and got[k] != keys[k])
    return {"statuses": statuses, "failed": failed, "keys": len(keys), "lost": lost,
            "duplicated": duplicated, "mismatched": mismatched}  # fmt: skip


def test_a_link_killed_mid_run_loses_no_key_and_relays_go_round(net):
    net.wait_for_relays(MASTER, SLAVE)
    primary(net)
    cuts: list[tuple[int, int]] = []

    def fault() -> None:  # the route's link at the fault's time (routes move for keys)
        cuts.append(current_cut(net.dir))
        inject(net.dir, *cuts[0], "down")

    def other() -> int:
        return 16 if cuts[0][1] == 9 else 9

    try:
        report = run_requests(net, REQUESTS, fault, lambda: switched(net, other()))
        assert set(report["statuses"]) <= {200, 503}, report["failed"]
        assert all(json.loads(body)["message"] for status, body in report["failed"]), report
        assert report["lost"] == report["duplicated"] == report["mismatched"] == 0, report
        assert report["statuses"].get(200, 0) >= REQUESTS // 4, report
        assert switched(net, other()), report  # the requests ran across the switch
        doc = routes(net)
        down = [x for x in doc["links"] if {x["a"], x["b"]} == set(cuts[0])]
        assert down and not down[0]["usable"]
        net.wait_for_relays(MASTER, SLAVE)  # and keys flow on the new path
        arrived = arrivals(net)  # the path's end logged the first over the new path
        assert any(round_8(path) == other() for path in arrived), arrived
    finally:
        for cut in cuts:
            inject(net.dir, *cut, "up")


def arrivals(net: Net) -> list[list[int]]:
    """The paths the CKMS at a path's end logged its pair's keys first arriving over."""
    found = []
    for log in (net.dir / "logs").glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"relays arrive over a new path"' in line:
                found.append([int(n) for n in json.loads(line)["path"].split("-")])
    return found


def switched(net: Net, other: int) -> bool:
    """The installed path between the access nodes goes through ``other`` now."""
    paths = [p for (s, d), p in installed(net).items() if {s, d} == {2, 14}]
    return any(round_8(list(p)) == other for p in paths)


def controller_pid(net: Net) -> int:
    state = netproc.ask_supervisor(net.dir) or {}
    return int(state.get("nodes", {}).get("controller", {}).get("pid", 0) or 0)


def test_installed_routes_go_on_without_the_controller_and_it_rebuilds_them(net):
    net.wait_for_relays(MASTER, SLAVE)
    primary(net)
    before = installed(net)
    pid = controller_pid(net)
    assert pid > 0
    os.kill(pid, 9)
    poll(lambda: controller_pid(net) != pid or None, "the supervisor saw the controller die")
    report = run_requests(net, 20)  # controller down or restarting: installed paths carry on
    assert report["statuses"] == {200: 20}, report["failed"]
    assert report["lost"] == report["duplicated"] == report["mismatched"] == 0
    poll(lambda: controller_pid(net) not in (0, pid) or None, "the controller restarted")
    # rebuilt from the agents: every pair routed before (the route may have moved since,
    # for key availability: the pair's path then joins its two nodes another way)
    rebuilt = poll(lambda: installed(net) if set(installed(net)) >= set(before) else None,
                   "routes rebuilt from agents")  # fmt: skip
    assert all(p[0] == s and p[-1] == d for (s, d), p in rebuilt.items())


def test_no_ukms_is_connected_to_the_controller_or_let_in(net):
    net.wait_for_relays(MASTER, SLAVE)
    api = next(c for c in map(net.config, ("qkdn-controller",)))["listen"]["api"]
    port = int(api.rsplit(":", 1)[1])
    for node in net.status()["nodes"]:
        if node["role"] == "ukms":
            for pid in node["pids"]:
                assert port not in remote_ports(pid), f"{node['name']} talks to the controller"
    refused = asyncio.run(ask_as(net, "ukms-berlin", api))
    assert refused == 403

    def let_in() -> bool | None:  # the access node's CKMS is let in and gets its path
        status = asyncio.run(ask_as(net, "akms-berlin", api))
        # 503 only while a controller just restarted (the test above) waits out the
        # hold-off of the links it has heard of again: usable only once it has held
        assert status in (200, 503), status
        return status == 200 or None

    poll(let_in, "a path for the access node's CKMS")


def test_a_path_request_carries_a_policy_class_and_nothing_of_the_contract(net):
    api = net.config("qkdn-controller")["listen"]["api"]

    def ask(policy: str, extra: str = "") -> int | None:
        body = f'{{"src": 3, "dst": 13, "route_policy": "{policy}"{extra}}}'.encode()
        status = asyncio.run(ask_as(net, "akms-berlin", api, body))
        assert status in (200, 400, 503), status  # 503: a just restarted controller
        return status if status != 503 else None

    assert poll(lambda: ask("fewest-hops"), "a fewest-hops path from 3 to 13") == 200
    (route,) = [r for r in routes(net)["routes"] if (r["src"], r["dst"]) == (3, 13)]
    assert route["route_policy"] == "fewest-hops"
    assert len(route["path"]) == 11 and route["path"][::10] == [3, 13]  # ten hops, the fewest
    assert ask("cheapest") == 400
    assert ask("balanced", ', "user": "alice"') == 400


def remote_ports(pid: int) -> set[int]:
    """Remote TCP ports of the process's sockets (from /proc: no tool needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


async def ask_as(net: Net, name: str, api: str, body: bytes = b'{"src": 2, "dst": 14}') -> int:
    from appliance.net.h2 import H2Client
    from appliance.pki import client_context

    cert, key, ca = net.pki("nodes", name)
    host, port = api.rsplit(":", 1)
    client = H2Client(host, int(port), client_context(cert, key, ca, ("h2",)), timeout=30.0)
    try:
        answer = await client.request("POST", "/v1/path", body)
    finally:
        await client.close()
    return answer.status


# -- the SDN agents of the running network -----------------------------------------
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
        links = phys(doc)
        assert links and all(x["qkdl_local"]["qkdn_id"] == model.node_uuid(node) for x in links)
        statuses = {x["qkdl_status"] for x in links}
        assert statuses <= {f"etsi-qkd-node-types:{s}" for s in ("ACTIVE", "PASSIVE", "OFF")}
    virtual = read(net, "ckms-virtual", found["ckms-virtual"][1])
    peers = {x["qkdl_remote"]["qkdn_id"] for x in phys(virtual)}
    assert peers == {model.node_uuid(8), model.node_uuid(10)}


def phys(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The physical links of a node's document (its VIRT links are installed routes)."""
    links = doc["qkd_links"]["qkd_link"]
    return [x for x in links if x["qkdl_type"] == "etsi-qkd-node-types:PHYS"]


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
