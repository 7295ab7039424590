"""The network's private PKI and the mutual-TLS contexts built on it.

``qkdn net up`` creates one CA per network, one certificate per node (server and client
use, ``CN`` = node name) and one per SAE (client use, ``CN`` = SAE ID). Every private key
is derived from the node's PTG.3 generator (FIPS 186-5 §B.4.1 "extra random bits": 64
more bits than the curve order, reduced), never from another RNG. Curve: P-256, the most
widely supported for TLS by ETSI 014 clients.

TLS contexts require TLS 1.3 and a peer certificate from the same CA on both sides; the
peer's identity is the ``CN`` of its certificate (:func:`peer_name`). The SAE edge
(:func:`sae_server_context`) also takes TLS 1.2, as ETSI 014 asks ("TLS version 1.2 or
higher"), with forward-secret AEAD suites only (ECDHE with AES-GCM or ChaCha20-Poly1305).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import ApplianceError

RandomBytes = Callable[[int], bytes]
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class PkiError(ApplianceError):
    """Certificates or keys are missing, unreadable or do not match."""

    code = "PKI"


def generate_key(rng: RandomBytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 key whose scalar comes from ``rng`` (FIPS 186-5 §B.4.1)."""
    scalar = int.from_bytes(rng(40), "big") % (P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass
class CertificateAuthority:
    """A CA certificate and its key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls, network: str, rng: RandomBytes, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        now = now or dt.datetime.now(dt.UTC)
        key = generate_key(rng)
        name = _name(f"{network} QKDN CA", network)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_serial(rng))
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def issue(
        self,
        cn: str,
        rng: RandomBytes,
        *,
        server: bool,
        hosts: tuple[str, ...] = (),
        now: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A leaf certificate for ``cn``: client use always, server use if asked."""
        now = now or dt.datetime.now(dt.UTC)
        key = generate_key(rng)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
            [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        )
        org = self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, str(org)))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial(rng))
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=730))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
            )
        return builder.sign(self.key, hashes.SHA256()), key


def _serial(rng: RandomBytes) -> int:
    return int.from_bytes(rng(16), "big") >> 1 or 1


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_pair(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> None:
    """PEM files; the key file is created with mode 0600."""
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def server_context(cert: Path, key: Path, ca: Path, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """TLS 1.3 server that requires a client certificate from ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return _configure(ctx, cert, key, ca, alpn)


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
TLS12_SUITES = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites at the SAE edge: ephemeral ECDH (forward secrecy) and an AEAD cipher.
TLS 1.3 suites are all of that kind."""


def sae_server_context(
    cert: Path, key: Path, ca: Path, alpn: tuple[str, ...], versions: tuple[str, ...]
) -> ssl.SSLContext:
    """The SAE edge's server context: ``versions`` (a non-empty subset of ``"1.2"``,
    ``"1.3"``), and a client certificate from ``ca`` required as everywhere."""
    chosen = sorted(TLS_VERSIONS[v] for v in set(versions))
    if not chosen:
        raise PkiError("no TLS version for the SAE edge")
    ctx = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, ca, alpn)
    ctx.minimum_version, ctx.maximum_version = chosen[0], chosen[-1]
    ctx.set_ciphers(TLS12_SUITES)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def client_context(cert: Path, key: Path, ca: Path, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """TLS 1.3 client presenting ``cert`` and trusting only ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # peers are identified by their CN under the private CA
    return _configure(ctx, cert, key, ca, alpn)


def _configure(
    ctx: ssl.SSLContext, cert: Path, key: Path, ca: Path, alpn: tuple[str, ...]
) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise PkiError(f"cannot load TLS credentials {cert}: {exc}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The CN of the verified peer certificate, or None."""
    if ssl_object is None:
        return None
    cert: dict[str, Any] = dict(ssl_object.getpeercert() or {})
    subject: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
