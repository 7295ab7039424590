"""SNMPv3 users and UDP addresses as configuration files give them, without pysnmp.

What a process that only configures or starts an agent needs (a KMS node starts its SNMP
agent beside it, :mod:`appliance.mgmt.feed`), so that it never loads pysnmp;
:mod:`appliance.snmp.usm` adds the protocols and the sockets.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

from appliance.config.addresses import check_host
from appliance.config.schema import Strict
from appliance.errors import ApplianceError

Secret = Annotated[str, StringConstraints(min_length=8, max_length=64, pattern=r"^[!-~]+$")]
UserName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")]


class UdpError(ApplianceError):
    """An address that is not host:port, or one that cannot be bound."""

    code = "SNMP-ADDRESS"


class Credentials(Strict):
    """An SNMPv3 user: name, authentication and privacy passphrases (8..64 characters)."""

    user: UserName
    auth: Secret
    priv: Secret


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; port 0 (any free port) is allowed."""
    host, _, port = address.rpartition(":")
    try:
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"a port in 0..65535, not {port[:8]!r}")
        return check_host(host), int(port)
    except ValueError as exc:
        raise UdpError(f"{address[:80]!r}: expected host:port ({exc})") from exc
