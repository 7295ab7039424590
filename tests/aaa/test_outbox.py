"""The AKMS's accounting outbox: a request's commit never pays for a WAL checkpoint; the
sender's checkpoint, from another thread, loses nothing and blocks no commit."""

from __future__ import annotations

import sqlite3
import threading

from appliance.aaa.outbox import Outbox, Pending


def _report(i: int) -> Pending:
    return Pending(
        ukms=2, request=f"r{i}", master="alice-a", slave="alice-b", outcome="delivered", keys=1
    )


def test_commits_leave_the_checkpoint_to_the_sender_which_loses_nothing(tmp_path):
    path = tmp_path / "aaa-outbox.db"
    box = Outbox(path)
    for i in range(1100):  # beyond SQLite's automatic checkpoint (1000 pages)
        box.add(_report(i))
    assert box.writes == 1100
    probe = sqlite3.connect(path)
    _busy, frames, _copied = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    probe.close()
    assert frames >= 1100  # no commit checkpointed (the WAL would have restarted)
    worker = threading.Thread(target=box.checkpoint)
    worker.start()
    for i in range(1100, 1200):  # commits go on while the checkpoint runs
        box.add(_report(i))
    worker.join(60)
    assert not worker.is_alive()
    box.close()
    again = Outbox(path)
    assert again.count == 1200 and again.writes == 0
    assert {p.request for p in again.due(2000)} == {f"r{i}" for i in range(1200)}
    again.close()
