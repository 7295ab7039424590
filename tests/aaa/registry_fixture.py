"""Fixtures of the AAA tests: a registry seeded with two users, their SAEs and contracts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from appliance.aaa.registry import Contract, Registry, Sae, User

NOW = dt.datetime(2026, 6, 15, 12, 0, tzinfo=dt.UTC).timestamp()
"""A fixed instant (noon UTC) every ledger test starts from."""


def populate(reg: Registry, *, keys_per_day: int = 1000, bits_per_day: int = 256_000) -> None:
    """Users alice and bob; AKMS 2 (UKMS 1) and AKMS 14 (UKMS 15); one contract each."""
    reg.attach(1, 2)
    reg.attach(15, 14)
    for user in ("alice", "bob"):
        reg.add_user(User(id=user, customer=f"{user.title()} Ltd", billing=f"B-{user}"))
        reg.add_sae(Sae(id=f"{user}-a", user=user, ukms=1))
        reg.add_sae(Sae(id=f"{user}-b", user=user, ukms=15))
        reg.add_contract(
            Contract(
                id=f"{user}-2026",
                user=user,
                max_key_size=256,
                keys_per_request=16,
                keys_per_day=keys_per_day,
                bits_per_day=bits_per_day,
                keys_per_month=keys_per_day * 3,
                bits_per_month=bits_per_day * 3,
                max_rate=1000,
                valid_from=dt.date(2026, 1, 1),
                valid_until=dt.date(2026, 12, 31),
                relay_mode="otp" if user == "bob" else "gcm",
                route_policy="most-key" if user == "bob" else "balanced",
                pairs=((f"{user}-a", f"{user}-b"), (f"{user}-b", f"{user}-a")),
            )
        )


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "aaa" / "registry.db")
    populate(reg)
    yield reg
    reg.close()
