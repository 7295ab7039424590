"""Throwaway PKI for tests and benches: a CA, a KME server certificate, SAE client certificates.

ECDSA P-256, valid for one day, written as PEM files (certificate and key in one file).
Test and bench equipment only: the keys are unprotected on disk.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, kw_only=True, slots=True)
class Pki:
    """Paths of the generated PEM files."""

    ca: Path
    """The CA certificate."""
    server: Path
    """The KME's certificate + key (SAN 127.0.0.1 and localhost)."""
    clients: dict[str, Path]
    """SAE ID -> client certificate + key (CN = SAE ID)."""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    usage: list[x509.ObjectIdentifier] | None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_cn, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> Path:
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        pem += key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path.write_bytes(pem)
    return path


def make_pki(directory: Path, saes: list[str], ca_name: str = "QKDN test CA") -> Pki:
    """Generate a CA, a server certificate for 127.0.0.1/localhost and one client per SAE."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, None, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = _cert("kme", server_key, (ca_name, ca_key), [ExtendedKeyUsageOID.SERVER_AUTH], san)
    clients = {}
    for sae in saes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(sae, key, (ca_name, ca_key), [ExtendedKeyUsageOID.CLIENT_AUTH])
        clients[sae] = _write(directory / f"{sae}.pem", cert, key)
    return Pki(
        ca=_write(directory / "ca.pem", ca, None),
        server=_write(directory / "kme.pem", server, server_key),
        clients=clients,
    )
