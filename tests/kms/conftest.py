"""Fixtures of this folder, and helpers for tests against a network of OS processes.

:func:`running_net` starts a network with ``qkdn net up`` (every KMS node a supervised OS
process on loopback, real mutual TLS) and stops it afterwards; modules wrap it in a
module-scoped fixture, so that each module pays for one network. :class:`Net` is what such a test
sees: the network's status, SAE connections built from ``qkdn net status --json``, node
kills and restarts, node logs, and the names an SAE must never learn.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.cli.net import bring_down, status_doc
from appliance.config.render import find_free_base_port
from tests.pki_fixture import pki  # noqa: F401 - the shared PKI fixture

QKDN = [sys.executable, "-m", "appliance.cli"]
ROOT = Path(__file__).parents[2]


T = TypeVar("T")
POLL_S = 0.1
START_TIMEOUT_S = 240
"""``net up --timeout`` of :func:`running_net` unless a test names its own."""
"""Pause between two looks of :func:`poll`."""


def poll(condition: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """The first truthy value of ``condition()``, looked at every POLL_S until ``timeout``
    seconds have passed; then the test fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(POLL_S)


def qkdn(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one ``qkdn`` command from the repository root."""
    return subprocess.run([*QKDN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@dataclass
class Reply:
    """One HTTP exchange as an SAE sees it: status, headers and the raw body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(conn: http.client.HTTPSConnection, method: str, path: str, body: Any = None) -> Reply:
    """One request on a kept-alive connection; ``body`` (not None) is sent as JSON."""
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if raw is not None else {}
    conn.request(method, path, body=raw, headers=headers)
    resp = conn.getresponse()
    return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())


@dataclass
class Net:
    """A network started by ``qkdn net up`` in ``dir``."""

    dir: Path
    _carrier_patterns: list[re.Pattern[str]] | None = field(default=None, init=False, repr=False)

    # -- what `qkdn net status --json` says --------------------------------------------
    def status(self) -> dict[str, Any]:
        """The document of ``qkdn net status --json`` (same function, without a process
        start per call: tests poll it)."""
        return status_doc(self.dir)

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.status()["nodes"] if n["name"] == name)

    def sae(self, sae_id: str) -> dict[str, Any]:
        return next(s for s in self.status()["saes"] if s["id"] == sae_id)

    def kme_port(self, sae_id: str) -> int:
        """The port of the ETSI 014 server that serves ``sae_id``."""
        return int(self.sae(sae_id)["etsi014_base_url"].split("://")[1].split("/")[0].split(":")[1])

    def connect(
        self, sae_id: str, port: int | None = None, *, cert: Path | None = None
    ) -> http.client.HTTPSConnection:
        """An HTTPS connection as ``sae_id`` (its certificate, or ``cert`` and its .key) to
        its own KME, or to the 014 server at ``port``."""
        entry = self.sae(sae_id)
        ctx = ssl.create_default_context(cafile=entry["ca_cert"])
        ctx.check_hostname = False  # the private CA names nodes, not hosts
        pem = cert or Path(entry["cert"])
        ctx.load_cert_chain(pem, pem.with_suffix(".key"))
        return http.client.HTTPSConnection(
            "127.0.0.1", port or self.kme_port(sae_id), context=ctx, timeout=30
        )

    def pki(self, kind: str, name: str) -> tuple[Path, Path, Path]:
        """(certificate, key, CA certificate) of a node (``kind="nodes"``) or an SAE."""
        base = self.dir / "pki" / kind / name
        return base.with_suffix(".pem"), base.with_suffix(".key"), self.dir / "pki" / "ca.pem"

    def config(self, node: str) -> dict[str, Any]:
        """The rendered configuration of one node."""
        return tomllib.loads((self.dir / "nodes" / f"{node}.toml").read_text())

    # -- key requests ------------------------------------------------------------------
    def enc_keys(self, master: str, slave: str, number: int = 1, size: int | None = None) -> Reply:
        """One enc_keys request as ``master``, on a connection of its own (``size``: a key
        size the stock does not hold makes the request cross the network)."""
        conn = self.connect(master)
        query = f"number={number}" + (f"&size={size}" if size is not None else "")
        try:
            return exchange(conn, "GET", f"/api/v1/keys/{slave}/enc_keys?{query}")
        finally:
            conn.close()

    def dec_keys(self, slave: str, master: str, key_ids: list[str]) -> Reply:
        """One dec_keys request (POST, key_IDs) as ``slave``, on a connection of its own."""
        conn = self.connect(slave)
        try:
            body = {"key_IDs": [{"key_ID": k} for k in key_ids]}
            return exchange(conn, "POST", f"/api/v1/keys/{master}/dec_keys", body)
        finally:
            conn.close()

    def wait_for_relays(
        self, master: str, slave: str, timeout: float = 60, size: int | None = None
    ) -> None:
        """Until one key crosses the network from ``master`` to ``slave`` again, and the
        slave gets the same."""

        def once() -> bool:
            got = self.enc_keys(master, slave, size=size)
            if got.status != 200:
                return False
            ids = [k["key_ID"] for k in got.json()["keys"]]
            assert self.dec_keys(slave, master, ids).json() == got.json()
            return True

        poll(once, f"keys from {master} to {slave} flowing again", timeout)

    # -- processes ---------------------------------------------------------------------
    def kill(self, name: str) -> int:
        """``kill -9`` one node process; return the pid it had."""
        pid = int(self.node(name)["pid"])
        assert pid > 0, f"{name} is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 60) -> None:
        """Until the supervisor has restarted ``name`` and every endpoint of it answers a
        TLS handshake with a certificate of this network's CA."""

        def restarted() -> bool:
            node = self.node(name)
            if not node["alive"] or node["pid"] in (0, old_pid):
                return False
            return all(self._handshakes(a) for a in node["endpoints"].values())

        poll(restarted, f"{name} restarted", timeout)

    def _handshakes(self, address: str) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.pem"))
        ctx.check_hostname = False
        host, port = address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1) as raw:
                ctx.wrap_socket(raw).close()
        except (OSError, ssl.SSLError):
            return False
        return True

    # -- logs --------------------------------------------------------------------------
    def log_mark(self, node: str) -> int:
        """Where the node's log ends now (for :meth:`log_since`)."""
        path = self.dir / "logs" / f"{node}.log"
        return path.stat().st_size if path.exists() else 0

    def log_since(self, node: str, mark: int) -> list[str]:
        with open(self.dir / "logs" / f"{node}.log", "rb") as fh:
            fh.seek(mark)
            return fh.read().decode(errors="replace").splitlines()

    # -- what an SAE must never learn ---------------------------------------------------
    def carrier_patterns(self) -> list[re.Pattern[str]]:
        """Names, IDs, sites, links and addresses of every node that is not a UKMS (the
        source or target KME an SAE may know), and route words, from the topology."""
        if self._carrier_patterns is None:
            self._carrier_patterns = self._find_carrier_patterns()
        return self._carrier_patterns

    def _find_carrier_patterns(self) -> list[re.Pattern[str]]:
        topo = tomllib.loads((self.dir / "topology.toml").read_text())
        user_sites = " ".join(n["site"] for n in topo["nodes"] if n["role"] == "ukms").lower()
        words = {n["name"] for n in topo["nodes"] if n["role"] != "ukms"}
        words |= {
            n["site"]
            for n in topo["nodes"]
            if n["role"] != "ukms" and n["site"].lower() not in user_sites
        }
        words |= {f"link-{x['a']}-{x['b']}" for x in topo["links"]}
        ports = {
            a.rsplit(":", 1)[1]
            for n in self.status()["nodes"]
            if n["role"] != "ukms"
            for a in n["endpoints"].values()
        }
        # whole words: the AAA node's name "aaa" is also hex, and turns up inside key IDs
        patterns = [
            re.compile(rf"(?<![0-9a-z]){re.escape(w)}(?![0-9a-z])", re.IGNORECASE)
            for w in sorted(words)
        ]
        patterns += [re.compile(rf":{p}\b") for p in sorted(ports)]
        patterns += [
            re.compile(r"\bnode\s*#?\d+", re.IGNORECASE),
            re.compile(r"\b(links?|hops?|routes?|path|relay\w*)\b", re.IGNORECASE),
            re.compile(r"(?<!/api)/v1/"),  # node-to-node endpoints, not the 014 API
        ]
        return patterns

    def assert_reveals_no_carrier(self, text: str) -> None:
        found = [p.pattern for p in self.carrier_patterns() if p.search(text)]
        assert not found, f"an SAE can read carrier details ({found}) in: {text[:500]}"


@contextmanager
def running_net(
    tmp_path_factory: pytest.TempPathFactory, *options: str, topology: str = "demoquandt"
) -> Iterator[Net]:
    """``qkdn net up TOPOLOGY OPTIONS`` in a fresh directory; ``net down`` afterwards (its
    function, in this process: a CLI start costs seconds on a busy machine)."""
    out = tmp_path_factory.mktemp("net")
    if "--timeout" not in options:  # a loaded 2-core machine starts 16 nodes and AAA slowly
        options = ("--timeout", str(START_TIMEOUT_S), *options)
    up = qkdn(
        "net", "up", topology, "--dir", str(out),
        "--base-port", str(find_free_base_port()), *options,
        timeout=START_TIMEOUT_S + 60,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        yield Net(out)
    finally:
        bring_down(out)
