"""Fixtures of this folder: the shared PKI, and one running SDN agent per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.control.agentfix import Served, free_port
from tests.pki_fixture import pki  # noqa: F401 - the shared PKI fixture


@pytest.fixture(scope="module")
def served(pki) -> Iterator[Served]:  # noqa: F811
    s = Served(pki, free_port())
    yield s
    s.client.close()
    s.server.stop(grace=None)
