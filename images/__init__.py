"""Appliance images: build, sign, verify, flash to A/B slots, boot counting and rollback.

Modules, from the bundle inwards:

- :mod:`images.signing` hybrid Ed25519 + ML-DSA-65 keys and signatures (both must verify);
- :mod:`images.keyring` root chain with rotation, dev/release signing keys, revocations;
- :mod:`images.manifest` the signed manifest and its strict parser;
- :mod:`images.bundle` the bundle file; signature first, then manifest, then payload;
- :mod:`images.hardening` and :mod:`images.build` the node's root tree, squashfs, verity;
- :mod:`images.records`, :mod:`images.bootstate` double-buffered records and the
  (state, event) -> (effect, next state) table, with no I/O;
- :mod:`images.policy` the device-owned policy (compatible, anchor, floor, dev keys);
- :mod:`images.target`, :mod:`images.install`, :mod:`images.boot` the thin adapters:
  GPT target, flashing, the emulated bootloader and its health checks.

Errors all derive from :class:`images.errors.ImageError` and carry a code.
"""
