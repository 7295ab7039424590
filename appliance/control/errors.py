"""The error root of :mod:`appliance.control`."""

from __future__ import annotations

from appliance.errors import ApplianceError


class ControlError(ApplianceError):
    """The SDN agent or the controller."""

    code = "CTL"


class PathError(ControlError):
    """A gNMI path that names nothing the agent serves, or is malformed."""

    code = "CTL-PATH"


class NoPath(ControlError):
    """No path of usable links joins the two nodes."""

    code = "CTL-NO-PATH"
