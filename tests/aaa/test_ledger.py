"""The credit-control ledger: every contract rule both ways, and never an over-grant."""

from __future__ import annotations

import dataclasses
import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.aaa.ledger import (
    GRACE_S,
    VALIDITY_S,
    Ask,
    Grant,
    Ledger,
    Reason,
    Refusal,
    terms_changed,
)
from appliance.aaa.registry import Contract, Sae, Snapshot, User
from tests.aaa.registry_fixture import NOW


def ask(reg: Snapshot, ledger: Ledger, rid: int, **kw: object) -> Grant | Refusal:
    now = kw.pop("now", NOW)
    fields = dict(akms=2, ukms=1, request_id=rid, master="alice-a", slave="alice-b")
    fields.update(keys=100, bits=25_600)
    fields.update(kw)
    return ledger.ask(reg, Ask(**fields), now)  # type: ignore[arg-type]


def test_a_grant_carries_the_directory_and_the_terms(registry):
    g = ask(registry.snapshot(), Ledger(), 1)
    assert isinstance(g, Grant)
    assert (g.ukms_b, g.akms_b, g.mode, g.max_key_size, g.keys_per_request) == (
        15,
        14,
        "gcm",
        256,
        16,
    )
    assert (g.keys, g.bits) == (100, 25_600)
    assert g.expires == NOW + VALIDITY_S
    b = ask(registry.snapshot(), Ledger(), 2, master="bob-b", slave="bob-a", ukms=15, akms=14)
    assert isinstance(b, Grant) and (b.mode, b.ukms_b, b.akms_b) == ("otp", 1, 2)
    assert (g.route_policy, b.route_policy) == ("balanced", "most-key")


def test_unknown_pairs_and_foreign_nodes_are_refused(registry):
    snap, ledger = registry.snapshot(), Ledger()
    cases = [
        (dict(slave="bob-b"), Reason.UNKNOWN_PAIR),  # another user's SAE
        (dict(master="alice-a", slave="alice-a"), Reason.UNKNOWN_PAIR),
        (dict(master="nobody"), Reason.UNKNOWN_PAIR),
        (dict(ukms=15), Reason.WRONG_NODE),  # the master is not at this UKMS
        (dict(akms=14), Reason.WRONG_NODE),  # UKMS 1 does not hang off AKMS 14
    ]
    for rid, (kw, reason) in enumerate(cases):
        answer = ask(snap, ledger, rid, **kw)
        assert isinstance(answer, Refusal) and answer.reason == reason, kw
    assert isinstance(ask(snap, ledger, 99), Grant)


def test_suspension_both_ways(registry):
    registry.set_user("alice", suspended=True)
    assert ask(registry.snapshot(), Ledger(), 1).reason == Reason.SUSPENDED
    registry.set_user("alice", suspended=False)
    registry.set_contract("alice-2026", suspended=True)
    assert ask(registry.snapshot(), Ledger(), 2).reason == Reason.SUSPENDED
    registry.set_contract("alice-2026", suspended=False)
    registry.set_sae("alice-b", suspended=True)
    assert ask(registry.snapshot(), Ledger(), 3).reason == Reason.SUSPENDED
    registry.set_sae("alice-b", suspended=False)
    assert isinstance(ask(registry.snapshot(), Ledger(), 4), Grant)


def test_the_validity_window_both_ways(registry):
    snap, ledger = registry.snapshot(), Ledger()
    last = dt.datetime(2026, 12, 31, 23, 59, 58, tzinfo=dt.UTC).timestamp()
    late = ask(snap, ledger, 1, now=last)
    assert isinstance(late, Grant) and late.expires == last + 2  # ends with the contract
    after = ask(snap, ledger, 2, now=last + 3)
    assert isinstance(after, Refusal) and after.reason == Reason.OUTSIDE_WINDOW
    before = ask(snap, ledger, 3, now=dt.datetime(2025, 12, 31, tzinfo=dt.UTC).timestamp())
    assert isinstance(before, Refusal) and before.reason == Reason.OUTSIDE_WINDOW


def test_the_daily_quota_both_ways_and_a_new_day_starts_afresh(registry):
    snap, ledger = registry.snapshot(), Ledger()
    got = [ask(snap, ledger, rid, keys=400, bits=400 * 256) for rid in range(3)]
    assert [g.keys for g in got if isinstance(g, Grant)] == [400, 400, 200]
    assert ask(snap, ledger, 3).reason == Reason.QUOTA
    assert ledger.close(got[0].id, used_keys=100, used_bits=25_600)
    assert ask(snap, ledger, 4, keys=1000).keys == 300  # the unused part came back
    tomorrow = NOW + 86_400
    assert isinstance(ask(snap, ledger, 5, now=tomorrow), Grant)


def test_bits_and_month_limits_bind_too(registry):
    snap, ledger = registry.snapshot(), Ledger()
    g = ask(snap, ledger, 1, keys=10, bits=300_000)
    assert isinstance(g, Grant) and g.bits == 256_000
    assert ask(snap, ledger, 2).reason == Reason.QUOTA
    for day in (1, 2):
        assert isinstance(
            ask(snap, ledger, 10 + day, keys=9, bits=256_000, now=NOW + day * 86_400), Grant
        )
    # three days' worth is the month's limit: the fourth day of June has nothing left
    assert ask(snap, ledger, 20, keys=1, now=NOW + 3 * 86_400).reason == Reason.QUOTA


def test_a_grant_never_crosses_midnight(registry):
    late = dt.datetime(2026, 6, 15, 23, 59, 55, tzinfo=dt.UTC).timestamp()
    g = ask(registry.snapshot(), Ledger(), 1, now=late)
    assert isinstance(g, Grant) and g.expires == late + 5 and g.day == "2026-06-15"


def test_a_repeated_ask_gets_the_same_answer_and_is_charged_once(registry):
    snap, ledger = registry.snapshot(), Ledger()
    first, again = ask(snap, ledger, 7), ask(snap, ledger, 7)
    assert first == again
    assert ledger.charged("alice-2026", "2026-06-15") == (100, 25_600)


def test_revocation_and_settlement_of_abandoned_grants(registry):
    snap, ledger = registry.snapshot(), Ledger()
    a, b = ask(snap, ledger, 1), ask(snap, ledger, 2, master="bob-a", slave="bob-b")
    assert ledger.revoke({"alice-2026"}) == [a]
    assert ledger.is_revoked(a.id) and not ledger.is_revoked(b.id)
    assert ledger.revoke({"alice-2026"}) == []  # once
    ledger.use(b.id, 3, 768)
    assert ledger.expire(NOW + VALIDITY_S + GRACE_S - 1) == []
    assert sorted(ledger.expire(NOW + VALIDITY_S + GRACE_S)) == [a.id, b.id]
    assert ledger.charged("bob-2026", "2026-06") == (3, 768)
    assert ledger.charged("alice-2026", "2026-06") == (0, 0)


def test_terms_changed_names_the_contracts_to_revoke(registry):
    before = registry.snapshot()
    registry.set_user("bob", suspended=True)
    assert terms_changed(before, registry.snapshot()) == {"bob-2026"}
    before = registry.snapshot()
    registry.set_contract("alice-2026", keys_per_day=5)
    assert terms_changed(before, registry.snapshot()) == {"alice-2026"}
    before = registry.snapshot()
    registry.set_user("alice", billing="new reference")
    assert terms_changed(before, registry.snapshot()) == {"alice-2026"}


# -- the property: never an over-grant ----------------------------------------------------
LIMITS = dict(keys_per_day=50, bits_per_day=6_400, keys_per_month=120, bits_per_month=15_000)
op = st.one_of(
    st.tuples(st.just("ask"), st.integers(0, 3), st.integers(1, 40), st.integers(8, 4000)),
    st.tuples(st.just("spend"), st.integers(0, 3), st.integers(0, 40), st.integers(0, 1)),
    st.tuples(st.just("close"), st.integers(0, 3), st.integers(0, 0), st.integers(0, 0)),
    st.tuples(st.just("revoke"), st.integers(0, 0), st.integers(0, 0), st.integers(0, 0)),
    st.tuples(
        st.just("tick"), st.integers(0, 0), st.sampled_from([1, 5, 11, 45, 86_400]), st.just(0)
    ),
)


def _snapshot() -> Snapshot:
    contract = Contract(
        id="c",
        user="u",
        max_key_size=256,
        keys_per_request=40,
        max_rate=1000,
        pairs=(("m", "s"),),
        **LIMITS,
    )
    return Snapshot(
        users={"u": User(id="u", customer="U")},
        saes={"m": Sae(id="m", user="u", ukms=1), "s": Sae(id="s", user="u", ukms=15)},
        ukms={1: 2, 15: 14},
        akms=frozenset({2, 14}),
        contracts={"c": contract},
        pairs={("m", "s"): "c"},
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=80))
def test_interleaved_asks_spends_closes_and_revocations_never_over_grant(ops):
    """Four AKMS wallets interleave at random (every interleaving a concurrent run can
    produce); each spends only what it holds. Charges and deliveries stay within limits."""
    snap, ledger, now = _snapshot(), Ledger(), NOW
    held: dict[int, list[list[int]]] = {w: [] for w in range(4)}  # [grant id, keys, bits, exp]
    delivered: dict[str, list[int]] = {}
    rid = 0
    for kind, w, a, b in ops:
        if kind == "ask":
            rid += 1
            g = ledger.ask(
                snap,
                Ask(akms=2, ukms=1, request_id=rid, master="m", slave="s", keys=a, bits=b),
                now,
            )
            if isinstance(g, Grant):
                assert g.keys <= a and g.bits <= b
                held[w].append([g.id, g.keys, g.bits, int(g.expires), g.day])
        elif kind == "spend" and held[w]:
            g = held[w][-1]
            n = min(a, g[1], g[2] // 64)
            if n and now < g[3] and not ledger.is_revoked(g[0]):
                g[1] -= n
                g[2] -= n * 64
                ledger.use(g[0], n, n * 64)
                for period in (g[4], g[4][:7]):
                    sums = delivered.setdefault(period, [0, 0])
                    sums[0] += n
                    sums[1] += n * 64
        elif kind == "close" and held[w]:
            ledger.close(held[w].pop(0)[0])
        elif kind == "revoke":
            ledger.revoke({"c"})
        elif kind == "tick":
            now += a
            ledger.expire(now)
        for period, (keys, bits) in [(p, ledger.charged("c", p)) for p in _periods(now)]:
            day = len(period) == 10
            assert 0 <= keys <= LIMITS["keys_per_day" if day else "keys_per_month"]
            assert 0 <= bits <= LIMITS["bits_per_day" if day else "bits_per_month"]
    for period, (keys, bits) in delivered.items():
        day = len(period) == 10
        assert keys <= LIMITS["keys_per_day" if day else "keys_per_month"]
        assert bits <= LIMITS["bits_per_day" if day else "bits_per_month"]
        charged = ledger.charged("c", period)
        assert keys <= charged[0] and bits <= charged[1]


def _periods(now: float) -> list[str]:
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return [day.isoformat(), day.isoformat()[:7]]


def test_contract_dataclass_is_frozen():
    c = _snapshot().contracts["c"]
    assert dataclasses.replace(c, priority=3).priority == 3 and c.priority == 0


def test_the_monthly_key_limit_binds(registry):
    snap, ledger = registry.snapshot(), Ledger()
    for day in range(3):
        g = ask(snap, ledger, day, keys=1000, bits=256, now=NOW + day * 86_400)
        assert isinstance(g, Grant) and g.keys == 1000
    assert ask(snap, ledger, 9, keys=1, bits=8, now=NOW + 3 * 86_400).reason == Reason.QUOTA
