"""The AKMS-AKMS channel: message authentication that does not rest on the PKI alone.

Mutual TLS already protects every inter-node connection, and key material between the
access nodes travels under CN keys. The channel adds a symmetric, quantum-safe check of
*who* is asking and answering, as the paper prescribes: it is bootstrapped from a
pre-shared key (a provisioning file, or the smartcard of the hsm issue, through
:mod:`hsm.psk`) and then re-keyed from QKDN keys.

One channel per ordered pair (caller -> callee): the caller opens it, the callee keeps its
keys by epoch. Sans-IO: the node adapter moves the bytes.

* **Open.** The caller sends a 16-byte nonce; the callee answers with its own nonce, a
  fresh channel ID and a confirmation tag. Both derive the epoch-0 key
  ``K0 = KDF(PSK, "qkdn-akms-channel" | caller | callee | channel ID, nonce_a | nonce_b)``
  (the PSK source's KDF, SP 800-108 CMAC). The confirmation proves the callee holds the
  PSK; the caller's first tagged request proves the caller does.
* **Re-key.** The caller asks for a fresh 32-byte key over the ordinary key flow (it is
  relayed hop by hop under a CN key, like any KSA key) and both move to epoch n+1. The
  PSK-derived key protects the first re-key and the requests sent while it runs (the
  caller asks for it at open and does not hold its first requests back); later re-keys
  are protected by the key they replace. The callee accepts the previous, current and
  next epoch, so requests already in flight survive a re-key; older keys are erased.
* **Tags.** Every request and response carries ``channel-id;epoch;tag`` in the
  ``qkdn-channel`` header: ``tag = HMAC-SHA256(K_epoch, direction | path | body)``.
  A bad tag is an integrity alarm; an unknown channel or epoch makes the caller open a
  new channel once (the callee restarted).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from appliance.kms.errors import IntegrityFailure, KmsError, ProtocolError, UnknownChannel

NONCE_BYTES = 16
KEY_BYTES = 32
REKEY_AFTER = 10_000
"""Requests under one key before the caller re-keys (also at every open)."""
HEADER = "qkdn-channel"


def context(caller: str, callee: str, channel_id: str) -> bytes:
    return f"qkdn-akms-channel\0{caller}\0{callee}\0{channel_id}".encode()


def _tag(key: bytes | bytearray, direction: bytes, path: str, body: bytes) -> str:
    message = b"".join((direction, b"\0", path.encode(), b"\0", body))
    return hmac.digest(bytes(key), message, "sha256").hex()  # one call into OpenSSL


def confirmation(key: bytes | bytearray, nonce_a: bytes, nonce_b: bytes) -> str:
    """The callee's proof, at open, that it derived the same epoch-0 key."""
    return _tag(key, b"confirm", "", nonce_a + nonce_b)


def _erase(key: bytearray) -> None:
    key[:] = bytes(len(key))


def _verify(
    channel_id: str,
    keys: dict[int, bytearray],
    header: str | None,
    direction: bytes,
    path: str,
    body: bytes,
    unknown: KmsError,
) -> int:
    """The epoch of a message whose tag checks out under our key of that epoch."""
    their_id, epoch, tag = parse_header(header)
    key = keys.get(epoch)
    if their_id != channel_id or key is None:
        raise unknown
    if not hmac.compare_digest(tag, _tag(key, direction, path, body)):
        raise IntegrityFailure(f"channel {direction.decode()} failed authentication")
    return epoch


def parse_header(value: str | None) -> tuple[str, int, str]:
    """(channel ID, epoch, tag) from a ``qkdn-channel`` header."""
    try:
        channel_id, epoch, tag = (value or "").split(";")
        return channel_id, int(epoch), tag
    except ValueError:
        raise ProtocolError("missing or malformed channel header") from None


class CallerChannel:
    """The caller's end: the current key and epoch, the previous key (for answers to
    requests sent before the last re-key), and when to re-key."""

    def __init__(self, channel_id: str, key: bytearray) -> None:
        self.channel_id, self.epoch, self.uses = channel_id, 0, 0
        self._keys: dict[int, bytearray] = {0: key}

    def tag_request(self, path: str, body: bytes) -> str:
        self.uses += 1
        key = self._keys[self.epoch]
        return f"{self.channel_id};{self.epoch};{_tag(key, b'request', path, body)}"

    def check_response(self, path: str, body: bytes, header: str | None) -> None:
        unknown = IntegrityFailure("channel response under another channel or epoch")
        _verify(self.channel_id, self._keys, header, b"response", path, body, unknown)

    def needs_rekey(self) -> bool:
        return self.epoch == 0 or self.uses >= REKEY_AFTER

    def rekey(self, new_key: bytearray) -> None:
        """Move to the next epoch with a key that came over the QKDN."""
        if len(new_key) != KEY_BYTES:
            raise ProtocolError("a channel key is 32 bytes")
        for old in [e for e in self._keys if e < self.epoch]:
            _erase(self._keys.pop(old))
        self.epoch, self.uses = self.epoch + 1, 0
        self._keys[self.epoch] = new_key

    def close(self) -> None:
        for key in self._keys.values():
            _erase(key)
        self._keys.clear()


@dataclass
class CalleeChannel:
    """The callee's end: keys by epoch (previous, current, next at most)."""

    channel_id: str
    keys: dict[int, bytearray] = field(default_factory=dict)

    def verify_request(self, path: str, body: bytes, header: str | None) -> int:
        """The epoch of a correctly tagged request; a newer epoch retires older keys."""
        unknown = UnknownChannel("no such channel or epoch here; open the channel again")
        epoch = _verify(self.channel_id, self.keys, header, b"request", path, body, unknown)
        for old in [e for e in self.keys if e < epoch - 1]:
            _erase(self.keys.pop(old))
        return epoch

    def tag_response(self, epoch: int, path: str, body: bytes) -> str:
        return f"{self.channel_id};{epoch};{_tag(self.keys[epoch], b'response', path, body)}"

    def add_next(self, after: int, key: bytearray) -> None:
        """Install the key the caller will use after epoch ``after`` (it travels in the
        reply to a re-key request made under ``after``). A re-key whose reply was lost is
        asked again; its newer key replaces the unused one."""
        if after not in self.keys or len(key) != KEY_BYTES:
            raise ProtocolError("a channel re-key must follow a known epoch")
        for newer in [e for e in self.keys if e > after]:
            _erase(self.keys.pop(newer))
        self.keys[after + 1] = key

    def close(self) -> None:
        for key in self.keys.values():
            _erase(key)
        self.keys.clear()
