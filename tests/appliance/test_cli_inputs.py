"""Hostile input to every ``qkdn`` subcommand (issue 13, items 4 and 16-19).

Every outcome is exit 0, or exactly one line ``qkdn: error [CODE]: ...`` with exit 1 (a
reported error) or 2 (bad usage, always USAGE): never ``[INTERNAL]``, never a traceback.

Three tables drive the tests, each row one option or argument of one subcommand:

- VALUES: every number, size, port, host, path, network, key id and version option, given
  values outside its range (NaN, infinities, huge, negative, empty, ``1_0``, other
  scripts' digits, and Hypothesis-made ones). Each must be refused as a usage error that
  names the option. The rest of each command line fails fast on its own, so that a value
  that slipped through shows as a wrong exit status, never as a hang or a started network.
- READS: every file a command reads, given binary, empty, oversized (``/dev/zero``),
  FIFO, directory, missing and malformed files, and Hypothesis-made contents.
- WRITES: every file or directory a command writes, given places that cannot be written.

Commands run in-process (fast); the broken pipe runs through a real subprocess.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import cli
from appliance.config.render import RenderPlan, render
from appliance.config.topology import load_topology
from images import keyring as kr
from images.policy import DevicePolicy
from images.signing import KeyPair
from images.target import init_target
from tests.images.conftest import fake_wheel, seeded

MISSING = "/nonexistent/qkdn-test"
READ_ONLY = Path("/proc/qkdn-test")
ONE_LINE = re.compile(r"^qkdn: error \[([A-Z0-9-]+)\]: [^\n]*\n\Z")
FEW = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", autouse=True)
def one_parser() -> Any:
    """Build the argument parser once for this module (argparse spends ~30 ms building it,
    most of it in gettext lookups); ``main`` runs unchanged on it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "build_parser", functools.cache(cli.build_parser))
        yield


def qkdn(*argv: str) -> tuple[int, str, str]:
    """Run ``qkdn`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(list(argv))
        except SystemExit as exc:  # argparse: usage errors and --help
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


def clean(status: int, err: str) -> str | None:
    """The error code of a clean outcome (None for success); fails on anything else."""
    assert "Traceback" not in err, err
    if status == 0:
        return None
    assert status in (1, 2), (status, err)
    found = ONE_LINE.match(err)
    assert found, f"not one coded line: {err!r}"
    code = found.group(1)
    assert code != "INTERNAL", err
    assert status == 1 or code == "USAGE", err
    return code


# -- the environment: valid files beside hostile ones -------------------------------------


@dataclass
class Env:
    dir: Path
    root_key: Path
    release_key: Path
    release_pub: Path
    ring: Path
    disk: Path
    net: Path
    station_pub: Path
    audit: Path
    wheels: Path
    bad_inputs: dict[str, Path]
    bad_outputs: dict[str, Path]

    def fill(self, text: str) -> str:
        return text.format(**{k: str(v) for k, v in vars(self).items() if isinstance(v, Path)})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return make_env(tmp_path_factory.mktemp("inputs"))


def make_env(d: Path) -> Env:
    """Keys, a keyring, a target disk, a rendered network, hostile inputs and outputs."""
    keys = d / "keys"
    keys.mkdir()
    root, release = KeyPair.generate("root", seeded("r")), KeyPair.generate("rel", seeded("s"))
    root.save(keys / "root.key")
    release.save(keys / "rel.key")
    ring = kr.certify(kr.new_keyring(root), root, release.public, "release")
    kr.save_keyring(keys / "ring.json", ring)
    disk = d / "disk.img"
    init_target(
        disk, 64 << 20, DevicePolicy(compatible="qkdn-appliance-x86_64", anchor=root.public)
    )
    net = d / "net"
    render(load_topology("demoquandt"), RenderPlan(out=net, start=0.0))
    (net / "run").mkdir()
    station = Ed25519PrivateKey.generate()
    pub = d / "station.pub.pem"
    pub.write_bytes(
        station.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (d / "audit.jsonl").write_text("")
    return Env(
        dir=d,
        root_key=keys / "root.key",
        release_key=keys / "rel.key",
        release_pub=keys / "rel.pub",
        ring=keys / "ring.json",
        disk=disk,
        net=net,
        station_pub=pub,
        audit=d / "audit.jsonl",
        wheels=fake_wheel(d / "wheels"),
        bad_inputs=_bad_inputs(d / "in"),
        bad_outputs=_bad_outputs(d / "out"),
    )


def _bad_inputs(d: Path) -> dict[str, Path]:
    d.mkdir()
    files = {
        "binary": bytes(range(256)) * 4,
        "empty": b"",
        "deep": b"a = " + b"[" * 3000 + b"]" * 3000,
        "deep-json": b"[" * 3000 + b"]" * 3000,
        "long-number": b"a = " + b"9" * 5000,
        "json-list": b"[1, 2]",
        "json-number": b"5",
        "not-utf8": b"\xff\xfe\x00name = 'x'",
    }
    out = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        (d / name).chmod(0o600)  # PIN files must be owner-only to be read at all
        out[name] = d / name
    os.mkfifo(d / "fifo", 0o600)
    (d / "dir").mkdir()
    return {
        **out,
        "fifo": d / "fifo",
        "dir": d / "dir",
        "zero": Path("/dev/zero"),
        "missing": d / "missing",
        "under-a-file": d / "binary" / "x",
    }


def _bad_outputs(d: Path) -> dict[str, Path]:
    d.mkdir()
    (d / "file").write_text("")
    out = {
        "under-a-file": d / "file" / "x",
        "read-only": READ_ONLY / "out",  # procfs takes no new files, even from root
    }
    try:  # nor does sysfs (EPERM rather than ENOENT); elsewhere this kind is left out
        (Path("/sys") / "qkdn-test").mkdir()
    except OSError:
        out["read-only-sysfs"] = Path("/sys/qkdn-test/out")
    return out


# -- VALUES: options given values out of their range --------------------------------------

_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?", re.ASCII)
_INTEGER = re.compile(r"[+-]?[0-9]{1,30}", re.ASCII)
JUNK = [
    "",
    " ",
    "x",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "1_0",
    "\u0662",
    " 5",
    "5 ",
    "0x10",
    "1e400",
    "99999999999999999999999999999999",
    "5\n",
    "--",
    "1,5",
]


@dataclass(frozen=True)
class Float:
    lo: float
    hi: float
    lo_open: bool = False
    words: tuple[str, ...] = ()
    """Words the option takes besides numbers (``max``)."""

    def valid(self, text: str) -> bool:
        if text in self.words:
            return True
        if not _DECIMAL.fullmatch(text):
            return False
        x = float(text)
        return math.isfinite(x) and self.lo <= x <= self.hi and not (self.lo_open and x == self.lo)

    def extremes(self) -> list[str]:
        return [repr(self.hi * 2 + 1), "-1", "-0.5", repr(self.lo)]


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int
    multiple_of: int = 1

    def valid(self, text: str) -> bool:
        if not _INTEGER.fullmatch(text):
            return False
        x = int(text)
        return self.lo <= x <= self.hi and x % self.multiple_of == 0

    def extremes(self) -> list[str]:
        return [str(self.lo - 1), str(self.hi + 1), str(10**40), "1.0", "1e3"]


@dataclass(frozen=True)
class Size:
    lo: int
    hi: int
    multiple_of: int = 1

    def valid(self, text: str) -> bool:
        raw = text.upper().removesuffix("B")
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(raw[-1:])
        number = raw[:-1] if unit else raw
        if not _DECIMAL.fullmatch(number):
            return False
        x = float(number) * (unit or 1)
        return math.isfinite(x) and self.lo <= x <= self.hi and int(x) % self.multiple_of == 0

    def extremes(self) -> list[str]:
        return ["0", "-1", "1x", "K", "1.5Q", str(self.hi + 1), "1e30", "64 K"]


@dataclass(frozen=True)
class Listed:
    """Options whose bad values are a fixed list (hosts, paths, networks, tokens)."""

    bad: tuple[str, ...]

    def valid(self, text: str) -> bool:
        return text not in self.bad

    def extremes(self) -> list[str]:
        return list(self.bad)


HOSTS = Listed(
    (
        "not a host",
        "",
        "a..b",
        "-a.b",
        "256.1.1.1",
        "1.2.3.4.5",
        "[1.2.3.4]",
        "::1::2",
        "[::1",
        "a_b",
        "\u00e9.de",
        "x" * 300,
        "h:1",
    )
)
PATHS = Listed(("", "a\0b", "x" * 300, "/" + "y/" * 2100))
NETS = Listed(("10.0.0.0/33", "x", "", "10.0.0.1/8/9", "fd00::/129", "1.2.3"))
KEY_IDS = Listed(("", "zz", "A" * 32, "0" * 31, "0" * 33, "g" * 32))
TOKENS = Listed(("", " ", "-x", "a b", "\u00e9", "x" * 200, "a\nb"))
PORT = Int(1, 65535)

NET_UP = ("net", "up", MISSING + ".toml", "--dir", "{dir}/netup")
NODE_RUN = ("node", "run", "--config", MISSING + ".toml")
NODE_AGENT = ("node", "agent", "--mgmt", MISSING + ".toml", "--name", "n", "--query-fd", "3",
              "--notice-fd", "4")  # fmt: skip
RENDER = ("topology", "render", "demoquandt", "--out", "{dir}/render")
DEMO = ("demo", "--skip-quantum", "--skip-network")
QRNG_RUN = ("qrng", "run", "--source", "nope://x", "--out", "{dir}/rand.bin")
QRNG_RAW = ("qrng", "raw", "--source", "nope://x", "--out", "{dir}/raw.bin")
BUILD = (
    "image",
    "build",
    "--role",
    "ckms",
    "--node",
    "5",
    "--topology",
    "demoquandt",
    "--key",
    MISSING,
    "--keyring",
    MISSING,
    "--out",
    "{dir}/b.qkdnb",
)
INIT = ("image", "init-target", "{dir}/t.img", "--keyring", MISSING)
SAE_GET = ("sae", "get", "--dir", MISSING, "--sae", "a", "--slave", "b")
ENROLL = ("card", "enroll", "--pair", "a", "b", "--signing-key", MISSING, "--audit", "{audit}")
PIN = ("card", "change-pin", "--old-pin-file", MISSING)
EMULATE = ("card", "emulate", "--state", "{dir}/in/binary/x")

VALUES: list[tuple[tuple[str, ...], str, Any]] = [
    (NET_UP, "--timeout", Float(0, 86400)),
    (NET_UP, "--patience", Float(0, 3600, lo_open=True)),
    (NET_UP, "--stock", Int(0, 100_000)),
    (NET_UP, "--speedup", Float(0, 1000, lo_open=True)),
    (NET_UP, "--base-port", Int(1024, 55536)),
    (NET_UP, "--mgmt-poll", Float(1, 3600)),
    (NET_UP, "--dir", PATHS),
    (("net", "status"), "--dir", PATHS),
    (("net", "down"), "--dir", PATHS),
    (NODE_RUN, "--stock", Int(0, 100_000)),
    (NODE_RUN, "--patience", Float(0, 3600, lo_open=True)),
    (("node", "run"), "--config", PATHS),
    (NODE_AGENT, "--query-fd", Int(3, 1 << 20)),
    (NODE_AGENT, "--notice-fd", Int(3, 1 << 20)),
    (NODE_AGENT, "--name", TOKENS),
    (("node", "agent", "--name", "n", "--query-fd", "3", "--notice-fd", "4"), "--mgmt", PATHS),
    (RENDER, "--base-port", Int(1024, 55536)),
    (RENDER, "--host", HOSTS),
    (RENDER, "--start", Float(0, 253_402_300_799)),
    (RENDER, "--data-root", PATHS),
    (("topology", "render", "demoquandt"), "--out", PATHS),
    (("topology", "validate"), "", PATHS),
    (DEMO, "--days", Float(0, 366, lo_open=True)),
    (DEMO, "--interval", Float(1, 86400)),
    (DEMO, "--speedup", Float(0, 1e9, lo_open=True, words=("max",))),
    (DEMO, "--verify-every", Int(1, 1_000_000)),
    (DEMO, "--requests", Int(1, 10_000_000)),
    (DEMO, "--topology", PATHS),
    (QRNG_RUN, "--bytes", Size(1, 1 << 40)),
    ((*QRNG_RUN, "--bytes", "16"), "--claimed-entropy", Float(0, 16, lo_open=True)),
    (QRNG_RAW, "--samples", Size(1, 1 << 40)),
    (("qrng", "assess", "{dir}/in/empty"), "--bits-per-sample", Int(1, 8)),
    (("qrng", "ais31"), "", PATHS),
    (BUILD, "--security-version", Int(0, 1 << 32)),
    (BUILD, "--source-date-epoch", Int(0, (1 << 32) - 1)),
    (BUILD, "--base-port", Int(1024, 55536)),
    (BUILD, "--host", HOSTS),
    (BUILD, "--chunk-size", Size(4096, 1 << 30, multiple_of=4096)),
    (BUILD, "--sae-net", NETS),
    (BUILD, "--admin-net", NETS),
    (BUILD, "--version", TOKENS),
    (BUILD, "--compatible", TOKENS),
    ((*INIT, "--size", "64M"), "--slot-size", Size(1, 1 << 44)),
    (INIT, "--size", Size(1, 1 << 44)),
    ((*INIT, "--size", "64M"), "--node", Int(1, 999)),
    ((*INIT, "--size", "64M"), "--floor", Int(0, 1 << 32)),
    ((*INIT, "--size", "64M"), "--attempts", Int(1, 255)),
    ((*INIT, "--size", "64M"), "--compatible", TOKENS),
    (("image", "key", "revoke", MISSING, "--root", MISSING), "--key-id", KEY_IDS),
    (("image", "key", "generate"), "--out", PATHS),
    (SAE_GET, "--number", Int(1, 100_000)),
    (SAE_GET, "--size", Int(8, 65536, multiple_of=8)),
    (ENROLL, "--timeout", Float(0, 3600)),
    (PIN, "--timeout", Float(0, 3600)),
    (EMULATE, "--port", PORT),
    (EMULATE, "--host", HOSTS),
    (("card", "audit-verify", "{audit}"), "--public-key", PATHS),
]


def _argv(env: Env, prefix: tuple[str, ...], option: str, value: str) -> list[str]:
    head = [env.fill(a) for a in prefix]
    return [*head, option, value] if option else [*head, value]


def _refused(env: Env, prefix: tuple[str, ...], option: str, value: str) -> None:
    status, _, err = qkdn(*_argv(env, prefix, option, value))
    assert clean(status, err) == "USAGE" and status == 2, (option, value, err)
    assert f"argument {option}" in err if option else "argument " in err, err


def _bad(kind: Any) -> st.SearchStrategy[str]:
    """Hypothesis-made values that ``kind`` must refuse."""
    if isinstance(kind, Listed):
        return st.sampled_from(kind.bad)
    made = st.one_of(
        st.text(max_size=12),
        st.integers().map(str),
        st.floats().map(repr),
        st.sampled_from(JUNK),
    )
    return made.filter(lambda text: not kind.valid(text))


@pytest.mark.parametrize(
    "prefix, option, kind", VALUES, ids=[f"{' '.join(p[:2])} {o}" for p, o, _ in VALUES]
)
def test_out_of_range_values_are_usage_errors(env: Env, prefix, option, kind) -> None:
    """Item 4 (and 17, 19): NaN, infinite, negative, huge, empty, non-ASCII or
    non-decimal values of every option are one USAGE line naming the option, exit 2."""
    for value in [v for v in JUNK + kind.extremes() if not kind.valid(v)]:
        _refused(env, prefix, option, value)

    @FEW
    @given(value=_bad(kind))
    def generated(value: str) -> None:
        _refused(env, prefix, option, value)

    generated()


def test_values_in_range_are_accepted(env: Env) -> None:
    """The types refuse what is out of range, not what is in it (bounds included)."""
    for argv in (
        [
            "topology",
            "render",
            "demoquandt",
            "--out",
            f"{env.dir}/ok",
            "--base-port",
            "55536",
            "--host",
            "[::1]",
            "--start",
            "0",
        ],
        ["topology", "render", "demoquandt", "--out", f"{env.dir}/ok", "--host", "node-5.example"],
        [
            "demo",
            "--skip-quantum",
            "--skip-network",
            "--days",
            "366",
            "--interval",
            "86400",
            "--speedup",
            "1e9",
            "--verify-every",
            "1",
            "--requests",
            "1",
        ],
    ):
        status, _, err = qkdn(*argv)
        assert status == 0, err


# -- READS: every file a command reads ------------------------------------------------------

READS: list[tuple[str, ...]] = [
    ("topology", "validate", "{F}"),
    ("topology", "show", "{F}"),
    ("topology", "render", "{F}", "--out", "{dir}/r"),
    ("demo", "--topology", "{F}", "--skip-network", "--days", "0.001"),
    ("net", "up", "{F}", "--dir", "{dir}/never"),
    ("node", "run", "--config", "{F}"),
    ("node", "agent", "--mgmt", "{F}", "--name", "n", "--query-fd", "3", "--notice-fd", "4"),
    ("qrng", "assess", "{F}"),
    ("qrng", "ais31", "{F}"),
    ("image", "key", "init", "--root", "{F}", "--out", "{dir}/ring-new.json"),
    (
        "image",
        "key",
        "certify",
        "{F}",
        "--root",
        "{root_key}",
        "--signer",
        "{release_pub}",
        "--purpose",
        "dev",
    ),
    (
        "image",
        "key",
        "certify",
        "{ring}",
        "--root",
        "{F}",
        "--signer",
        "{release_pub}",
        "--purpose",
        "dev",
    ),
    (
        "image",
        "key",
        "certify",
        "{ring}",
        "--root",
        "{root_key}",
        "--signer",
        "{F}",
        "--purpose",
        "dev",
    ),
    ("image", "key", "rotate", "{ring}", "--old-root", "{root_key}", "--new-root", "{F}"),
    ("image", "key", "revoke", "{F}", "--root", "{root_key}", "--key-id", "0" * 32),
    ("image", "inspect", "{F}", "--keyring", "{ring}"),
    ("image", "inspect", "{dir}/in/binary", "--keyring", "{F}"),
    ("image", "inspect", "{dir}/in/binary", "--target", "{F}"),
    ("image", "flash", "{F}", "--target", "{disk}"),
    ("image", "status", "--target", "{F}"),
    ("image", "boot", "--target", "{F}", "--no-selftest"),
    ("image", "commit", "--target", "{F}"),
    ("image", "init-target", "{dir}/t2.img", "--size", "64M", "--keyring", "{F}", "--force"),
    (
        "image",
        "build",
        "--role",
        "ckms",
        "--node",
        "5",
        "--topology",
        "demoquandt",
        "--key",
        "{F}",
        "--keyring",
        "{ring}",
        "--out",
        "{dir}/b.qkdnb",
        "--wheelhouse",
        "{wheels}",
    ),
    (
        "image",
        "build",
        "--role",
        "ckms",
        "--node",
        "5",
        "--topology",
        "demoquandt",
        "--key",
        "{release_key}",
        "--keyring",
        "{F}",
        "--out",
        "{dir}/b.qkdnb",
        "--wheelhouse",
        "{wheels}",
    ),
    ("card", "audit-verify", "{F}", "--public-key", "{station_pub}"),
    ("card", "audit-verify", "{audit}", "--public-key", "{F}"),
    ("card", "enroll", "--pair", "a", "b", "--signing-key", "{F}", "--audit", "{dir}/a.jsonl"),
    ("card", "change-pin", "--old-pin-file", "{F}"),
    ("card", "unblock", "--puk-file", "{F}"),
    (
        "keystore",
        "init",
        "pkcs11:token=t?module-path=/nonexistent.so&pin-value=1",
        "--so-pin-source",
        "file:{F}",
    ),
]
"""Each row reads the file {F}; everything else on the line is valid."""
STATE_READS = [
    ("net", "status", "--dir", "{net}"),
    ("net", "down", "--dir", "{net}"),
    ("sae", "status", "--dir", "{net}", "--sae", "nobody", "--slave", "sae-bonn-1"),
]
"""Each row reads the supervisor's state file, run/state.json."""


def _read_with(env: Env, row: tuple[str, ...], path: Path) -> str | None:
    argv = [env.fill(a.replace("{F}", str(path))) for a in row]
    status, _, err = qkdn(*argv)
    return clean(status, err)


@pytest.mark.parametrize("row", READS, ids=[" ".join(r[:3]) for r in READS])
def test_hostile_files_are_coded_errors(env: Env, row) -> None:
    """Items 16 and 18: a file that is binary, empty, endless (/dev/zero), a FIFO nobody
    writes, a directory, missing, nested too deep or not the expected JSON is a coded
    error (or, for a command that can do without it, success), read with a bound."""
    for name, path in env.bad_inputs.items():
        if row[1] in ("assess", "ais31") and name in ("deep", "deep-json", "long-number"):
            continue  # valid samples (only slower to assess than the 1 KiB binary file)
        _read_with(env, row, path)


@pytest.mark.parametrize("row", STATE_READS, ids=[" ".join(r[:2]) for r in STATE_READS])
def test_hostile_state_files_are_ignored_or_coded(env: Env, row) -> None:
    """A state file that is binary, endless, a FIFO or a directory never crashes
    ``net status``, ``net down`` or ``sae`` (a binary state.json was item 18's example)."""
    state = env.net / "run" / "state.json"
    try:
        for path in env.bad_inputs.values():
            state.unlink(missing_ok=True)
            state.symlink_to(path)
            _read_with(env, row, path)
    finally:
        state.unlink(missing_ok=True)


state_contents = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"[]",
            b"5",
            b'"x"',
            b"{}",
            b'{"nodes": 5}',
            b'{"nodes": {"a": 1}}',
            b'{"supervisor_pid": "1", "nodes": {}}',
            b"\xff" * 10,
        ]
    ),
)
"""Never an integer pid: a test must not signal a process (see test_state_pids_...)."""


@FEW
@given(content=state_contents)
def test_generated_state_files_are_ignored_or_coded(env: Env, content: bytes) -> None:
    state = env.net / "run" / "state.json"
    state.unlink(missing_ok=True)
    state.write_bytes(content)
    try:
        for row in STATE_READS:
            _read_with(env, row, state)
    finally:
        state.unlink(missing_ok=True)


json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
keyring_like = st.fixed_dictionaries(
    {"format": st.just("qkdn-keyring-1")},
    optional={"roots": json_docs, "signers": json_docs, "revocations": json_docs},
)
contents = st.one_of(
    st.binary(max_size=300),
    json_docs.map(lambda d: json.dumps(d).encode()),
    keyring_like.map(lambda d: json.dumps(d).encode()),
)
GENERATED = [r for r in READS if r[1] not in ("assess", "ais31", "build", "init-target")]


@pytest.mark.parametrize("row", GENERATED, ids=[" ".join(r[:3]) for r in GENERATED])
def test_generated_file_contents_are_coded_errors(env: Env, row) -> None:
    """Hypothesis-made binary and JSON contents (keyrings of the right format with
    anything inside) in every file a command reads."""
    path = env.dir / "generated"

    @FEW
    @given(content=contents)
    def check(content: bytes) -> None:
        path.write_bytes(content)
        path.chmod(0o600)
        _read_with(env, row, path)

    check()


# -- WRITES: every file or directory a command writes ---------------------------------------

WRITES: list[tuple[str, ...]] = [
    ("topology", "render", "demoquandt", "--out", "{O}"),
    ("qrng", "run", "--bytes", "64", "--out", "{O}"),
    ("qrng", "raw", "--samples", "64", "--out", "{O}"),
    ("image", "key", "generate", "--out", "{O}"),
    ("image", "key", "init", "--root", "{root_key}", "--out", "{O}"),
    ("image", "init-target", "{O}", "--size", "64M", "--keyring", "{ring}", "--force"),
    (
        "image",
        "build",
        "--role",
        "ckms",
        "--node",
        "5",
        "--topology",
        "demoquandt",
        "--key",
        "{release_key}",
        "--keyring",
        "{ring}",
        "--out",
        "{O}",
        "--wheelhouse",
        "{wheels}",
    ),
    ("demo", "--skip-network", "--days", "0.001", "--json", "{O}"),
    ("card", "emulate", "--state", "{O}"),
]


@pytest.mark.parametrize("row", WRITES, ids=[" ".join(r[:3]) for r in WRITES])
def test_unwritable_outputs_are_coded_errors(env: Env, row, tmp_path: Path) -> None:
    """Item 18: read-only places, paths under a file, a missing parent (success where the
    command creates parents), a full device for streamed output."""
    outputs = dict(env.bad_outputs)
    if row[1] != "emulate":  # a state directory whose parents can be made: it would run
        outputs["missing-parent"] = tmp_path / "no" / "such" / "x"
    if row[1] in ("run", "raw"):
        outputs["full"] = Path("/dev/full")  # ENOSPC in the middle of writing
    for name, path in outputs.items():
        argv = [env.fill(a.replace("{O}", str(path))) for a in row]
        status, _, err = qkdn(*argv)
        code = clean(status, err)
        assert code is not None or name == "missing-parent", (name, err)


# -- the examples of the issue ---------------------------------------------------------------

EXAMPLES = [
    (["qrng", "run", "--bytes", "inf", "--out", "{dir}/x"], 2, "USAGE", "argument --bytes"),
    (
        ["image", "init-target", "{dir}/big.img", "--size", "1e30", "--keyring", "{ring}"],
        2,
        "USAGE",
        "argument --size",
    ),
    (["net", "up", "--timeout", "nan"], 2, "USAGE", "argument --timeout"),
    (["net", "up", "--aaa", "--no-aaa"], 2, "USAGE", "argument --no-aaa"),
    (["sae", "get", "--sae", "a", "--slave", "b", "--size", "0"], 2, "USAGE", "argument --size"),
    (
        [
            "image",
            "build",
            "--role",
            "ckms",
            "--node",
            "5",
            "--topology",
            "demoquandt",
            "--key",
            "{release_key}",
            "--keyring",
            "{ring}",
            "--out",
            "{dir}/b",
            "--security-version",
            "-1",
        ],
        2,
        "USAGE",
        "argument --security-version",
    ),
    (
        [
            "image",
            "build",
            "--role",
            "ckms",
            "--node",
            "5",
            "--topology",
            "demoquandt",
            "--key",
            "{release_key}",
            "--keyring",
            "{ring}",
            "--out",
            "{dir}/b",
            "--base-port",
            "70000",
        ],
        2,
        "USAGE",
        "argument --base-port: expected an integer in 1024..55536",
    ),
    (
        ["topology", "render", "demoquandt", "--out", "{dir}/r", "--host", "not a host"],
        2,
        "USAGE",
        "argument --host",
    ),
    (["topology", "validate", "/dev/zero"], 1, "CFG-FILE", "larger than 4 MiB"),
    (
        ["card", "audit-verify", "{dir}/in/binary", "--public-key", "{station_pub}"],
        1,
        "HSM-AUDIT",
        "not UTF-8",
    ),
    (
        [
            "image",
            "build",
            "--role",
            "ckms",
            "--node",
            "5",
            "--topology",
            "demoquandt",
            "--key",
            "{release_key}",
            "--keyring",
            "{ring}",
            "--out",
            "{dir}/out/file/b.qkdnb",
            "--wheelhouse",
            "{wheels}",
        ],
        1,
        "IMG-USAGE",
        "cannot write",
    ),
    (["card", "emulate", "--state", "{dir}/out/file/card"], 1, "USAGE", "--state: cannot use"),
]


@pytest.mark.parametrize("argv, status, code, fragment", EXAMPLES, ids=[e[0][1] for e in EXAMPLES])
def test_the_issues_examples(env: Env, argv, status, code, fragment) -> None:
    got, _, err = qkdn(*[env.fill(a) for a in argv])
    assert (got, clean(got, err)) == (status, code), err
    assert fragment in err


def test_binary_state_file_and_net_down(env: Env) -> None:
    """Item 18: ``net down`` with a binary run/state.json (was INTERNAL UnicodeDecodeError)."""
    state = env.net / "run" / "state.json"
    state.write_bytes(bytes(range(128, 256)))
    try:
        status, out, err = qkdn("net", "down", "--dir", str(env.net))
    finally:
        state.unlink(missing_ok=True)
    assert (status, err) == (0, "") and "no network running" in out


def test_broken_pipe_is_one_coded_line(env: Env) -> None:
    """Item 18: ``qkdn net status --json | head -c 100``: the reader has gone before we
    write (a pipe whose read end is closed), so the outcome does not depend on timing."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance.cli",
                "net",
                "status",
                "--json",
                "--dir",
                str(env.net),
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("qkdn: error [PIPE]: ") and proc.stderr.count("\n") == 1


def test_broken_pipe_in_process(env: Env, monkeypatch) -> None:
    """The same for any command that prints, run in this process on a closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", closed)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), closed:  # main points the closed pipe at /dev/null
        status = cli.main(["topology", "show", "demoquandt", "--json"])
    assert status == 1 and err.getvalue() == (
        "qkdn: error [PIPE]: standard output was closed before all output was written\n"
    )


def test_error_messages_stay_one_line(env: Env) -> None:
    """A newline in a value (a file name) is escaped, not printed."""
    status, _, err = qkdn("topology", "show", "a\nb")
    assert clean(status, err) == "CFG-FILE" and "a\\nb" in err


def test_node_run_refuses_a_port_that_would_wrap(env: Env, tmp_path: Path) -> None:
    """Item 17: ``node run`` with ``ckms = "127.0.0.1:99999"`` listened on 34463."""
    config = tmp_path / "ckms-hagen.toml"
    text = (env.net / "nodes" / "ckms-hagen.toml").read_text()
    config.write_text(re.sub(r'ckms = "[^"]*"', 'ckms = "127.0.0.1:99999"', text, count=1))
    status, _, err = qkdn("node", "run", "--config", str(config))
    assert clean(status, err) == "CFG-VALUE" and "a port in 1..65535, not 99999" in err


def test_node_run_with_an_unwritable_data_directory(tmp_path: Path, monkeypatch) -> None:
    """Item 18: a read-only data directory for ``node run`` was [INTERNAL]."""
    import qrng
    from appliance.kms.network import load_configs, make_pki

    monkeypatch.setattr(qrng, "_node", None)  # the node opens its own one generator
    topo = load_topology("demoquandt")
    out = tmp_path / "net"
    render(topo, RenderPlan(out=out, data_root=READ_ONLY / "data"))
    make_pki(topo, load_configs(out), os.urandom)
    status, _, err = qkdn("node", "run", "--config", str(out / "nodes" / "ckms-hagen.toml"))
    assert clean(status, err) == "IO" and str(READ_ONLY) in err, err
