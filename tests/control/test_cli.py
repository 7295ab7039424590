"""``qkdn controller`` and ``qkdn net fault`` turn bad input into one coded line."""

from __future__ import annotations

import pytest

from tests.cli_run import run


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (("net", "fault", "link", "8-x", "down"), "USAGE"),
        (("net", "fault", "link", "8-8", "up"), "USAGE"),
        (("net", "fault", "link", "8-9", "sideways"), "USAGE"),
        (("net", "fault", "link", "8-9", "down", "--dir", "{tmp}"), "USAGE"),
        (("controller", "routes", "--dir", "{tmp}"), "USAGE"),
        (("controller", "run", "--dir", "{tmp}", "--weights", "speed=2"), "CTL-WEIGHTS"),
        (("controller", "run", "--dir", "{tmp}", "--weights", "hop=-1"), "CTL-WEIGHTS"),
        (("controller", "run", "--dir", "{tmp}", "--weights", "cheapest.hop=1"), "CTL-WEIGHTS"),
        (("controller", "run", "--dir", "{tmp}", "--hold-off-ms", "x"), "USAGE"),
    ],
)
def test_bad_input_is_one_coded_line(capsys, tmp_path, argv, code):
    status, _out, err = run(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"[{code}]" in lines[0], err
    assert "Traceback" not in err


def test_controller_help_teaches_the_weight(capsys):
    status, out, _ = run(capsys, "controller", "--help")
    assert status == 0 and "availability * B/(B + bits)" in out
