"""Errors of the shared contract: what a document, a certificate or a key can be
wrong with. Neither program lets them through; each maps them at its own
boundary (the server to its faults, the agent to its ``ClientError``s).

* SchemaError                  base; its docstring is the default message
  + DocumentError              malformed, hostile or schema-invalid XML
  + CertificateError           not a PEM certificate, request or key Scire can use
"""

from __future__ import annotations


class SchemaError(Exception):
    """The data does not follow the Scire contract."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class DocumentError(SchemaError):
    """The XML document is malformed or does not match its schema."""


class CertificateError(SchemaError):
    """The certificate, certificate request or key is not valid."""
