"""The hardening profile, property by property, parsed from the built image's files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from appliance.config.render import RenderPlan, services_of
from images.build import BuildSpec, assemble, build, node_document
from images.errors import BuildError
from images.hardening import FORBIDDEN_TOOLS, SYSCTL
from tests.images.conftest import EPOCH, fake_wheel

ROLE_NODES = {"ukms": 1, "akms+ckms": 2, "ckms": 5, "controller": 20, "manager": 21, "aaa": 22}
RULE = re.compile(
    r"(ip6?) (saddr|daddr) \{ ([^}]*) \} (tcp|udp) dport (\d+) accept comment \"([^\"]*)\""
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return sections


def parse_chain(ruleset: str, chain: str) -> dict[str, object]:
    body = ruleset.split(f"chain {chain} {{", 1)[1].split("\n\t}", 1)[0]
    rules = [m.groups() for m in RULE.finditer(body)]
    policy = re.search(r"policy (\w+);", body)
    return {"policy": policy.group(1) if policy else None, "rules": rules, "body": body}


@pytest.fixture(scope="module", params=sorted(ROLE_NODES))
def tree(request, tmp_path_factory, topo):
    node = topo.node(ROLE_NODES[request.param])
    root = tmp_path_factory.mktemp(f"tree-{node.id}") / "root"
    spec = BuildSpec(
        topology=topo,
        node=node,
        wheelhouse=fake_wheel(root.parent / "w"),
        version="1",
        security_version=1,
        epoch=EPOCH,
    )
    assemble(spec, root)
    return spec, root


def test_units_are_sandboxed(tree):
    spec, root = tree
    units = sorted((root / "etc/systemd/system").glob("qkdn-*.service"))
    assert [u.name for u in units] == [f"qkdn-{r}.service" for r in sorted(spec.node.roles)]
    for path in units:
        svc = parse_unit(path.read_text())["Service"]
        assert svc["ProtectSystem"] == ["strict"]
        assert svc["NoNewPrivileges"] == ["yes"]
        assert svc["CapabilityBoundingSet"] == [""] and svc["AmbientCapabilities"] == [""]
        assert svc["PrivateTmp"] == ["yes"]
        assert "@system-service" in svc["SystemCallFilter"]
        assert any(f.startswith("~") and "@privileged" in f for f in svc["SystemCallFilter"])
        assert set(svc["RestrictAddressFamilies"][0].split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}
        assert svc["User"] == ["qkdn"] and svc["ReadWritePaths"] == ["/var/lib/qkdn"]
        assert not any(v.startswith(("/bin/sh", "/bin/bash")) for v in svc["ExecStart"])


def test_firewall_opens_only_the_roles_ports_to_their_peers(tree, topo):
    spec, root = tree
    ruleset = (root / "etc/nftables.conf").read_text()
    plan = RenderPlan(out=Path("/etc/qkdn"))
    inp, out = parse_chain(ruleset, "input"), parse_chain(ruleset, "output")
    assert inp["policy"] == out["policy"] == "drop"
    assert parse_chain(ruleset, "forward")["policy"] == "drop"
    expected = {int(plan.address(spec.node, s).rsplit(":", 1)[1]) for s in services_of(spec.node)}
    opened = {int(r[4]) for r in inp["rules"]}  # type: ignore[union-attr]
    assert opened <= expected
    for service in services_of(spec.node):
        port = int(plan.address(spec.node, service).rsplit(":", 1)[1])
        proto = "udp" if service in ("snmp", "traps") else "tcp"
        ours = [r for r in inp["rules"] if int(r[4]) == port]  # type: ignore[union-attr]
        if service in ("etsi014", "etsi004", "web"):  # no operator networks given: closed
            assert not ours
            continue
        assert ours and all(r[3] == proto for r in ours), service
        assert all(r[2] == "127.0.0.1" for r in ours)  # the peers' host in this address plan
    doc = node_document(spec)
    allowed_out = {a.rsplit(":", 1)[1] for a in doc.get("services", {}).values()}
    allowed_out |= {n["address"].rsplit(":", 1)[1] for n in doc.get("neighbours", [])}
    got_out = {r[4] for r in out["rules"]}  # type: ignore[union-attr]
    assert allowed_out <= got_out
    if "akms" in spec.node.roles:
        assert "21014" in got_out  # the AKMS-AKMS channel to akms-bonn
    if "ukms" in spec.node.roles:  # customer premises: only its AKMS, nothing of the operator
        assert got_out == {n["address"].rsplit(":", 1)[1] for n in doc["neighbours"]}
    assert 'iif "lo" accept' in inp["body"]  # type: ignore[operator]


def test_firewall_peers_are_exact_for_the_access_node(topo):
    from images.hardening import input_rules

    rules = {r.service: r for r in input_rules(topo, topo.node(2), RenderPlan(out=Path("/x")), {})}
    assert rules["akms"].comment == "akms from ukms-berlin(1), akms-bonn(14)"
    assert rules["ckms"].comment == "ckms from ckms-brandenburg(3)"
    assert rules["snmp"].comment == "snmp from qkdn-manager(21)"


def test_sysctl_mounts_and_accounts(tree):
    _, root = tree
    conf = dict(
        line.split(" = ", 1)
        for line in (root / "etc/sysctl.d/90-qkdn-hardening.conf").read_text().splitlines()
    )
    assert conf == SYSCTL
    assert conf["kernel.yama.ptrace_scope"] == "3" and conf["net.ipv4.ip_forward"] == "0"
    fstab = [ln.split() for ln in (root / "etc/fstab").read_text().splitlines() if ln[:1] != "#"]
    mounts = {f[1]: f for f in fstab}
    assert mounts["/"][2] == "squashfs" and "ro" in mounts["/"][3].split(",")
    assert mounts["/var/lib/qkdn"][0] == "PARTLABEL=qkdn-data"
    assert {"nosuid", "nodev", "noexec"} <= set(mounts["/var/lib/qkdn"][3].split(","))
    for line in (root / "etc/passwd").read_text().splitlines():
        assert line.endswith(":/usr/sbin/nologin")


def test_no_shell_ssh_or_debug_tools_in_the_image(images, tmp_path):
    listing = subprocess.run(
        ["unsquashfs", "-lc", "-o", "0", "-d", "", str(_image_of(images["v1"], tmp_path))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    names = {Path(p).name for p in listing}
    assert not names & FORBIDDEN_TOOLS
    assert "node.toml" in names and "nftables.conf" in names


def _image_of(bundle: Path, tmp_path: Path) -> Path:
    from images.bundle import read_envelope

    _, offset = read_envelope(bundle)
    out = tmp_path / "image.squashfs"
    out.write_bytes(bundle.read_bytes()[offset:])
    return out


def test_build_refuses_a_planted_shell(topo, tmp_path):
    spec = BuildSpec(
        topology=topo,
        node=topo.node(5),
        wheelhouse=fake_wheel(tmp_path / "w"),
        version="1",
        security_version=1,
        extra_files={"usr/bin/bash": b"\x7fELF"},
    )
    with pytest.raises(BuildError, match="usr/bin/bash"):
        assemble(spec, tmp_path / "root")


def test_build_is_byte_reproducible(topo, keys, tmp_path):
    spec = BuildSpec(
        topology=topo,
        node=topo.node(14),
        wheelhouse=fake_wheel(tmp_path / "w"),
        version="1",
        security_version=1,
        epoch=EPOCH,
    )
    one = build(spec, keys.release, keys.ring, tmp_path / "one.qkdnb").bundle.read_bytes()
    two = build(spec, keys.release, keys.ring, tmp_path / "two.qkdnb").bundle.read_bytes()
    from images.bundle import read_envelope

    env1, off1 = read_envelope(tmp_path / "one.qkdnb")
    env2, _ = read_envelope(tmp_path / "two.qkdnb")
    assert env1["manifest"] == env2["manifest"]  # image hash, verity root, chunks: identical
    assert one[off1:] == two[off1:]  # the payload, byte for byte
