"""What keeps a node's agent cheap: a module that reports its own changes is never read by
the link watch, pysnmp's MIB modules come from Python's bytecode cache, USM master keys
are RFC 3414's, engine discovery finds ready agents (and parses whatever comes back
without raising), and the manager's polls ask for no repetition beyond an agent's MIB."""

from __future__ import annotations

import asyncio
import hashlib
import py_compile
import threading
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from pysnmp.proto.secmod.rfc3414 import localkey

import hal
from appliance.mgmt.manager import AgentEntry, ManagerConfig, MapLink
from appliance.mgmt.nodestate import LinkWatch
from appliance.mgmt.nodeview import instance_count
from appliance.snmp import discovery, engines
from appliance.snmp.usm import Credentials
from hal.emulated import Fault, add_fault, write_faults
from tests.conftest import url


class Counting:
    """Counts the status reads of an emulated module (the watch's own reads among them)."""

    def __init__(self, inner: hal.Qkdm) -> None:
        self.inner, self.reads = inner, 0
        self.follows_file_changes = inner.follows_file_changes  # type: ignore[attr-defined]

    def subscribe(self, callback: hal.StateCallback) -> object:
        unsubscribe = self.inner.subscribe(callback)
        self.follows_file_changes = self.inner.follows_file_changes  # type: ignore[attr-defined]
        return unsubscribe

    def poll_state(self) -> hal.LinkState:
        self.reads += 1
        return self.inner.poll_state()


def test_a_module_following_its_faults_file_is_not_read_by_the_watch(tmp_path: Path):
    faults = tmp_path / "faults.json"
    write_faults(faults, [])
    module = hal.open_qkdm(url("a", start=int(time.time()) - 5, faults=faults))
    counting = Counting(module)
    woken = threading.Event()

    async def run() -> tuple[int, int]:
        watch = LinkWatch([counting], woken.set)  # type: ignore[list-item]
        watch.start()
        try:
            reads = counting.reads  # the start's reading of the state as it is
            add_fault(faults, Fault(kind="down", start=time.time() - 1, end=None))
            for _ in range(3000):  # bounded: the inotify follower wakes the watch
                if woken.is_set():
                    break
                await asyncio.sleep(0.01)
            return len(watch.polled), counting.reads - reads
        finally:
            await watch.close()

    try:
        assert asyncio.run(run()) == (0, 0)
        assert woken.is_set()
    finally:
        module.close()


def test_master_keys_are_rfc_3414s():
    for phrase in ("manager-auth-8", "x" * 70, "\u00e9t\u00e9-priv-key"):
        expected = bytes(localkey.hash_passphrase(phrase, hashlib.sha256))
        assert engines.master_key(phrase) == expected


def test_mib_modules_come_from_a_current_bytecode_cache_only(tmp_path: Path):
    source = tmp_path / "X-MIB.py"
    source.write_text("value = 1\n")
    py_compile.compile(str(source))
    code = engines.cached_code(str(source))
    assert code is not None and "value" in code.co_names
    source.write_text("value = 22\n")  # changed since it was compiled: stale
    assert engines.cached_code(str(source)) is None
    assert engines.cached_code(str(tmp_path / "none.py")) is None


def test_an_engine_made_from_the_cache_is_pysnmps_engine():
    eng = engines.new_engine(b"\x80\x00\x7e\xd9\x04qkdn-a-test")
    builder = eng.get_mib_builder()
    (engine_id,) = builder.import_symbols("__SNMP-FRAMEWORK-MIB", "snmpEngineID")
    assert bytes(engine_id.syntax) == b"\x80\x00\x7e\xd9\x04qkdn-a-test"
    sources = builder.get_mib_sources()
    assert isinstance(sources[0], engines.CachedMibSource)
    assert sources[0].read("SNMPv2-MIB")[1] == engines.CACHED  # pip compiled it at install


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**31 - 1))
def test_a_discovery_answer_is_parsed_without_raising(data: bytes, msg_id: int):
    got = discovery.engine_of(data, msg_id)
    assert got is None or isinstance(got, bytes)


def test_discovery_asks_in_the_clear_and_finds_nobody_at_a_closed_port():
    request = discovery.request(7)
    assert request[:2] == b"\x30" + bytes([len(request) - 2])
    assert discovery.engine_of(request, 7) is None  # a request is no Report
    assert discovery.answering({"nobody": "127.0.0.1:9"}, 0.3) == {}


def test_a_poll_asks_for_the_agents_instances_and_one_more(tmp_path: Path):
    poll_user = Credentials(user="m", auth="auth-phrase", priv="priv-phrase")

    def entry(node: int) -> AgentEntry:
        return AgentEntry(
            name=f"n{node}", id=node, role="ckms", address="127.0.0.1:1", poll=poll_user,
            notify=poll_user,
        )  # fmt: skip

    from appliance.mgmt.manager import Manager
    from appliance.mgmt.store import Store

    links = [MapLink(a=1, b=2, name="l12"), MapLink(a=2, b=3, name="l23")]
    store = Store(tmp_path / "manager.db")
    try:
        manager = Manager(ManagerConfig(links=links), store)
        assert manager.repetitions(entry(2)) == instance_count(2) + 1
        assert manager.repetitions(entry(1)) == instance_count(1) + 1
        assert manager.repetitions(entry(9)) == instance_count(0) + 1
    finally:
        store.close()
