"""The daemon-mode agent's ``poll_now`` listener: a server's hint that work is due.

It is the server's own hardened listener (``scire_schema.listener``) with the
same XML-RPC framing (``scire_schema.rpcwire``), under the agent's certificate
and with small limits: a client certificate from the CA is required in the
handshake, and only one whose role (``certs.role``) is ``scire-server`` may
call; anything else is ``Forbidden``. ``poll_now`` carries nothing: it calls
the daemon's ``on_hint`` (which sets its wake flag) and answers ``True``, so a
burst of hints is one flag and the daemon's loop coalesces it into one poll
(see ``daemon.py``).
"""

from __future__ import annotations

import logging
import xmlrpc.client
from collections.abc import Callable

from scire_client.config import ClientConfig, parse_address
from scire_client.exceptions import ConfigError
from scire_schema import certs, protocol, tls
from scire_schema.errors import CertificateError
from scire_schema.listener import Listener, ListenerLimits
from scire_schema.protocol import FaultCode
from scire_schema.rpcwire import Call, XMLRPCApp

log = logging.getLogger(__name__)

#: Only servers call, and rarely; a flood gets nothing but refusals.
LIMITS = ListenerLimits(
    max_connections=64,
    max_connections_per_peer=16,
    max_body_bytes=64 * 1024,
    max_anonymous_body_bytes=4 * 1024,
    max_threads=2,
    max_queued=32,
)
DRAIN_GRACE = 1.0  # seconds for a hint being answered when the daemon stops


class PollNowListener:
    """Serves ``poll_now`` on ``config.listen``; each accepted hint calls ``on_hint``."""

    def __init__(self, config: ClientConfig, on_hint: Callable[[], None]) -> None:
        self._host, port = parse_address(config.listen, "listen", allow_port_zero=True)
        self._advertise = config.advertise
        self._on_hint = on_hint
        self.hints = 0  #: accepted since start
        try:
            context = tls.callback_server_context(config.cert_file, config.key_file, config.ca_path)
        except OSError as exc:
            raise ConfigError(
                f"poll_now listener: cannot load the agent's certificate: {exc}"
            ) from exc
        self._context = context
        self._cert_file, self._key_file = config.cert_file, config.key_file
        self._app = XMLRPCApp(self._dispatch)
        self._listener = Listener(
            self._host,
            port,
            context,
            self._app,
            LIMITS,
            server_name="Scire agent",
            name="poll_now",
        )

    def start(self) -> None:
        try:
            self._listener.start()
        except OSError as exc:
            raise ConfigError(f"listen {self._host}:{self._listener.port}: {exc.strerror}") from exc

    def reload_certificate(self) -> None:
        """Present the agent's renewed certificate from the next connection on (the
        server pins the fingerprint on record, which the renewal changed)."""
        try:
            self._context.load_cert_chain(self._cert_file, self._key_file)
        except OSError as exc:  # ssl.SSLError too
            log.error("poll_now listener: cannot load the renewed certificate: %s", exc)

    def stop(self) -> None:
        self._listener.drain(DRAIN_GRACE)

    @property
    def callback(self) -> str:
        """The ``host:port`` the server is to call: ``advertise``, else the bound address."""
        if self._advertise:
            return self._advertise
        host, port = self._listener.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _dispatch(self, call: Call) -> bool:
        host, port = call.peer
        role = ""
        if call.peer_cert_der is not None:
            try:
                role = certs.role(call.peer_cert_der)
            except CertificateError:
                role = ""
        if role != protocol.ROLE_SERVER:
            self._app.noise.log(
                logging.WARNING,
                "refused",
                "poll_now: refused %s from %s:%d: a %s certificate, not a server's",
                call.method,
                host,
                port,
                role or "role-less",
            )
            raise xmlrpc.client.Fault(
                FaultCode.FORBIDDEN.value, "only a Scire server may call this agent"
            )
        if call.method != protocol.POLL_NOW_METHOD:
            raise xmlrpc.client.Fault(
                FaultCode.FORBIDDEN.value,
                f"no method {call.method[:60]!r} here; this agent serves only poll_now",
            )
        if call.params:
            raise xmlrpc.client.Fault(
                FaultCode.INVALID_ARGUMENT.value, "wrong arguments for poll_now: it takes none"
            )
        self.hints += 1
        log.debug("poll_now from %s:%d", host, port)
        self._on_hint()
        return True
