"""The manager's side of ``qkdn demo --fault``: the cut's link name from the manager's
configuration, and the cut link's alarm found (raised after the fault, cleared) in its
database, on an injected store clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.mgmt.demo import link_name, watch_alarm
from appliance.mgmt.errors import MgmtError
from appliance.mgmt.store import Store


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def network(tmp_path: Path) -> Path:
    (tmp_path / "mgmt").mkdir()
    (tmp_path / "mgmt" / "manager.toml").write_text(
        'links = [{a = 8, b = 9, name = "link-8-9"}, {a = 8, b = 16, name = "link-8-16"}]\n'
    )
    return tmp_path


def test_the_cut_is_named_as_the_topology_names_it(tmp_path: Path):
    net = network(tmp_path)
    assert link_name(net, 9, 8) == "link-8-9" and link_name(net, 8, 16) == "link-8-16"
    with pytest.raises(MgmtError) as caught:
        link_name(net, 9, 10)
    assert caught.value.code == "MGMT-LINK"
    with pytest.raises(MgmtError):
        link_name(tmp_path / "none", 8, 9)


def test_the_cuts_alarm_is_the_one_raised_after_the_fault_and_its_clear(tmp_path: Path):
    net = network(tmp_path)
    clock = Clock(1000.0)
    store = Store(net / "mgmt" / "manager.db", clock=clock)
    store.notify("qkdnLinkDown", "ckms-minden", "major", "link-8-9", "an older cut")
    clock.t = 1001.0
    store.notify("qkdnLinkUp", "ckms-minden", "cleared", "link-8-9", "up")
    clock.t = 2000.4
    ours = store.notify("qkdnLinkDown", "qkdn-controller", "major", "link-8-9", "unusable")
    store.notify("qkdnKeyStoreLow", "ckms-minden", "minor", "link-8-9", "another kind")
    clock.t = 2000.7
    store.notify("qkdnLinkDown", "ckms-minden", "major", "link-8-9", "link down")
    clock.t = 2010.25
    store.notify("qkdnLinkUp", "ckms-minden", "cleared", "link-8-9", "link up")
    store.close()
    alarm = watch_alarm(net, "link-8-9", fault_at=2000.0, restored_at=2010.0, timeout=5)
    assert alarm.id == ours and alarm.raised_after_ms == 400.0
    assert alarm.cleared_after_ms == 250.0 and alarm.cleared_at == 2010.25
    assert alarm.sources == ["qkdn-controller", "ckms-minden"] and alarm.reports == 2


def test_no_alarm_for_the_cut_is_said_so(tmp_path: Path):
    net = network(tmp_path)
    Store(net / "mgmt" / "manager.db").close()
    alarm = watch_alarm(net, "link-8-16", fault_at=10.0, restored_at=20.0, timeout=0.2)
    assert alarm.id == 0 and alarm.cleared_at is None
    with pytest.raises(MgmtError):
        watch_alarm(tmp_path / "none", "link-8-9", 1.0, 2.0)
