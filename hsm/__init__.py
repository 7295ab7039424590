"""Smartcards and PKCS#11: the card applet protocol (sans-IO), the PC/SC transport,
PSK enrollment, and the node's PKCS#11 keystore.

Smartcards: :mod:`hsm.apdu` (ISO 7816-4 APDUs), :mod:`hsm.applet` (the PSK card applet),
:mod:`hsm.vpcd` (its emulator behind vsmartcard's vpcd), :mod:`hsm.pcsc` (``pcsc://``
transport), :mod:`hsm.card` (card client and the card PSK source), :mod:`hsm.enroll` (the
enrollment ceremony and its signed audit record), :mod:`hsm.testing` (pcscd and emulated
cards for tests and benches). PSK sources: :mod:`hsm.psk`. The PKCS#11 keystore:
:mod:`hsm.keystore`. Errors: :mod:`hsm.errors`.
"""
