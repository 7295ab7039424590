"""The MIB view without SNMP: SET validation (types, ranges, rows, who may report) and
what the operator's changes revoke."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.aaa import mib
from appliance.aaa.accounting import Accounting
from appliance.aaa.ledger import Ask, Grant
from appliance.aaa.service import AaaService
from appliance.aaa.view import MibView, SetFailure, quota_columns, record
from tests.aaa.registry_fixture import NOW


def name(text: str) -> tuple[int, ...]:
    return (len(text), *text.encode())


@pytest.fixture
def view(registry, tmp_path):
    service = AaaService(registry, Accounting(tmp_path / "accounting.db"), clock=lambda: NOW)
    yield MibView(service)
    service.accounting.close()


def test_an_operator_set_changes_the_contract_and_revokes_its_grants(view):
    g = view.service.ask(
        Ask(akms=2, ukms=1, request_id=1, master="alice-a", slave="alice-b", keys=10, bits=2560)
    )
    assert isinstance(g, Grant)
    oid = mib.oid("aaaContractKeysPerDay") + name("alice-2026")
    assert view.set([(oid, 5)], None) == [g]
    assert view.service.registry.contract("alice-2026").keys_per_day == 5
    assert view.get(oid, None) == ("Unsigned32", 5)


def test_an_operator_sets_a_contracts_routing_class_and_the_next_grant_carries_it(view):
    oid = mib.oid("aaaContractRoutePolicy") + name("alice-2026")
    assert view.get(oid, None) == ("INTEGER", 1)
    view.set([(oid, 2)], None)
    assert view.service.registry.contract("alice-2026").route_policy == "fewest-hops"
    g = view.service.ask(
        Ask(akms=2, ukms=1, request_id=1, master="alice-a", slave="alice-b", keys=10, bits=2560)
    )
    assert isinstance(g, Grant) and g.route_policy == "fewest-hops"
    cols = quota_columns(g, NOW)
    assert cols["aaaQuotaRoutePolicy"] == 2 and cols["aaaQuotaAnswer"].endswith(b" alice-2026 2")


@pytest.mark.parametrize(
    ("column", "index", "value", "status"),
    [
        ("aaaContractMaxKeySize", "alice-2026", 12, "inconsistentValue"),  # not a multiple of 8
        ("aaaContractMaxKeySize", "alice-2026", 9000, "wrongValue"),  # above the MIB's range
        ("aaaContractRelayMode", "alice-2026", 3, "wrongValue"),
        ("aaaContractRoutePolicy", "alice-2026", 4, "wrongValue"),
        ("aaaContractRoutePolicy", "alice-2026", 0, "wrongValue"),
        ("aaaUserSuspended", "nobody", 1, "noCreation"),
        ("aaaUserCustomer", "alice", b"x", "notWritable"),
        ("aaaUserSuspended", "alice", b"1", "wrongValue"),
    ],
)
def test_bad_sets_are_refused_with_their_status(view, column, index, value, status):
    with pytest.raises(SetFailure) as exc:
        view.set([(mib.oid(column) + name(index), value)], None)
    assert exc.value.status == status
    assert not view.service.registry.user("alice").suspended


def test_a_report_needs_master_slave_outcome_and_the_masters_own_ukms(view):
    rid = name("r-1")
    m = {c: mib.oid(c) for c in ("aaaUsageMaster", "aaaUsageSlave", "aaaUsageOutcome")}
    with pytest.raises(SetFailure) as exc:
        view.set([(m["aaaUsageMaster"] + (1, *rid), b"alice-a")], 2)
    assert exc.value.status == "inconsistentValue"
    foreign = [
        (m["aaaUsageMaster"] + (15, *rid), b"alice-a"),
        (m["aaaUsageSlave"] + (15, *rid), b"alice-b"),
        (m["aaaUsageOutcome"] + (15, *rid), 2),
    ]
    with pytest.raises(SetFailure):
        view.set(foreign, 14)  # UKMS 15 does not serve alice-a
    own = [((*o[: -len(rid) - 1], 1, *rid), v) for o, v in foreign]
    assert view.set(own, 2) == []
    assert view.get(m["aaaUsageOutcome"] + (1, *rid), 2) == ("INTEGER", 2)


def test_a_walk_lists_the_directory_in_oid_order_and_no_quota_rows(view):
    oids, at = [], mib.AAA_ARC
    while (found := view.next(at)) is not None:
        oids.append(found[0])
        at = found[0]
    assert oids == sorted(oids) and len(oids) > 20
    quota = mib.oid("aaaQuotaTable")
    assert not [o for o in oids if o[: len(quota)] == quota]


def _usage(column: str, ukms: int, request: str) -> tuple[int, ...]:
    return (*mib.oid(column), ukms, *name(request))


def test_a_record_reports_as_the_columns_do_and_reads_back(view):
    """aaaUsageRecord alone is the whole report: recorded as a SET of every column would
    record it, counted once when repeated, read back in the same form."""
    columns = [
        (_usage("aaaUsageMaster", 1, "r-cols"), b"alice-a"),
        (_usage("aaaUsageSlave", 1, "r-cols"), b"alice-b"),
        (_usage("aaaUsageOutcome", 1, "r-cols"), 1),
        (_usage("aaaUsageKeys", 1, "r-cols"), 2),
        (_usage("aaaUsageBits", 1, "r-cols"), 512),
    ]
    assert view.set(columns, 2) == []
    rec = record("alice-a", "alice-b", 1, 0, 2, 512, 0)
    for _ in range(2):  # a retried report counts once
        assert view.set([(_usage("aaaUsageRecord", 1, "r-rec"), rec)], 2) == []
    by_cols, by_rec = view.service.recorded(1, "r-cols"), view.service.recorded(1, "r-rec")
    assert by_cols is not None and by_rec is not None
    assert (by_rec.master, by_rec.slave, by_rec.outcome, by_rec.keys, by_rec.bits) == (
        by_cols.master,
        by_cols.slave,
        by_cols.outcome,
        by_cols.keys,
        by_cols.bits,
    )
    assert view.get(_usage("aaaUsageRecord", 1, "r-cols"), 2) == ("OCTET STRING", rec)
    assert view.get(_usage("aaaUsageKeys", 1, "r-rec"), 2) == ("Unsigned32", 2)


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (b"alice-a alice-b 1 0 2 512", "wrongValue"),  # six fields
        (b"alice-a alice-b 1 0 2 512 0 0", "wrongValue"),  # eight
        (b"alice-a alice-b 4 0 2 512 0", "wrongValue"),  # no such outcome
        (b"alice-a alice-b 3 9 0 0 0", "wrongValue"),  # no such reason
        (b"alice-a alice-b 1 0 100001 512 0", "wrongValue"),  # keys above the MIB's range
        (b"alice-a alice-b 1 0 -2 512 0", "wrongValue"),
        (b"alice-a alice-b 1 0 2 4294967296 0", "wrongValue"),
        (b"alice-a  alice-b 1 0 2 512 0", "wrongValue"),  # an empty field
        (b"alice-a alice-b 2 0 0 0 0", None),  # a failed request: accepted
        (b"alice-a bob-b 3 1 0 0 0", None),  # a refusal for a pair no contract names
        (b"alice-b alice-a 1 0 1 256 0", "inconsistentValue"),  # not UKMS 1's master
    ],
)
def test_a_malformed_record_is_refused_and_records_nothing(view, value, status):
    oid = _usage("aaaUsageRecord", 1, "r-bad")
    if status is None:
        assert view.set([(oid, value)], 2) == []
        assert view.service.recorded(1, "r-bad") is not None
        return
    with pytest.raises(SetFailure) as exc:
        view.set([(oid, value)], 2)
    assert exc.value.status == status
    assert view.service.recorded(1, "r-bad") is None


def test_a_record_is_set_alone(view):
    binds = [
        (_usage("aaaUsageRecord", 1, "r-2"), record("alice-a", "alice-b", 2, 0, 0, 0, 0)),
        (_usage("aaaUsageOutcome", 1, "r-2"), 2),
    ]
    with pytest.raises(SetFailure) as exc:
        view.set(binds, 2)
    assert exc.value.status == "inconsistentValue"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=130),
        st.lists(
            st.one_of(
                st.sampled_from(["alice-a", "alice-b", "0", "1", "3", "7"]), st.text(max_size=12)
            ),
            max_size=9,
        ).map(lambda xs: " ".join(xs).encode("utf-8")),
    )
)
def test_any_record_is_recorded_as_its_fields_say_or_refused_with_a_status(view, value):
    oid = _usage("aaaUsageRecord", 1, "r-fuzz")
    before = view.service.recorded(1, "r-fuzz")
    try:
        view.set([(oid, value)], 2)
    except SetFailure as exc:
        assert exc.status in ("wrongValue", "inconsistentValue")
        assert view.service.recorded(1, "r-fuzz") == before
        return
    got = view.service.recorded(1, "r-fuzz")
    assert got is not None
    fields = value.split(b" ")
    assert (got.master.encode(), got.slave.encode()) == (fields[0], fields[1])
    assert (got.keys, got.bits, got.grant) == (int(fields[4]), int(fields[5]), int(fields[6]))
