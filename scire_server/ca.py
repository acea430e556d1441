"""The CA: made once by ``scire-admin init``, then signing every certificate.

Only the server holds the CA key. Keys, requests, loading and fingerprints,
which the agent needs too, are in ``scire_schema.certs``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scire_schema import certs, protocol
from scire_schema.certs import PrivateKey
from scire_schema.protocol import utc_now

CA_VALIDITY_DAYS = 3650
CERT_VALIDITY_DAYS = 825
ROLE_SERVER = protocol.ROLE_SERVER
ROLE_CLIENT = protocol.ROLE_CLIENT
ROLE_USER = protocol.ROLE_USER


def _name(cn: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Scire"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def create_ca(
    cn: str = "Scire CA", days: int = CA_VALIDITY_DAYS
) -> tuple[PrivateKey, x509.Certificate]:
    key = certs.generate_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Scire"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    now = utc_now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    cn: str,
    role: str,
    alt_names: list[str] | None = None,
    days: int = CERT_VALIDITY_DAYS,
    not_before: dt.datetime | None = None,
) -> x509.Certificate:
    """Valid from ``not_before`` (default: now, less five minutes of clock skew) for ``days``."""
    now = utc_now()
    start = not_before or now - dt.timedelta(minutes=5)
    # Servers also call agents (poll_now) and agents also listen in daemon mode,
    # so both usages go on every end-entity certificate.
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, role))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after((not_before or now) + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(_san(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def sign_csr(
    ca_key: PrivateKey, ca_cert: x509.Certificate, csr_pem: str | bytes, cn: str, role: str
) -> x509.Certificate:
    """Sign the request's key for ``cn``; raises ``CertificateError`` for a bad request."""
    csr = certs.load_csr(csr_pem)
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return issue_certificate(ca_key, ca_cert, public_key, cn, role)
