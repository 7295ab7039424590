"""The registry's contract columns: a routing policy class round-trips, a bad one is
refused with a code, and a registry written before the column existed opens with it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.aaa.errors import RegistryError
from appliance.aaa.registry import SCHEMA, Contract, Registry, User

OLD_CONTRACTS = """
CREATE TABLE contracts (
  id TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(id),
  max_key_size INTEGER NOT NULL, keys_per_request INTEGER NOT NULL,
  keys_per_day INTEGER NOT NULL, bits_per_day INTEGER NOT NULL,
  keys_per_month INTEGER NOT NULL, bits_per_month INTEGER NOT NULL,
  max_rate INTEGER NOT NULL, valid_from TEXT, valid_until TEXT,
  relay_mode TEXT NOT NULL, priority INTEGER NOT NULL,
  suspended INTEGER NOT NULL DEFAULT 0);
"""
"""The contracts table as the registry wrote it before route_policy."""


def test_a_contracts_routing_class_round_trips_and_a_bad_one_is_refused(registry):
    assert registry.contract("bob-2026").route_policy == "most-key"
    assert registry.contract("alice-2026").route_policy == "balanced"
    registry.set_contract("alice-2026", route_policy="fewest-hops")
    again = Registry(registry.path)
    assert again.snapshot().contracts["alice-2026"].route_policy == "fewest-hops"
    again.close()
    with pytest.raises(RegistryError) as exc:
        registry.set_contract("alice-2026", route_policy="cheapest")
    assert exc.value.code == "AAA-VALUE"
    assert registry.contract("alice-2026").route_policy == "fewest-hops"


def test_a_registry_from_before_the_routing_class_opens_with_balanced(tmp_path: Path):
    path = tmp_path / "registry.db"
    db = sqlite3.connect(path)
    old = SCHEMA.replace(SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS contracts") :], "")
    db.executescript(old + OLD_CONTRACTS)
    db.execute("INSERT INTO users VALUES ('acme', 'ACME', '', 0)")
    db.execute(
        "INSERT INTO contracts VALUES ('old', 'acme', 256, 16, 10, 2560, 30, 7680, 5,"
        " NULL, NULL, 'otp', 3, 0)"
    )
    db.commit()
    db.close()
    reg = Registry(path)
    old_contract = reg.contract("old")
    assert (old_contract.route_policy, old_contract.relay_mode, old_contract.priority) == (
        "balanced",
        "otp",
        3,
    )
    reg.set_contract("old", route_policy="most-key")
    reg.add_user(User(id="newco", customer="New Co"))
    reg.add_contract(Contract(id="new", user="newco", route_policy="fewest-hops"))
    reg.close()
    reg = Registry(path)  # opening an upgraded registry changes nothing
    got = {c.id: c.route_policy for c in reg.snapshot().contracts.values()}
    assert got == {"old": "most-key", "new": "fewest-hops"}
    reg.close()
