"""The manager's records: alarms (raise, correlate, clear, acknowledge), history with
downsampling, sessions and password hashes: all on injected clocks."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.mgmt.store import BUCKET_S, RAW_KEEP_S, LinkSample, Store
from appliance.mgmt.web import Sessions, check_password, hash_password


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_both_ends_of_a_link_make_one_alarm_and_its_clear_closes_it(tmp_path: Path):
    clock = Clock()
    store = Store(tmp_path / "m.db", clock=clock)
    first = store.notify("qkdnLinkDown", "ckms-8", "major", "link-8-9", "link down")
    clock.t += 1
    second = store.notify("qkdnLinkDown", "ckms-9", "major", "link-8-9", "link down")
    assert first == second
    [alarm] = store.alarms()
    assert (alarm.kind, alarm.resource, alarm.reports, alarm.severity) == (
        "link",
        "link-8-9",
        2,
        "major",
    )
    assert store.notify("qkdnLinkUp", "ckms-9", "cleared", "link-8-9", "link up") == first
    assert store.alarms() == []
    [closed] = store.alarms(include_cleared=True)
    assert closed.cleared == clock.t and closed.severity == "cleared"
    # a clear that matches no open alarm changes nothing; a new fault is a new alarm
    assert store.notify("qkdnLinkUp", "ckms-9", "cleared", "link-8-9", "up") is None
    assert store.notify("qkdnLinkDown", "ckms-9", "major", "link-8-9", "down") != first


def test_a_clear_matches_only_its_own_kind_and_resource(tmp_path: Path):
    store = Store(tmp_path / "m.db", clock=Clock())
    low = store.notify("qkdnKeyStoreLow", "ckms-8", "minor", "link-8-9", "3 keys")
    store.notify("qkdnRngHealthFailure", "ckms-8", "critical", "rng", "failed")
    assert store.notify("qkdnQberHigh", "ckms-8", "cleared", "link-8-9", "ok") is None
    assert store.notify("qkdnRngHealthFailure", "ckms-9", "cleared", "rng", "ok") is None
    assert {a.kind for a in store.alarms()} == {"keys", "rng"}
    assert store.notify("qkdnKeyStoreLow", "ckms-9", "cleared", "link-8-9", "ok") == low
    assert [a.kind for a in store.alarms()] == ["rng"]


def test_acknowledge_once_and_unknown_notifications_are_no_alarms(tmp_path: Path):
    store = Store(tmp_path / "m.db", clock=Clock())
    n = store.notify("qkdnLinkDown", "ckms-8", "major", "link-8-9", "down")
    assert n is not None
    assert store.ack(n, "alice") and not store.ack(n, "bob") and not store.ack(n + 1, "x")
    assert store.alarms()[0].acked_by == "alice"
    assert store.notify("qkdnAuthFailure", "ckms-8", "warning", "snmp", "x") is None
    assert store.notify("qkdnLinkDown", "ckms-8", "loud", "link-8-9", "x") is None


def test_history_folds_old_samples_into_buckets(tmp_path: Path):
    clock = Clock(10 * BUCKET_S)
    store = Store(tmp_path / "m.db", clock=clock)
    for i in range(60):
        sample = LinkSample(
            node="ckms-8",
            link="link-8-9",
            peer=9,
            state="up",
            skr=1000 + i,
            qber_ppm=20_000,
            level=100 - i,
            capacity=1000,
            consumed=i,
        )
        store.record([sample])
        clock.t += 30
    clock.t += RAW_KEEP_S
    folded = store.downsample()
    assert folded == 60
    rows = store.history("link-8-9")
    assert 1 <= len(rows) <= 3 and all(r["span"] == BUCKET_S for r in rows)
    assert sum(r["n"] for r in rows) == 60
    assert min(r["level_min"] for r in rows) == 41
    assert store.links()[0]["level"] == 41  # the current state is kept apart


def test_a_poll_rounds_rows_commit_together_or_not_at_all(tmp_path: Path):
    """Store.transaction: what runs inside (a nested record() too) is one transaction: seen
    by another connection only after it commits; an error inside leaves nothing."""
    import sqlite3

    import pytest

    store = Store(tmp_path / "m.db")
    other = sqlite3.connect(tmp_path / "m.db")
    sample = LinkSample(
        node="ckms-8", link="link-8-9", peer=9, state="up", skr=1, qber_ppm=1, level=1,
        capacity=1, consumed=0,
    )  # fmt: skip
    with store.transaction():
        store.seen("ckms-8", id=8, role="ckms", software="q", slot="none", address="a", reachable=1)
        store.record([sample])
        assert store.db.in_transaction
        assert other.execute("SELECT COUNT(*) FROM inventory").fetchone()[0] == 0
    assert other.execute("SELECT COUNT(*) FROM links").fetchone()[0] == 1
    with pytest.raises(RuntimeError), store.transaction():
        store.seen("ckms-9", id=9, role="ckms", software="q", slot="none", address="a", reachable=1)
        raise RuntimeError("a failed round")
    assert [r["node"] for r in store.inventory()] == ["ckms-8"]
    other.close()
    store.close()


def test_sessions_expire_on_the_clock():
    clock = Clock()
    sessions = Sessions(60.0, clock)
    token = sessions.open("alice", "ack")
    assert sessions.get(token) is not None and sessions.get("forged") is None
    clock.t += 59.9
    assert sessions.get(token) is not None
    clock.t += 0.2
    assert sessions.get(token) is None
    assert sessions.get(token) is None


@settings(max_examples=2, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_password_hashes_verify_only_their_password(password: str):
    stored = hash_password(password)
    assert check_password(password, stored)
    assert not check_password(password + "x", stored)
    assert not check_password(password, "scrypt$1$1$1$zz$zz")
    assert not check_password(password, "plain")
