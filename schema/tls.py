"""The one place TLS contexts are made, certificates turned into identities,
and XML-RPC carried over TLS.

Both programs use it: the server's listener, and the agent's and the admin
CLI's connections (through ``TLSTransport``).
"""

from __future__ import annotations

import datetime as dt
import http.client
import ssl
import xmlrpc.client
from pathlib import Path
from typing import Any

from cryptography import x509

from scire_schema import certs, protocol


def server_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """A listener context: TLS 1.2+, client certificates verified against the CA.

    Certificates are optional at the TLS layer because enrollment (the caller
    has none yet) goes over the same port; ``rpc.py`` refuses every other
    method to a caller without one. A certificate from another CA fails the
    handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    _no_session_tickets(ctx)
    return ctx


def callback_server_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """The daemon-mode agent's ``poll_now`` listener: TLS 1.2+, the agent's own
    certificate, and a client certificate from the CA required in the handshake
    (there is no enrollment on this port). Which certificates may call is the
    listener's check (the role, ``certs.role``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED
    _no_session_tickets(ctx)
    return ctx


def _no_session_tickets(ctx: ssl.SSLContext) -> None:
    """No TLS 1.3 session tickets: no client of ours resumes a session, and
    the tickets a server sends after the handshake cross the client's request
    on the wire; with the client's ``TCP_NODELAY`` (http.client sets it) that
    cost every call on a new connection a delayed ACK, about 40 ms."""
    ctx.num_tickets = 0


def client_context(
    ca_file: Path | None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    ca_data: str | None = None,
) -> ssl.SSLContext:
    """A caller context: TLS 1.2+, the server's certificate verified against the
    CA and its name against the URL's host (``check_hostname``: a DNS name or IP
    address among the certificate's subject alternative names; ``scire-admin
    init --alt-name`` puts them there).

    Without ``ca_file`` or ``ca_data`` it trusts nothing and checks nothing:
    only for fetching the CA, whose fingerprint the caller then checks itself."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    if ca_data is not None or ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
    if ca_data is not None:
        ctx.load_verify_locations(cadata=ca_data)
    elif ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Compression leaks secrets through the length of what it sends (CRIME).
    ctx.options |= ssl.OP_NO_COMPRESSION


def certificate_expired(cert: x509.Certificate, now: dt.datetime | None = None) -> bool:
    """True once ``cert``'s validity has ended (``now``: aware, default the current time)."""
    return cert.not_valid_after_utc <= (now or protocol.utc_now())


def peer_fingerprint(sock: ssl.SSLSocket) -> str | None:
    der = sock.getpeercert(binary_form=True)
    return certs.fingerprint(der) if der else None


class TLSTransport(xmlrpc.client.SafeTransport):
    """``xmlrpc.client`` over TLS with the caller's context and a socket timeout.

    The stdlib transport keeps one HTTP/1.1 connection open between calls, so
    a run's many polls and reports reuse one TLS session.
    """

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(context=context)
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout  # read when the socket is opened
        return conn
