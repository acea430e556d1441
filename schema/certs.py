"""Keys, certificate requests and certificates, as every party handles them.

Every party proves who it is with a certificate from the Scire CA; the
identity stored in the database is the SHA-256 fingerprint of the DER
certificate. Keys are ECDSA P-256: small, fast, and accepted by every TLS 1.2+
stack. Making the CA and signing belong to the server (its ``ca`` module); what
is here is what an agent needs too. Bad input raises ``errors.CertificateError``.
"""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from scire_schema.errors import CertificateError

PrivateKey = ec.EllipticCurvePrivateKey

_HEX64 = re.compile(r"[0-9a-f]{64}")


def generate_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
        raise CertificateError(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError("only EC private keys are supported")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes | str) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate: {exc}") from exc


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """SHA-256 of the DER certificate, lower-case hex: the identity Scire stores."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def key_fingerprint(
    subject: x509.Certificate | x509.CertificateSigningRequest | PrivateKey,
) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo of a request's, a certificate's or
    a private key's public key, lower-case hex like :func:`fingerprint`.

    It names the key, not the document: what the agent prints when it asks to
    enroll and what ``scire-admin client list`` shows, so an operator can check
    that the request they accept carries the agent's key.
    """
    public_key = subject.public_key()
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def parse_fingerprint(raw: str) -> str:
    """A SHA-256 fingerprint as people write it (``AB:CD:...``, ``sha256:abcd...``
    or plain hex), as lower-case hex; ``CertificateError`` when it is not one."""
    text = raw.strip().lower().removeprefix("sha256:").replace(":", "")
    if not _HEX64.fullmatch(text):
        raise CertificateError("a fingerprint is a SHA-256 digest: 64 hex digits, ':' allowed")
    return text


def common_name(cert: x509.Certificate | x509.CertificateSigningRequest) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def role(cert: x509.Certificate | bytes) -> str:
    """What the certificate is for: its subject's organizational unit (OU), one of
    ``protocol.ROLE_SERVER``, ``ROLE_CLIENT``, ``ROLE_USER``; "" when it has none.
    ``cert`` may be DER bytes, as a listener sees its peer's."""
    if isinstance(cert, bytes):
        try:
            cert = x509.load_der_x509_certificate(cert)
        except ValueError as exc:
            raise CertificateError(f"not a DER certificate: {exc}") from exc
    attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else ""


def same_key(public_key: object, key: PrivateKey) -> bool:
    """True when ``public_key`` (of a certificate or a request) belongs to ``key``."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    ours = key.public_key().public_bytes(der, spki)
    return hasattr(public_key, "public_bytes") and public_key.public_bytes(der, spki) == ours


def make_csr(key: PrivateKey, cn: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise CertificateError("the certificate request's signature is not valid")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise CertificateError("the certificate request must carry an EC P-256 key")
    return csr


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for, in its order."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names: list[str] = []
    for entry in extension.value:
        if isinstance(entry, (x509.DNSName, x509.IPAddress)):
            names.append(str(entry.value))
    return names
