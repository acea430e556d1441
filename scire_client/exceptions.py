"""Errors of the Scire agent.

Every error the agent raises is a ``ClientError``; foreign errors (ssl, socket,
``xmlrpc.client.Fault``) are mapped once, in ``transport.py``, ``from`` the
original.

* ClientError                  base; its docstring is the default message
  + ConfigError                bad configuration or command line (exit 2)
  + TransportError             network or TLS failure talking to a server; retryable
    + RetryLater               every server that answered asked for a pause (not an error)
  + ServerFault                the server answered with an XML-RPC fault
  + EnrollmentPending          the request waits for an administrator (exit 3)
  + EnrollmentRefused          the request was rejected or revoked (exit 4)
  + CertificateExpired         the agent's own certificate has expired: renew or re-enroll
  + AgentBusy                  another agent process holds the state directory
  + SpoolError                 a spool entry is missing or damaged
"""

from __future__ import annotations

from scire_schema.protocol import PERMANENT_FAULTS


class ClientError(Exception):
    """Scire agent error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(ClientError):
    """The agent's configuration is not valid."""


class TransportError(ClientError):
    """No server could be reached; try again later."""


class RetryLater(TransportError):
    """The servers ask for a pause: an HTTP 503 with Retry-After, or an
    Unavailable fault ending "retry after N s". Nothing is wrong with the agent."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        #: The shortest pause a server asked for.
        self.seconds = seconds


class ServerFault(ClientError):
    """The server refused the call."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"server fault {code}: {message}")
        self.code = code
        self.fault_message = message

    @property
    def permanent(self) -> bool:
        """True when retrying the same call cannot help (``protocol.PERMANENT_FAULTS``)."""
        return self.code in PERMANENT_FAULTS


class EnrollmentPending(ClientError):
    """The enrollment request waits for an administrator."""


class EnrollmentRefused(ClientError):
    """The enrollment request was refused; remove the state directory's key to start over."""


class CertificateExpired(ClientError):
    """The agent's certificate has expired; renew or re-enroll."""


class AgentBusy(ClientError):
    """Another scire-client process is using this state directory."""


class SpoolError(ClientError):
    """A spool entry is missing or damaged."""
