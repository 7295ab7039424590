"""A throwaway PKI for network tests: one CA with four identities, and a foreign CA.

Imported by the conftest of each test folder that needs it (one fixture, one place).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.pki import CertificateAuthority, write_pair


@dataclass
class Identity:
    cert: Path
    key: Path
    ca: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Identity]:
    root = tmp_path_factory.mktemp("pki")
    out: dict[str, Identity] = {}
    for ca_name, names in (
        ("net", ("node-a", "node-b", "sae-1", "sae-2")),
        ("other", ("intruder",)),
    ):
        ca = CertificateAuthority.create(ca_name, os.urandom)
        ca_path = root / f"{ca_name}-ca.pem"
        ca_path.write_bytes(
            ca.cert.public_bytes(
                __import__(
                    "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
                ).Encoding.PEM
            )
        )
        for name in names:
            cert, key = ca.issue(name, os.urandom, server=True, hosts=("127.0.0.1", name))
            write_pair(cert, key, root / f"{name}.pem", root / f"{name}.key")
            out[name] = Identity(root / f"{name}.pem", root / f"{name}.key", ca_path)
    return out
