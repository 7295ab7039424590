"""The management plane of a running network (``qkdn net up --controller``, with its AAA
device and the manager polling every 3 s, one network for the module): each role's agent
answers net-snmp, the manager's CLI and /metrics, and the operator's web page in headless
Chromium (log in, the map, a link fault's alarm, acknowledge, refusals, the T_key and
accounting panels filled by the keys an SAE took, and none of those keys or their IDs on
the page); the manager tells the QKDN Controller of the cut link, and the controller's
telemetry and both ends' agents make one alarm of it.
"""

from __future__ import annotations

import json
import ssl
import tempfile
import tomllib
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.control.linkfault import inject
from appliance.snmp.usm import Credentials
from tests.kms.conftest import Net, poll, qkdn, running_net
from tests.kms.test_interop import TOPOLOGY as INTEROP
from tests.mgmt.snmp_fixture import snmp

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAULTY = "link-2-8"
TOPOLOGY = (
    INTEROP.replace("[[links]]\na = 2\nb = 3\n", "[[links]]\na = 2\nb = 8\n")
    + """
[[links]]
a = 8
b = 3
length_km = 20.0

[[nodes]]
id = 8
name = "ckms-middle"
site = "Middle"
role = "ckms"

[[nodes]]
id = 9
name = "qkdn-manager"
site = "Data centre"
role = "manager"

[[nodes]]
id = 10
name = "qkdn-controller"
site = "Data centre"
role = "controller"

[[nodes]]
id = 11
name = "aaa"
site = "Data centre"
role = "aaa"
"""
)
NODES = TOPOLOGY.count("[[nodes]]") - 3
"""The KMS nodes (every node but the manager, the controller and AAA): the inventory lists
each."""
MASTER, SLAVE, USER = "sae-east-1", "sae-west-1", "encryptors"
"""An SAE pair of the topology's user: its keys fill the T_key and accounting panels."""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    folder = tmp_path_factory.mktemp("topology")
    (folder / "mgmt.toml").write_text(TOPOLOGY)
    topology = str(folder / "mgmt.toml")
    options = ("--timeout", "240", "--controller", "--mgmt-poll", "3")
    with running_net(tmp_path_factory, *options, topology=topology) as running:
        yield running


def manager_cfg(net: Net) -> dict[str, Any]:
    return tomllib.loads((net.dir / "mgmt" / "manager.toml").read_text())


def operators(net: Net) -> dict[str, str]:
    lines = (net.dir / "mgmt" / "operators.txt").read_text().splitlines()
    return {line.split()[0]: line.split()[1] for line in lines if not line.startswith("#")}


def web_url(net: Net) -> str:
    return f"https://{manager_cfg(net)['web']}"


def fetch(net: Net, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(net.dir / "pki" / "ca.pem"))
    ctx.check_hostname = False
    req = urllib.request.Request(web_url(net) + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_each_roles_agent_answers_net_snmp_in_authpriv(net: Net):
    agents = {a["name"]: a for a in manager_cfg(net)["agents"]}
    for name, role in (("ukms-east", "ukms"), ("akms-east", "akmsCkms"), ("ckms-middle", "ckms")):
        agent = agents[name]
        user = Credentials(**agent["poll"])
        walk = snmp("snmpbulkwalk", agent["address"], "QKDN-MIB::qkdnMIB", user=user)
        assert walk.returncode == 0, walk.stderr
        assert f"qkdnNodeRole.0 = INTEGER: {role}" in walk.stdout
        assert (
            "qkdnLinkState." in walk.stdout
            and "qkdnRngHealth.0 = INTEGER: healthy(2)" in walk.stdout
        )
        node = tomllib.loads((net.dir / "mgmt" / f"node-{name}.toml").read_text())
        monitor = Credentials(**{k: node["users"][1][k] for k in ("user", "auth", "priv")})
        got = snmp("snmpget", agent["address"], "QKDN-MIB::qkdnNodeName.0", user=monitor)
        assert f'"{name}"' in got.stdout
        denied = snmp("snmpget", agent["address"], "QKDN-MIB::qkdnKmsRequests.0", user=monitor)
        assert "No Such Object" in denied.stdout


def test_the_manager_knows_every_node_and_serves_metrics_to_operators_only(net: Net):
    def inventory() -> list[dict[str, Any]] | None:
        out = qkdn("manager", "inventory", "--json", "--dir", str(net.dir))
        rows = json.loads(out.stdout) if out.returncode == 0 else []
        return rows if len(rows) == NODES and all(r["reachable"] for r in rows) else None

    rows = poll(inventory, "every node reachable in the inventory", 120)
    assert {r["role"] for r in rows} == {"ukms", "akmsCkms", "ckms"}
    assert all(r["software"].startswith("qkdn ") and r["cert_expiry"] for r in rows)
    assert fetch(net, "/metrics")[0] == 401
    bad = b64encode(b"viewer:wrong").decode()
    assert fetch(net, "/metrics", {"authorization": f"Basic {bad}"})[0] == 401
    good = b64encode(f"viewer:{operators(net)['viewer']}".encode()).decode()
    status, text = fetch(net, "/metrics", {"authorization": f"Basic {good}"})
    assert status == 200 and "# TYPE qkdn_link_up gauge" in text
    assert f'qkdn_link_up{{link="{FAULTY}",node="ckms-middle"}} 1' in text


def _login(page: Any, net: Net, user: str, password: str) -> None:
    page.goto(web_url(net) + "/")
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#submit")


def test_the_operator_page_shows_a_link_fault_and_takes_an_acknowledgement(net: Net):
    from playwright.sync_api import sync_playwright

    pw = operators(net)
    taken = net.enc_keys(MASTER, SLAVE, number=2)  # T_key at ukms-east, accounted by AAA
    assert taken.status == 200, taken.body
    issued = [v for k in taken.json()["keys"] for v in (k["key_ID"], k["key"])]
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path="/usr/bin/chromium",
            headless=True,
            args=CHROMIUM_ARGS,
            ignore_https_errors=True,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = ctx.new_page()
            _login(page, net, "operator", "not-the-password")
            page.wait_for_selector("#error", timeout=30_000)
            _login(page, net, "operator", pw["operator"])
            page.wait_for_selector(
                f'line[data-link="{FAULTY}"][data-state="up"]', timeout=60_000, state="attached"
            )
            assert page.locator("line.link").count() == TOPOLOGY.count("[[links]]")
            before = max((a["id"] for a in all_alarms(net)), default=0)
            inject(net.dir, 2, 8, "down")  # qkdn net fault link 2-8 down
            row = f'#alarms tr[data-resource="{FAULTY}"]'
            page.wait_for_selector(row, timeout=20_000)  # pushed by server-sent events
            held = poll(lambda: held_by_manager(net), "the controller holds link 2-8 down", 60)
            assert held["usable"] is False
            page.wait_for_selector(
                f'line[data-link="{FAULTY}"][data-state="down"]', timeout=20_000, state="attached"
            )
            assert "major" in page.inner_text(row)
            page.click(f"{row} button.ack")
            page.wait_for_selector(f"{row}.acked", timeout=20_000)
            assert "by operator" in page.inner_text(row)
            shot = net.dir / "operator-page.png"  # docs/mgmt-operator-page.png is one of these
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            panels(page)
            content = page.content()
            assert "key_id" not in content.lower()
            assert not [x for x in issued if x in content]  # no key, no key ID
            cookie = next(c for c in ctx.cookies() if c["name"] == "qkdn_session")
            assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
            page.click("text=Log out")
            page.wait_for_selector("#login", timeout=30_000)
            old = {"cookie": f"qkdn_session={cookie['value']}"}
            assert fetch(net, "/api/state", old)[0] == 401  # a closed session is refused
            # both ends and the controller report the fault, each in its own time (one end
            # heard its module 1.1 s after the cut once, after this page's steps were done)
            poll(lambda: reported(net, before) >= 3, "three reports of the link's fault", 30)
            inject(net.dir, 2, 8, "up")
            _login(page, net, "viewer", pw["viewer"])
            page.wait_for_selector(
                f'line[data-link="{FAULTY}"][data-state="up"]', timeout=60_000, state="attached"
            )
            assert page.locator("button.ack").count() == 0
        finally:
            ctx.close()
    [alarm] = [a for a in all_alarms(net) if a["resource"] == FAULTY and a["id"] > before]
    assert alarm["acked_by"] == "operator" and alarm["cleared"] and alarm["reports"] >= 3
    # both ends' agents and the controller's telemetry: one alarm (docs/mgmt.md)
    assert set(alarm["sources"].split(",")) == {"akms-east", "ckms-middle", "qkdn-controller"}
    poll(lambda: released(net), "the manager's hold released (the agents report it up)", 60)


def panels(page: Any) -> None:
    """The T_key panel charts ukms-east (the enc_keys it served) and the accounting panel
    has the user's row, with the keys AAA allowed: live data, read by the manager's polls
    and pushed to the page."""
    page.wait_for_selector('#node-pick option[value="ukms-east"]', timeout=60_000, state="attached")
    page.select_option("#node-pick", "ukms-east")
    page.wait_for_selector("#chart-tkey polyline", timeout=60_000, state="attached")
    page.wait_for_selector("#chart-tkey99 polyline", timeout=20_000, state="attached")
    row = f'#accounting tr[data-user="{USER}"]'
    page.wait_for_selector(row, timeout=60_000, state="attached")
    cells = page.locator(f"{row} td").all_inner_texts()
    assert cells[0] == USER and int(cells[2]) >= 1 and int(cells[3]) >= 2, cells


def reported(net: Net, before: int) -> int:
    """The reports of the fault's alarm on the faulty link raised after alarm ``before``."""
    rows = [a for a in all_alarms(net) if a["resource"] == FAULTY and a["id"] > before]
    return max((int(a["reports"]) for a in rows), default=0)


def all_alarms(net: Net) -> list[dict[str, Any]]:
    out = qkdn("manager", "alarms", "--all", "--json", "--dir", str(net.dir))
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def controller_links(net: Net) -> list[dict[str, Any]] | None:
    """The controller's links (``qkdn controller routes --json``: its own process, as the
    browser's event loop runs in this thread); None while it does not answer."""
    out = qkdn("controller", "routes", "--json", "--dir", str(net.dir))
    if out.returncode != 0:
        return None
    links: list[dict[str, Any]] = json.loads(out.stdout)["links"]
    return links


def released(net: Net) -> bool:
    links = controller_links(net)
    return links is not None and not any({x["a"], x["b"]} == {2, 8} and x["manager"] for x in links)


def held_by_manager(net: Net) -> dict[str, Any] | None:
    """Link 2-8 in the controller's graph if the manager holds it down."""
    doc = {"links": controller_links(net) or []}
    rows = [x for x in doc["links"] if {x["a"], x["b"]} == {2, 8} and x["manager"]]
    return rows[0] if rows else None
