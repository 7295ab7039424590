"""A node agent's configuration file (``node-NAME.toml`` of a network's ``mgmt`` folder),
without pysnmp: the node reads it (its image disk) and starts the agent beside it
(:mod:`appliance.mgmt.feed`); the agent (:mod:`appliance.mgmt.agent`) reads the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from appliance.config.schema import Strict, load_model, read_toml
from appliance.snmp.users import Credentials


class AgentUser(Credentials):
    role: Literal["manager", "monitor"] = "manager"


class Receiver(Credentials):
    """Where notifications go: ``host:port`` and the SNMPv3 user to send them as."""

    address: str


class AgentConfig(Strict):
    listen: str = "127.0.0.1:0"
    users: list[AgentUser] = Field(min_length=1, max_length=16)
    inform: Receiver | None = None
    """The QKDN Manager: INFORMs, retried until acknowledged."""
    traps: list[Receiver] = Field(default_factory=list, max_length=8)
    """Other receivers: traps (the node's notifier engine is authoritative)."""
    poll_s: float | None = Field(default=None, gt=0, le=86400)
    """Seconds between two looks at what does not tell of its changes (default
    :data:`appliance.mgmt.agent.POLL_S`)."""
    image: str | None = Field(default=None, max_length=4096)
    """The node's target disk, when it runs from an appliance image (its boot state gives
    the image slot and version, and qkdnSlotRollback; :mod:`appliance.mgmt.image`)."""


def load_config(path: Path) -> AgentConfig:
    return load_model(AgentConfig, read_toml(path), str(path))
