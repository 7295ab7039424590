# ruff: noqa: F811 - pytest fixtures imported from the smartcard tests
"""qkdnCardRemoved after start: a PSK smartcard (an emulated card in vpcd, through pcscd,
as tests/hsm uses) pulled while the node runs is noticed by the agent's probe, raises the
alarm, and clears when the card is back. Nothing mocked below pyscard."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from appliance.mgmt.detect import Detector
from appliance.mgmt.nodestate import cards_present
from appliance.mgmt.nodeview import NodeReading
from hsm.card import open_card_psk_source
from hsm.psk import FilePskSource, write_psk_file
from tests.hsm.conftest import PORT_A, card_a, pcscd, rack, url_of  # noqa: F401
from tests.hsm.test_card_pcsc import card, personalise, pin_file  # noqa: F401

BASE = NodeReading(id=2, name="akms-east", role="akmsCkms", software="qkdn", card="present",
                   card_sources=1)  # fmt: skip


def test_a_card_pulled_while_running_raises_card_removed_until_it_is_back(
    card, card_a, rack, tmp_path: Path
):
    personalise(card)
    source = open_card_psk_source(url_of(card_a, pin_file=pin_file(tmp_path)))
    write_psk_file(tmp_path / "peer.psk", bytes(32))
    plain = FilePskSource(tmp_path / "peer.psk")  # a file source: nothing to probe
    detector = Detector()
    try:
        assert cards_present([source, plain])
        assert detector.observe(BASE) == []
        card_a.remove_on = lambda apdu: True  # pulled: the next command finds no card
        assert not cards_present([source, plain])
        [notice] = detector.observe(dataclasses.replace(BASE, card="absent"))
        assert (notice.name, notice.severity, notice.resource) == (
            "qkdnCardRemoved",
            "major",
            "card",
        )
        assert not cards_present([source])  # still out: no new alarm, still absent
        assert detector.observe(dataclasses.replace(BASE, card="absent")) == []
        rack.fresh(PORT_A, state=card_a.applet.state)  # the same card, inserted again
        assert cards_present([source])
        [back] = detector.observe(BASE)
        assert (back.name, back.severity) == ("qkdnCardRemoved", "cleared")
    finally:
        source.close()
        plain.close()
