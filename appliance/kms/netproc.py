"""What ties the processes of one ``qkdn net`` network to its directory, and to each other.

- **A marker.** The supervisor and every node it starts carry ``QKDN_NET=<network
  directory>`` in their environment (nodes also their name and their supervisor's pid).
  :func:`find_processes` finds them through ``/proc``, so ``qkdn net down`` stops a
  network whose ``run/state.json`` is missing or damaged, and ``qkdn net up`` sees
  processes left over from an earlier run.
- **A lock.** :func:`lock_dir` takes an exclusive ``flock`` on ``run/lock``. ``net up``
  holds it while it starts a network and hands the same open file to the supervisor,
  which holds it for its whole life: two starts on one directory cannot both succeed,
  and the kernel releases the lock when the supervisor dies, even by ``kill -9``.
- **A control socket.** The supervisor answers on an abstract Unix socket (no file: it
  works on a full disk) with its live state; :func:`ask_supervisor` reads it. That is how
  ``net status`` learns what the supervisor could not write to disk.
- **Parent death.** :func:`die_with_supervisor` makes a node process get SIGKILL when its
  supervisor dies, and exit at once if the supervisor died before it could ask for that.

What it must never do: signal a process that does not carry this network's marker (a
recycled pid included: signals go through a pidfd opened before the marker is checked),
or answer the control socket to another user.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

ENV_NET = "QKDN_NET"
"""The network directory (resolved), in the supervisor's and every node's environment."""
ENV_NODE = "QKDN_NET_NODE"
"""The name of the supervised process (``node`` or ``node/akms``), in nodes only."""
ENV_SUPERVISOR = "QKDN_NET_SUPERVISOR"
"""The pid of the supervisor that started the node, in nodes only."""
SUPERVISOR = "supervisor"
"""What :func:`find_processes` calls the supervisor."""
PR_SET_PDEATHSIG = 1
"""``prctl`` option of <linux/prctl.h>: the signal a process gets when its parent dies."""
MAX_ENVIRON = 1 << 20
"""Bytes of ``/proc/PID/environ`` read (the kernel's argument limit is about 2 MiB)."""
MAX_ANSWER = 1 << 20
"""Longest answer read from a supervisor's control socket."""
_CPUCLOCK_SCHED = 2
"""The low bits of a process CPU clock id that select its scheduler run time (Linux)."""


class NetError(ApplianceError):
    """A network's processes, lock or control socket."""

    code = "NET"


def marker(net_dir: Path) -> str:
    """The value of :data:`ENV_NET` for a network directory."""
    return str(net_dir.resolve())


def find_processes(net_dir: Path) -> dict[int, str]:
    """Every live process of the network in ``net_dir`` (this one excepted): pid -> its
    name, :data:`SUPERVISOR` for the supervisor. A zombie has no environment: not listed."""
    want = f"{ENV_NET}={marker(net_dir)}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            name = _marked(int(entry.name), want)
            if name is not None:
                found[int(entry.name)] = name
    return found


def cpu_ns(pid: int) -> int | None:
    """CPU time (user + system, ns) a process has used so far, every thread's, those that
    ended included; None if it is gone. Read from the process's CPU clock, whose id Linux
    derives from the pid (``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)``, what
    ``clock_getcpuclockid(3)`` returns): finer than the 10 ms ticks of ``/proc/PID/stat``,
    and unlike a sum over ``/proc/PID/task/*/schedstat`` it keeps ended threads."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:  # gone (EINVAL), or not ours to read
        return None


def process_cpu_s(pid: int) -> float:
    """:func:`cpu_ns` in seconds, for a process that must be there (else :class:`NetError`)."""
    spent = cpu_ns(pid)
    if spent is None:
        raise NetError(f"process {pid} is gone: no CPU time to read")
    return spent / 1e9


def cpu_seconds(net_dir: Path) -> dict[str, float]:
    """CPU time (user + system, seconds) each live process of the network has used, by
    name (what the benches count per request)."""
    out = {}
    for pid, name in find_processes(net_dir).items():
        spent = cpu_ns(pid)
        if spent is not None:  # else gone meanwhile
            out[name] = spent / 1e9
    return out


def _marked(pid: int, want: bytes) -> str | None:
    """The process's name if its environment holds ``want``, else None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read(MAX_ENVIRON).split(b"\0")
    except OSError:  # gone, or not ours to read
        return None
    if want not in env:
        return None
    prefix = f"{ENV_NODE}=".encode()
    names = [v[len(prefix) :] for v in env if v.startswith(prefix)]
    return names[0].decode(errors="replace") if names else SUPERVISOR


def signal_marked(pid: int, net_dir: Path, sig: int) -> bool:
    """Send ``sig`` to ``pid`` if it is a live process of this network; True if sent."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already
        return False
    try:
        if _marked(pid, f"{ENV_NET}={marker(net_dir)}".encode()) is None:
            return False  # the pidfd pins the process: this check is about the same one
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def wait_gone(pids: set[int], net_dir: Path, timeout: float) -> set[int]:
    """Poll until none of ``pids`` is a live process of this network, or ``timeout``
    seconds pass; reap those that are children of this process. Returns those left."""
    want = f"{ENV_NET}={marker(net_dir)}".encode()
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            _reap(pid)
        left = {pid for pid in pids if _marked(pid, want) is not None}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps it
        os.waitpid(pid, os.WNOHANG)


def lock_dir(net_dir: Path) -> int:
    """Take the exclusive lock of a network directory; return its file descriptor (the
    lock lasts while any process holds that open file). Raises NET-BUSY if it is held."""
    path = net_dir / "run" / "lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise NetError(f"cannot open {path}: {exc.strerror}", code="NET-LOCK") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NetError(
            f"a network is already running (or starting) from {net_dir} "
            f"(qkdn net down --dir {net_dir} first)",
            code="NET-BUSY",
        ) from None
    return fd


def confirm_lock(fd: int) -> None:
    """Check that ``fd`` holds the lock :func:`lock_dir` took (the open file was handed
    down from the process that took it); raise NET-BUSY if it does not."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise NetError(f"file descriptor {fd} holds no lock of ours", code="NET-BUSY") from exc


def control_address(net_dir: Path) -> str:
    """The abstract Unix socket name of a network's supervisor."""
    return "\0qkdn-net-" + hashlib.sha256(marker(net_dir).encode()).hexdigest()[:32]


def ask_supervisor(net_dir: Path, timeout: float = 2.0) -> dict[str, Any] | None:
    """The live state of the network's supervisor, or None if none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(control_address(net_dir))
            data = bytearray()
            while chunk := sock.recv(65536):
                data += chunk
                if len(data) > MAX_ANSWER:
                    return None
            doc = json.loads(data)
        except (OSError, ValueError):
            return None
    return doc if isinstance(doc, dict) else None


def peer_uid(conn: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def die_with_supervisor() -> None:
    """In a node started by a supervisor (its pid in :data:`ENV_SUPERVISOR`): get SIGKILL
    when the supervisor dies. If it died before this call (the request races with the
    start), its pid is no longer the parent's: raise NODE-ORPHAN. Elsewhere, nothing."""
    expected = os.environ.get(ENV_SUPERVISOR)
    if expected is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise NetError(f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}", code="NODE-PDEATHSIG")
    if str(os.getppid()) != expected:
        raise NetError(
            f"its supervisor (pid {expected[:20]}) is gone; not starting", code="NODE-ORPHAN"
        )
