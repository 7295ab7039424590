"""The key supply of one QKD link at one node, without I/O: which end spends which keys.

Both ends of a QKDM pair see the same keys. If both took keys in order they would spend
the same bits for different messages, a two-time pad. So on every link the lower node ID
is the **master**: it alone takes keys in order, for its own sending direction, and it
grants batches of key IDs to the **slave** for the other direction, keeping the granted
keys' material to open what the slave sends with them. The slave only ever reads keys by
ID: those the master sent with, and those it was granted.

:class:`LinkEnd` keeps the bookkeeping: the keys read for sending (an OTP byte stream and
whole keys for GCM, :mod:`relay`), the receiving ledger that refuses any reuse, the
granted IDs, and the run epochs that let a restarted end be recognised. It never reads a
QKD module: it says what to read (:meth:`send_read`), and is fed what was read. The
engines (:mod:`appliance.kms.engines`) turn that into ``ReadLinkKeys`` actions.
"""

from __future__ import annotations

from enum import StrEnum

from appliance.kms.errors import IntegrityFailure, KeyUnavailable, StaleGrant
from appliance.kms.events import KeyBits
from appliance.kms.relay import (
    GCM_USES,
    MAC_KEY_BYTES,
    GcmSender,
    Hop,
    Mode,
    PadLedger,
    PadStream,
    Segment,
)

GRANT_BATCH = 64
"""Keys the master grants at a time."""
WANTED_GRANT = 4
"""Keys a slave end asks for when it readies a link in GCM mode with no message waiting
(a route installed through its node: ``LinkWanted``): a fresh path's first grants, one
per slave end of the path, stay small (one GCM key serves 1,024 messages); the grants
that follow, asked for by messages, are of :data:`GRANT_BATCH`."""
GRANT_TTL = 3600.0
"""Seconds a master keeps the material of keys it granted; a slave gives up grants after
half of it, so it never sends with a key its master has swept."""
SEND_MAX_AGE = GRANT_TTL / 2
"""Seconds a link key read for sending may serve: the receiving end forgets a key
GRANT_TTL after it fetched it (a master: after it granted it), so a sender on a quiet link
must move on to a fresh key well before (a GCM key may otherwise wait for its 1,024
messages for days)."""
KEY_BYTES_GUESS = 32
"""QKDM key size assumed when deciding how many keys to read (256 bits, the usual size;
a shorter key only means one more read)."""


class Role(StrEnum):
    MASTER = "master"
    SLAVE = "slave"


def role_of(node_id: int, link_a: int, link_b: int) -> Role:
    """The lower node ID is the link's master."""
    return Role.MASTER if node_id == min(link_a, link_b) else Role.SLAVE


class LinkEnd:
    """Sending and receiving key material on one link, for one node."""

    def __init__(self, link: str, role: Role, epoch: str) -> None:
        self.link, self.role = link, role
        self._otp = PadStream()
        self._gcm_keys = PadStream()  # whole keys for GCM, apart from OTP's byte stream
        self._gcm = GcmSender()
        self._ledger = PadLedger()
        self._granted: list[tuple[str, float]] = []  # slave: (ID, when granted), not yet read
        # Master: a fresh epoch per run; slave: the epoch of the grants it holds. Grants of
        # an earlier run of the master cannot be honoured (it forgot their material).
        self.epoch: str | None = epoch if role is Role.MASTER else None
        self.generation = 0
        """Counts the resets of the sending state: keys read, or a message sealed, under
        an earlier generation belong to a state that was dropped since."""

    # -- sending --------------------------------------------------------------------------
    def shortfall(self, mode: Mode, payload: int, now: float) -> int:
        """Bytes of link key still missing to seal ``payload`` bytes in ``mode`` at ``now``
        (0: ready); keys read more than SEND_MAX_AGE ago are dropped first."""
        cutoff = now - SEND_MAX_AGE
        self._otp.drop_older(cutoff)
        self._gcm_keys.drop_older(cutoff)
        if self._gcm.uses < GCM_USES and self._gcm.since < cutoff:
            self._gcm.clear()
        if mode is Mode.OTP:
            return max(0, payload + MAC_KEY_BYTES - self._otp.available())
        if self._gcm.uses < GCM_USES or self._gcm_keys.whole_key_ready():
            return 0
        return KEY_BYTES_GUESS

    def send_read(self, short: int, now: float) -> tuple[int, tuple[str, ...]] | None:
        """What to read to cover ``short`` bytes: (count, ()) in order at the master,
        (0, IDs) of granted keys at the slave; None when the slave must ask for a grant.
        Grants older than SEND_MAX_AGE are given up (their master forgets them)."""
        count = max(1, -(-short // KEY_BYTES_GUESS))
        if self.role is Role.MASTER:
            return count, ()
        self._granted = [(k, at) for k, at in self._granted if at >= now - SEND_MAX_AGE]
        if not self._granted:
            return None
        return 0, tuple(k for k, _ in self._granted[:count])

    def fed_for_sending(
        self, mode: Mode, keys: list[KeyBits], ids_gone: tuple[str, ...] = (), now: float = 0.0
    ) -> None:
        """Keys read for sending at ``now`` (and, at the slave, granted IDs the module no
        longer has: dropped from a full buffer, never usable). The stream erases the bits."""
        if self.role is Role.SLAVE:
            done = {key_id for key_id, _ in keys} | set(ids_gone)
            self._granted = [(k, at) for k, at in self._granted if k not in done]
        stream = self._otp if mode is Mode.OTP else self._gcm_keys
        for key_id, material in keys:
            stream.feed(key_id, material, now)

    def seal_material(self, mode: Mode, payload: int) -> tuple[tuple[Segment, ...], bytearray, int]:
        """The segments, key bytes and GCM counter for one message (shortfall() must be 0)."""
        if mode is Mode.OTP:
            segments, pad = self._otp.allocate(payload + MAC_KEY_BYTES)
            return segments, pad, 0
        key_id, key, counter = self._gcm.next(self._gcm_keys)
        return (Segment(key_id, 0, len(key)),), bytearray(key), counter

    # -- grants ---------------------------------------------------------------------------
    def grant(self, keys: list[KeyBits], now: float) -> list[str]:
        """Master: keep the material of keys read for the slave's direction; their IDs."""
        if self.role is not Role.MASTER:
            for _, material in keys:
                material[:] = bytes(len(material))
            raise IntegrityFailure(f"{self.link}: only the master end grants keys")
        for key_id, material in keys:
            self._ledger.add(key_id, material, now)
        return [key_id for key_id, _ in keys]

    def accept_grant(self, key_ids: list[str], epoch: str | None, now: float) -> None:
        """Slave: remember granted IDs; their material is read when needed."""
        if self.role is not Role.SLAVE:
            raise IntegrityFailure(f"{self.link}: the master end is never granted keys")
        self.seen_master_epoch(epoch)
        self.epoch = epoch
        self._granted.extend((key_id, now) for key_id in key_ids)

    def granted_left(self) -> int:
        return len(self._granted)

    def seen_master_epoch(self, epoch: str | None) -> None:
        """Slave: the master announced its epoch; grants of another epoch are dropped."""
        if epoch is not None and epoch != self.epoch:
            self.drop_grants()
            self.epoch = epoch

    def drop_grants(self) -> None:
        """Slave: forget granted keys (the master restarted); the next send asks again."""
        self._granted.clear()
        self._clear_sending()
        self.epoch = None

    def drop_sending(self) -> None:
        """Forget the keys we send with (the receiving end lost them): fresh ones next."""
        if self.role is Role.SLAVE:
            self.drop_grants()
        else:
            self._clear_sending()

    def _clear_sending(self) -> None:
        self.generation += 1
        self._otp.clear()
        self._gcm_keys.clear()
        self._gcm.clear()

    def check_epoch(self, epoch: str | None) -> None:
        """On receipt: a master refuses, before opening anything, a message sealed with
        another run's grants; a slave learns that its master restarted."""
        if self.role is Role.MASTER:
            if epoch != self.epoch:
                raise StaleGrant(f"{self.link}: link keys granted by an earlier run of this end")
        else:
            self.seen_master_epoch(epoch)

    # -- receiving ------------------------------------------------------------------------
    def missing(self, hop: Hop) -> list[str]:
        """Key IDs a received message names that must be read first (slave only: a master
        holds every key the slave may use, so a missing one is a stale or forged grant)."""
        missing = self._ledger.missing(hop)
        if missing and self.role is Role.MASTER:  # the epoch matched: not a restart, a forgery
            raise IntegrityFailure(f"{self.link}: message uses a link key this end never granted")
        return missing

    def add_received(self, keys: list[KeyBits], now: float) -> None:
        for key_id, material in keys:
            self._ledger.add(key_id, material, now)

    def open_material(self, hop: Hop) -> bytearray:
        """The pad (OTP) or key (GCM) a received message names, marked spent (replays and
        reuse are refused)."""
        return self._ledger.pad(hop) if hop.mode is Mode.OTP else self._ledger.gcm_key(hop)

    # -- housekeeping ---------------------------------------------------------------------
    def housekeeping(self, now: float) -> int:
        """Forget what a restarted or silent peer will never use: a master sweeps granted
        and read keys older than GRANT_TTL; a slave drops grants older than half of it."""
        swept = self._ledger.sweep(now - GRANT_TTL)
        kept = [(k, at) for k, at in self._granted if at >= now - SEND_MAX_AGE]
        swept += len(self._granted) - len(kept)
        self._granted = kept
        return swept

    def available(self) -> int:
        """OTP bytes ready for sending without a read."""
        return self._otp.available()


def no_key(link: str, why: str = "no link key") -> KeyUnavailable:
    return KeyUnavailable(f"{link}: {why}")
