"""``netproc.cpu_ns``: the CPU time of another process, which the benches count per request."""

from __future__ import annotations

import os
import subprocess
import sys

from appliance.kms import netproc

BURN_S = 0.2
"""CPU seconds the child's extra thread spends (on its own CPU clock) before it ends."""

CHILD = f"""
import sys, threading, time
def burn():
    while time.thread_time() < {BURN_S}:
        pass
t = threading.Thread(target=burn)
t.start()
t.join()
print("ready", flush=True)
sys.stdin.read()
"""


def test_cpu_ns_counts_every_thread_of_another_process_those_that_ended_included():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        spent = netproc.cpu_ns(child.pid)
        assert spent is not None and spent >= BURN_S * 1e9  # the ended thread's time is kept
    finally:
        child.communicate("")
    assert netproc.cpu_ns(child.pid) is None  # reaped: gone


def test_cpu_ns_of_this_process_grows_with_its_work():
    before = netproc.cpu_ns(os.getpid())
    assert before is not None
    sum(range(2_000_000))
    after = netproc.cpu_ns(os.getpid())
    assert after is not None and after > before
