"""``qkdn topology render``: one valid configuration per node, stable across renders."""

from __future__ import annotations

import stat

import pytest
import tomli_w

import hal
from appliance.config.node import load_node_config
from appliance.config.render import RenderPlan, render
from appliance.config.schema import read_toml
from appliance.config.topology import load_topology
from appliance.errors import ApplianceError, ConfigError, UsageError


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("net")
    topo = load_topology("demoquandt")
    files = render(topo, RenderPlan(out=out, start=1_000.0))
    return topo, out, {f.stem: load_node_config(f) for f in files}


def test_one_config_per_node_with_role_services(rendered):
    topo, _, configs = rendered
    assert set(configs) == {n.name for n in topo.spec.nodes}
    ukms = configs["ukms-berlin"]
    assert set(ukms.listen) == {"ukms", "etsi014", "etsi004", "snmp"}
    assert [s.id for s in ukms.saes] == ["sae-berlin-1", "sae-berlin-2"]
    assert ukms.services == {}  # a user node reaches nothing in the data centre
    akms = configs["akms-berlin"]
    assert set(akms.listen) == {"akms", "ckms", "snmp", "gnmi"}
    assert set(akms.services) == {"manager", "controller", "aaa"}
    assert set(configs["ckms-hamm"].services) == {"manager", "controller"}
    assert set(configs["qkdn-controller"].listen) == {"api", "gnmi"}
    ports = [a for c in configs.values() for a in c.listen.values()]
    assert len(ports) == len(set(ports)), "two services share a port"


def test_neighbours_point_at_each_others_services(rendered):
    _, _, configs = rendered
    ukms, akms = configs["ukms-berlin"], configs["akms-berlin"]
    (to_akms,) = ukms.neighbours
    assert to_akms.name == "akms-berlin" and to_akms.address == akms.listen["akms"]
    to_ukms = next(n for n in akms.neighbours if n.name == "ukms-berlin")
    assert to_ukms.address == ukms.listen["ukms"]
    hamm = configs["ckms-hamm"]
    assert {n.name for n in hamm.neighbours} == {"ckms-bielefeld", "ckms-dortmund", "ckms-virtual"}
    assert all(n.address.endswith(str(20000 + 2000 + n.node)) for n in hamm.neighbours)


def test_rendered_qkdm_urls_open_as_agreeing_pairs(rendered):
    _, _, configs = rendered
    clock = hal.ManualClock(1_030.0)
    a_end = next(n for n in configs["ckms-minden"].neighbours if n.link == "link-8-9")
    b_end = next(n for n in configs["ckms-bielefeld"].neighbours if n.link == "link-8-9")
    assert "end=a" in a_end.qkdm and "end=b" in b_end.qkdm
    a, b = hal.open_qkdm(a_end.qkdm, clock=clock), hal.open_qkdm(b_end.qkdm, clock=clock)
    key = a.get_key()
    assert b.get_key_by_id(key.key_id).material == key.material
    assert a.status().skr_bps > 0


def test_secrets_are_private_and_kept_across_renders(rendered):
    topo, out, _ = rendered
    secret = out / "secrets" / "link-9-10.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    before = secret.read_text()
    render(topo, RenderPlan(out=out))  # no --start: the earlier start is kept
    assert secret.read_text() == before
    assert read_toml(out / "network.toml")["emulation_start"] == 1_000.0


def test_bad_plans_are_clear_errors(tmp_path):
    topo = load_topology("demoquandt")
    with pytest.raises(UsageError, match="--base-port"):
        render(topo, RenderPlan(out=tmp_path, base_port=64000))
    (tmp_path / "network.toml").write_text("emulation_start = 'yesterday'\n")
    with pytest.raises(ConfigError, match="emulation_start"):
        render(topo, RenderPlan(out=tmp_path))


def test_unwritable_output_is_a_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ApplianceError, match="cannot write") as info:
        render(load_topology("demoquandt"), RenderPlan(out=blocker / "net"))
    assert info.value.code == "IO"


def test_node_config_validation(tmp_path):
    render(load_topology("demoquandt"), RenderPlan(out=tmp_path))
    path = tmp_path / "nodes" / "ukms-berlin.toml"
    path.write_text(path.read_text().replace("[node]\n", '[node]\ncolour = "red"\n'))
    with pytest.raises(ConfigError, match=r"ukms-berlin\.toml: node\.colour: unknown key") as info:
        load_node_config(path)
    assert info.value.code == "CFG-UNKNOWN-KEY"


def test_access_nodes_share_one_provisioned_psk(rendered):
    """Each AKMS names the PSK source of the channel to every other AKMS; `net up`
    provisions the file once (0600) for both ends, and never replaces it."""
    import os

    from appliance.kms.network import provision_psks
    from hsm.psk import open_psk_source

    _, _, configs = rendered
    berlin, bonn = configs["akms-berlin"], configs["akms-bonn"]
    assert set(berlin.psk) == {"akms-bonn"} and set(bonn.psk) == {"akms-berlin"}
    assert berlin.psk["akms-bonn"] == bonn.psk["akms-berlin"]
    assert all(not c.psk for name, c in configs.items() if not name.startswith("akms-"))
    created = provision_psks(configs, os.urandom)
    assert len(created) == 1 and stat.S_IMODE(created[0].stat().st_mode) == 0o600
    before = created[0].read_bytes()
    assert provision_psks(configs, os.urandom) == [] and created[0].read_bytes() == before
    a, b = (open_psk_source(c.psk[p]) for c, p in ((berlin, "akms-bonn"), (bonn, "akms-berlin")))
    assert a.derive(b"ctx", b"nonce") == b.derive(b"ctx", b"nonce")


def test_ipv6_hosts_are_written_in_brackets_and_parse_back(tmp_path):
    """Item 19: ``--host ::1`` was written as ``::1:20001``."""
    from appliance.config.addresses import split_host_port

    render(load_topology("demoquandt"), RenderPlan(out=tmp_path, host="::1", start=0.0))
    cfg = load_node_config(tmp_path / "nodes" / "ukms-berlin.toml")
    assert cfg.plan.host == "::1" and cfg.listen["ukms"] == "[::1]:20001"
    assert split_host_port(cfg.listen["etsi014"]) == ("::1", 23001)
    assert [n.address for n in cfg.neighbours] == ["[::1]:21002"]


@pytest.mark.parametrize("host", ["not a host", "", "[::1]x", "256.0.0.1", "a..b"])
def test_plans_with_bad_hosts_are_refused(tmp_path, host):
    with pytest.raises(UsageError, match="--host: expected"):
        render(load_topology("demoquandt"), RenderPlan(out=tmp_path, host=host))
    assert not (tmp_path / "nodes").exists()


def _edit(doc, where, value):
    *path, last = where
    for part in path:
        doc = doc[part]
    doc[last] = value


@pytest.mark.parametrize(
    "where, value, key, expected",
    [
        (("listen", "ckms"), "127.0.0.1:99999", "listen.ckms", "a port in 1..65535, not 99999"),
        (("listen", "ckms"), "127.0.0.1:0", "listen.ckms", "a port in 1..65535, not 0"),
        (("listen", "snmp"), "::1:24005", "listen.snmp", "IPv6 host in brackets"),
        (("listen", "ckms"), "not a host:22005", "listen.ckms", "an IP address or a DNS name"),
        (("services", "manager"), "127.0.0.1:70000", "services.manager", "a port in 1..65535"),
        (("neighbours", 0, "address"), "10.0.0.1:65536", "neighbours[0]", "a port in 1..65535"),
        (("plan", "base_port"), 70000, "plan.base_port", "less than or equal to 55536"),
        (("plan", "base_port"), 80, "plan.base_port", "greater than or equal to 1024"),
        (("plan", "host"), "[::1]", "plan.host", "a host without brackets"),
        (("plan", "host"), "not a host", "plan.host", "an IP address or a DNS name"),
    ],
)
def test_node_config_ports_and_hosts_are_checked(rendered, tmp_path, where, value, key, expected):
    """Item 17: ``ckms = "127.0.0.1:99999"`` made ``node run`` listen on port 34463."""
    _, out, _ = rendered
    doc = read_toml(out / "nodes" / "ckms-hagen.toml")
    _edit(doc, where, value)
    path = tmp_path / "ckms-hagen.toml"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert info.value.code == "CFG-VALUE"
    assert str(info.value).startswith(f"{path}: {key}") and expected in str(info.value)


def test_the_node_runtime_checks_its_sae_entries_and_keeps_none(tmp_path):
    """``node run`` finds its SAEs in the topology: the config's entries are checked as
    strictly as ever (an unknown key names its entry), then not kept."""
    render(load_topology("demoquandt"), RenderPlan(out=tmp_path, start=0.0))
    path = tmp_path / "nodes" / "ukms-berlin.toml"
    full = load_node_config(path)
    lean = load_node_config(path, keep_saes=False)
    assert [s.id for s in full.saes] == ["sae-berlin-1", "sae-berlin-2"]
    assert lean.saes == [] and lean.model_dump(exclude={"saes"}) == full.model_dump(
        exclude={"saes"}
    )
    doc = read_toml(path)
    doc["saes"][1]["colour"] = "red"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(ConfigError, match=r"saes\[1\] \(sae-berlin-2\)\.colour: unknown key"):
        load_node_config(path, keep_saes=False)


def test_the_sae_edge_takes_tls_12_and_13_unless_a_node_says_otherwise(rendered, tmp_path):
    _, out, configs = rendered
    assert configs["ukms-berlin"].etsi014.tls_versions == ["1.2", "1.3"]
    path = tmp_path / "ukms-berlin.toml"
    text = (out / "nodes" / "ukms-berlin.toml").read_text()
    path.write_text(text + '\n[etsi014]\ntls_versions = ["1.3"]\n')
    assert load_node_config(path).etsi014.tls_versions == ["1.3"]
    path.write_text(text + '\n[etsi014]\ntls_versions = ["1.1"]\n')
    with pytest.raises(ConfigError, match=r"etsi014\.tls_versions"):
        load_node_config(path)
