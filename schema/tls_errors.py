"""Connection and TLS failures in words: what went wrong and what to do.

``ssl`` reports ``CERTIFICATE_VERIFY_FAILED``, ``WRONG_VERSION_NUMBER`` or
``EOF occurred in violation of protocol``; an operator needs to hear "the
server's certificate does not name this host; use a name it has". One
classification of the failure, two wordings: ``explain`` for the operator at
``scire-admin`` (whose remedy is a flag or a bundle), ``explain_for_agent`` for
the agent's log (whose remedy is renewing or re-enrolling the host).
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) one can act on.
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_NOT_FROM_OUR_CA = frozenset({18, 19, 20, 21})  # self-signed, unknown issuer, unverifiable leaf
_NAME_MISMATCH = frozenset({62, 64})  # host name, IP address


def explain(exc: BaseException, server: str) -> str:
    """One line for a failure to reach or talk TLS with ``server`` (a URL)."""
    where = urlsplit(server).netloc or server
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verify_failure(exc, where)
    if isinstance(exc, ssl.SSLEOFError):
        return (
            f"{where} closed the connection during the TLS handshake: it did not accept "
            "your certificate (revoked, expired, or from another CA) or it is not a Scire "
            "server; check --bundle and --server"
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST"):
            return (
                f"{where} does not speak TLS (a plain-HTTP or other service on that port?); "
                "check the port in --server (the server's default is 8443)"
            )
        if reason == "TLSV1_ALERT_UNKNOWN_CA":
            return (
                f"{where} refused your certificate: it was not issued by the server's CA; "
                "use a bundle made by this server's 'scire-admin user add' (--bundle)"
            )
        if reason in ("SSLV3_ALERT_CERTIFICATE_EXPIRED",):
            return (
                f"{where} refused your certificate: it has expired; "
                "ask an administrator for a new bundle ('scire-admin user add')"
            )
        if reason in ("SSLV3_ALERT_BAD_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return (
                f"{where} refused your certificate; check that --bundle is your Scire user "
                "bundle for this server"
            )
        return f"TLS with {where} failed: {reason or exc}; check --server and --bundle"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"nothing listens on {where} (connection refused): is scire-server running, "
            "and is the port in --server right?"
        )
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return (
            f"{where} did not answer in time: check the address and any firewall, "
            "or raise the timeout (timeout in the [admin] section)"
        )
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name in {server}: {exc.strerror}; check --server"
    if isinstance(exc, ConnectionResetError):
        return f"{where} reset the connection: is it a Scire server? check --server"
    if isinstance(exc, OSError):
        return f"cannot reach {where}: {exc.strerror or exc}; check --server"
    return f"cannot talk to {where}: {exc}"


def _verify_failure(exc: ssl.SSLCertVerificationError, where: str) -> str:
    code = exc.verify_code
    host = where.rsplit(":", 1)[0].strip("[]")
    if code in _NAME_MISMATCH:
        return (
            f"the server's certificate is not valid for {host!r}: connect with a name it has "
            "(scire-admin init --alt-name set them; 'localhost' or 127.0.0.1 on the server "
            "itself), or reissue the server certificate with this name"
        )
    if code in _NOT_FROM_OUR_CA:
        return (
            f"the server at {where} has a certificate from another CA than your bundle's: "
            "this bundle belongs to another Scire installation, or --server points at the "
            "wrong server; check --bundle and --server"
        )
    if code == _CERT_HAS_EXPIRED:
        return (
            f"the server's certificate at {where} has expired (or this machine's clock is "
            "ahead): check the clock, then reissue the server certificate"
        )
    if code == _CERT_NOT_YET_VALID:
        return (
            f"the server's certificate at {where} is not valid yet: this machine's clock is "
            "behind; set the clock right (NTP)"
        )
    return f"the server's certificate at {where} was refused: {exc.verify_message}"


def explain_for_agent(exc: ssl.SSLError, url: str) -> str:
    """What a failed TLS connection to ``url`` means, in words.

    The server's certificate refused here (``SSLCertVerificationError``), or
    ours refused by the server (a TLS alert), instead of OpenSSL's
    ``CERTIFICATE_VERIFY_FAILED``, worded for the agent's log.
    """
    host = urlsplit(url).hostname or url
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == _CERT_HAS_EXPIRED:
            return (
                f"{url}: the server's certificate has expired (or this host's clock is wrong); "
                "the server's administrator must renew it"
            )
        if code == _CERT_NOT_YET_VALID:
            return f"{url}: the server's certificate is not valid yet: check this host's clock"
        if code in _NAME_MISMATCH:
            return (
                f"{url}: the server's certificate does not name {host}: use a name it carries "
                "in the URL, or have it issued with that name (scire-admin init --alt-name)"
            )
        if code in _NOT_FROM_OUR_CA:
            return f"{url}: the server's certificate is not from our CA: {exc.verify_message}"
        return f"{url}: the server's certificate was refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return (
            f"{url}: the server closed the TLS connection "
            "(it may have refused our certificate: expired, or not from its CA)"
        )
    reason = exc.reason or ""
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        return (
            f"{url}: the server refused our certificate as expired "
            "(or a clock is wrong); renew or re-enroll"
        )
    if reason in ("SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA"):
        return f"{url}: the server refused our certificate: is it from the server's CA?"
    if reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER"):
        return f"{url}: no common TLS version (1.2 or newer), or not a TLS server"
    return f"{url}: TLS failed: {reason or exc}"


def explain_for_pusher(exc: ssl.SSLError, where: str) -> str:
    """What a failed TLS connection from the server to an agent's ``poll_now``
    listener at ``where`` (host:port) means, in words, for the server's log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == _CERT_HAS_EXPIRED:
            return (
                f"the agent's certificate at {where} has expired (or a clock is wrong); "
                "the host must renew or re-enroll"
            )
        if code == _CERT_NOT_YET_VALID:
            return f"the agent's certificate at {where} is not valid yet: check the clocks"
        if code in _NOT_FROM_OUR_CA:
            return (
                f"the listener at {where} has a certificate from another CA: not a Scire "
                "agent of this installation"
            )
        return f"the agent's certificate at {where} was refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError):
        return (
            f"the listener at {where} closed the TLS connection (it may have refused the "
            "server's certificate)"
        )
    reason = exc.reason or ""
    if reason in ("SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA"):
        return f"the listener at {where} refused the server's certificate"
    if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
        return f"the listener at {where} refused the server's certificate as expired"
    if reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER"):
        return f"{where} does not speak TLS 1.2 or newer: not a Scire agent's listener?"
    return f"TLS with the agent at {where} failed: {reason or exc}"
