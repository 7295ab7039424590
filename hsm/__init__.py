"""Smartcards and PKCS#11: the card applet protocol (sans-IO), the PC/SC transport,
PSK enrollment, and the node's PKCS#11 keystore.

Empty until the hsm issue lands.
"""
