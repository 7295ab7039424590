"""Smartcard fixtures: pcscd (started here only if none runs), and emulated cards in vpcd's
two slots, reset to blank for each test without a removal (pcscd polls readers, so every
real insertion costs 0.2-0.5 s). Nothing is mocked below pyscard.

Per module, not per session: a module holds vpcd's slots under a machine-wide lock
(:func:`hsm.testing.vpcd_slots`), so test runs started at once on one machine take turns
module by module instead of stealing each other's cards (or pcscd). The emulators run in
threads of this process and are closed at the end of each module: a live emulator thread
next to pyscard would hang the interpreter at exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hsm.testing import CardRack, ensure_pcscd, vpcd_slots
from hsm.vpcd import VirtualCard

PORT_A, PORT_B = 35963, 35964


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bool]:
    """vpcd's slots are ours and pcscd runs; True if started here (it is stopped after)."""
    log = tmp_path_factory.mktemp("pcscd") / "pcscd.log"
    with vpcd_slots(), ensure_pcscd(log=log) as started:
        yield started


@pytest.fixture(scope="module")
def rack(pcscd: bool) -> Iterator[CardRack]:
    cards = CardRack()
    try:
        yield cards
    finally:
        cards.close()


@pytest.fixture
def card_a(rack: CardRack) -> VirtualCard:
    """A blank emulated card in reader 'Virtual PCD 00 00' (pcsc://#0)."""
    return rack.fresh(PORT_A)


@pytest.fixture
def card_b(rack: CardRack) -> VirtualCard:
    """A blank emulated card in reader 'Virtual PCD 00 01' (pcsc://#1)."""
    return rack.fresh(PORT_B)


def url_of(card: VirtualCard, **params: str | Path) -> str:
    """The pcsc:// URL of an emulated card's reader, with query parameters."""
    query = "&".join(f"{k.replace('_', '-')}={v}" for k, v in params.items())
    return f"pcsc://{card.reader.replace(' ', '%20')}" + (f"?{query}" if query else "")
