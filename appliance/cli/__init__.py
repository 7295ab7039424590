"""``qkdn``: the one command-line entry point of the appliance stack.

Each area adds a subcommand module with ``register(subparsers)``. Errors from any package
of the project become a single line ``qkdn: error [CODE]: message`` on stderr with a
non-zero exit status; a traceback appears only with ``--debug``.

Exit status: 0 success, 1 a reported error, 2 bad usage, 70 an internal error (a bug).

A base install (``pip install qkdn``, what a node image carries) has no extras: ``node run``
and ``qrng selftest --json`` work there, and a command that needs a missing extra ends in
one line with the code EXTRA-MISSING naming the extra, never a traceback.

Every error is exactly one line: control characters in a message (a file name with a
newline, say) are escaped. An :class:`OSError` that no command turned into its own error
(a full disk, a vanished directory) is reported with the code IO; a reader that closes
our standard output early (``qkdn net status --json | head``) gets the code PIPE.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import select
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from appliance import logs
from appliance.aaa.errors import AaaError
from appliance.errors import ApplianceError, MissingExtra, printable
from hal.errors import HalError
from hsm.errors import HsmError
from images.errors import ImageError
from qrng.errors import QrngError

PROJECT_ERRORS: tuple[type[Exception], ...] = (
    ApplianceError,
    HalError,
    QrngError,
    ImageError,
    HsmError,
    AaaError,
)
"""The error roots of the project's packages; later packages add theirs here."""

COMMANDS = (
    "topology",
    "demo",
    "qrng",
    "image",
    "net",
    "sae",
    "keystore",
    "card",
    "aaa",
    "controller",
    "manager",
)
"""The subcommand modules of ``appliance.cli``, in the order ``qkdn --help`` lists them."""

EXTRAS = {"rich": "provisioning", "tomli_w": "provisioning", "matplotlib": "plots"}
"""Top-level modules of the optional dependencies, and the extra (pyproject.toml) of each."""

EPILOG = """\
examples:
  qkdn topology show demoquandt            the DemoQuanDT nodes and links as tables
  qkdn topology render demoquandt --out net   one configuration file per node
  qkdn demo                                emulate the quantum layer for a week, print Table 3
  qkdn qrng selftest                       known-answer tests and a start-up test of the QRNG
  qkdn image flash BUNDLE --target DISK    verify and write a signed image to the inactive slot

Run 'qkdn COMMAND --help' for the options of a command.
"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors carrying the USAGE code."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("qkdn").strip()
        where = f"{command}: " if command else ""
        hint = f" (see '{self.prog} --help')"
        print(f"qkdn: error [USAGE]: {one_line(where + message)}{hint}", file=sys.stderr)
        raise SystemExit(2)


def missing_extra(exc: ModuleNotFoundError) -> MissingExtra | None:
    """The extra to install if ``exc`` is an absent optional dependency, else None."""
    module = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    try:
        installed = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        installed = False
    return None if installed else MissingExtra(extra, module)


def one_line(message: str) -> str:
    """``message`` with line breaks and other control characters escaped."""
    return printable(message)


def report(code: str, message: str) -> int:
    """Print the one-line error and return the exit status 1."""
    print(f"qkdn: error [{code}]: {one_line(message)}", file=sys.stderr)
    return 1


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return where + (exc.strerror or str(exc))


def _broken_pipe(exc: BrokenPipeError) -> int:
    """A closed standard output (its reader went away) is PIPE; any other pipe is IO."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # stdout is not a file (tests capture it)
        return report("IO", _os_error(exc))
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return report("IO", _os_error(exc))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)  # what is still buffered goes nowhere (Python would complain at exit)
    os.close(devnull)
    return report("PIPE", "standard output was closed before all output was written")


def _register(sub: Any, name: str) -> None:
    """Add the subcommand of module ``name``; without its extra, a stub that says so."""
    try:
        module = importlib.import_module(f"appliance.cli.{name}")
    except ModuleNotFoundError as exc:
        missing = missing_extra(exc)
        if missing is None:
            raise
        stub = sub.add_parser(name, help=f"(needs the '{missing.extra}' extra)", add_help=False)
        stub.add_argument("args", nargs=argparse.REMAINDER)
        stub.set_defaults(func=_needs_extra, missing_extra=missing)
        return
    module.register(sub)


def _needs_extra(args: argparse.Namespace) -> int:
    raise args.missing_extra


def build_parser() -> Parser:
    parser = Parser(
        prog="qkdn",
        description="Trusted-node appliance stack for carrier-grade QKD networks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--log-level",
        default="error",
        choices=["debug", "info", "warning", "error"],
        help="default: error (operational events such as health warnings are for daemons)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log records as text lines or one JSON object per line",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMANDS:
        _register(sub, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qkdn``; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.install_redaction()
    logs.configure(args.log_level, args.log_format)
    try:
        status: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not after main has returned
        return status
    except KeyboardInterrupt:
        print("qkdn: interrupted", file=sys.stderr)
        return 130
    except PROJECT_ERRORS as exc:
        if args.debug:
            raise
        return report(getattr(exc, "code", "ERROR"), str(exc))
    except BrokenPipeError as exc:
        if args.debug:
            raise
        return _broken_pipe(exc)
    except OSError as exc:
        if args.debug:
            raise
        return report("IO", _os_error(exc))
    except Exception as exc:
        if args.debug:
            raise
        missing = missing_extra(exc) if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None:
            print(f"qkdn: error [{missing.code}]: {missing}", file=sys.stderr)
            return 1
        logging.getLogger("qkdn").debug("internal error", exc_info=True)
        print(
            f"qkdn: error [INTERNAL]: {type(exc).__name__}: {exc} "
            "(a bug; run with --debug for a traceback)",
            file=sys.stderr,
        )
        return 70


def run() -> NoReturn:
    """Console-script entry point."""
    raise SystemExit(main())
