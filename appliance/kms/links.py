"""The key supply of one QKD link at one node: which end takes which keys.

Both ends of a QKDM pair see the same keys. If both took keys in order they would spend
the same bits for different messages, a two-time pad. So on every link the lower node ID
is the **master**: it alone takes keys in order (``get_key``), for its own sending
direction, and it grants batches of key IDs to the **slave** for the other direction,
keeping the granted keys' material to decrypt what the slave sends with them. The slave
only ever fetches keys by ID: those the master sends with, and those it was granted.

:class:`LinkKeys` wraps the node's QKDM end for one link and offers pad bytes or GCM keys
for sending and for receiving (:mod:`appliance.kms.relay`). It calls the (synchronous)
QKDM driver directly; node adapters run it where blocking is acceptable.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum

import hal
from appliance.kms.errors import IntegrityFailure, KeyUnavailable, StaleGrant, StaleKey
from appliance.kms.relay import GCM_USES, GcmSender, Hop, Mode, PadLedger, PadStream, Segment

GRANT_BATCH = 64
"""Keys the master grants at a time."""
GRANT_TTL = 3600.0
"""Seconds a master keeps the material of keys it granted; a slave gives up grants after
half of it, so it never sends with a key its master has swept."""


class Role(StrEnum):
    MASTER = "master"
    SLAVE = "slave"


def role_of(node_id: int, link_a: int, link_b: int) -> Role:
    """The lower node ID is the link's master."""
    return Role.MASTER if node_id == min(link_a, link_b) else Role.SLAVE


class LinkKeys:
    """Sending and receiving key material on one link, for one node."""

    def __init__(self, link: str, role: Role, qkdm: hal.Qkdm) -> None:
        self.link, self.role, self.qkdm = link, role, qkdm
        self._out = PadStream()
        self._gcm_keys = PadStream()  # whole keys for GCM, apart from OTP's byte stream
        self._gcm = GcmSender()
        self._ledger = PadLedger()
        self._granted_ids: list[str] = []  # slave: IDs granted but not yet fetched
        self._granted_at = 0.0  # slave: when the newest grant arrived
        # Master: a fresh epoch per run; slave: the epoch of the grants it holds. Grants of
        # an earlier run of the master cannot be honoured (it forgot their material).
        self.epoch: str | None = uuid.uuid4().hex if role is Role.MASTER else None

    # -- sending ------------------------------------------------------------------------
    def pad(self, n: int) -> tuple[tuple[Segment, ...], bytearray]:
        """``n`` fresh pad bytes for an OTP message (KeyUnavailable if the link is short)."""
        self._fill(n)
        return self._out.allocate(n)

    def gcm(self) -> tuple[str, bytearray, int]:
        """(key ID, key, counter) for the next GCM message, rotating keys after GCM_USES."""
        if self._gcm.uses >= GCM_USES and not self._gcm_keys.available():
            key_id, material = self._next_key()
            self._gcm_keys.feed(key_id, material)
        return self._gcm.next(self._gcm_keys)

    def available(self) -> int:
        """Pad bytes ready for sending without asking the QKDM or the master."""
        return self._out.available()

    def _fill(self, n: int) -> None:
        while self._out.available() < n:
            self._out.feed(*self._next_key())

    def _next_key(self) -> tuple[str, bytearray]:
        """The next key this end may send with: taken in order (master) or granted (slave)."""
        try:
            key = self.qkdm.get_key() if self.role is Role.MASTER else self._next_granted()
        except hal.HalError as exc:  # empty, down, not yet distilled, or gone: no key now
            raise KeyUnavailable(f"{self.link}: no link key ({exc.code})") from None
        return key.key_id, key.material

    def _next_granted(self) -> hal.QkdKey:
        """Slave: the first granted key this end can still fetch. A grant may wait long in
        GCM mode (one key serves 1,024 messages) and a full QKDM buffer drops its oldest
        keys, so granted keys that are gone are skipped; one not distilled here yet is kept."""
        while self._granted_ids:
            try:
                key = self.qkdm.get_key_by_id(self._granted_ids[0])
            except hal.KeyNotFound:
                self._granted_ids.pop(0)  # dropped by the module: never usable
                continue
            self._granted_ids.pop(0)
            return key
        raise KeyUnavailable(f"{self.link}: no granted link keys left; ask the master")

    # -- grants -------------------------------------------------------------------------
    def grant(self, n: int = GRANT_BATCH) -> list[str]:
        """Master: take up to ``n`` keys for the slave's sending direction (as many as the
        link has, at least one); return their IDs."""
        if self.role is not Role.MASTER:
            raise IntegrityFailure(f"{self.link}: only the master end grants keys")
        ids: list[str] = []
        for _ in range(n):
            try:
                key = self.qkdm.get_key()
            except (hal.NoKeyAvailable, hal.LinkDownError) as exc:
                if ids:
                    break  # grant what the link has distilled so far, lose nothing
                raise KeyUnavailable(f"{self.link}: no link key to grant ({exc.code})") from None
            self._ledger.add(key.key_id, key.material, time.monotonic())
            ids.append(key.key_id)
        return ids

    def accept_grant(self, key_ids: list[str], epoch: str) -> None:
        """Slave: remember granted IDs; their material is fetched when needed."""
        if self.role is not Role.SLAVE:
            raise IntegrityFailure(f"{self.link}: the master end is never granted keys")
        self.seen_master_epoch(epoch)
        self._granted_ids.extend(key_ids)
        self._granted_at = time.monotonic()

    def housekeeping(self, now: float | None = None) -> int:
        """Forget what a restarted or silent peer will never use: a master sweeps granted
        and fetched keys older than GRANT_TTL (their messages were lost, or the slave
        restarted and asks anew); a slave drops grants older than half of it. Returns the
        number of keys swept."""
        now = time.monotonic() if now is None else now
        swept = self._ledger.sweep(now - GRANT_TTL)
        if self.role is Role.SLAVE and self._granted_at and now - self._granted_at > GRANT_TTL / 2:
            swept += len(self._granted_ids)
            self.drop_grants()
            self._granted_at = 0.0
        return swept

    def seen_master_epoch(self, epoch: str | None) -> None:
        """Slave: the master announced its epoch; grants of another epoch are dropped."""
        if epoch is not None and epoch != self.epoch:
            self.drop_grants()
            self.epoch = epoch

    def drop_grants(self) -> None:
        """Slave: forget granted keys (the master restarted); the next send asks again."""
        self._granted_ids.clear()
        self._clear_sending()
        self.epoch = None

    def drop_sending(self) -> None:
        """Forget the keys we send with (the receiving end lost them): fresh ones next."""
        if self.role is Role.SLAVE:
            self.drop_grants()
        else:
            self._clear_sending()

    def _clear_sending(self) -> None:
        self._out.clear()
        self._gcm_keys.clear()
        self._gcm.clear()

    def check_grant_epoch(self, epoch: str | None) -> None:
        """Master: refuse, before opening anything, a message sealed with another run's grants."""
        if self.role is Role.MASTER and epoch != self.epoch:
            raise StaleGrant(f"{self.link}: link keys granted by an earlier run of this end")

    def granted_left(self) -> int:
        """Slave: granted keys not yet used."""
        return len(self._granted_ids)

    # -- receiving ----------------------------------------------------------------------
    def receive(self, hop: Hop) -> bytearray:
        """The pad (OTP) or key (GCM) a received hop message names, marked spent."""
        for key_id in self._ledger.missing(hop):
            if self.role is Role.MASTER:  # the slave may only use keys we granted
                raise StaleGrant(f"{self.link}: message uses a link key this end never granted")
            try:
                self._ledger.add(key_id, self.qkdm.get_key_by_id(key_id).material, time.monotonic())
            except hal.KeyNotFound:
                raise StaleKey(f"{self.link}: link key {key_id} is not obtainable here") from None
            except hal.KeyNotYetAvailable as exc:
                raise IntegrityFailure(
                    f"{self.link}: link key not obtainable ({exc.code})"
                ) from None
        return self._ledger.pad(hop) if hop.mode is Mode.OTP else self._ledger.gcm_key(hop)
