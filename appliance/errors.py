"""Errors raised by the appliance (configuration, node runtime, demo).

One root, :class:`ApplianceError`, each subclass with a machine-readable ``code``. The CLI
prints ``qkdn: error [CODE]: message`` and exits non-zero; it never shows a traceback
unless ``--debug`` is given. Messages name the file and the key at fault, and say what was
expected. They never contain key material.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Root of every error raised by ``appliance``."""

    code = "QKDN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(ApplianceError):
    """A topology or node configuration file is unreadable, malformed or inconsistent."""

    code = "CFG"

    def __init__(self, file: str, key: str, problem: str, *, code: str = "CFG-VALUE") -> None:
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(printable(where + problem), code=code)
        self.file, self.key, self.problem = file, key, problem


class UsageError(ApplianceError):
    """The command line asks for something impossible (caller misuse)."""

    code = "USAGE"


class MissingExtra(ApplianceError):
    """A command needs an optional dependency group (an extra) that is not installed."""

    code = "EXTRA-MISSING"

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this command needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'qkdn[{extra}]'"
        )
        self.extra, self.module = extra, module


def printable(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (messages are one
    line: a key or a file name from a user's file may hold anything)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
