"""Seeding from a topology: users, SAEs, contracts with their pairs and derived limits;
only user and access nodes enter the registry (the access/carrier separation)."""

from __future__ import annotations

from appliance.aaa.registry import Registry
from appliance.aaa.seed import seed
from appliance.config.topology import load_topology


def test_demoquandt_seeds_users_saes_contracts_and_only_access_nodes(tmp_path):
    topology = load_topology("demoquandt")
    reg = Registry(tmp_path / "registry.db")
    done = seed(reg, topology)
    snap = reg.snapshot()
    assert (done.users, done.saes, done.contracts) == (2, 4, 2)
    bank = snap.contracts["bank-2026"]
    assert bank.pairs == (("sae-berlin-2", "sae-bonn-2"), ("sae-bonn-2", "sae-berlin-2"))
    assert bank.bits_per_day == bank.keys_per_day * bank.max_key_size
    assert bank.valid_until is not None and bank.valid_until.year == 2027
    ukms = {n.id for n in topology.nodes_with("ukms")}
    akms = {n.id for n in topology.nodes_with("akms")}
    assert set(snap.ukms) <= ukms and set(snap.ukms.values()) <= akms and snap.akms <= akms
    carriers = {n.id for n in topology.nodes_with("ckms")} - akms
    blob = (tmp_path / "registry.db").read_bytes()
    assert carriers and not (set(snap.ukms) | snap.akms) & carriers
    assert b"link-" not in blob  # no links, no routes
    reg.set_user("example-bank", suspended=True)
    assert seed(reg, topology).users == 0  # a second seeding keeps the operator's change
    assert reg.user("example-bank").suspended
    reg.close()
