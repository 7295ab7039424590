"""Appliance images: build, sign, verify, flash to A/B slots, boot counting and rollback.

Empty until the images issue lands.
"""
