"""The node's agent beside the node: the node (:class:`appliance.mgmt.feed.Feed`) starts
``qkdn node agent`` as its child, answers its reads over the query socket and tells it to
look over the notice socket. Real processes, net-snmp's ``snmpget`` as the manager. The
node never loads pysnmp; its agent answers live values, looks when told, is started again
when it dies, stops with the feed, and dies with its node (even by SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.mgmt import channel
from appliance.mgmt.agent import Agent, load_config
from appliance.mgmt.channel import ChannelError, NodeGone
from appliance.mgmt.feed import Feed
from appliance.mgmt.nodeview import LinkReading, NodeReading
from appliance.mgmt.sidecar import NodeLink, node_socket
from appliance.snmp.usm import Credentials
from tests.kms.conftest import poll
from tests.mgmt.snmp_fixture import free_udp_port, snmp

USER = Credentials(user="manager-3", auth="feed-auth-pass", priv="feed-priv-pass")
READING = NodeReading(
    id=3, name="ckms-feed", role="ckms", software="qkdn test",
    links=(LinkReading(peer=4, name="link-3-4", state="up", level=7, capacity=10),),
    failures={"KMS-NO-PATH": 2},
)  # fmt: skip


def agent_file(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            listen = "127.0.0.1:{port}"
            poll_s = 3600
            [[users]]
            user = "{USER.user}"
            auth = "{USER.auth}"
            priv = "{USER.priv}"
            """
        )
    )
    return path


# -- the messages --------------------------------------------------------------------------
def test_a_reading_goes_over_the_channel_as_it_was_read():
    seq, reading = channel.parse_answer(channel.reading_answer(7, READING))
    assert (seq, reading) == (7, READING)
    assert channel.parse_request(channel.read_request(2**32 + 5)) == 5
    with pytest.raises(ChannelError, match="could not read itself: HalError: gone"):
        channel.parse_answer(channel.failed_answer(1, "HalError: gone"))
    huge = dataclasses.replace(READING, failures={f"C{i:05}": i for i in range(5000)})
    with pytest.raises(ChannelError, match="longer than"):
        channel.reading_answer(1, huge)


@settings(max_examples=300, deadline=None)
@given(message=st.binary(max_size=300) | st.builds(lambda b: b"V\0\0\0\1" + b, st.binary()))
def test_any_message_is_parsed_or_refused_with_a_channel_error(message: bytes):
    for parse in (channel.parse_answer, channel.parse_request):
        with contextlib.suppress(ChannelError):
            parse(message)


def test_the_agents_reader_skips_late_answers_and_is_bounded():
    node, agent = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = NodeLink(agent, timeout=0.2)
    try:
        node.send(channel.reading_answer(0, dataclasses.replace(READING, name="late")))
        node.send(channel.reading_answer(1, READING))  # the answer to the coming ask
        assert link.read() == READING
        assert channel.parse_request(node.recv(100)) == 1
        with pytest.raises(ChannelError, match="did not answer"):
            link.read()  # the node never answers
        node.close()  # with the unread ask in its queue: the agent's end is reset
        with pytest.raises(NodeGone, match="closed the query socket"):
            link.read()
    finally:
        agent.close()


def test_an_agent_whose_node_is_gone_stops_watching_without_an_error(tmp_path, caplog):
    """A node killed while its agent reads it: the agent's watch ends with an info line,
    not an error (its process follows the node; an ordinary crash logs no error)."""

    def reader() -> NodeReading:
        raise NodeGone("the node closed the query socket")

    async def scenario() -> None:
        cfg = load_config(agent_file(tmp_path, free_udp_port()))
        agent = Agent("ckms-gone", reader, cfg)
        await agent.start()
        try:
            watch = agent._tasks[0]
            await asyncio.wait_for(watch, 60)
            assert watch.exception() is None
        finally:
            await agent.close()

    with caplog.at_level(logging.INFO, logger="qkdn.mgmt"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "the agent of ckms-gone stops watching" in caplog.text


def test_the_agent_takes_only_local_packet_sockets_as_its_nodes():
    r, w = os.pipe()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for fd in (r, udp.fileno()):
            with pytest.raises(ChannelError, match="not the node's socket"):
                node_socket(fd, "--query-fd")
    finally:
        os.close(r)
        os.close(w)
        udp.close()


# -- the agent process ---------------------------------------------------------------------
def get(port: int, name: str) -> str:
    done = snmp("snmpget", f"127.0.0.1:{port}", f"QKDN-MIB::{name}", user=USER,
                options=("-Oqv",))  # fmt: skip
    return done.stdout.strip() if done.returncode == 0 else f"error: {done.stderr.strip()}"


def test_the_agent_beside_the_node_answers_live_looks_when_told_and_comes_back(tmp_path):
    port = free_udp_port()
    state = {"reading": READING, "reads": 0}

    def reader() -> NodeReading:
        state["reads"] += 1
        return state["reading"]  # type: ignore[return-value]

    async def scenario() -> None:
        feed = Feed("ckms-feed", reader, agent_file(tmp_path, port))
        await feed.start()
        try:
            named = lambda: get(port, "qkdnNodeName.0") == '"ckms-feed"'  # noqa: E731
            await asyncio.to_thread(poll, named, "the agent answers its node's name", 120)
            state["reading"] = dataclasses.replace(READING, requests=41)
            assert await asyncio.to_thread(get, port, "qkdnKmsRequests.0") == "41"  # live
            reads = state["reads"]
            feed.look()  # the agent's own period is an hour: only the notice reads the node
            for _ in range(6000):
                if state["reads"] > reads:
                    break
                await asyncio.sleep(0.01)
            assert state["reads"] > reads
            first = feed.process
            assert first is not None
            first.kill()  # the agent dies: the node starts it again
            for _ in range(12000):
                if feed.starts == 2 and feed.process is not first:
                    break
                await asyncio.sleep(0.01)
            assert feed.starts == 2
            again = lambda: get(port, "qkdnKmsRequests.0") == "41"  # noqa: E731
            await asyncio.to_thread(poll, again, "the started-again agent answers", 120)
        finally:
            await feed.close()
        assert feed.process is not None and feed.process.poll() is not None

    asyncio.run(scenario())


NODE = """
import asyncio, sys
from pathlib import Path
from appliance.mgmt.feed import Feed
from appliance.mgmt.nodeview import NodeReading

async def main():
    feed = Feed("n", lambda: NodeReading(id=1, name="n", role="ckms", software="s"),
                Path(sys.argv[1]))
    await feed.start()
    print(feed.process.pid, flush=True)
    assert not [m for m in sys.modules if m.startswith(("pysnmp", "pyasn1"))]
    print("no pysnmp", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_the_agent_dies_with_its_node_and_the_node_loads_no_pysnmp(tmp_path):
    script = tmp_path / "node.py"
    script.write_text(NODE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    node = subprocess.Popen(
        [sys.executable, str(script), str(agent_file(tmp_path, free_udp_port()))],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert node.stdout is not None
        agent = int(node.stdout.readline())
        assert node.stdout.readline().strip() == "no pysnmp"
        poll(lambda: _parent(agent) == node.pid, "the agent is the node's child")
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=60)
        poll(lambda: not _alive(agent), "the agent died with its node")
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(timeout=60)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """A process that has not exited (a zombie has: its parent, init, reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
