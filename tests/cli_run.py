"""Run ``qkdn`` in-process for CLI tests: (exit status, stdout, stderr)."""

from __future__ import annotations

from appliance import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # argparse's --help and usage errors
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err
