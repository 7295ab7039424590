"""Fixtures of this folder."""

from tests.pki_fixture import pki  # noqa: F401 - the shared PKI fixture
