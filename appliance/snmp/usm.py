"""SNMPv3 settings every agent and client of the project shares, and its UDP helpers.

authPriv only: HMAC-SHA-256 authentication (usmHMAC192SHA256AuthProtocol, RFC 7860) and
AES-128 privacy (RFC 3826). Passphrases are 8..64 printable ASCII characters
(:class:`appliance.snmp.users.Credentials`, which this module re-exports).
"""

from __future__ import annotations

import socket

from pysnmp.entity import config

from appliance.snmp.users import Credentials as Credentials
from appliance.snmp.users import Secret as Secret
from appliance.snmp.users import UdpError as UdpError
from appliance.snmp.users import UserName as UserName
from appliance.snmp.users import host_port as host_port

AUTH = config.USM_AUTH_HMAC192_SHA256
PRIV = config.USM_PRIV_CFB128_AES
SNMP_TRAP_OID = (1, 3, 6, 1, 6, 3, 1, 1, 4, 1, 0)
"""snmpTrapOID.0 (SNMPv2-MIB): the second varbind of every notification."""
SYS_UPTIME = (1, 3, 6, 1, 2, 1, 1, 3, 0)
"""sysUpTime.0: the first varbind of every notification."""


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
