"""An AAA agent on a free UDP port in a thread of its own (its own event loop), with
AKMS 2 and AKMS 14 as SNMP users; net-snmp commands and AaaClients talk to it."""

from __future__ import annotations

import asyncio
import inspect
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.aaa.accounting import Accounting
from appliance.aaa.agent import Agent, AgentConfig, AkmsUser, Credentials
from appliance.aaa.client import AaaClient
from appliance.aaa.registry import Registry
from appliance.aaa.service import AaaService
from tests.aaa.registry_fixture import populate

T = TypeVar("T")
OPERATOR = Credentials(user="operator", auth="operator-auth-1", priv="operator-priv-1")
AKMS = {
    2: AkmsUser(id=2, user="akms-2", auth="akms-2-auth-key", priv="akms-2-priv-key"),
    14: AkmsUser(id=14, user="akms-14", auth="akms-14-auth-key", priv="akms-14-priv-key"),
}


async def decided(verdict: Awaitable[T] | T) -> T:
    """A validator's verdict: as it came (decided from held quota) or once awaited."""
    if inspect.isawaitable(verdict):
        return await verdict
    return verdict


needs_netsnmp = pytest.mark.skipif(shutil.which("snmpget") is None, reason="net-snmp missing")


@dataclass
class Running:
    """The agent's thread, loop and objects (touch them only through :meth:`call`)."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    agent: Agent
    port: int
    db: Path
    revoked: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    events: dict[int, threading.Event] = field(default_factory=dict)
    hooks: dict[int, list[Callable[[str, int], None]]] = field(default_factory=dict)
    """Called in the agent's loop when AKMS n receives an INFORM (add before use)."""

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def client(self, akms: int) -> AaaClient:
        async def make() -> AaaClient:
            return AaaClient(f"127.0.0.1:{self.port}", AKMS[akms])

        return self.call(make())

    def snmp(
        self, tool: str, *args: str, user: Credentials = OPERATOR
    ) -> subprocess.CompletedProcess[str]:
        """A net-snmp command as ``user`` (authPriv, SHA-256, AES-128)."""
        cmd = [
            tool,
            "-v3",
            "-l",
            "authPriv",
            "-u",
            user.user,
            "-a",
            "SHA-256",
            "-A",
            user.auth,
            "-x",
            "AES",
            "-X",
            user.priv,
            "-m",
            "",
            "-On",
            "-t",
            "2",
            "-r",
            "1",
            f"127.0.0.1:{self.port}",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    def raw(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [tool, "-m", "", "-On", "-t", "0.5", "-r", "0", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def start(tmp: Path, *, receivers: bool = True) -> Running:
    db = tmp / "registry.db"
    reg = Registry(db)
    populate(reg)
    reg.close()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    revoked: dict[int, list[tuple[str, int]]] = {2: [], 14: []}
    events = {2: threading.Event(), 14: threading.Event()}
    hooks: dict[int, list[Callable[[str, int], None]]] = {2: [], 14: []}

    async def boot() -> tuple[Agent, int, list[AaaClient]]:
        listeners, akms = [], []
        for n, user in AKMS.items():
            inform = None
            if receivers:
                rx = AaaClient("127.0.0.1:9", user)

                def got(contract: str, grant: int, n: int = n) -> None:
                    revoked[n].append((contract, grant))
                    for hook in hooks[n]:
                        hook(contract, grant)
                    events[n].set()

                inform = f"127.0.0.1:{rx.listen('127.0.0.1:0', got)}"
                listeners.append(rx)
            akms.append(user.model_copy(update={"inform": inform}))
        cfg = AgentConfig(listen="127.0.0.1:0", operator=OPERATOR, akms=akms)
        service = AaaService(Registry(db), Accounting(tmp / "accounting.db"))
        agent = Agent(service, cfg)
        return agent, await agent.start(), listeners

    fut = asyncio.run_coroutine_threadsafe(boot(), loop)
    agent, port, listeners = fut.result(30)
    running = Running(loop, thread, agent, port, db, revoked, events, hooks)
    running.listeners = listeners  # type: ignore[attr-defined]
    return running


def stop(running: Running) -> None:
    async def down() -> None:
        await running.agent.close()
        for rx in running.listeners:  # type: ignore[attr-defined]
            rx.close()
        running.agent.service.registry.close()
        running.agent.service.accounting.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    running.call(down())
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(10)
    running.loop.close()


@pytest.fixture
def aaa(tmp_path: Path) -> Running:
    running = start(tmp_path)
    yield running
    stop(running)
