"""Supervision of a network of node processes (issue 13, items 1-3, 5, 19, 28).

What an operator must get from ``qkdn net``: nodes die with their supervisor, even by
``kill -9``, and the directory then starts again; ``net down`` stops a network whose state
file is missing or damaged; two starts on one directory cannot both succeed, and ports in
use are refused at once; a failed start leaves nothing running; a directory that holds
another topology is refused at once; a supervisor that cannot write its state file (a
kernel ENOSPC, from ``/dev/full``) keeps its nodes and says so in ``net status``.

The network is the smallest with a relay (UKMS, AKMS, AKMS, UKMS: four processes start
faster than sixteen). Tests that need it running start it if it is not (so that no test
depends on another's order). What runs is read from ``/proc`` (command lines naming the
directory, pids of the state file), not through the code under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.cli.net import DEFAULT_DIR, bring_down
from appliance.config.render import RenderPlan, find_free_base_port, render
from appliance.config.topology import load_topology
from tests.kms.conftest import QKDN, ROOT, Net, poll, qkdn
from tests.kms.test_interop import MASTER, SLAVE, TOPOLOGY


@dataclass
class Site:
    """A network directory, its topology file and its port plan."""

    dir: Path
    topology: Path
    base_port: int

    def up(self, *options: str) -> subprocess.CompletedProcess[str]:
        return qkdn(
            "net", "up", str(self.topology), "--dir", str(self.dir),
            "--base-port", str(self.base_port), "--stock", "0", *options,
        )  # fmt: skip

    def ensure_up(self) -> Net:
        net = Net(self.dir)
        if not (self.dir / "nodes").is_dir() or not net.status()["running"]:
            done = self.up()
            assert done.returncode == 0, done.stderr
        return net

    def state(self) -> dict:
        return json.loads((self.dir / "run" / "state.json").read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One network directory for the tests that need a running network."""
    files = tmp_path_factory.mktemp("topology")
    (files / "two-sites.toml").write_text(TOPOLOGY)
    here = Site(tmp_path_factory.mktemp("net"), files / "two-sites.toml", find_free_base_port())
    try:
        yield here
    finally:
        bring_down(here.dir)


def fresh_site(tmp_path: Path) -> Site:
    (tmp_path / "two-sites.toml").write_text(TOPOLOGY)
    return Site(tmp_path / "net", tmp_path / "two-sites.toml", find_free_base_port())


def running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (the supervisor, the nodes)."""
    found, want = [], str(path).encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            args = cmdline.split(b"\0")
            named = any(a == want or a.startswith(want + b"/") for a in args)
            if named and running(int(entry.name)):
                found.append(int(entry.name))
    return found


def node_pids(net: Net) -> dict[str, int]:
    return {n["name"]: n["pid"] for n in net.status()["nodes"]}


def error_code(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("qkdn: error ["), done.stderr
    return done.stderr.split("[", 1)[1].split("]", 1)[0]


# -- item 1: nodes die with their supervisor; down finds them without the state file ----
def test_a_killed_supervisor_takes_its_nodes_and_the_directory_starts_again(site: Site) -> None:
    net = site.ensure_up()
    pids = node_pids(net)
    os.kill(site.state()["supervisor_pid"], signal.SIGKILL)
    poll(
        lambda: not any(running(p) for p in pids.values()),
        f"the nodes {sorted(pids.values())} die with their supervisor",
        timeout=15,
    )
    down = qkdn("net", "down", "--dir", str(site.dir))
    assert down.returncode == 0 and "no network running" in down.stdout
    again = site.up()
    assert again.returncode == 0, again.stderr
    assert set(node_pids(net).values()).isdisjoint(pids.values())
    net.wait_for_relays(MASTER, SLAVE)


@pytest.mark.parametrize("damage", ["missing", "binary"])
def test_down_stops_a_network_whose_state_file_is_gone(site: Site, damage: str) -> None:
    net = site.ensure_up()
    pids = [*node_pids(net).values(), site.state()["supervisor_pid"]]
    state = site.dir / "run" / "state.json"
    if damage == "missing":
        state.unlink()
    else:
        state.write_bytes(b"\xff\xfe\x00{" + os.urandom(64))
    down = qkdn("net", "down", "--dir", str(site.dir))
    assert down.returncode == 0 and "network stopped" in down.stdout, down.stderr
    assert not [p for p in pids if running(p)]
    assert not processes_naming(site.dir)


# -- items 1 and 2: one network per directory, ports in use refused ---------------------
def test_two_starts_on_one_directory_one_wins_and_busy_ports_are_refused(
    tmp_path: Path,
) -> None:
    here = fresh_site(tmp_path)
    args = [
        *QKDN, "net", "up", str(here.topology), "--dir", str(here.dir),
        "--base-port", str(here.base_port), "--stock", "0",
    ]  # fmt: skip
    try:
        starts = [
            subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        results = sorted((p.communicate(timeout=120)[1].decode(), p.returncode) for p in starts)
        results = sorted((code, err) for err, code in results)
        assert [r for r, _ in results] == [0, 1], results
        assert results[1][1].startswith("qkdn: error [NET-BUSY]: "), results
        net = Net(here.dir)
        pids = node_pids(net)
        assert len(processes_naming(here.dir)) == 1 + len(pids)  # one supervisor, 4 nodes

        other = Site(tmp_path / "other", here.topology, here.base_port)
        assert error_code(other.up("--timeout", "20")) == "NET-PORTS"
        assert not processes_naming(other.dir)
        assert node_pids(net) == pids and all(running(p) for p in pids.values())
    finally:
        bring_down(here.dir)


# -- item 3: a failed start stops all it started ----------------------------------------
def test_a_failed_start_leaves_nothing_running(tmp_path: Path) -> None:
    here = fresh_site(tmp_path)
    try:
        assert error_code(here.up("--timeout", "0")) == "NET-TIMEOUT"
        assert not processes_naming(here.dir)

        (here.dir / "pki" / "nodes" / "ukms-west.pem").unlink()  # that node cannot start
        failed = here.up("--timeout", "90")
        assert error_code(failed) == "NET-NODE"
        assert "ukms-west" in failed.stderr and "[PKI]" in failed.stderr
        assert not processes_naming(here.dir)
    finally:
        bring_down(here.dir)


# -- item 19: a directory holds one topology --------------------------------------------
def test_another_topology_in_a_used_directory_is_refused_at_once(tmp_path: Path) -> None:
    here = fresh_site(tmp_path)
    render(load_topology(str(here.topology)), RenderPlan(out=here.dir, base_port=here.base_port))
    before = sorted(p.name for p in (here.dir / "nodes").iterdir())
    other = tmp_path / "three-sites.toml"
    other.write_text(
        TOPOLOGY.replace("two-sites", "three-sites").replace("ukms-west", "ukms-south")
    )
    try:
        refused = Site(here.dir, other, here.base_port).up("--timeout", "30")
        assert error_code(refused) == "NET-DIR-TOPOLOGY"
        assert "two-sites" in refused.stderr and "ukms-south" in refused.stderr
        assert sorted(p.name for p in (here.dir / "nodes").iterdir()) == before
        assert not processes_naming(here.dir)

        # the same nodes, links and SAEs at another key rate: the directory is reused
        faster = tmp_path / "faster.toml"
        faster.write_text(TOPOLOGY.replace("skr_kbps = 10.0", "skr_kbps = 20.0"))
        assert error_code(Site(here.dir, faster, here.base_port).up("--timeout", "0")) == (
            "NET-TIMEOUT"
        )
    finally:
        bring_down(here.dir)


# -- item 5: a full disk does not stop the network ---------------------------------------
def test_a_state_file_the_disk_refuses_keeps_the_nodes_and_is_reported(site: Site) -> None:
    """The supervisor writes ``run/state.json.tmp`` and renames it; made a link to
    ``/dev/full``, that write fails with the kernel's ENOSPC."""
    net = site.ensure_up()
    before = node_pids(net)
    log = site.dir / "logs" / "supervisor.log"
    mark = log.stat().st_size
    tmp = site.dir / "run" / "state.json.tmp"
    tmp.symlink_to("/dev/full")
    try:
        net.kill("ukms-west")

        def restarted_and_reported() -> bool:
            status = net.status()
            west = next(n for n in status["nodes"] if n["name"] == "ukms-west")
            codes = [a.get("code") for a in status.get("alarms", [])]
            fresh = west["alive"] and west["pid"] not in (0, before["ukms-west"])
            return bool(fresh and "NET-STATE-WRITE" in codes)

        poll(restarted_and_reported, "ukms-west restarted and the alarm in status", timeout=30)
        others = {n: p for n, p in before.items() if n != "ukms-west"}
        assert all(running(p) for p in others.values())
        assert {n: p for n, p in node_pids(net).items() if n != "ukms-west"} == others
        assert site.state()["nodes"]["ukms-west"]["pid"] == before["ukms-west"]  # not written
        with open(log, "rb") as fh:
            fh.seek(mark)
            lines = [json.loads(x) for x in fh.read().splitlines() if x.startswith(b"{")]
        assert next(x["msg"] for x in lines if x.get("code") == "NET-STATE-WRITE").startswith(
            f"cannot write {site.dir.resolve() / 'run' / 'state.json'}: No space left on device"
        )
    finally:
        tmp.unlink()
    poll(
        lambda: (
            site.state()["nodes"]["ukms-west"]["pid"] == node_pids(net)["ukms-west"]
            and not net.status()["alarms"]
        ),
        "the state written again and the alarm cleared",
        timeout=15,
    )
    net.wait_for_relays(MASTER, SLAVE)


# -- item 1: the parent-death check of a node --------------------------------------------
def test_a_node_whose_supervisor_is_gone_does_not_start(tmp_path: Path) -> None:
    """A node asks for SIGKILL on its supervisor's death before anything else; if the
    supervisor died before that (a race with the start), its parent is another: it exits."""
    args = [*QKDN, "node", "run", "--config", str(tmp_path / "absent.toml")]

    def run(supervisor: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "QKDN_NET_SUPERVISOR": supervisor}
        return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)

    orphan = run(str(2**22 + 1))  # above any pid this machine hands out (pid_max)
    assert error_code(orphan) == "NODE-ORPHAN"
    assert error_code(run(str(os.getpid()))).startswith("CFG")  # its parent: it goes on


# -- item 28 ------------------------------------------------------------------------------
def test_the_default_network_directory_is_ignored_by_git() -> None:
    """``net up`` writes private keys and PSKs under .qkdn/ by default."""
    ignored = (ROOT / ".gitignore").read_text().split()
    assert f"{DEFAULT_DIR.parts[0]}/" in ignored or f"/{DEFAULT_DIR.parts[0]}/" in ignored
