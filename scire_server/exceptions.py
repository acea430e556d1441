"""Errors of the Scire server.

Each error carries a stable XML-RPC fault code; ``rpc.py`` maps them to
``xmlrpc.client.Fault`` at the boundary and nothing else leaks to a caller.

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
  + InstanceConflict (11)        another live daemon holds this instance key
"""

from __future__ import annotations


class ScireError(Exception):
    """Internal server error."""

    code = 99

    def __init__(self, message: str | None = None, *, job_id: int | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        #: The job the refused call was about, for its audit row.
        self.job_id = job_id

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class AuthenticationRequired(ScireError):
    """A valid, enrolled client certificate is required for this call."""

    code = 1


class Forbidden(ScireError):
    """The caller is not allowed to do this."""

    code = 2


class NotFound(ScireError):
    """No such object."""

    code = 3


class InvalidArgument(ScireError):
    """An argument is not valid."""

    code = 4


class InvalidDocument(ScireError):
    """The XML document is malformed or does not match its schema."""

    code = 5


class NotHeld(ScireError):
    """The caller does not hold this assignment."""

    code = 6


class IllegalTransition(ScireError):
    """This state change is not allowed."""

    code = 7


class Conflict(ScireError):
    """The object exists already."""

    code = 8


class EnrollmentRefused(ScireError):
    """The enrollment request was refused."""

    code = 9


class Unavailable(ScireError):
    """The server cannot answer now; try again later."""

    code = 10


class InstanceConflict(ScireError):
    """Another live server daemon holds this instance key."""

    code = 11


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
