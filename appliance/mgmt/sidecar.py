"""``qkdn node agent``: a node's SNMP agent in a process beside the node.

Started by the node (:class:`appliance.mgmt.feed.Feed`) with the agent's ends of the two
socket pairs of :mod:`appliance.mgmt.channel`. The agent (:class:`appliance.mgmt.agent.Agent`)
reads the node through :class:`NodeLink` at each PDU and at each look (a synchronous
ask, answered by the node's event loop within :data:`READ_TIMEOUT_S`), and looks at once
when the node sends a notice. It exits when the node closes the notice socket (the node
stopped), on SIGTERM or SIGINT, and by SIGKILL when the node dies (it dies with the node).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import signal
import socket
import time

from appliance.mgmt.agent import Agent
from appliance.mgmt.agentconfig import AgentConfig
from appliance.mgmt.channel import (
    MAX_MESSAGE,
    ChannelError,
    NodeGone,
    answer_seq,
    parse_answer,
    read_request,
)
from appliance.mgmt.nodeview import NodeReading

GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
"""What the query socket says when the node's end is closed (the node stopped or died)."""
READ_TIMEOUT_S = 2.0
"""Longest wait for the node's answer to one ask (its event loop may be busy serving)."""


class NodeLink:
    """The agent's reader of its node over the query socket (blocking, bounded)."""

    def __init__(self, sock: socket.socket, timeout: float = READ_TIMEOUT_S) -> None:
        self.sock, self.timeout = sock, timeout
        self.seq = 0

    def read(self) -> NodeReading:
        self.seq = (self.seq + 1) % (1 << 32)
        deadline = time.monotonic() + self.timeout
        try:
            self.sock.settimeout(self.timeout)
            self.sock.send(read_request(self.seq))
            while True:  # an answer to an earlier ask that timed out is skipped
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                message = self.sock.recv(MAX_MESSAGE)
                if not message:
                    raise NodeGone("the node closed the query socket")
                if answer_seq(message) == self.seq:
                    return parse_answer(message)[1]
        except TimeoutError as exc:
            raise ChannelError(f"the node did not answer within {self.timeout:.1f} s") from exc
        except OSError as exc:
            if exc.errno in GONE:
                raise NodeGone(f"the node closed the query socket ({exc.strerror})") from exc
            raise ChannelError(f"the query socket: {exc.strerror or exc}") from exc


def node_socket(fd: int, what: str) -> socket.socket:
    """The node's end ``fd`` passed to this process: a local sequenced-packet socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ChannelError(f"{what} {fd}: not the node's socket ({exc.strerror})") from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.detach()
        raise ChannelError(f"{what} {fd}: not the node's socket (not a local packet socket)")
    return sock


async def run(cfg: AgentConfig, name: str, query_fd: int, notice_fd: int) -> None:
    """Serve the agent until the node goes or a signal stops it."""
    link = NodeLink(node_socket(query_fd, "--query-fd"))
    notice = node_socket(notice_fd, "--notice-fd")
    notice.setblocking(False)
    agent = Agent(name, link.read, cfg)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def noticed() -> None:
        while True:
            try:
                message = notice.recv(16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if not message:  # the node is gone or stopping
                loop.remove_reader(notice.fileno())
                stop.set()
                return
            agent.look()

    loop.add_reader(notice.fileno(), noticed)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc.collect()  # start-up's objects live as long as the process (as in the node)
    gc.freeze()
    try:
        await stop.wait()
    finally:
        await agent.close()
        link.sock.close()
        notice.close()
