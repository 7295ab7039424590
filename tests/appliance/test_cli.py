"""The ``qkdn`` command: help that teaches, one-line errors with codes, JSON for scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import cli
from tests.cli_run import run


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["topology", "--help"],
        ["topology", "render", "--help"],
        ["topology", "show", "--help"],
        ["demo", "--help"],
    ],
)
def test_help_teaches(capsys, argv):
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert "usage: qkdn" in out
    if argv in (["--help"], ["demo", "--help"], ["topology", "render", "--help"]):
        assert "example" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "the following arguments are required: COMMAND"),
        (["launch"], "invalid choice: 'launch'"),
        (["demo", "--days", "lots"], "argument --days: expected a number 0 < x <= 366"),
        (["demo", "--days", "-1"], "argument --days"),
        (["demo", "--speedup", "fast"], "argument --speedup"),
        (["topology", "render", "demoquandt"], "--out"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, fragment):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert err.count("\n") == 1 and "[USAGE]" in err and fragment in err


@pytest.mark.parametrize(
    "argv, code",
    [
        (["demo", "--topology", "/nonexistent/net.toml"], "CFG-FILE"),
        (["topology", "show", "nowhere"], "CFG-FILE"),
    ],
)
def test_reported_errors_are_one_line_with_code(capsys, argv, code):
    status, _, err = run(capsys, *argv)
    assert status == 1
    assert err.startswith(f"qkdn: error [{code}]: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_topology_error_names_file_and_key(capsys, tmp_path):
    path = tmp_path / "net.toml"
    path.write_text(
        '[network]\nname = "n"\n[[nodes]]\nid = 1\nname = "a"\nsite = "s"\n'
        'role = "ukms"\nspeed = 3\n'
    )
    status, _, err = run(capsys, "topology", "validate", str(path))
    assert status == 1
    assert err == (
        f"qkdn: error [CFG-UNKNOWN-KEY]: {path}: nodes[0] (1).speed: unknown key "
        "(allowed here: id, name, role, site, virtual)\n"
    )


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="no such file"):
        cli.main(["--debug", "topology", "show", "/nonexistent.toml"])


def test_internal_errors_are_flagged_as_bugs(capsys, monkeypatch):
    import appliance.cli.topology as topology

    def explode(_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(topology, "cmd_validate", explode)
    status, _, err = run(capsys, "topology", "validate", "demoquandt")
    assert status == 70
    assert (
        err
        == "qkdn: error [INTERNAL]: RuntimeError: boom (a bug; run with --debug for a traceback)\n"
    )


def test_show_json_lists_nodes_and_links(capsys):
    status, out, _ = run(capsys, "topology", "show", "demoquandt", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["network"] == "demoquandt"
    assert len(doc["nodes"]) == 19 and len(doc["links"]) == 16
    link = next(x for x in doc["links"] if x["id"] == "link-9-10")
    assert (link["skr_kbps"], link["qber_pct"]) == (0.3, 1.6)


def test_show_table_and_render(capsys, tmp_path):
    status, out, _ = run(capsys, "topology", "show", "demoquandt")
    assert status == 0 and "ckms-virtual (virtual)" in out and "923.0 km" in out
    status, out, _ = run(
        capsys, "topology", "render", "demoquandt", "--out", str(tmp_path), "--json"
    )
    assert status == 0 and len(json.loads(out)["nodes"]) == 19


def test_console_script_reports_errors_in_one_line(tmp_path):
    """The installed entry point, in its own process, as an operator would run it."""
    qkdn = Path(sys.executable).with_name("qkdn")
    result = subprocess.run(
        [str(qkdn), "topology", "validate", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("qkdn: error [CFG-FILE]:") and result.stderr.count("\n") == 1
    assert result.stdout == ""
