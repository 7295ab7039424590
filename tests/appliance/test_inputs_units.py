"""The pieces that check input where it enters: argument types, host:port addresses,
bounded file reads and the supervisor's state file (issue 13, items 4, 16, 17)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.cli import args as types
from appliance.cli import net
from appliance.config.addresses import check_host, join_host_port, split_host_port
from appliance.files import read_bounded


@pytest.mark.parametrize(
    "parse, good, bad",
    [
        (
            types.number(0, 10),
            ["0", "10", "2.5", "1e1", ".5", "+3"],
            ["nan", "inf", "-1", "10.01", "1_0", "\u0662", " 5", "5\n", "0x1", "", "1e400"],
        ),
        (types.number(0, 10, lo_open=True), ["0.001"], ["0", "-0"]),
        (types.integer(1, 8), ["1", "8", "+5"], ["0", "9", "1.0", "1e0", "٣", "99" * 20, "5\n"]),
        (types.integer(8, 64, multiple_of=8), ["8", "64"], ["12", "0", "72"]),
        (
            types.size(1, 1 << 20),
            ["1", "1K", "1k", "1KB", "1.5K", "1M"],
            ["0", "1M1", "2M", "inf", "K", "1Q", "1 K", "-1K", ""],
        ),
        (types.port, ["1", "65535"], ["0", "65536", "99999", "-1"]),
        (types.base_port, ["1024", "55536"], ["1023", "55537", "70000"]),
        (
            types.cidr,
            ["10.0.0.0/8", "10.1.2.3/8", "fd00::/8", "192.0.2.1"],
            ["10.0.0.0/33", "x", "", "fd00::/129"],
        ),
        (types.key_id, ["0123456789abcdef0123456789abcdef"], ["0" * 31, "A" * 32, "0" * 32 + "\n"]),
        (types.path, ["x", "/a/b", "a" * 255], ["", "a\0b", "a" * 256, "/a" * 2049]),
        (types.speedup_or_max, ["max", "1", "1e9"], ["0", "maximum", "1e10", "nan"]),
    ],
)
def test_argument_types(parse, good, bad) -> None:
    for text in good:
        parse(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected .*, got"):
            parse(text)


@pytest.mark.parametrize(
    "host, expected",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("fe80::1", "fe80::1"),
        ("kms-5.example.net", "kms-5.example.net"),
        ("localhost", "localhost"),
        ("a.b.", "a.b."),
    ],
)
def test_hosts(host: str, expected: str) -> None:
    assert check_host(host) == expected


@pytest.mark.parametrize(
    "host",
    [
        "",
        "not a host",
        "a..b",
        "-a",
        "a-",
        "256.1.1.1",
        "1.2.3",
        "[1.2.3.4]",
        "::1::2",
        "[::1",
        "a_b",
        "\u00e9.de",
        "x" * 64,
        ("a." * 127) + "b",
        "a\n",
    ],
)
def test_bad_hosts(host: str) -> None:
    with pytest.raises(ValueError):
        check_host(host)


def test_ipv6_is_written_in_brackets() -> None:
    """Item 19: ``--host ::1`` was written as ``::1:20001``."""
    assert join_host_port("::1", 20001) == "[::1]:20001"
    assert join_host_port("10.0.0.1", 20001) == "10.0.0.1:20001"
    assert split_host_port("[::1]:20001") == ("::1", 20001)


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:99999",
        "127.0.0.1:0",
        "127.0.0.1:",
        "127.0.0.1",
        "::1:20001",
        "[::1]20001",
        "[127.0.0.1]:1",
        "host:+5",
        "host: 5",
        "host:5\n",
        "not a host:1",
        ":20001",
        "[::1]:",
    ],
)
def test_bad_addresses(text: str) -> None:
    """Item 17: ``127.0.0.1:99999`` made a node listen on 34463."""
    with pytest.raises(ValueError):
        split_host_port(text)


@given(
    host=st.one_of(
        st.ip_addresses().map(str), st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)
    ),
    port=st.integers(1, 65535),
)
def test_addresses_round_trip(host: str, port: int) -> None:
    text = join_host_port(host, port)
    assert split_host_port(text) == (host, port)
    if ":" in host:
        assert ipaddress.ip_address(host).version == 6 and text.startswith("[")


def test_reads_are_bounded(tmp_path: Path) -> None:
    """Item 16: ``topology validate /dev/zero`` read 22.8 GB."""
    with pytest.raises(OSError) as info:
        read_bounded(Path("/dev/zero"), 1 << 20)
    assert info.value.errno == errno.EFBIG and info.value.strerror == "larger than 1 MiB"
    exact = tmp_path / "exact"
    exact.write_bytes(b"x" * 4096)
    assert read_bounded(exact, 4096) == b"x" * 4096
    with pytest.raises(OSError, match="larger than 4095 bytes"):
        read_bounded(exact, 4095)
    with pytest.raises(IsADirectoryError):
        read_bounded(tmp_path, 10)
    with pytest.raises(OSError) as info:
        read_bounded(Path("a\0b"), 10)
    assert info.value.errno == errno.EINVAL


def test_a_fifo_without_writer_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_bounded(fifo, 10) == b""


def test_what_a_fifo_holds_is_read_to_its_end(tmp_path: Path) -> None:
    """Opening without waiting loses nothing: what a writer left in the FIFO is read."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the writer may open at once
    try:
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"a = 1\n")
        os.close(writer)
        assert read_bounded(fifo, 100) == b"a = 1\n"
    finally:
        os.close(keep)


@pytest.mark.parametrize(
    "doc",
    [
        {"supervisor_pid": -1, "nodes": {}},
        {"supervisor_pid": 0, "nodes": {}},
        {"supervisor_pid": 1, "nodes": {}},
        {"supervisor_pid": "4242", "nodes": {}},
        {"supervisor_pid": 4242.0, "nodes": {}},
        {"supervisor_pid": True, "nodes": {}},
        {"supervisor_pid": 4242, "nodes": {"a": {"pid": -1}}},
        {"supervisor_pid": 4242, "nodes": {"a": {"pid": 1}}},
        {"supervisor_pid": 4242, "nodes": {"a": {"pid": 5, "restarts": "x"}}},
        {"supervisor_pid": 4242, "nodes": {"a": 5}},
        {"supervisor_pid": 4242, "nodes": []},
        {"supervisor_pid": 4242},
        [4242],
    ],
)
def test_state_pids_that_kill_would_misread_are_refused(tmp_path: Path, doc) -> None:
    """A state file naming pid -1 would have made ``net down`` signal every process we may
    signal (0: our process group, 1: init). Checked on the parsed file, no signal sent."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text(json.dumps(doc))
    assert net._state(tmp_path) is None


def test_a_state_file_of_the_supervisors_shape_is_read(tmp_path: Path) -> None:
    doc = {
        "supervisor_pid": 4242,
        "mode": "gcm",
        "nodes": {"a": {"pid": 0, "restarts": 0}, "b": {"pid": 4243, "restarts": 2}},
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text(json.dumps(doc))
    assert net._state(tmp_path) == doc
    (tmp_path / "run" / "state.json").write_bytes(b"\x80" * 10)
    assert net._state(tmp_path) is None
