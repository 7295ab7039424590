"""The device's own update policy, kept on the target and never taken from a bundle.

Like RAUC's ``system.conf`` plus keyring: which images a device accepts is decided by the
device. The policy names the ``compatible`` string, optionally the node id the device was
provisioned as, the trust anchor (a root public key), whether development-signed images
are accepted, the revocation list known at provisioning, the initial security-version
floor, and how many boot attempts a new image gets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from images.errors import BootStateError, KeyFileError
from images.signing import PublicKey, canonical


@dataclass(frozen=True, kw_only=True)
class DevicePolicy:
    compatible: str
    """An image's manifest must carry exactly this string."""
    anchor: PublicKey
    """The root key every bundle's keyring must chain to."""
    node: int | None = None
    """When set, only images built for this node id are accepted."""
    accept_dev: bool = False
    """Accept images signed by development keys (bench devices only)."""
    revoked: frozenset[str] = frozenset()
    floor: int = 0
    """Initial security-version floor; the boot state raises it on every commit."""
    attempts: int = 3
    """Boot attempts a freshly flashed image gets before it is rolled back."""

    def encode(self) -> bytes:
        return canonical(
            {
                "compatible": self.compatible,
                "anchor": self.anchor.to_json(),
                "node": self.node,
                "accept_dev": self.accept_dev,
                "revoked": sorted(self.revoked),
                "floor": self.floor,
                "attempts": self.attempts,
            }
        )


def decode_policy(data: bytes) -> DevicePolicy:
    """Parse a stored policy; anything unexpected is IMG-STATE."""
    try:
        doc = json.loads(data)
        return _from_doc(doc)
    except (ValueError, TypeError, KeyError, AttributeError, KeyFileError, RecursionError):
        raise BootStateError("the device policy record is malformed") from None


def _from_doc(doc: dict[str, Any]) -> DevicePolicy:
    node, revoked = doc["node"], doc["revoked"]
    checks = [
        isinstance(doc["compatible"], str),
        node is None or type(node) is int,
        isinstance(doc["accept_dev"], bool),
        isinstance(revoked, list) and all(isinstance(r, str) for r in revoked),
        type(doc["floor"]) is int and doc["floor"] >= 0,
        type(doc["attempts"]) is int and 1 <= doc["attempts"] <= 255,
    ]
    if not all(checks) or len(doc) != 7:
        raise ValueError("policy")
    return DevicePolicy(
        compatible=doc["compatible"],
        anchor=PublicKey.from_json(doc["anchor"]),
        node=node,
        accept_dev=doc["accept_dev"],
        revoked=frozenset(revoked),
        floor=doc["floor"],
        attempts=doc["attempts"],
    )
