"""One QKD link between two nodes: master/slave roles, grants, both directions, no reuse.

:class:`LinkEnd` never reads a QKD module itself; :class:`End` here does what an engine's
adapter does for it (reads the keys it says it needs), so the tests speak of sending and
receiving as before.
"""

from __future__ import annotations

import pytest

import hal
from appliance.kms.errors import IntegrityFailure, KeyUnavailable, ReplayDetected, StaleGrant
from appliance.kms.linkend import GRANT_TTL, LinkEnd, Role, role_of
from appliance.kms.relay import (
    MAC_KEY_BYTES,
    Direction,
    Hop,
    Mode,
    Segment,
    decode,
    open_gcm,
    open_otp,
    seal_gcm,
    seal_otp,
)


class End:
    """A link end with its QKD module: what the engines and the node adapter do together."""

    def __init__(self, role: Role, qkdm: hal.Qkdm, epoch: str) -> None:
        self.link = LinkEnd("link-2-3", role, epoch)
        self.role, self.qkdm, self.now = role, qkdm, 0.0

    @property
    def epoch(self) -> str | None:
        return self.link.epoch

    def _read(self, count: int, ids: tuple[str, ...]) -> tuple[list, tuple[str, ...]]:
        keys, gone = [], []
        try:
            for _ in range(count):
                key = self.qkdm.get_key()
                keys.append((key.key_id, key.material))
            for key_id in ids:
                try:
                    key = self.qkdm.get_key_by_id(key_id)
                except hal.KeyNotFound:
                    gone.append(key_id)
                    continue
                keys.append((key.key_id, key.material))
        except hal.HalError as exc:
            if not keys and not gone:
                raise KeyUnavailable(f"link-2-3: no link key ({exc.code})") from None
        return keys, tuple(gone)

    def _cover(self, mode: Mode, payload: int) -> None:
        while (short := self.link.shortfall(mode, payload, self.now)) > 0:
            plan = self.link.send_read(short, self.now)
            if plan is None:
                raise KeyUnavailable("link-2-3: no granted link keys left; ask the master")
            keys, gone = self._read(*plan)
            self.link.fed_for_sending(mode, keys, gone, self.now)

    def pad(self, n: int) -> tuple[tuple[Segment, ...], bytearray]:
        self._cover(Mode.OTP, n - MAC_KEY_BYTES)
        segments, pad, _ = self.link.seal_material(Mode.OTP, n - MAC_KEY_BYTES)
        return segments, pad

    def gcm(self) -> tuple[str, bytearray, int]:
        self._cover(Mode.GCM, 32)
        (segment,), key, counter = self.link.seal_material(Mode.GCM, 32)
        return segment.key_id, key, counter

    def grant(self, n: int) -> list[str]:
        keys, _ = self._read(n, ())
        return self.link.grant(keys, self.now)

    def accept_grant(self, ids: list[str], epoch: str) -> None:
        self.link.accept_grant(ids, epoch, self.now)

    def granted_left(self) -> int:
        return self.link.granted_left()

    def receive(self, hop: Hop) -> bytearray:
        missing = self.link.missing(hop)
        if missing:
            keys, gone = self._read(0, tuple(missing))
            assert not gone
            self.link.add_received(keys, self.now)
        return self.link.open_material(hop)


def pair(skr: float = 25600, seed: str = "links") -> tuple[End, End, hal.ManualClock]:
    clock = hal.ManualClock(0)
    query = f"skr={skr}&seed={seed}"
    a = hal.open_qkdm(f"emulated://link-2-3?end=a&{query}", clock=clock)
    b = hal.open_qkdm(f"emulated://link-2-3?end=b&{query}", clock=clock)
    clock.advance(10)
    return End(Role.MASTER, a, "a" * 32), End(Role.SLAVE, b, "b" * 32), clock


def otp(sender: End, receiver: End, cn: bytes, hop_no: int = 0) -> bytearray:
    segments, pad = sender.pad(len(cn) + MAC_KEY_BYTES)
    hop = Hop(
        request_id=b"q" * 16,
        hop=hop_no,
        direction=Direction.TO_REQUESTER,
        link="link-2-3",
        mode=Mode.OTP,
        segments=segments,
    )
    got, header, body = decode(seal_otp(hop, cn, pad))
    return open_otp(header, body, receiver.receive(got))


def test_roles_follow_node_ids():
    assert role_of(2, 2, 3) is Role.MASTER and role_of(3, 2, 3) is Role.SLAVE
    assert role_of(10, 16, 10) is Role.MASTER


def test_master_to_slave_without_grants():
    master, slave, _ = pair()
    for i in range(20):
        assert otp(master, slave, bytes([i]) * 40) == bytes([i]) * 40


def test_slave_to_master_needs_and_uses_grants():
    master, slave, _ = pair()
    with pytest.raises(KeyUnavailable, match="ask the master"):
        slave.pad(10)
    slave.accept_grant(master.grant(16), master.epoch or "")
    assert slave.granted_left() == 16
    for i in range(3):
        assert otp(slave, master, bytes([i]) * 64) == bytes([i]) * 64


def test_both_directions_never_share_bits():
    """Keys granted to the slave are never also used by the master's own sending."""
    master, slave, _ = pair()
    slave.accept_grant(master.grant(16), master.epoch or "")
    down = [master.pad(96)[0] for _ in range(5)]
    up = [slave.pad(96)[0] for _ in range(5)]
    down_ids = {s.key_id for segs in down for s in segs}
    up_ids = {s.key_id for segs in up for s in segs}
    assert down_ids and up_ids and not down_ids & up_ids


def test_a_message_with_ungranted_keys_is_rejected_by_the_master():
    master, _, _ = pair()
    foreign, _, _ = pair(seed="another-link-secret")
    segments, pad = foreign.pad(64)  # keys the master never granted
    hop = Hop(
        request_id=b"x" * 16,
        hop=0,
        direction=Direction.TO_RESPONDER,
        link="link-2-3",
        mode=Mode.OTP,
        segments=segments,
    )
    got, _, _ = decode(seal_otp(hop, b"y" * 32, pad))
    with pytest.raises((IntegrityFailure, ReplayDetected)):
        master.receive(got)


def test_gcm_in_both_directions():
    master, slave, _ = pair()
    slave.accept_grant(master.grant(2), master.epoch or "")
    for sender, receiver in ((master, slave), (slave, master)):
        for i in range(5):
            key_id, key, counter = sender.gcm()
            hop = Hop(
                request_id=b"g" * 16,
                hop=i,
                direction=Direction.TO_REQUESTER,
                link="link-2-3",
                mode=Mode.GCM,
                segments=(Segment(key_id, 0, 32),),
                counter=counter,
            )
            got, header, body = decode(seal_gcm(hop, b"cn" * 16, key))
            assert open_gcm(got, header, body, receiver.receive(got)) == b"cn" * 16


def test_an_empty_link_is_key_unavailable():
    master, _, _ = pair(skr=256)  # one key per second
    with pytest.raises(KeyUnavailable, match="no link key"):
        master.pad(10 * 32 + 1)


def test_a_restarted_master_refuses_old_grants_until_the_slave_asks_again():
    master, slave, _ = pair()
    slave.accept_grant(master.grant(8), master.epoch or "")
    restarted = End(Role.MASTER, master.qkdm, "c" * 32)  # same QKDM end, new run
    assert restarted.epoch != master.epoch
    with pytest.raises(StaleGrant):
        restarted.link.check_epoch(slave.epoch)
    slave.link.check_epoch(restarted.epoch)  # the slave learns of the restart
    assert slave.granted_left() == 0
    slave.accept_grant(restarted.grant(8), restarted.epoch or "")
    restarted.link.check_epoch(slave.epoch)
    assert otp(slave, restarted, b"after restart" * 3) == b"after restart" * 3


def test_housekeeping_forgets_what_a_silent_peer_will_never_use():
    """A master sweeps granted keys after GRANT_TTL (a restarted slave asks anew); a slave
    gives its grants up after half of it, so it never sends with a swept key."""
    master, slave, _ = pair()
    slave.accept_grant(master.grant(8), master.epoch or "")
    now = 0.0
    assert master.link.housekeeping(now) == 0 and slave.link.housekeeping(now) == 0
    assert slave.link.housekeeping(now + GRANT_TTL / 2 + 1) == 8 and slave.granted_left() == 0
    assert master.link.housekeeping(now + GRANT_TTL + 1) == 8
    slave.accept_grant(master.grant(4), master.epoch or "")  # and a fresh grant works
    assert otp(slave, master, b"after" * 10) == b"after" * 10


def test_granted_keys_the_module_dropped_are_skipped(monkeypatch):
    """A full QKDM buffer drops its oldest keys while a slave still holds their IDs as
    grants (in GCM mode a key serves 1,024 messages): the slave skips the dropped ones
    and sends with the first it can fetch, or asks for a new grant: no hang, no error."""
    master, slave, _ = pair()
    granted = master.grant(6)
    dropped = set(granted[:4])
    fetch = slave.qkdm.get_key_by_id

    def get_key_by_id(key_id: str):
        if key_id in dropped:
            raise hal.KeyNotFound(f"{key_id} dropped from the buffer")
        return fetch(key_id)

    monkeypatch.setattr(slave.qkdm, "get_key_by_id", get_key_by_id)
    slave.accept_grant(granted, master.epoch or "")
    key_id, _, _ = slave.gcm()
    assert key_id == granted[4] and slave.granted_left() == 1
    dropped.add(granted[5])
    slave.link.drop_sending()  # (as after a peer's refusal) the next send needs a fresh key
    slave.accept_grant(granted[5:], master.epoch or "")
    with pytest.raises(KeyUnavailable, match="ask the master"):
        slave.gcm()
    assert slave.granted_left() == 0
