"""SNMPv3 settings every agent and client of the project shares, and its UDP helpers.

authPriv only: HMAC-SHA-256 authentication (usmHMAC192SHA256AuthProtocol, RFC 7860) and
AES-128 privacy (RFC 3826). Passphrases are 8..64 printable ASCII characters.
"""

from __future__ import annotations

import socket
from typing import Annotated

from pydantic import StringConstraints
from pysnmp.entity import config

from appliance.config.addresses import check_host
from appliance.config.schema import Strict
from appliance.errors import ApplianceError

AUTH = config.USM_AUTH_HMAC192_SHA256
PRIV = config.USM_PRIV_CFB128_AES
SNMP_TRAP_OID = (1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0)
"""snmpTrapOID.0 (SNMPv2-MIB): the second varbind of every notification."""
SYS_UPTIME = (1, 3, 6, 1, 2, 1, 1, 3, 0)
"""sysUpTime.0: the first varbind of every notification."""
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


def bind_udp(address: str) -> socket.socket:
    """A non-blocking UDP socket bound to ``address``."""
    host, port = host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UdpError(f"cannot listen on {address}: {exc.strerror}", code="SNMP-LISTEN") from exc
    sock.setblocking(False)
    return sock
