"""The server's XML-RPC endpoint: audiences, caller identity, and the one place
errors become faults.

Sockets, TLS, deadlines and caps belong to ``scire_schema.listener`` and the
parsing of hostile request bodies to ``scire_schema.rpcwire``: a worker thread
here only ever sees a complete, parsed call. The caller's identity is the
SHA-256 fingerprint of the certificate it presented in the TLS handshake; the
API layer (``RemoteMethods.identify``) checks it on every call (against the
callers it remembers, ``identities.KnownCallers``, else the database) and
records each refusal. An idle client's empty poll is answered on the
listener's event loop (:meth:`ScireRPCServer.from_memory`), every other call
in a worker thread. Arguments never name the caller. This module talks to the API
layer only, never to the store.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import ssl
import time
import xmlrpc.client
from collections.abc import Callable
from typing import Any

from scire_schema import protocol
from scire_schema.listener import Listener, ListenerLimits, ListenerStats, Request, Response
from scire_schema.rpcwire import Call, XMLRPCApp
from scire_server.api import Caller, RemoteMethods
from scire_server.config import ServerConfig
from scire_server.exceptions import Forbidden, InvalidArgument, ScireError, Unavailable, clip

log = logging.getLogger(__name__)


def listener_limits(config: ServerConfig) -> ListenerLimits:
    """The listener's deadlines and caps from the server's configuration."""
    return ListenerLimits(
        handshake_timeout=config.handshake_timeout,
        idle_timeout=config.idle_timeout,
        request_timeout=config.request_timeout,
        max_connections=config.max_connections,
        max_connections_per_peer=config.max_connections_per_peer,
        max_threads=config.max_threads,
        max_queued=config.max_queued_requests,
    )


class ScireRPCServer:
    """The remote methods of ``RemoteMethods`` served over the hardened listener.

    ``fallback`` answers every other path (``/healthz``, ``/metrics``);
    ``on_call(method, fault or None, caller, seconds)`` hears of every call's
    outcome and how long it took from the parsed call to the answer.
    """

    def __init__(
        self,
        address: tuple[str, int],
        context: ssl.SSLContext,
        methods: RemoteMethods,
        limits: ListenerLimits,
        *,
        fallback: Callable[[Request], Response] | None = None,
        on_call: Callable[[str, int | None, Caller | None, float], None] | None = None,
    ) -> None:
        self.methods = methods
        self.table = methods.table()
        self.on_call = on_call
        app = XMLRPCApp(
            self.dispatch,
            fallback=fallback,
            quick_dispatch=self.from_memory,
            quick_methods=("agent.poll",),
        )
        self.listener = Listener(
            address[0], address[1], context, app, limits, name="rpc", quick=app.quick
        )

    def start(self) -> None:
        """Bind and serve in background threads (``OSError`` when the port is taken)."""
        self.listener.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    def stats(self) -> ListenerStats:
        return self.listener.stats()

    def drain(self, grace: float) -> bool:
        """Stop taking calls, give in-flight ones ``grace`` seconds, then close
        every connection. True when nothing was cut off."""
        return self.listener.drain(grace)

    def dispatch(self, call: Call) -> Any:
        """One parsed call: who may call it, who the caller is, then the method."""
        method = call.method
        caller: Caller | None = None
        began = time.monotonic()
        try:
            if self.listener.draining:
                raise Unavailable("server is shutting down; try another server or later")
            entry = self.table.get(method)
            if entry is None:
                raise Forbidden(f"no method {clip(method)}")
            audience, function = entry
            if audience != "open":
                caller = self.methods.identify(call.peer_fingerprint)
                if audience == "agent" and caller.kind != "client":
                    raise Forbidden(f"{method} is for agents")
                if audience in ("user", "admin") and caller.kind != "user":
                    raise Forbidden(f"{method} is for users of scire-admin")
                if audience == "admin" and not caller.is_admin:
                    raise Forbidden(f"{method} needs an administrator; {caller.name} is not one")
            _check_arity(method, function, caller, call.params)
            answer = to_xmlrpc(function(caller, *call.params))
        except ScireError as exc:
            self.methods.record_refusal(method, caller, call.peer[0], exc)
            self._tell(method, exc.code, caller or exc.identity, began)
            raise xmlrpc.client.Fault(exc.code, exc.message) from None
        except Exception:
            self._tell(method, protocol.FaultCode.INTERNAL, caller, began)
            raise
        self._tell(method, None, caller, began)
        return answer

    def from_memory(self, call: Call) -> tuple[bool, Any]:
        """On the listener's event loop: the empty poll of an idle client whose
        certificate is known, answered without a worker thread or the database;
        (False, None) for anything else, which then takes :meth:`dispatch`'s way."""
        fingerprint = call.peer_fingerprint
        if call.method != "agent.poll" or fingerprint is None or self.listener.draining:
            return False, None
        caller = self.methods.known_callers.get(fingerprint)
        if caller is None or caller.kind != "client" or len(call.params) > 4:
            return False, None
        began = time.monotonic()
        answer = self.methods.poll_from_memory(caller, *call.params)
        if answer is None:
            return False, None
        self._tell(call.method, None, caller, began)
        return True, answer

    def _tell(self, method: str, fault: int | None, caller: Caller | None, began: float) -> None:
        if self.on_call is not None:
            # Names outside the table are a stranger's choice: one label for all.
            name = method if method in self.table else "unknown"
            self.on_call(name, fault, caller, time.monotonic() - began)


def _check_arity(
    method: str, function: Any, caller: Caller | None, params: tuple[Any, ...]
) -> None:
    """Refuse a call with the wrong number of arguments in words, not Python's."""
    try:
        inspect.signature(function).bind(caller, *params)
    except TypeError:
        names = list(inspect.signature(function).parameters)[1:]
        raise InvalidArgument(
            f"wrong arguments for {method}: it takes ({', '.join(names)}), "
            f"not {len(params)} argument(s)"
        ) from None


def to_xmlrpc(value: Any) -> Any:
    """What XML-RPC can carry: times as ISO strings (UTC, Z), ``None`` kept (allow_none)."""
    if isinstance(value, dt.datetime):
        return protocol.format_time(value)
    if isinstance(value, dict):
        return {str(k): to_xmlrpc(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_xmlrpc(v) for v in value]
    return value
