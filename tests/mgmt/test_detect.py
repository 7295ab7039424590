"""Which notifications a node's readings raise and clear (sans-IO)."""

from __future__ import annotations

import dataclasses

from appliance.mgmt.detect import LOW_KEYS, QBER_WARN_PPM, Detector
from appliance.mgmt.nodeview import LinkReading, NodeReading

LINK = LinkReading(peer=9, name="link-8-9", state="up", qber_ppm=20_000, level=500)


def reading(link: LinkReading = LINK, **fields: object) -> NodeReading:
    base = NodeReading(id=8, name="ckms-8", role="ckms", software="qkdn", links=(link,))
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def names(notices):
    return [(n.name, n.severity) for n in notices]


def test_a_healthy_start_says_nothing_and_a_link_down_at_start_is_raised():
    assert Detector().observe(reading()) == []
    down = dataclasses.replace(LINK, state="down")
    assert names(Detector().observe(reading(down))) == [("qkdnLinkDown", "major")]


def test_link_down_then_up_raises_then_clears():
    d = Detector()
    d.observe(reading())
    notices = d.observe(reading(dataclasses.replace(LINK, state="abort")))
    assert names(notices) == [("qkdnLinkDown", "major")] and notices[0].peer == 9
    assert d.observe(reading(dataclasses.replace(LINK, state="abort"))) == []
    assert names(d.observe(reading())) == [("qkdnLinkUp", "cleared")]


def test_qber_and_key_level_thresholds():
    d = Detector()
    d.observe(reading())
    high = dataclasses.replace(LINK, qber_ppm=QBER_WARN_PPM + 1, level=LOW_KEYS - 1)
    assert names(d.observe(reading(high))) == [
        ("qkdnQberHigh", "warning"),
        ("qkdnKeyStoreLow", "minor"),
    ]
    assert names(d.observe(reading())) == [
        ("qkdnQberHigh", "cleared"),
        ("qkdnKeyStoreLow", "cleared"),
    ]


def test_rng_card_integrity_and_refused_requests():
    d = Detector()
    d.observe(reading(card="present"))
    got = d.observe(reading(rng_health="failed", card="absent", integrity=2), refusals=3)
    assert names(got) == [
        ("qkdnRngHealthFailure", "critical"),
        ("qkdnCardRemoved", "major"),
        ("qkdnIntegrityAlarm", "major"),
        ("qkdnAuthFailure", "warning"),
    ]
    assert names(d.observe(reading(card="present", integrity=2), refusals=3)) == [
        ("qkdnRngHealthFailure", "cleared"),
        ("qkdnCardRemoved", "cleared"),
    ]
