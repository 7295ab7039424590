"""Which notifications a node raises, from two successive readings: sans-IO.

Rules (QKDN-MIB's notifications, X.733 severities):

* a link leaving ``up`` raises ``qkdnLinkDown`` (major); back ``up``, ``qkdnLinkUp``
  (cleared) clears it;
* a link's QBER above :data:`QBER_WARN_PPM` raises ``qkdnQberHigh`` (warning), below it
  again the same notification with cleared;
* a link's key level below :data:`LOW_KEYS` while up raises ``qkdnKeyStoreLow`` (minor);
* the generator ``failed`` raises ``qkdnRngHealthFailure`` (critical), healthy again clears;
* a PSK card source lost raises ``qkdnCardRemoved`` (major), back clears;
* the node running the slot an image rollback fell back to raises ``qkdnSlotRollback``
  (major), a good image running again clears it;
* more integrity alarms or more SNMP refusals than last time raise ``qkdnIntegrityAlarm``
  (major) and ``qkdnAuthFailure`` (warning): events, with nothing to clear.

The first reading only raises what is wrong already (a link down at start).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.mgmt.nodeview import LinkReading, NodeReading

QBER_WARN_PPM = 80_000
"""8 %: above it a link's key rate collapses (the emulated modules abort at 11 %)."""
LOW_KEYS = 8
"""Keys in a module's buffer below which a link is short of keys."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Notice:
    """One notification to send."""

    name: str
    """The NOTIFICATION-TYPE in QKDN-MIB, e.g. ``qkdnLinkDown``."""
    severity: str
    """X.733 label of qkdnNotifySeverity: cleared, critical, major, minor, warning."""
    resource: str
    """A link name, ``rng``, ``card``, ``snmp`` or the node's name."""
    text: str
    peer: int = 0
    """For link notifications: the link row's index (its peer node)."""


class Detector:
    def __init__(self) -> None:
        self.last: NodeReading | None = None
        self.refusals = 0

    def observe(self, now: NodeReading, refusals: int = 0) -> list[Notice]:
        """The notices between the last reading and ``now`` (``refusals``: the agent's
        USM and SNMP refusal counters, summed)."""
        out: list[Notice] = []
        before = {link.peer: link for link in self.last.links} if self.last else {}
        for link in now.links:
            out += _link(before.get(link.peer), link)
        out += self._node(now)
        if refusals > self.refusals:
            n = refusals - self.refusals
            out.append(
                Notice(
                    name="qkdnAuthFailure",
                    severity="warning",
                    resource="snmp",
                    text=f"{n} SNMP request(s) refused (version, user, level, digest)",
                )
            )
        self.last, self.refusals = now, refusals
        return out

    def _node(self, now: NodeReading) -> list[Notice]:
        last = self.last
        out = []
        failed, was_failed = (
            now.rng_health == "failed",
            last is not None and last.rng_health == "failed",
        )
        if failed != was_failed and (failed or last is not None):
            sev = "critical" if failed else "cleared"
            out.append(
                Notice(
                    name="qkdnRngHealthFailure",
                    severity=sev,
                    resource="rng",
                    text=f"random number generator {now.rng_health}",
                )
            )
        gone = now.card == "absent"
        was_gone = last is not None and last.card == "absent"
        if gone != was_gone:
            sev = "major" if gone else "cleared"
            out.append(
                Notice(
                    name="qkdnCardRemoved",
                    severity=sev,
                    resource="card",
                    text="PSK source " + ("unavailable" if gone else "back"),
                )
            )
        rolled, was_rolled = bool(now.rollback), last is not None and bool(last.rollback)
        if rolled != was_rolled:
            out.append(
                Notice(
                    name="qkdnSlotRollback",
                    severity="major" if rolled else "cleared",
                    resource="image",
                    text=now.rollback or f"running {now.slot} ({now.software})",
                )
            )
        if last is not None and now.integrity > last.integrity:
            out.append(
                Notice(
                    name="qkdnIntegrityAlarm",
                    severity="major",
                    resource=now.name,
                    text=f"{now.integrity - last.integrity} integrity failure(s)",
                )
            )
        return out


def _link(last: LinkReading | None, now: LinkReading) -> list[Notice]:
    out = []
    down, was_down = now.state != "up", last is not None and last.state != "up"
    if down != was_down:
        if down:
            out.append(
                Notice(
                    name="qkdnLinkDown",
                    severity="major",
                    resource=now.name,
                    text=f"link {now.state}",
                    peer=now.peer,
                )
            )
        else:
            out.append(
                Notice(
                    name="qkdnLinkUp",
                    severity="cleared",
                    resource=now.name,
                    text="link up",
                    peer=now.peer,
                )
            )
    high = now.state == "up" and now.qber_ppm > QBER_WARN_PPM
    was_high = last is not None and last.state == "up" and last.qber_ppm > QBER_WARN_PPM
    if high != was_high and (high or last is not None):
        out.append(
            Notice(
                name="qkdnQberHigh",
                severity="warning" if high else "cleared",
                resource=now.name,
                text=f"QBER {now.qber_ppm / 10_000:.2f} %",
                peer=now.peer,
            )
        )
    low = now.state == "up" and now.level < LOW_KEYS
    was_low = last is not None and last.state == "up" and last.level < LOW_KEYS
    if low != was_low and (low or last is not None):
        out.append(
            Notice(
                name="qkdnKeyStoreLow",
                severity="minor" if low else "cleared",
                resource=now.name,
                text=f"{now.level} keys in the module",
                peer=now.peer,
            )
        )
    return out
