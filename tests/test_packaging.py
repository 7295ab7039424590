"""The dependency split: a base install runs a node, and the extras hold the rest.

``pip install qkdn`` (what a node image carries) installs only ``[project] dependencies``.
These tests build that environment by hand: a directory with the project's packages and
the installed files of the base dependencies and what they require, nothing else, used as
the only ``sys.path`` entry beside the standard library (``python -S``, as the image's
launcher does). Nodes must start and serve there; commands of the extras must say which
extra to install, in one coded line.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.cli import EXTRAS
from tests.base_install import BASE, PYPROJECT, ROOT, dist_name, make_base_site


@pytest.fixture(scope="module")
def base_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base_site(tmp_path_factory.mktemp("base-site"))


def base_qkdn(site: Path, *args: str, cwd: Path = ROOT) -> subprocess.Popen[str]:
    env = {"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    return subprocess.Popen(
        [sys.executable, "-S", "-m", "appliance.cli", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_base(site: Path, *args: str) -> tuple[int, str, str]:
    proc = base_qkdn(site, *args)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_the_base_install_holds_no_extra():
    extras = PYPROJECT["optional-dependencies"]
    assert not BASE & {"rich", "tomli-w", "matplotlib", "hypothesis", "pytest", "h2", "h11"}
    assert "pysnmp" in BASE, "an access node's AKMS asks the AAA device over SNMPv3 (appliance/aaa)"
    for module, extra in EXTRAS.items():
        dists = {dist_name(d) for d in md.packages_distributions()[module]}
        assert dists & {dist_name(r) for r in extras[extra]}, (module, extra)
    assert {"provisioning", "plots", "bench"} <= {
        x for r in extras["dev"] if r.startswith("qkdn[") for x in r[5:-1].split(",")
    }, "make setup installs .[dev]: it must pull every other extra"


def test_the_base_site_cannot_import_an_extra(base_site):
    code = f"import importlib.util as u; print([m for m in {list(EXTRAS)!r} if u.find_spec(m)])"
    env = {"PYTHONPATH": str(base_site)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_selftest_and_help_on_the_base_install(base_site):
    status, out, err = run_base(base_site, "qrng", "selftest", "--json")
    assert status == 0, err
    assert json.loads(out)["passed"] is True
    status, out, err = run_base(base_site, "--help")
    assert status == 0, err
    assert "needs the 'provisioning' extra" in out  # topology, image, card, ...
    for command in ("topology", "image", "card", "net", "node", "qrng"):
        assert command in out


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (("topology", "show", "demoquandt"), "rich"),
        (("image", "key", "generate", "--out", "{tmp}/k"), "rich"),
        (("card", "status"), "rich"),
        (("net", "up", "--dir", "{tmp}/net"), "tomli_w"),  # node run shares its module
        (("qrng", "selftest"), "rich"),  # the table needs rich; --json does not
    ],
)
def test_commands_of_an_extra_say_which_extra(base_site, tmp_path, argv, module):
    status, out, err = run_base(base_site, *(a.format(tmp=tmp_path) for a in argv))
    assert status == 1, (out, err)
    assert err.strip().splitlines() == [
        "qkdn: error [EXTRA-MISSING]: this command needs the 'provisioning' extra "
        f"({module} is not installed): pip install 'qkdn[provisioning]'"
    ]
    assert not any(tmp_path.iterdir()), "a refused command wrote nothing"


def _handshakes(address: str, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1) as raw:
            ctx.wrap_socket(raw).close()
    except (OSError, ssl.SSLError):
        return False
    return True


def test_nodes_run_on_the_base_install(base_site, tmp_path):
    """A user node and an access node (every KMS role) start, serve TLS and stop cleanly
    from the base install: the node runtime imports no extra."""
    import qrng
    from appliance.config.render import RenderPlan, find_free_base_port, render
    from appliance.config.topology import load_topology
    from appliance.kms.network import load_configs, make_pki, provision_psks

    topo = load_topology("demoquandt")
    render(topo, RenderPlan(out=tmp_path, base_port=find_free_base_port()))
    configs = load_configs(tmp_path)
    rng = qrng.node_generator("emulated-qrng://provisioning?bits=16").random_bytes
    make_pki(topo, configs, rng)
    provision_psks(configs, rng)
    chosen = [
        next(n for n, c in configs.items() if c.node.role == r) for r in ("ukms", "akms+ckms")
    ]
    argv = {  # the access node with its SDN agent too (--gnmi), as under a controller
        n: ["node", "run", "--config", f"nodes/{n}.toml"]
        + (["--gnmi"] if "ckms" in configs[n].node.role else [])
        for n in chosen
    }
    procs = {n: base_qkdn(base_site, *argv[n], cwd=tmp_path) for n in chosen}
    try:
        addresses = [a for n in chosen for s, a in configs[n].listen.items() if s != "snmp"]
        ca = Path(configs[chosen[0]].paths.ca_cert)
        deadline = time.monotonic() + 90
        while not all(_handshakes(a, ca) for a in addresses):
            dead = {n: p.poll() for n, p in procs.items() if p.poll() is not None}
            assert not dead, (dead, {n: procs[n].communicate()[1][-2000:] for n in dead})
            assert time.monotonic() < deadline, "the nodes did not listen within 90 s"
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        results = {n: (p.wait(timeout=60), p.communicate()[1]) for n, p in procs.items()}
    for name, (status, err) in results.items():
        assert status == 0, (name, err[-2000:])
        assert "EXTRA-MISSING" not in err and "Traceback" not in err, (name, err[-2000:])


def test_demo_plot_without_the_plots_extra_refuses_before_its_run(monkeypatch, capsys, tmp_path):
    import importlib.util

    from appliance import cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a),
    )
    argv = ["demo", "--skip-quantum", "--requests", "1", "--plot", str(tmp_path / "t.png")]
    status = cli.main([*argv, "--net-dir", str(tmp_path / "n")])
    assert status == 1
    assert capsys.readouterr().err.splitlines() == [
        "qkdn: error [EXTRA-MISSING]: this command needs the 'plots' extra "
        "(matplotlib is not installed): pip install 'qkdn[plots]'"
    ]
    assert not any(tmp_path.iterdir()), "nothing ran"
