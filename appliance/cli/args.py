"""Argument types shared by every ``qkdn`` subcommand: each value is checked where it enters.

A type turns the text of one option into a bounded value, or raises
``ArgumentTypeError``, which argparse reports as one line ``qkdn: error [USAGE]: ...
argument --X: expected ..., got '...'`` with exit status 2. Numbers are ASCII decimal
only: ``nan``, ``inf``, ``1_0``, ``0x10``, surrounding blanks and other scripts' digits are
refused, and so is any value outside the option's range. This module must never accept a
value that the command would then have to check again.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from collections.abc import Callable
from pathlib import Path

from appliance.config.addresses import MAX_PORT, check_host
from appliance.config.render import MAX_BASE_PORT, MIN_BASE_PORT

_INT = re.compile(r"[+-]?[0-9]{1,30}", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?", re.ASCII)
_MAX_NUMBER_TEXT = 40
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
KEY_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
MAX_PATH, MAX_NAME = 4096, 255
UNIX_TIME_MAX = 253_402_300_799
"""The last second of the year 9999."""


def _refuse(expected: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {expected}, got {text[:64]!r}")


def number(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[str], float]:
    """A finite decimal number in ``lo..hi`` (``lo`` itself excluded when ``lo_open``)."""
    expected = f"a number {lo:g} {'<' if lo_open else '<='} x <= {hi:g}"

    def parse(text: str) -> float:
        if len(text) > _MAX_NUMBER_TEXT or not _FLOAT.fullmatch(text):
            raise _refuse(expected, text)
        value = float(text)
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            raise _refuse(expected, text)
        return value

    return parse


def integer(lo: int, hi: int, *, multiple_of: int = 1) -> Callable[[str], int]:
    """A decimal integer in ``lo..hi`` (and a multiple of ``multiple_of``)."""
    expected = f"an integer in {lo}..{hi}"
    if multiple_of > 1:
        expected += f", a multiple of {multiple_of}"

    def parse(text: str) -> int:
        if not _INT.fullmatch(text):
            raise _refuse(expected, text)
        value = int(text)
        if not lo <= value <= hi or value % multiple_of:
            raise _refuse(expected, text)
        return value

    return parse


def size(lo: int, hi: int, *, multiple_of: int = 1) -> Callable[[str], int]:
    """An amount such as ``1000``, ``64K``, ``1.5M``, ``2G`` (powers of 1024), in ``lo..hi``."""
    expected = f"an amount such as 1000, 64K or 100M, from {lo} to {hi}"
    if multiple_of > 1:
        expected += f", a multiple of {multiple_of}"

    def parse(text: str) -> int:
        raw = text.upper().removesuffix("B")
        scale = UNITS.get(raw[-1:], 1) if raw[-1:].isalpha() else 1
        digits = raw[:-1] if raw[-1:].isalpha() else raw
        if raw[-1:].isalpha() and raw[-1:] not in UNITS:
            raise _refuse(expected, text)
        if len(digits) > _MAX_NUMBER_TEXT or not _FLOAT.fullmatch(digits):
            raise _refuse(expected, text)
        value = float(digits) * scale
        if not math.isfinite(value) or not lo <= value <= hi or int(value) % multiple_of:
            raise _refuse(expected, text)
        return int(value)

    return parse


def port(text: str) -> int:
    """A TCP/UDP port, 1..65535."""
    return integer(1, MAX_PORT)(text)


def base_port(text: str) -> int:
    """The first port of a port plan: every port derived from it must fit (render.py)."""
    return integer(MIN_BASE_PORT, MAX_BASE_PORT)(text)


def host(text: str) -> str:
    """An IPv4 or IPv6 address (bare or in brackets) or a DNS name; brackets are dropped."""
    try:
        return check_host(text)
    except ValueError as exc:
        raise _refuse(str(exc), text) from None


def cidr(text: str) -> str:
    """An IPv4 or IPv6 network (``10.0.0.0/8``, ``fd00::/8``) or a single address."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise _refuse("a network such as 10.0.0.0/8 or fd00::/8", text) from None


def matching(pattern: re.Pattern[str], expected: str) -> Callable[[str], str]:
    """A text that ``pattern`` matches in full."""

    def parse(text: str) -> str:
        if not pattern.fullmatch(text):
            raise _refuse(expected, text)
        return text

    return parse


key_id = matching(KEY_ID, "a key id of 32 lower-case hex digits")
"""An image key id, as ``image key generate`` prints it."""


def path(text: str) -> Path:
    """A file or directory name the OS can take (not empty, no NUL, not too long)."""
    encoded = text.encode("utf-8", "surrogateescape")
    parts = encoded.split(b"/")
    if not text or b"\0" in encoded or len(encoded) > MAX_PATH or max(map(len, parts)) > MAX_NAME:
        raise _refuse(f"a path (at most {MAX_PATH} bytes, {MAX_NAME} per name, no NUL)", text)
    return Path(text)


def topology(text: str) -> str:
    """A shipped topology name or a topology file (checked as a path)."""
    path(text)
    return text


def speedup_or_max(text: str) -> float | None:
    """``max`` (None: as fast as possible) or a factor ``0 < x <= 1e9``."""
    return None if text == "max" else number(0, 1e9, lo_open=True)(text)
