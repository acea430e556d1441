"""Errors of the Scire server.

Each error carries a stable XML-RPC fault code (``scire_schema.protocol.FaultCode``);
``rpc.py`` maps them to ``xmlrpc.client.Fault`` at the boundary and nothing
else leaks to a caller. The shared contract's own errors (``scire_schema.errors``)
become server errors through ``from_schema_error`` where the server parses.

* ScireError (99, internal)
  + AuthenticationRequired (1)   no or unknown client certificate
  + Forbidden (2)                known caller, not allowed (revoked, not admin, wrong namespace)
  + NotFound (3)
  + InvalidArgument (4)
  + InvalidDocument (5)          malformed, hostile or schema-invalid XML
  + NotHeld (6)                  report on an assignment the caller does not hold
  + IllegalTransition (7)
  + Conflict (8)                 the thing exists already
  + EnrollmentRefused (9)
  + Unavailable (10)             try again later (database busy, shutting down)
    + DatabaseUnreachable        the database does not answer (one log line per outage)
  + InstanceConflict (11)        another live daemon holds this instance key or SQLite file
  + ConfigError                  bad configuration or command line; never sent as a fault

A caller's input ends up in messages ("client name '...' is not valid") and
messages end up in faults, log lines and audit rows, so every message is cut
to ``MESSAGE_LIMIT`` characters here, and a caller's value is quoted with
:func:`clip`: a 31 MiB name costs a short fault and a short log line.
"""

from __future__ import annotations

import reprlib
from typing import TYPE_CHECKING

from scire_schema.errors import DocumentError, SchemaError
from scire_schema.protocol import FaultCode

if TYPE_CHECKING:
    from scire_server.store.records import Caller

ECHO_LIMIT = 100  # characters of a caller's value quoted in a message
MESSAGE_LIMIT = 1000  # characters of a fault's text, a log line's message, an audit detail


class _Quote(reprlib.Repr):
    """``reprlib`` that names a huge integer instead of converting it (which
    costs quadratic time and fails past 4300 digits)."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * self.maxlong:
            return f"<integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


def clip(value: object, limit: int = ECHO_LIMIT) -> str:
    """A caller's value as a fault or a log line may quote it: its ``repr``, at
    most about ``limit`` characters, saying how long a longer string was.
    Nesting and containers are cut too, so a hostile value never costs more
    than its first few items (``reprlib``)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    quote = _Quote()
    quote.maxlevel = 3
    quote.maxstring = quote.maxother = quote.maxlong = limit
    try:
        return bound(quote.repr(value), limit + 20)
    except Exception:  # a value whose repr fails must not turn a refusal into a crash
        return f"<{type(value).__name__}>"


def bound(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A text for a fault, a log line or an audit row: at most ``limit``
    characters (plus a note of the full length), control characters escaped so
    one line stays one line."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut
        )
    return cut if len(text) <= limit else f"{cut}... ({len(text)} characters)"


class ScireError(Exception):
    """Internal server error."""

    code: int = FaultCode.INTERNAL.value

    def __init__(
        self,
        message: str | None = None,
        *,
        job_id: int | None = None,
        identity: Caller | None = None,
    ) -> None:
        super().__init__(bound(message or (self.__doc__ or "").strip()))
        #: The job the refused call was about, for its audit row.
        self.job_id = job_id
        #: The known but refused identity (a revoked client or user) the call
        #: came from, so its refusal is logged and audited under that name.
        self.identity = identity

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class AuthenticationRequired(ScireError):
    """A valid, enrolled client certificate is required for this call."""

    code = FaultCode.AUTHENTICATION_REQUIRED.value


class Forbidden(ScireError):
    """The caller is not allowed to do this."""

    code = FaultCode.FORBIDDEN.value


class NotFound(ScireError):
    """No such object."""

    code = FaultCode.NOT_FOUND.value


class InvalidArgument(ScireError):
    """An argument is not valid."""

    code = FaultCode.INVALID_ARGUMENT.value


class InvalidDocument(ScireError):
    """The XML document is malformed or does not match its schema."""

    code = FaultCode.INVALID_DOCUMENT.value


class NotHeld(ScireError):
    """The caller does not hold this assignment."""

    code = FaultCode.NOT_HELD.value


class IllegalTransition(ScireError):
    """This state change is not allowed."""

    code = FaultCode.ILLEGAL_TRANSITION.value


class Conflict(ScireError):
    """The object exists already."""

    code = FaultCode.CONFLICT.value


class EnrollmentRefused(ScireError):
    """The enrollment request was refused."""

    code = FaultCode.ENROLLMENT_REFUSED.value


class Unavailable(ScireError):
    """The server cannot answer now; try again later."""

    code = FaultCode.UNAVAILABLE.value


class DatabaseUnreachable(Unavailable):
    """The database does not answer (down, restarting, failing over, the network).
    Counted by the store's outage tracker, which logs the outage once: neither
    the API nor the timed tasks log it per call."""


class InstanceConflict(ScireError):
    """Another live server daemon holds this instance key (or this SQLite file)."""

    code = FaultCode.INSTANCE_CONFLICT.value


class ConfigError(ScireError):
    """The configuration is not valid."""


FAULT_NAMES = {
    cls.code: cls.__name__
    for cls in (
        ScireError,
        AuthenticationRequired,
        Forbidden,
        NotFound,
        InvalidArgument,
        InvalidDocument,
        NotHeld,
        IllegalTransition,
        Conflict,
        EnrollmentRefused,
        Unavailable,
        InstanceConflict,
    )
}


def from_schema_error(exc: SchemaError) -> ScireError:
    """The server error a caller gets for a bad document or certificate it sent:
    a document is ``InvalidDocument``, anything else (a certificate or a
    request) ``InvalidArgument``."""
    if isinstance(exc, DocumentError):
        return InvalidDocument(exc.message)
    return InvalidArgument(exc.message)
