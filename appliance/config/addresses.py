"""Hosts, ports and ``host:port`` addresses, checked where they enter the configuration.

A host is an IPv4 address, an IPv6 address (written bare, ``::1``, or in brackets) or a
DNS name (RFC 1123 labels). An address joins a host and a port 1..65535; an IPv6 host is
written in brackets (``[::1]:20001``) so that the port can be split off again. Nothing
here resolves a name or opens a socket.
"""

from __future__ import annotations

import ipaddress
import re

MAX_PORT = 65535
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$", re.ASCII)
_DIGITS = re.compile(r"^[0-9]{1,5}$", re.ASCII)


def check_host(text: str) -> str:
    """The host, without brackets; ValueError if it is neither an IP address nor a DNS name."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if ip is not None:
        if bare != text and ip.version != 6:
            raise ValueError("only an IPv6 address goes in brackets")
        return bare
    labels = text.removesuffix(".").split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("an IP address or a DNS name (letters, digits, '-', '.')")
    if all(label.isdigit() for label in labels):
        raise ValueError("an IP address or a DNS name (this is neither)")
    return text


def check_port(port: int, *, what: str = "port") -> int:
    if not 1 <= port <= MAX_PORT:
        raise ValueError(f"a {what} in 1..{MAX_PORT}, not {port}")
    return port


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``host:port`` or ``[v6]:port``; ValueError if either is bad."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or ":" not in host:
            raise ValueError("host:port, with an IPv6 host in brackets ([::1]:20001)")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("host:port, with an IPv6 host in brackets ([::1]:20001)")
    if not _DIGITS.fullmatch(port):
        raise ValueError("host:port with a decimal port")
    return check_host(host), check_port(int(port))


def check_host_port(text: str) -> str:
    """``text`` itself once :func:`split_host_port` accepts it (for configuration fields)."""
    split_host_port(text)
    return text
