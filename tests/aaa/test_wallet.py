"""The AKMS's wallet (sans-IO): spends only what a grant holds, within the contract's
limits and rate, before expiry, never after a revocation; asks ahead; settles once."""

from __future__ import annotations

import pytest

from appliance.aaa.client import parse_answer, verdict
from appliance.aaa.errors import SnmpError
from appliance.aaa.ledger import Reason, Refusal
from appliance.aaa.wallet import REFUSAL_TTL_S, Spent, Terms, Wallet
from appliance.kms.relay import Mode
from appliance.kms.seams import Denial

PAIR = ("a", "b")


def terms(**kw: object) -> Terms:
    fields: dict[str, object] = dict(
        ukms=1,
        grant=7,
        contract="c",
        keys=10,
        bits=2560,
        lifetime_s=10.0,
        ukms_b=15,
        akms_b=14,
        mode="otp",
        max_key_size=256,
        keys_per_request=4,
        max_rate=1000,
        keys_per_period=100_000,
    )
    fields.update(kw)
    return Terms(**fields)  # type: ignore[arg-type]


def test_spends_what_the_grant_holds_and_then_asks():
    w = Wallet()
    assert w.spend("a", "b", 1, 256, 0.0) is None  # nothing held: ask
    w.add(PAIR, terms(), sent=0.0)
    got = [w.spend("a", "b", 4, 256, 1.0) for _ in range(3)]
    assert [isinstance(g, Spent) for g in got] == [True, True, False]
    assert got[2] is None  # 8 of 10 spent, 4 more do not fit: ask
    assert isinstance(w.spend("a", "b", 2, 256, 1.0), Spent)


def test_limits_and_rate_are_enforced_locally():
    w = Wallet()
    w.add(PAIR, terms(max_rate=5, keys=100, bits=100 * 256), sent=0.0)
    for number, size in ((5, 256), (1, 512), (1, 12), (0, 256)):
        r = w.spend("a", "b", number, size, 1.0)
        assert isinstance(r, Refusal) and r.reason == Reason.LIMITS
    assert isinstance(w.spend("a", "b", 4, 256, 1.0), Spent)
    r = w.spend("a", "b", 4, 256, 1.0)
    assert isinstance(r, Refusal) and r.reason == Reason.RATE
    assert isinstance(w.spend("a", "b", 4, 256, 2.0), Spent)  # a second later


def test_expiry_counts_from_when_the_ask_was_sent():
    w = Wallet()
    w.add(PAIR, terms(lifetime_s=2.0), sent=10.0)
    assert isinstance(w.spend("a", "b", 1, 256, 11.9), Spent)
    assert w.spend("a", "b", 1, 256, 12.0) is None


def test_a_revoked_grant_is_never_spent_and_is_settled_once_with_its_use():
    w = Wallet()
    w.add(PAIR, terms(), sent=0.0)
    assert isinstance(w.spend("a", "b", 2, 256, 1.0), Spent)
    assert w.revoke(contract="c") == 1
    assert w.spend("a", "b", 1, 256, 1.0) is None
    closed = w.to_close(1.0)
    assert [(h.terms.grant, h.used_keys, h.used_bits) for _, _, h in closed] == [(7, 2, 512)]
    assert w.to_close(2.0) == []


def test_refusals_are_remembered_briefly_and_asks_go_ahead_of_need():
    w = Wallet()
    w.add(PAIR, Refusal(reason=Reason.SUSPENDED, message="x"), sent=0.0)
    assert w.spend("a", "b", 1, 256, 0.1).reason == Reason.SUSPENDED
    assert not w.wants("a", "b", 0.1)
    assert w.spend("a", "b", 1, 256, REFUSAL_TTL_S) is None
    w.add(PAIR, terms(keys=10), sent=1.0)
    assert not w.wants("a", "b", 1.0)
    for _ in range(2):
        w.spend("a", "b", 4, 256, 1.0)
    assert w.wants("a", "b", 1.0)  # 2 of 10 left
    w.add(PAIR, terms(grant=8, keys=10), sent=1.0)
    assert not w.wants("a", "b", 2.0) and w.wants("a", "b", 9.0)  # near expiry


def test_a_failed_request_gives_its_keys_back():
    w = Wallet()
    w.add(PAIR, terms(), sent=0.0)
    spent = w.spend("a", "b", 4, 256, 1.0)
    assert isinstance(spent, Spent)
    w.unspend("a", "b", spent, 4, 256)
    assert [h.used_keys for h in w.open()] == [0]


def test_answers_and_verdicts():
    t = parse_answer(1, b"0 9 100 25600 9500 15 14 2 256 16 1000 5000 bank-2026")
    assert isinstance(t, Terms) and (t.grant, t.mode, t.contract, t.lifetime_s) == (
        9,
        "otp",
        "bank-2026",
        9.5,
    )
    assert (t.keys_per_period, t.route_policy) == (5000, "balanced")  # an older AAA's
    t = parse_answer(1, b"0 9 100 25600 9500 15 14 2 256 16 1000 5000 bank-2026 3")
    assert isinstance(t, Terms) and t.route_policy == "most-key"
    spent = Spent(grant=1, contract="c", mode="otp", ukms_b=15, akms_b=14, route_policy="most-key")
    assert verdict(spent).route_policy == "most-key"
    r = parse_answer(1, b"3 0 0 0 0 0 0 0 0 0 0 0")
    assert isinstance(r, Refusal) and r.reason == Reason.SUSPENDED
    assert verdict(r).denied.why == Denial.UNAUTHORISED
    for short in (b"0 9 100 25600 9500 15 14 2 256 16 1000", b"3 0 0", b""):
        with pytest.raises(SnmpError) as caught:
            parse_answer(1, short)
        assert caught.value.code == "AAA-ANSWER"
    assert verdict(Refusal(reason=Reason.RATE, message="")).denied.why == Denial.QUOTA
    assert verdict(Refusal(reason=Reason.LIMITS, message="")).denied.why == Denial.LIMITS
    ok = verdict(Spent(grant=1, contract="c", mode="otp", ukms_b=15, akms_b=14))
    assert ok.denied is None and (ok.mode, ok.akms_b) == (Mode.OTP, 14)
