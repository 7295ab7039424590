"""Errors of the management plane: one root, :class:`MgmtError`, each with a code
(``MGMT-...``); the ``qkdn`` command prints them as one line."""

from __future__ import annotations

from appliance.errors import ApplianceError


class MgmtError(ApplianceError):
    """Root of every error raised by ``appliance.mgmt``."""

    code = "MGMT"


class StoreError(MgmtError):
    """The manager's database cannot be opened or written."""

    code = "MGMT-STORE"
