"""Topology files: the shipped DemoQuanDT network, and clear errors for bad input."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config.topology import load_topology, resolve_path
from appliance.errors import ConfigError

TABLE_3 = {  # link: (SKR kb/s, QBER %), from the paper
    (4, 5): (2.0, 2.4),
    (7, 8): (22.7, 5.4),
    (8, 9): (1.2, 1.7),
    (9, 10): (0.3, 1.6),
    (10, 11): (21.3, 4.5),
    (11, 12): (2.2, 1.6),
    (12, 13): (11.8, 5.6),
    (13, 14): (2.0, 1.3),
}


def test_demoquandt_is_the_papers_network():
    topo = load_topology("demoquandt")
    roles = {n.id: n.role for n in topo.spec.nodes}
    assert roles[1] == roles[15] == "ukms"
    assert roles[2] == roles[14] == "akms+ckms"
    assert all(roles[i] == "ckms" for i in range(3, 14))
    assert topo.node(16).virtual and roles[16] == "ckms"
    chain = [link for link in topo.links if 16 not in (link.a, link.b)]
    assert [(link.a, link.b) for link in chain] == [(i, i + 1) for i in range(1, 15)]
    assert sum(link.length_km for link in chain) == pytest.approx(923.0)
    for link in topo.links:
        if (link.a, link.b) in TABLE_3:
            assert (link.skr_kbps, link.qber_pct) == TABLE_3[(link.a, link.b)]
            assert link.kind == "vendor"
        else:
            assert link.skr_kbps == 10.0 and link.qber_pct == 1.0
    bypass = {(link.a, link.b) for link in topo.links if 16 in (link.a, link.b)}
    assert bypass == {(8, 16), (16, 10)}
    assert {s.node for s in topo.spec.saes} == {1, 15}


BASE: dict[str, Any] = {
    "network": {"name": "mini"},
    "nodes": [
        {"id": 1, "name": "u1", "site": "A", "role": "ukms"},
        {"id": 2, "name": "a2", "site": "A", "role": "akms+ckms"},
        {"id": 3, "name": "c3", "site": "B", "role": "ckms"},
        {"id": 9, "name": "ctl", "site": "DC", "role": "controller"},
    ],
    "links": [
        {"a": 1, "b": 2, "length_km": 5.0},
        {"a": 2, "b": 3, "length_km": 50.0, "skr_kbps": 3.0, "qber_pct": 2.0},
    ],
    "users": [{"id": "u", "name": "User"}],
    "contracts": [{"id": "c", "user": "u", "valid_from": dt.date(2026, 1, 1)}],
    "saes": [{"id": "s1", "node": 1, "user": "u", "contract": "c"}],
}


def write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "net.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def mutate(fn):
    doc = copy.deepcopy(BASE)
    fn(doc)
    return doc


def _second_site(
    doc: dict[str, Any],
    *,
    link_to_carrier: bool,
    ukms_linked: bool = True,
    via_user_node: bool = False,
) -> None:
    """A second user node (4) behind a second access node (5), with SAE s2 of user u."""
    doc["nodes"] += [
        {"id": 4, "name": "u4", "site": "C", "role": "ukms"},
        {"id": 5, "name": "a5", "site": "C", "role": "akms+ckms"},
    ]
    if ukms_linked:
        doc["links"].append({"a": 4, "b": 5, "length_km": 5.0})
    if link_to_carrier:
        doc["links"].append({"a": 3, "b": 5, "length_km": 40.0})
    if via_user_node:  # a user node linked to both access nodes relays nothing
        doc["nodes"].append({"id": 6, "name": "u6", "site": "D", "role": "ukms"})
        doc["links"] += [{"a": 2, "b": 6, "length_km": 1.0}, {"a": 5, "b": 6, "length_km": 1.0}]
    doc["saes"].append({"id": "s2", "node": 4, "user": "u", "contract": "c"})


def test_sae_pairs_joined_through_carriers_are_valid(tmp_path):
    """Two SAEs of one user behind two access nodes joined through a carrier node; an SAE
    of another user with no path to them is fine (they never exchange keys)."""
    doc = mutate(lambda d: _second_site(d, link_to_carrier=True))
    doc["nodes"] += [
        {"id": 7, "name": "u7", "site": "E", "role": "ukms"},
        {"id": 8, "name": "a8", "site": "E", "role": "akms+ckms"},
    ]
    doc["links"].append({"a": 7, "b": 8, "length_km": 2.0})
    doc["users"].append({"id": "w", "name": "Other"})
    doc["contracts"].append({"id": "cw", "user": "w"})
    doc["saes"].append({"id": "s3", "node": 7, "user": "w", "contract": "cw"})
    topo = load_topology(str(write(tmp_path, doc)))
    assert len(topo.spec.saes) == 3


def test_minimal_topology_is_valid(tmp_path):
    topo = load_topology(str(write(tmp_path, BASE)))
    assert [link.id for link in topo.links] == ["link-1-2", "link-2-3"]
    assert topo.links[0].skr_kbps == 10.0  # the default


CASES = [
    (
        "unknown top-level key",
        lambda d: d.update(colour="red"),
        "CFG-UNKNOWN-KEY",
        "colour",
        "allowed here: contracts, link_defaults, links, network, nodes, saes, users",
    ),
    (
        "unknown key in a link",
        lambda d: d["links"][1].update(skr=3),
        "CFG-UNKNOWN-KEY",
        "links[1] (2-3).skr",
        "skr_kbps",
    ),
    (
        "unknown emulator key",
        lambda d: d["links"][1].update(emulator={"tau": 3}),
        "CFG-UNKNOWN-KEY",
        "links[1] (2-3).emulator.tau",
        "tau_s",
    ),
    (
        "negative SKR",
        lambda d: d["links"][1].update(skr_kbps=-2.0),
        "CFG-VALUE",
        "links[1] (2-3).skr_kbps",
        "greater than or equal to 0",
    ),
    (
        "SKR as a string",
        lambda d: d["links"][1].update(skr_kbps="fast"),
        "CFG-VALUE",
        "links[1] (2-3).skr_kbps",
        "valid number",
    ),
    (
        "QBER above abort",
        lambda d: d["links"][1].update(qber_pct=12.0),
        "CFG-VALUE",
        "links[1] (2-3).qber_pct",
        "below the abort threshold",
    ),
    (
        "zero length",
        lambda d: d["links"][0].update(length_km=0),
        "CFG-VALUE",
        "links[0] (1-2).length_km",
        "greater than 0",
    ),
    (
        "link to an unknown node",
        lambda d: d["links"][1].update(b=7),
        "CFG-REF",
        "links[1] (2-7).b",
        "unknown node 7",
    ),
    (
        "link to a controller",
        lambda d: d["links"][1].update(b=9),
        "CFG-REF",
        "links[1] (2-9).b",
        "has no KMS",
    ),
    (
        "self link",
        lambda d: d["links"][1].update(b=2),
        "CFG-REF",
        "links[1] (2-2)",
        "two different nodes",
    ),
    (
        "duplicate link",
        lambda d: d["links"].append({"a": 3, "b": 2, "length_km": 1.0}),
        "CFG-REF",
        "links[2] (3-2)",
        "duplicate link",
    ),
    (
        "user node linked to a carrier node",
        lambda d: d["links"].append({"a": 1, "b": 3, "length_km": 1.0}),
        "CFG-REF",
        "links[2] (1-3)",
        "access node",
    ),
    (
        "roles that cannot be colocated",
        lambda d: d["nodes"][0].update(role="ukms+akms"),
        "CFG-ROLE",
        "nodes[0] (1).role",
        "cannot be colocated",
    ),
    (
        "aaa with the controller",
        lambda d: d["nodes"][3].update(role="aaa+controller"),
        "CFG-ROLE",
        "nodes[3] (9).role",
        "cannot be colocated",
    ),
    (
        "unknown role",
        lambda d: d["nodes"][2].update(role="router"),
        "CFG-ROLE",
        "nodes[2] (3).role",
        "unknown role 'router'",
    ),
    (
        "duplicate node id",
        lambda d: d["nodes"][2].update(id=2),
        "CFG-REF",
        "nodes[2]",
        "duplicate '2'",
    ),
    (
        "missing key",
        lambda d: d["nodes"][2].pop("site"),
        "CFG-MISSING",
        "nodes[2] (3).site",
        "missing required key",
    ),
    (
        "bad node name",
        lambda d: d["nodes"][2].update(name="C 3"),
        "CFG-VALUE",
        "nodes[2] (3).name",
        "should match pattern",
    ),
    (
        "SAE on a carrier node",
        lambda d: d["saes"][0].update(node=3),
        "CFG-REF",
        "saes[0] (s1).node",
        "ukms node",
    ),
    (
        "SAE with another user's contract",
        lambda d: (d["users"].append({"id": "v", "name": "V"}), d["saes"][0].update(user="v")),
        "CFG-REF",
        "saes[0] (s1).contract",
        "contract of user 'v'",
    ),
    (
        "contract of an unknown user",
        lambda d: d["contracts"][0].update(user="nobody"),
        "CFG-REF",
        "contracts[0] (c).user",
        "unknown user",
    ),
    (
        "contract ending before it starts",
        lambda d: d["contracts"][0].update(valid_until=dt.date(2025, 1, 1)),
        "CFG-VALUE",
        "contracts[0] (c).valid_until",
        "on or after valid_from",
    ),
    (
        "infinite key rate (item 19)",
        lambda d: d["links"][1].update(skr_kbps=float("inf")),
        "CFG-VALUE",
        "links[1] (2-3).skr_kbps",
        "finite number (got inf)",
    ),
    (
        "infinite default key rate",
        lambda d: d.update(link_defaults={"skr_kbps": float("inf")}),
        "CFG-VALUE",
        "link_defaults.skr_kbps",
        "finite number",
    ),
    (
        "key rate whose bit rate is not finite",
        lambda d: d["links"][1].update(skr_kbps=1e308),
        "CFG-VALUE",
        "links[1] (2-3).skr_kbps",
        "less than or equal to 1000000",
    ),
    (
        "infinite emulator time constant",
        lambda d: d["links"][1].update(emulator={"tau_s": float("inf")}),
        "CFG-VALUE",
        "links[1] (2-3).emulator.tau_s",
        "finite number",
    ),
    (
        "NaN fluctuation",
        lambda d: d["links"][1].update(emulator={"skr_std_kbps": float("nan")}),
        "CFG-VALUE",
        "links[1] (2-3).emulator.skr_std_kbps",
        "finite number",
    ),
    (
        "SAE pair with no carrier path (item 19)",
        lambda d: _second_site(d, link_to_carrier=False),
        "CFG-ROUTE",
        "saes s1 and s2",
        "no path between their access nodes 2 and 5 through carrier (ckms) nodes",
    ),
    (
        "SAE pair joined only through a user node",
        lambda d: _second_site(d, link_to_carrier=False, via_user_node=True),
        "CFG-ROUTE",
        "saes s1 and s2",
        "no path between their access nodes 2 and 5",
    ),
    (
        "SAE on a user node without an access node",
        lambda d: _second_site(d, link_to_carrier=True, ukms_linked=False),
        "CFG-ROUTE",
        "saes (s2).node",
        "user node 4 has no link to an access node",
    ),
    (
        "contract's route policy not a class",
        lambda d: d["contracts"][0].update(route_policy="cheapest"),
        "CFG-VALUE",
        "contracts[0] (c).route_policy",
        "'balanced', 'fewest-hops' or 'most-key'",
    ),
    (
        "key size not a multiple of 8",
        lambda d: d["network"].update(key_size=100),
        "CFG-VALUE",
        "network.key_size",
        "multiple of 8",
    ),
]


@pytest.mark.parametrize("what, change, code, key, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_topologies_name_file_key_and_expectation(tmp_path, what, change, code, key, expected):
    path = write(tmp_path, mutate(change))
    with pytest.raises(ConfigError) as info:
        load_topology(str(path))
    err = info.value
    assert err.code == code, str(err)
    assert str(err).startswith(f"{path}: {key}"), str(err)
    assert expected in str(err)
    assert "\n" not in str(err)


def test_syntax_errors_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[network\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML") as info:
        load_topology(str(bad))
    assert info.value.code == "CFG-SYNTAX"
    with pytest.raises(ConfigError, match="no such file") as info:
        load_topology(str(tmp_path / "absent.toml"))
    assert info.value.code == "CFG-FILE"
    with pytest.raises(ConfigError, match="shipped: demoquandt"):
        load_topology("berlin-paris")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_topology(str(binary))


toml_scalars = st.one_of(
    st.integers(-5, 2000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.booleans(),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(
        [
            ("network", "name"),
            ("network", "key_size"),
            ("nodes", 1, "id"),
            ("nodes", 0, "role"),
            ("links", 1, "skr_kbps"),
            ("links", 0, "a"),
            ("links", 1, "emulator"),
            ("saes", 0, "node"),
            ("contracts", 0),
            ("users",),
            ("link_defaults",),
            ("nodes", 2, "virtual"),
        ]
    ),
    value=st.one_of(
        toml_scalars,
        st.lists(toml_scalars, max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=5), toml_scalars, max_size=3),
    ),
)
def test_fuzzed_topologies_never_crash(tmp_path, path, value):
    doc = copy.deepcopy(BASE)
    target: Any = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    try:
        load_topology(str(write(tmp_path, doc)))
    except ConfigError as err:
        assert str(err).startswith(str(tmp_path / "net.toml")) and "\n" not in str(err)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=300))
def test_random_bytes_are_a_clean_error(tmp_path, blob):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(blob)
    try:
        load_topology(str(path))
    except ConfigError as err:
        assert err.code.startswith("CFG")


def test_customer_rows_are_kept_lean_and_checked_as_strictly(tmp_path):
    """SAEs, users and contracts (a network may list tens of thousands) are slotted records
    without a per-row ``__dict__``; a bad row is still named, with the keys allowed."""
    topo = load_topology("demoquandt")
    for row in (topo.spec.saes[0], topo.spec.users[0], topo.spec.contracts[0]):
        assert not hasattr(row, "__dict__")
    text = resolve_path("demoquandt").read_text()
    path = tmp_path / "t.toml"
    path.write_text(text.replace('id = "sae-bonn-1"\n', 'id = "sae-bonn-1"\ncolour = "red"\n'))
    with pytest.raises(
        ConfigError,
        match=r"saes\[1\] \(sae-bonn-1\)\.colour: unknown key "
        r"\(allowed here: contract, id, node, user\)",
    ):
        load_topology(str(path))
