"""The node's side of its SNMP agent: the agent runs beside the node, in a process of its
own, and reads the node through this feed.

pysnmp's engines and MIB modules cost a node's key path about 5 % of its CPU per request
when they share its process, even while the agent serves nothing (BENCHMARKS.md, issue
17): so a node never imports pysnmp. :class:`Feed` starts ``qkdn node agent``
(:mod:`appliance.mgmt.sidecar`) as the node's child, with two sequenced-packet socket
pairs (:mod:`appliance.mgmt.channel`): on the *query* pair it answers each of the agent's
asks with a fresh :class:`NodeReading` (the reader of :mod:`appliance.mgmt.nodestate`,
on the node's event loop); on the *notice* pair it tells the agent to look at once
(:meth:`Feed.look`: a link changed state, the node raised an alarm).

The agent dies with its node: its environment names the node as the process it dies with
(``QKDN_NET_SUPERVISOR``, :func:`appliance.kms.netproc.die_with_supervisor`: SIGKILL when
the node dies, even by SIGKILL), and carries the network's marker (``QKDN_NET``), so that
``qkdn net down`` finds it too. An agent that exits is started again with a back-off
(1 s doubling to 10 s, reset once it has run a minute); :meth:`Feed.close` stops it
(SIGTERM, then SIGKILL after :data:`STOP_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from appliance.kms import netproc
from appliance.mgmt.channel import (
    LOOK_MESSAGE,
    MAX_MESSAGE,
    ChannelError,
    failed_answer,
    parse_request,
    reading_answer,
)
from appliance.mgmt.nodeview import NodeReading

log = logging.getLogger("qkdn.mgmt")

AGENT_SUFFIX = "/agent"
"""What the agent's process name (``QKDN_NET_NODE``, see netproc) adds to its node's."""
STOP_S = 5.0
"""Seconds the agent has to exit after SIGTERM before it gets SIGKILL."""
BACKOFF_S, MAX_BACKOFF_S, STEADY_S = 1.0, 10.0, 60.0
"""An agent that exits is started again after BACKOFF_S, doubling up to MAX_BACKOFF_S;
the back-off is reset once an agent has run STEADY_S."""


class Feed:
    """Runs the node's agent ``name`` (configuration ``config``) beside the node and feeds
    it ``reader``'s readings. ``cli`` is how ``qkdn`` is run (its global options)."""

    def __init__(
        self,
        name: str,
        reader: Callable[[], NodeReading],
        config: Path,
        cli: Sequence[str] = (sys.executable, "-m", "appliance.cli"),
    ) -> None:
        self.name, self.reader, self.config, self.cli = name, reader, config, tuple(cli)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exited = asyncio.Event()
        """Set whenever the agent process has exited (cleared when it is started again)."""
        self._query: socket.socket | None = None
        self._notice: socket.socket | None = None
        self._pidfd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff, self._started = BACKOFF_S, 0.0
        self._again: asyncio.TimerHandle | None = None
        self._closing = False

    async def start(self) -> None:
        """Start the agent (its readiness is its own: it answers SNMP engine discovery)."""
        self._loop = asyncio.get_running_loop()
        self._spawn()

    def look(self) -> None:
        """Tell the agent to read the node now; safe from any thread. A notice already
        waiting says the same: one more is not needed when the socket is full."""
        notice = self._notice
        if notice is not None:
            with contextlib.suppress(OSError):  # full (a look is pending) or the agent gone
                notice.send(LOOK_MESSAGE, socket.MSG_DONTWAIT)

    async def close(self) -> None:
        """Stop the agent and close the feed."""
        self._closing = True
        if self._again is not None:
            self._again.cancel()
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), STOP_S)
            except TimeoutError:
                proc.kill()
            await asyncio.to_thread(proc.wait)
        self._release()

    # -- the agent process ----------------------------------------------------------------
    def _spawn(self) -> None:
        assert self._loop is not None
        query, agent_query = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        notice, agent_notice = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (agent_query.fileno(), agent_notice.fileno())
        env = {**os.environ, netproc.ENV_SUPERVISOR: str(os.getpid())}
        env[netproc.ENV_NODE] = os.environ.get(netproc.ENV_NODE, self.name) + AGENT_SUFFIX
        argv = [*self.cli, "node", "agent", "--mgmt", str(self.config), "--name", self.name]
        argv += ["--query-fd", str(fds[0]), "--notice-fd", str(fds[1])]
        try:
            self.process = subprocess.Popen(argv, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        finally:
            agent_query.close()
            agent_notice.close()
        self.starts += 1
        self._started = time.monotonic()
        self.exited.clear()
        query.setblocking(False)
        notice.setblocking(False)
        self._query, self._notice = query, notice
        self._loop.add_reader(query.fileno(), self._answer)
        self._pidfd = os.pidfd_open(self.process.pid)
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        """The agent exited: start it again after the back-off (unless closing)."""
        assert self._loop is not None and self.process is not None
        code = self.process.wait()
        self._release()
        self.exited.set()
        if self._closing:
            return
        if time.monotonic() - self._started >= STEADY_S:
            self._backoff = BACKOFF_S
        wait = self._backoff
        log.error("mgmt: the SNMP agent of %s exited (%s); again in %.0f s", self.name, code, wait)
        self._again = self._loop.call_later(self._backoff, self._respawn)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _respawn(self) -> None:
        self._again = None
        if not self._closing:
            self._spawn()

    def _release(self) -> None:
        loop = self._loop
        if self._query is not None:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._query.fileno())
            self._query.close()
        if self._notice is not None:
            self._notice.close()
        self._query = self._notice = None
        if self._pidfd >= 0:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    # -- the agent's asks -----------------------------------------------------------------
    def _answer(self) -> None:
        """One ask of the agent, answered with the node read now."""
        query = self._query
        if query is None:
            return
        try:
            message = query.recv(MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message = b""
        if not message:  # the agent closed its end (exiting): its exit is reaped
            assert self._loop is not None
            self._loop.remove_reader(query.fileno())
            return
        try:
            seq = parse_request(message)
        except ChannelError as exc:
            log.error("mgmt: %s from the agent of %s", exc, self.name)
            return
        try:
            answer = reading_answer(seq, self.reader())
        except Exception as exc:  # a reading that fails is told, not raised into the loop
            log.error("mgmt: reading the node failed: %s", exc, exc_info=True)
            answer = failed_answer(seq, f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):  # the agent gone, or it stopped reading
            query.send(answer, socket.MSG_DONTWAIT)
