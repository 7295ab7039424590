"""The MIB view without SNMP: SET validation (types, ranges, rows, who may report) and
what the operator's changes revoke."""

from __future__ import annotations

import pytest

from appliance.aaa import mib
from appliance.aaa.accounting import Accounting
from appliance.aaa.ledger import Ask, Grant
from appliance.aaa.service import AaaService
from appliance.aaa.view import MibView, SetFailure
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


@pytest.mark.parametrize(
    ("column", "index", "value", "status"),
    [
        ("aaaContractMaxKeySize", "alice-2026", 12, "inconsistentValue"),  # not a multiple of 8
        ("aaaContractMaxKeySize", "alice-2026", 9000, "wrongValue"),  # above the MIB's range
        ("aaaContractRelayMode", "alice-2026", 3, "wrongValue"),
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
