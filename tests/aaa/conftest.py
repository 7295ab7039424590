"""Fixtures of the AAA tests (see registry_fixture.py)."""

from tests.aaa.registry_fixture import registry

__all__ = ["registry"]
