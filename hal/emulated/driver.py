"""Driver for emulated QKD modules: ``emulated://LINK?...``.

URL format (rates in bit/s, QBER as a fraction, times in clock seconds)::

    emulated://link-8-9?end=a&skr=1200&skr_std=100&qber=0.017&qber_std=0.005
              &secret_file=/etc/qkdn/secrets/link-8-9.secret&start=1764201600

========== ======================================================== ===========
parameter  meaning                                                  default
========== ======================================================== ===========
end        which end of the link this is: ``a`` or ``b``             a
skr        mean secret key rate, bit/s (>= 0)                       required
skr_std    standard deviation of the SKR, bit/s                     0
skr_max    physical ceiling of the SKR, bit/s                       2*skr+6*std
qber       mean QBER, fraction in [0, qber_abort)                   0.02
qber_std   standard deviation of the QBER                           0
qber_abort QBER above which no key is distilled                     0.11
tau        correlation time of the fluctuations, s                  300
epoch      time resolution of the model, s                          1
key_size   bits per key, a multiple of 8 in [64, 65536]             256
buffer     keys the module holds; the oldest are dropped when full  100000
start      clock time at which the link started                     0
secret_file  file holding the link secret as hex (>= 16 bytes)      one of the
seed       public seed instead of a secret: tests and demos only    two
faults     JSON fault schedule shared by both ends (see faults.py)  none
state      file that keeps this end's consumption across restarts   none
speedup    emulated time runs this many times faster than the       1
           system clock from ``start`` (bench runs at scaled rates;
           every process computes the same time from the URL)
========== ======================================================== ===========

With ``state=``, the end writes a high-water mark of the keys it has handed out (in order:
reserved :data:`RESERVE` keys ahead, one fsync per reservation; by ID: exact). After a
restart it resumes above the mark, so no key is handed out twice, by order or by ID;
up to ``RESERVE`` keys that were never used are skipped. The KMS calls
:meth:`EmulatedQkdm.prepare` at the start of the end that takes keys in order, which
reserves ahead then (:data:`START_RESERVE`), so that no request waits for the first
fsync. Without ``state=``, consumption lives in memory only.

Both ends opened with the same parameters yield the same keys under the same IDs. Each
end hands out each key once: the master end takes keys in order with ``get_key``, the
slave end takes the same keys by ID. The buffer holds the newest ``buffer`` keys; keys
that age out of it are gone at both ends alike, since both compute the same window; and
``get_key`` skips the oldest tenth, so a key it hands out stays fetchable at the peer for
at least a tenth of the buffer's lifetime, whatever the two ends' clock skew.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from hal.clock import Clock, SharedScaledClock, SystemClock
from hal.emulated.faults import FaultWatcher
from hal.emulated.keys import KeyIdCodec, KeyStream, derive, secret_from_seed
from hal.emulated.model import LinkModel, LinkParams
from hal.emulated.watch import FaultFollower
from hal.errors import (
    DeviceError,
    DeviceUrlError,
    KeyNotFound,
    KeyNotYetAvailable,
    LinkDownError,
    NoKeyAvailable,
)
from hal.qkdm import LinkState, QkdKey, Qkdm, QkdmStatus, StateCallback
from hal.url import DeviceUrl

RESERVE = 1024
"""Keys reserved ahead in the state file."""
START_RESERVE, START_RESERVE_S = 128, 60.0
"""What :meth:`EmulatedQkdm.prepare` reserves ahead of the next key in order, at the start
of the end that takes keys in order: 128 keys (a link's first grant, 64, included) plus
what the link distils in 60 s at its mean rate (a full buffer's oldest keys age out at
that pace, and the next key in order with them). The first keys of a fresh path then pay
no fsync'd write on a request's way; a restart skips at most these if none was used."""
_LINK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_CATCH_UP_S = 400 * 86400


class EmulatedQkdm(Qkdm):
    """One end of an emulated link: a key buffer over a deterministic :class:`LinkModel`."""

    def __init__(
        self,
        *,
        link: str,
        end: str,
        model: LinkModel,
        stream: KeyStream,
        codec: KeyIdCodec,
        key_size: int,
        buffer: int,
        clock: Clock,
        state: Path | None = None,
        faults: Path | None = None,
        rate: float | None = None,
    ) -> None:
        self.link, self.end = link, end
        self._faults, self._rate = faults, rate
        self._follower: FaultFollower | None = None
        self._model, self._stream, self._codec = model, stream, codec
        self._key_size, self._buffer, self._clock = key_size, buffer, clock
        self._lock = threading.Lock()
        self._t = -math.inf
        self._produced = 0  # keys distilled so far (index of the next key)
        self._next = 0  # every index below this is gone (taken or dropped)
        self._taken: set[int] = set()  # indexes >= _next taken out of order (by ID)
        self._state = state
        self._reserved = self._load_state()  # persisted: no index below it is handed out
        self._writes = 0
        self._next = self._reserved

    # -- the Qkdm interface -----------------------------------------------------
    def get_key(self) -> QkdKey:
        with self._lock:
            self._sync()
            # Keys in the last tenth of their buffer life are not handed out in order: the
            # peer end, reading its clock a moment later, would have dropped them before it
            # could fetch them by ID. They age out unused.
            guard = self._produced - self._buffer + self._buffer // 10
            if self._next < guard:
                self._skip_to(guard)
            if self._next >= self._produced:
                raise self._empty()
            index = self._next
            self._next += 1
            self._compact()
            self._handed_out(index, ahead=RESERVE)
            return self._key(index)

    def get_keys(self, count: int) -> list[QkdKey]:
        """As :meth:`hal.Qkdm.get_keys`: the same keys, in the same order, as ``count``
        calls of :meth:`get_key`, derived in one AES-CTR run (and their IDs in one ECB
        call) rather than one cipher context per key; at most one reservation."""
        with self._lock:
            self._sync()
            guard = self._produced - self._buffer + self._buffer // 10
            if self._next < guard:
                self._skip_to(guard)
            if count <= 0:
                return []
            if self._next >= self._produced:
                raise self._empty()
            indexes: list[int] = []
            while len(indexes) < count and self._next < self._produced:
                indexes.append(self._next)
                self._next += 1
                self._compact()
            self._handed_out(indexes[-1], ahead=RESERVE)
            first, span = indexes[0], indexes[-1] - indexes[0] + 1
            ids = self._codec.encode_run(first, span)
            material = self._stream.keys(first, span)
            wanted = set(indexes) if len(indexes) < span else None
            keys = []
            for i in range(span):
                if wanted is None or first + i in wanted:
                    keys.append(QkdKey(key_id=ids[i], material=material[i]))
                else:  # a key taken by ID before: not handed out again, erased here
                    material[i][:] = bytes(len(material[i]))
            return keys

    def get_key_by_id(self, key_id: str) -> QkdKey:
        with self._lock:
            index = self._codec.decode(key_id)
            if index is None:
                raise KeyNotFound(f"{self.link}: no key with ID {key_id!r}")
            self._sync()
            if index >= self._produced:
                raise KeyNotYetAvailable(f"{self.link}: key {key_id} not received yet")
            if index < self._next or index in self._taken:
                raise KeyNotFound(f"{self.link}: key {key_id} already taken or expired")
            self._taken.add(index)
            self._compact()
            self._handed_out(index, ahead=0)
            return self._key(index)

    def key_count(self) -> int:
        with self._lock:
            self._sync()
            return self._count()

    def status(self) -> QkdmStatus:
        with self._lock:
            self._sync()
            state, skr, qber = self._model.reading(self._t)
            return QkdmStatus(
                link=self.link,
                state=state,
                skr_bps=skr,
                qber=qber,
                key_count=self._count(),
                max_key_count=self._buffer,
                key_size=self._key_size,
                keys_produced=self._produced,
            )

    def subscribe(self, callback: StateCallback) -> Callable[[], None]:
        """As :meth:`hal.Qkdm.subscribe`; with a faults file, a thread of this module
        (:class:`~hal.emulated.watch.FaultFollower`) then reads the state again as soon as
        the file changes or a fault starts or ends, so a subscriber hears of a cut at once
        rather than at its next status reading."""
        unsubscribe = super().subscribe(callback)
        with self._lock:
            if self._faults is not None and self._follower is None:
                self._follower = FaultFollower(self._faults, self._wake, self._next_boundary)
        return unsubscribe

    @property
    def follows_file_changes(self) -> bool:
        """True once a subscriber made this module follow its faults file by inotify."""
        follower = self._follower
        return follower is not None and follower.inotify

    def prepare(self) -> None:
        """As :meth:`hal.Qkdm.prepare`: with ``state=``, reserve ahead now (one fsync'd
        write, ~8 ms on this project's ext4 disks; :data:`START_RESERVE`)."""
        with self._lock:
            if self._state is None:
                return
            self._sync()
            start = max(self._next, self._produced - self._buffer + self._buffer // 10)
            rate = self._model.p.skr / self._key_size  # keys per second of the clock
            if self._reserved - start < START_RESERVE:  # else a reservation holds
                self._reserve(start + START_RESERVE + int(rate * START_RESERVE_S), sync=True)

    def close(self) -> None:
        with self._lock:
            follower, self._follower = self._follower, None
        if follower is not None:
            follower.close()

    # -- internals ----------------------------------------------------------------
    def _wake(self) -> None:
        self.poll_state()

    def _next_boundary(self) -> float | None:
        """Wall seconds until the next fault boundary (None: none, or the clock is not
        tied to the wall clock)."""
        if self._rate is None:
            return None
        with self._lock:
            now = max(self._t, self._clock.now())
            times = self._model.boundaries(now)
        # a hair after the boundary, so that the reading taken then is on its far side
        return (times[0] - now) / self._rate + 0.0005 if times else None

    def _sync(self) -> None:
        """Bring the buffer up to the clock: new keys arrive, the oldest may drop out."""
        self._t = max(self._t, self._clock.now())
        self._produced = max(self._produced, int(self._model.bits_at(self._t) // self._key_size))
        oldest = self._produced - self._buffer
        if oldest > self._next:
            self._skip_to(oldest)

    def _load_state(self) -> int:
        if self._state is None:
            return 0
        try:
            return int(self._state.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError):
            raise DeviceError(f"{self.link}: state file {self._state} unreadable") from None

    def _handed_out(self, index: int, *, ahead: int) -> None:
        """Keep the persisted mark above every key handed out.

        In order (``get_key``) the mark is reserved ``ahead`` keys in advance: one fsync'd
        write per reservation. By ID the next IDs belong to the peer's order, so the mark is
        exact: rewritten on every new maximum (a killed process leaves it in the page cache)
        and fsync'd every 64 writes (a power loss reopens at most 64 fetched IDs).
        """
        if self._state is None or index < self._reserved:
            return
        self._writes += 1
        self._reserve(index + 1 + ahead, sync=bool(ahead) or self._writes % 64 == 0)

    def _reserve(self, mark: int, *, sync: bool) -> None:
        """Persist ``mark``: no index below it is handed out after a restart."""
        assert self._state is not None
        self._reserved = mark
        tmp = self._state.with_name(self._state.name + ".tmp")
        self._state.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as fh:
            fh.write(f"{mark}\n")
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self._state)

    def _skip_to(self, index: int) -> None:
        self._next = index
        self._taken = {i for i in self._taken if i >= index}
        self._compact()

    def _compact(self) -> None:
        while self._next in self._taken:
            self._taken.remove(self._next)
            self._next += 1

    def _count(self) -> int:
        return self._produced - self._next - len(self._taken)

    def _key(self, index: int) -> QkdKey:
        return QkdKey(key_id=self._codec.encode(index), material=self._stream.key(index))

    def _empty(self) -> NoKeyAvailable | LinkDownError:
        state, _, qber = self._model.reading(self._t)
        if state is LinkState.DOWN:
            return LinkDownError(f"{self.link}: link down, no key in buffer")
        if state is LinkState.ABORT:
            return LinkDownError(
                f"{self.link}: QBER {qber:.3f} above abort threshold, no key in buffer"
            )
        return NoKeyAvailable(f"{self.link}: key buffer empty")


def _read_secret(path: str) -> bytes:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
        secret = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "expected hex text"
        raise DeviceUrlError(f"secret_file {path}: {reason}") from None
    if len(secret) < 16:
        raise DeviceUrlError(
            f"secret_file {path}: expected at least 16 bytes of hex, got {len(secret)}"
        )
    return secret


def _link_secret(url: DeviceUrl) -> bytes:
    secret_file, seed = url.take_optional("secret_file"), url.take_optional("seed")
    if (secret_file is None) == (seed is None):
        raise DeviceUrlError(f"emulated://{url.name}: give exactly one of secret_file= or seed=")
    return _read_secret(secret_file) if secret_file is not None else secret_from_seed(seed or "")


def _link_params(url: DeviceUrl) -> LinkParams:
    skr = url.take_float("skr", lo=0.0)
    skr_std = url.take_float("skr_std", 0.0, lo=0.0)
    qber_abort = url.take_float("qber_abort", 0.11, lo=0.0, hi=0.5, lo_open=True)
    return LinkParams(
        skr=skr,
        skr_std=skr_std,
        skr_max=url.take_float("skr_max", 2.0 * skr + 6.0 * skr_std, lo=skr),
        qber=url.take_float("qber", 0.02, lo=0.0, hi=qber_abort),
        qber_std=url.take_float("qber_std", 0.0, lo=0.0, hi=0.5),
        qber_abort=qber_abort,
        tau=url.take_float("tau", 300.0, lo=0.0),
        epoch=url.take_float("epoch", 1.0, lo=0.001, hi=3600.0),
        start=url.take_float("start", 0.0),
    )


def open_qkdm(url: DeviceUrl, clock: Clock | None = None) -> EmulatedQkdm:
    """Open one end of an emulated link from its parsed URL."""
    if not _LINK_NAME.match(url.name) or url.path not in ("", "/"):
        raise DeviceUrlError(
            f"{url.raw}: expected emulated://LINK-NAME?... (letters, digits, . _ -)"
        )
    end = url.take_str("end", "a", choices=("a", "b"))
    params = _link_params(url)
    key_size = url.take_int("key_size", 256, lo=64, hi=65536, multiple_of=8)
    buffer = url.take_int("buffer", 100_000, lo=1, hi=10_000_000)
    faults = url.take_optional("faults")
    state = url.take_optional("state")
    speedup = url.take_float("speedup", 1.0)
    if not 0 < speedup <= 1e6:
        raise DeviceUrlError(f"emulated://{url.name}: speedup must be in (0, 1e6]")
    secret = _link_secret(url)
    url.finish()
    real_time = clock is None
    if clock is None:
        clock = SystemClock() if speedup == 1.0 else SharedScaledClock(params.start, speedup)
    if clock.now() - params.start > _MAX_CATCH_UP_S:
        raise DeviceUrlError(f"emulated://{url.name}: start= lies more than 400 days before now")
    watcher = FaultWatcher(Path(faults) if faults else None)
    model = LinkModel(params, derive(secret, url.name, "noise"), watcher)
    return EmulatedQkdm(
        link=url.name,
        end=end,
        model=model,
        stream=KeyStream(derive(secret, url.name, "key-stream"), key_size // 8),
        codec=KeyIdCodec(derive(secret, url.name, "key-id")),
        key_size=key_size,
        buffer=buffer,
        clock=clock,
        state=Path(state) if state else None,
        faults=Path(faults) if faults else None,
        rate=speedup if real_time else None,
    )
