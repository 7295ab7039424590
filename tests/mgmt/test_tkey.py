"""T_key per node: a UKMS counts its enc_keys service times (a bounded window), QKDN-MIB
serves their median and 99th percentile, the manager's poll records them as the node's
T_key history (folded like link history), read by ``qkdn manager history --node``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from appliance.kms.counters import TKEY_WINDOW, NodeCounters
from appliance.mgmt.agent import Agent, AgentConfig, AgentUser
from appliance.mgmt.manager import AgentEntry, Manager, ManagerConfig
from appliance.mgmt.nodestate import tkey_percentiles
from appliance.mgmt.nodeview import NodeReading
from appliance.mgmt.store import BUCKET_S, RAW_KEEP_S, Store
from appliance.snmp.usm import Credentials
from tests.cli_run import run

USER = AgentUser(user="manager-1", auth="manager-auth-1", priv="manager-priv-1")
NOTIFY = Credentials(user="notify-1", auth="notify-auth-1", priv="notify-priv-1")


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_window_keeps_the_last_requests_and_gives_their_percentiles():
    counters = NodeCounters()
    assert tkey_percentiles(counters.tkey_us) == (0, 0)
    for ms in range(1, TKEY_WINDOW + 201):  # 1 .. 1200 ms: the first 200 fall out
        counters.served(ms / 1000)
    assert counters.tkey_requests == TKEY_WINDOW + 200 and len(counters.tkey_us) == TKEY_WINDOW
    p50, p99 = tkey_percentiles(counters.tkey_us)
    assert 700_000 <= p50 <= 701_000 and 1_189_000 <= p99 <= 1_191_000


def test_the_manager_polls_a_nodes_tkey_into_its_history(tmp_path: Path, capsys):
    clock = Clock(1_000_000.0)
    (tmp_path / "mgmt").mkdir()
    store = Store(tmp_path / "mgmt" / "manager.db", clock=clock)

    def read() -> NodeReading:
        return NodeReading(
            id=1, name="ukms-berlin", role="ukms", software="qkdn",
            tkey_p50_us=41_000, tkey_p99_us=95_000, tkey_requests=120,
        )  # fmt: skip

    async def run_poll() -> None:
        agent = Agent("ukms-berlin", read, AgentConfig(users=[USER]))
        port = await agent.start()
        entry = AgentEntry(
            name="ukms-berlin", id=1, role="ukms", address=f"127.0.0.1:{port}",
            poll=Credentials(**USER.model_dump(exclude={"role"})), notify=NOTIFY,
        )  # fmt: skip
        manager = Manager(ManagerConfig(agents=[entry]), store)
        try:
            await manager.poll_all()
        finally:
            await agent.close()
            await manager.close()

    asyncio.run(run_poll())
    [sample] = store.tkey_history("ukms-berlin")
    assert (sample["tkey_p50_us"], sample["tkey_p99_us"], sample["served"]) == (41_000, 95_000, 120)
    assert store.tkey_nodes() == ["ukms-berlin"]
    # an hour later the raw sample folds into its bucket
    for i in range(3):
        clock.t += 30
        store.record_tkey("ukms-berlin", 40_000 + i * 1000, 90_000, 121 + i)
    clock.t += RAW_KEEP_S + BUCKET_S
    store.downsample()
    rows = store.tkey_history("ukms-berlin")
    assert sum(r["n"] for r in rows) == 4 and all(r["span"] == BUCKET_S for r in rows)
    store.close()
    status, out, _ = run(
        capsys, "manager", "history", "ukms-berlin", "--node", "--json", "--dir", str(tmp_path)
    )
    assert status == 0 and sum(r["n"] for r in json.loads(out)) == 4
