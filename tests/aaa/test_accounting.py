"""Accounting: exact, idempotent by request ID, tamper-evident (hash chain, signed heads)."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.aaa.accounting import Accounting, Report, export, verify
from appliance.aaa.errors import AccountingError
from appliance.aaa.ledger import Reason
from tests.aaa.registry_fixture import NOW

DAY = 86_400.0


def report(rid: str, outcome: str = "delivered", **kw: object) -> Report:
    fields: dict[str, object] = dict(
        request=rid,
        contract="alice-2026",
        user="alice",
        master="alice-a",
        slave="alice-b",
        outcome=outcome,
    )
    if outcome == "delivered":
        fields.update(keys=2, bits=512, grant=1)
    fields.update(kw)
    return Report(**fields)  # type: ignore[arg-type]


@pytest.fixture
def acct(tmp_path):
    a = Accounting(tmp_path / "accounting.db")
    yield a
    a.close()


def test_counts_per_pair_and_period_with_refusals_by_reason(acct):
    acct.record(report("1:1"), NOW)
    acct.record(report("1:2"), NOW)
    acct.record(report("1:3", "failed"), NOW)
    acct.record(report("1:4", "refused", reason=Reason.QUOTA), NOW)
    acct.record(report("1:5", "refused", reason=Reason.SUSPENDED), NOW)
    acct.record(report("1:6", "refused", reason=Reason.LIMITS), NOW + DAY)
    day = dt.date(2026, 6, 15)
    (row,) = acct.rows(day, day)
    assert (row.allowed, row.keys, row.bits, row.failed) == (3, 4, 1024, 1)
    assert (row.refused_quota, row.refused_unauthorised, row.refused_limits) == (1, 1, 0)
    (month,) = acct.rows(day, day + dt.timedelta(days=1), by="month")
    assert month.period == "2026-06" and month.refused_limits == 1 and month.keys == 4
    assert acct.rows(day, day, user="bob") == []


def test_a_retried_report_counts_once_and_a_conflicting_one_is_refused(acct):
    assert acct.record(report("1:1"), NOW)
    assert not acct.record(report("1:1"), NOW + 5)
    with pytest.raises(AccountingError) as exc:
        acct.record(report("1:1", keys=3, bits=768), NOW + 6)
    assert exc.value.code == "AAA-CONFLICT"
    assert acct.count() == 1


def test_only_delivered_requests_carry_keys(acct):
    with pytest.raises(AccountingError):
        acct.record(report("1:1", "failed", keys=1, bits=256), NOW)
    with pytest.raises(AccountingError):
        acct.record(report("1:2", "refused"), NOW)  # no reason


def test_the_chain_and_signed_heads_verify_and_any_edit_breaks_them(acct, tmp_path):
    key = Ed25519PrivateKey.generate()
    for i in range(5):
        acct.record(report(f"1:{i}"), NOW + i * DAY / 2)
    assert acct.seal(key, before="2026-06-18") == ["2026-06-15", "2026-06-16", "2026-06-17"]
    assert acct.seal(key, before="2026-06-18") == []
    good = verify(acct.path, key.public_key())
    assert (good.records, good.heads) == (5, 3)
    with pytest.raises(AccountingError, match="signature"):
        verify(acct.path, Ed25519PrivateKey.generate().public_key())
    db = sqlite3.connect(acct.path)
    db.execute("UPDATE records SET keys = 200 WHERE seq = 2")
    db.commit()
    with pytest.raises(AccountingError, match="record 2"):
        verify(acct.path, key.public_key())
    db.execute("UPDATE records SET keys = 2 WHERE seq = 2")
    db.execute("DELETE FROM records WHERE seq = 3")
    db.commit()
    with pytest.raises(AccountingError, match="record 4"):
        verify(acct.path, key.public_key())
    db.close()


def test_removing_a_days_tail_breaks_its_signed_head(acct):
    key = Ed25519PrivateKey.generate()
    for i in range(3):
        acct.record(report(f"1:{i}"), NOW + i)
    acct.seal(key, before="2026-06-16")
    db = sqlite3.connect(acct.path)
    db.execute("DELETE FROM records WHERE seq = 3")
    db.commit()
    db.close()
    with pytest.raises(AccountingError, match="head of 2026-06-15"):
        verify(acct.path, key.public_key())


def test_export_csv_and_json_carry_the_billing_reference(acct):
    acct.record(report("1:1"), NOW)
    rows = acct.rows(dt.date(2026, 6, 1), dt.date(2026, 6, 30))
    text = export(rows, "csv", {"alice": "B-77"})
    assert text.splitlines()[0].startswith("period,contract,user,master,slave,allowed")
    assert text.splitlines()[1].endswith(",2,512,0,B-77")
    assert '"billing": "B-77"' in export(rows, "json", {"alice": "B-77"})


def test_a_batch_commits_once_and_keeps_what_it_accepted_before_an_error(acct):
    other = sqlite3.connect(acct.path)
    with pytest.raises(AccountingError), acct.batch():
        assert acct.record(report("1:1"), NOW)
        assert acct.record(report("1:2"), NOW)
        assert not acct.record(report("1:1"), NOW)  # a retry inside the batch: once
        assert other.execute("SELECT count(*) FROM records").fetchone()[0] == 0  # not yet
        acct.record(report("1:2", keys=9), NOW)  # a conflict ends the batch
    assert other.execute("SELECT count(*) FROM records").fetchone()[0] == 2
    assert acct.record(report("1:3"), NOW)  # outside a batch: committed on its own
    assert other.execute("SELECT count(*) FROM records").fetchone()[0] == 3
    assert verify(acct.path, Ed25519PrivateKey.generate().public_key()).records == 3  # chain
    other.close()
