"""XML-RPC on the wire, hardened: request parsing, answer marshalling, and the
adapter between the listener and a method dispatcher.

Requests are parsed here, not by ``xmlrpc.client.loads``: the stdlib parser
accepts DTDs and expands internal entities, recurses without bound in the
objects it builds, takes ``int()`` of anything (Unicode digits, any size), and
fails with Python exception text. This parser runs expat with every DOCTYPE
refused (so no entity is ever declared, let alone expanded), checks the
XML-RPC grammar element by element, bounds the nesting depth and the element
count, range-checks integers (``i4``/``int`` 32-bit, ``i8`` 64-bit), and
accepts only ``0``/``1`` booleans, finite doubles, strict base64 and
``dateTime.iso8601``. Every failure is one :class:`MalformedRequest` carrying
fault code 12 and a short message that names what was wrong; a value it echoes
is cut to :data:`MAX_ECHO` characters.

Answers are marshalled by the stdlib (``xmlrpc.client.dumps(...,
methodresponse=True, allow_none=True)``), with two fixes: a carriage return is
sent as ``&#13;`` (a raw one becomes a line feed in the receiver's XML
parser), and a character XML 1.0 cannot carry at all is refused
(:class:`AnswerError`) instead of sent as a document the caller cannot parse.

Values parsed: ``int`` (``i4``, ``int``, ``i8``), ``bool``, ``float``
(``double``), ``str`` (``string`` or untyped), ``bytes`` (``base64``),
``datetime.datetime`` (naive, ``dateTime.iso8601``), ``None`` (``nil``),
``list`` (``array``), ``dict`` (``struct``; a repeated member name is refused).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime as dt
import logging
import math
import re
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from xml.parsers import expat

from scire_schema.listener import NoiseLog, Request, Response
from scire_schema.protocol import FaultCode

log = logging.getLogger(__name__)

#: Fault codes (``scire_schema.protocol.FaultCode``) of a parse or type failure
#: and of an unexpected failure (details only in the server log).
MALFORMED_REQUEST = FaultCode.MALFORMED_REQUEST.value
INTERNAL_ERROR = FaultCode.INTERNAL.value
INTERNAL_ERROR_MESSAGE = "internal error; see the server log"

MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_DEPTH = 64  # elements, root included: about 20 nested arrays or structs
MAX_ELEMENTS = 250_000
MAX_METHOD_NAME = 128  # characters
MAX_ECHO = 60  # characters of a caller's value quoted in a message
MAX_MESSAGE = 200  # characters of a MalformedRequest message
MAX_FAULT_STRING = 1000  # characters of any fault string sent

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

_SCALARS = frozenset(
    {"i4", "int", "i8", "boolean", "double", "string", "base64", "dateTime.iso8601", "nil"}
)
_CHILDREN: dict[str | None, frozenset[str]] = {
    None: frozenset({"methodCall"}),
    "methodCall": frozenset({"methodName", "params"}),
    "params": frozenset({"param"}),
    "param": frozenset({"value"}),
    "value": _SCALARS | {"array", "struct"},
    "array": frozenset({"data"}),
    "data": frozenset({"value"}),
    "struct": frozenset({"member"}),
    "member": frozenset({"name", "value"}),
}
#: Elements whose text is content; elsewhere only whitespace may stand between tags.
_TEXT = _SCALARS | {"methodName", "name", "value"}
_WHITESPACE = " \t\r\n"
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")
_DOUBLE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
_DATETIME = re.compile(r"([0-9]{4})-?([0-9]{2})-?([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})")
_METHOD_NAME = re.compile(r"[A-Za-z0-9_.:/]+")
_UTF8_SLICE = 64 * 1024
_BASE64_SPACE = re.compile(r"[ \t\r\n]+")
#: Characters XML 1.0 cannot carry, not even as character references.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


class MalformedRequest(Exception):
    """The request is not a well-formed, bounded XML-RPC call (fault 12)."""

    code = MALFORMED_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(_cut(message, MAX_MESSAGE))

    @property
    def message(self) -> str:
        return str(self.args[0])


class AnswerError(ValueError):
    """An answer cannot be marshalled as XML-RPC."""


class RPCCall(NamedTuple):
    """A parsed call."""

    method: str
    params: tuple[Any, ...]


@dataclass(frozen=True)
class WireLimits:
    """Bounds on one request; the defaults are the module constants."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_depth: int = MAX_DEPTH
    max_elements: int = MAX_ELEMENTS

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_depth", "max_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


def shorten(value: object, limit: int = MAX_ECHO) -> str:
    """A caller's value fit to quote in a message or a log line: at most
    ``limit`` characters of it, control characters escaped, and its length
    when it was cut. Never expensive, whatever the value's size."""
    if isinstance(value, bytes):
        text = value[: limit * 4].decode("utf-8", "replace")
        size = len(value)
        unit = "bytes"
    elif isinstance(value, str):
        text, size, unit = value, len(value), "characters"
    elif isinstance(value, list | tuple | dict | set):
        return f"<{type(value).__name__} of {len(value)} items>"
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<integer of {value.bit_length()} bits>"
    else:
        text = repr(value)[: limit + 1]
        return text if len(text) <= limit else text[:limit] + "..."
    shown = repr(text[:limit])
    if size > limit or len(text) > limit:
        shown += f"... ({size} {unit})"
    return shown


def _cut(text: str, limit: int) -> str:
    """``text`` at most ``limit`` characters long, saying so when cut, and
    with what XML cannot carry replaced, so it always marshals."""
    text = _NOT_XML.sub("?", text[: limit + 1])
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# Parsing.


class _Frame:
    __slots__ = ("tag", "text", "items", "value", "typed", "name", "seen")

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.text: list[str] = []
        self.items: list[Any] = []  # params' params, data's values, struct's members
        self.value: Any = None  # a value's typed content, a member's value
        self.typed = False  # a value: its content came in a type element; a member: has its value
        self.name: str | None = None  # a member's name; methodCall's method name
        self.seen: set[str] = set()  # children seen, for the ones allowed once


class _CallParser:
    """Expat callbacks that check the XML-RPC grammar and build the values."""

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self.stack: list[_Frame] = []
        self.elements = 0
        self.call: RPCCall | None = None
        self.method: str | None = None

    def start(self, tag: str, attrs: Any) -> None:
        self.elements += 1
        if self.elements > self.limits.max_elements:
            raise MalformedRequest(f"more than {self.limits.max_elements} elements")
        if len(self.stack) >= self.limits.max_depth:
            raise MalformedRequest(f"nesting deeper than {self.limits.max_depth} elements")
        if ":" in tag:
            # Apache's extension types arrive with a namespace prefix (ex:i8, ex:nil).
            local = tag.rpartition(":")[2]
            if local in ("i8", "nil"):
                tag = local
        parent = self.stack[-1] if self.stack else None
        parent_tag = parent.tag if parent else None
        allowed = _CHILDREN.get(parent_tag, frozenset())
        if tag not in allowed:
            where = f"in <{parent_tag}>" if parent_tag else "as the root element"
            shown = tag if len(tag) <= 40 else tag[:40] + "..."
            raise MalformedRequest(f"unexpected element <{shown}> {where}")
        if parent is not None:
            self._check_order(parent, tag)
            parent.seen.add(tag)
        self.stack.append(_Frame(tag))

    def _check_order(self, parent: _Frame, tag: str) -> None:
        seen = parent.seen
        if parent.tag == "methodCall":
            if tag in seen:
                raise MalformedRequest(f"more than one <{tag}> in <methodCall>")
            if tag == "params" and "methodName" not in seen:
                raise MalformedRequest("<params> before <methodName>")
        elif parent.tag in ("param", "array") and seen:
            raise MalformedRequest(f"more than one child in <{parent.tag}>")
        elif parent.tag == "value":
            if seen:
                raise MalformedRequest("more than one type in one <value>")
            if "".join(parent.text).strip(_WHITESPACE):
                raise MalformedRequest("text and a type element mixed in one <value>")
        elif parent.tag == "member":
            if tag in seen:
                raise MalformedRequest(f"more than one <{tag}> in <member>")
            if tag == "value" and "name" not in seen:
                raise MalformedRequest("<value> before <name> in <member>")

    def data(self, text: str) -> None:
        frame = self.stack[-1] if self.stack else None
        if frame is None:
            return  # expat reports nothing but whitespace outside the root
        if frame.tag in _TEXT and not (frame.tag == "value" and frame.seen):
            frame.text.append(text)
        elif text.strip(_WHITESPACE):
            raise MalformedRequest(f"text not allowed in <{frame.tag}>")

    def end(self, _tag: str) -> None:
        frame = self.stack.pop()
        parent = self.stack[-1] if self.stack else None
        tag = frame.tag
        if tag in _SCALARS:
            assert parent is not None
            parent.value = _scalar(tag, "".join(frame.text))
            parent.typed = True
        elif tag == "value":
            value = frame.value if frame.typed else "".join(frame.text)
            assert parent is not None
            if parent.tag == "member":
                parent.value = value
                parent.typed = True
            else:
                parent.items.append(value)
        elif tag == "data":
            assert parent is not None
            parent.value = frame.items
            parent.typed = True
        elif tag == "array":
            assert parent is not None
            if not frame.typed:
                raise MalformedRequest("<array> without <data>")
            parent.value = frame.value
            parent.typed = True
        elif tag == "name":
            assert parent is not None
            parent.name = "".join(frame.text)
        elif tag == "member":
            assert parent is not None
            if frame.name is None or not frame.typed:
                raise MalformedRequest("<member> needs a <name> and a <value>")
            parent.items.append((frame.name, frame.value))
        elif tag == "struct":
            assert parent is not None
            members: dict[str, Any] = {}
            for name, value in frame.items:
                if name in members:
                    raise MalformedRequest(f"struct member {shorten(name)} given twice")
                members[name] = value
            parent.value = members
            parent.typed = True
        elif tag == "param":
            assert parent is not None
            if not frame.items:
                raise MalformedRequest("<param> without <value>")
            parent.items.append(frame.items[0])
        elif tag == "params":
            assert parent is not None
            parent.items = frame.items
        elif tag == "methodName":
            name = "".join(frame.text)
            if len(name) > MAX_METHOD_NAME or not _METHOD_NAME.fullmatch(name):
                raise MalformedRequest(f"bad method name {shorten(name)}")
            assert parent is not None
            parent.name = name
        elif tag == "methodCall":
            if frame.name is None:
                raise MalformedRequest("<methodCall> without <methodName>")
            self.call = RPCCall(frame.name, tuple(frame.items))

    def refuse_doctype(self, *_args: Any) -> None:
        raise MalformedRequest("DOCTYPE declarations are not allowed")

    def refuse_entity(self, *_args: Any) -> int:
        raise MalformedRequest("entity declarations are not allowed")

    def refuse_instruction(self, *_args: Any) -> None:
        raise MalformedRequest("processing instructions are not allowed")


def _scalar(tag: str, text: str) -> Any:
    """The value of one scalar element, checked strictly."""
    if tag == "string":
        return text
    if tag in ("i4", "int", "i8"):
        digits = text.strip(_WHITESPACE)
        if not _INTEGER.fullmatch(digits):
            raise MalformedRequest(f"<{tag}> is not an integer: {shorten(text)}")
        number = int(digits)
        low, high = INT64 if tag == "i8" else INT32
        if not low <= number <= high:
            bits = 64 if tag == "i8" else 32
            raise MalformedRequest(f"<{tag}> out of the {bits}-bit range: {shorten(digits)}")
        return number
    if tag == "boolean":
        flag = text.strip(_WHITESPACE)
        if flag not in ("0", "1"):
            raise MalformedRequest(f"<boolean> must be 0 or 1, not {shorten(text)}")
        return flag == "1"
    if tag == "double":
        number_text = text.strip(_WHITESPACE)
        if len(number_text) > 400 or not _DOUBLE.fullmatch(number_text):
            raise MalformedRequest(f"<double> is not a number: {shorten(text)}")
        real = float(number_text)
        if not math.isfinite(real):
            raise MalformedRequest(f"<double> out of range: {shorten(number_text)}")
        return real
    if tag == "base64":
        try:
            return base64.b64decode(_BASE64_SPACE.sub("", text), validate=True)
        except (binascii.Error, ValueError):
            raise MalformedRequest("<base64> is not valid base64") from None
    if tag == "dateTime.iso8601":
        match = _DATETIME.fullmatch(text.strip(_WHITESPACE))
        try:
            if match is None:
                raise ValueError
            year, month, day, hour, minute, second = (int(part) for part in match.groups())
            return dt.datetime(year, month, day, hour, minute, second)
        except ValueError:
            raise MalformedRequest(f"<dateTime.iso8601> is not a time: {shorten(text)}") from None
    # nil
    if text.strip(_WHITESPACE):
        raise MalformedRequest("<nil> must be empty")
    return None


def _check_utf8(body: bytes) -> None:
    """Refuse a body that is not UTF-8, in slices, so no copy of it is made."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(body)
    offset = 0
    try:
        for offset in range(0, len(body), _UTF8_SLICE):
            decoder.decode(view[offset : offset + _UTF8_SLICE])
        offset = len(body)
        decoder.decode(b"", True)
    except UnicodeDecodeError as exc:
        # The position is within the slice (and the bytes the decoder held back).
        where = max(0, offset - len(decoder.getstate()[0])) + exc.start
        raise MalformedRequest(f"request body is not valid UTF-8 (byte {where})") from None


def parse_call(body: bytes, limits: WireLimits | None = None) -> RPCCall:
    """Parse one XML-RPC ``methodCall``. Raises :class:`MalformedRequest`
    (and nothing else) when the body is not a bounded, well-formed call."""
    limits = limits or WireLimits()
    if not body:
        raise MalformedRequest("empty request body")
    if len(body) > limits.max_body_bytes:
        raise MalformedRequest(f"request body over {limits.max_body_bytes} bytes")
    _check_utf8(body)
    target = _CallParser(limits)
    parser = expat.ParserCreate(encoding="UTF-8")
    parser.buffer_text = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = target.refuse_doctype
    parser.EntityDeclHandler = target.refuse_entity
    parser.UnparsedEntityDeclHandler = target.refuse_entity
    parser.ExternalEntityRefHandler = target.refuse_entity
    parser.ProcessingInstructionHandler = target.refuse_instruction
    parser.StartElementHandler = target.start
    parser.EndElementHandler = target.end
    parser.CharacterDataHandler = target.data
    try:
        parser.Parse(body, True)
    except MalformedRequest:
        raise
    except expat.ExpatError as exc:
        reason = expat.ErrorString(exc.code) or "syntax error"
        raise MalformedRequest(
            f"not well-formed XML: {reason} at line {exc.lineno}, column {exc.offset}"
        ) from None
    except MemoryError:
        raise
    except Exception:
        # A failure the checks above did not foresee is a bug here; the caller
        # still gets the one error type, and the log gets the details.
        log.exception("XML-RPC request parser failed unexpectedly")
        raise MalformedRequest("request could not be parsed") from None
    if target.call is None:
        raise MalformedRequest("no <methodCall> in the request")
    return target.call


# Marshalling.


def marshal_result(value: Any) -> bytes:
    """A ``methodResponse`` carrying ``value``. Raises :class:`AnswerError` for
    a value XML-RPC cannot carry (an int over 32 bits, a control character,
    an unknown type)."""
    try:
        text = xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True, encoding="utf-8")
    except (TypeError, OverflowError, ValueError, RecursionError) as exc:
        raise AnswerError(f"the answer cannot be marshalled: {exc}") from None
    return _encode(text)


def marshal_fault(code: int, message: str) -> bytes:
    """A ``methodResponse`` carrying a fault; the message is cut to
    :data:`MAX_FAULT_STRING` characters and always marshals."""
    fault = xmlrpc.client.Fault(code, _cut(message, MAX_FAULT_STRING))
    text = xmlrpc.client.dumps(fault, methodresponse=True, allow_none=True, encoding="utf-8")
    return _encode(text)


def _encode(text: str) -> bytes:
    bad = _NOT_XML.search(text)
    if bad is not None:
        raise AnswerError(
            f"the answer holds U+{ord(bad.group()):04X}, which XML cannot carry; "
            "send such data as base64"
        )
    # dumps writes only "\n" between tags, so every "\r" is content.
    return text.replace("\r", "&#13;").encode("utf-8")


# The adapter between the listener and a dispatcher.


@dataclass(frozen=True)
class Call:
    """What a dispatcher gets: the parsed call and who made it."""

    method: str
    params: tuple[Any, ...]
    request: Request

    @property
    def peer(self) -> tuple[str, int]:
        return self.request.peer

    @property
    def peer_cert_der(self) -> bytes | None:
        return self.request.peer_cert_der

    @property
    def peer_fingerprint(self) -> str | None:
        return self.request.peer_fingerprint


Dispatcher = Callable[[Call], Any]
#: Answers a call from memory: (True, result), or (False, None) for "not here".
QuickDispatcher = Callable[[Call], tuple[bool, Any]]
_XML_HEADERS = (("Content-Type", "text/xml; charset=utf-8"),)


class XMLRPCApp:
    """A listener handler: XML-RPC calls by ``POST`` to one of ``paths`` go to
    ``dispatch``; everything else goes to ``fallback`` (``/healthz``,
    ``/metrics``), or is answered 404/405 without one.

    ``dispatch(call)`` returns the result, or raises ``xmlrpc.client.Fault``
    (sent as it is, its string cut) or :class:`MalformedRequest` (fault 12).
    Anything else it raises is logged once with its traceback and answered
    fault 99, "internal error; see the server log".
    """

    def __init__(
        self,
        dispatch: Dispatcher,
        *,
        limits: WireLimits | None = None,
        fallback: Callable[[Request], Response] | None = None,
        paths: tuple[str, ...] = ("/", "/RPC2"),
        quick_dispatch: QuickDispatcher | None = None,
        quick_methods: tuple[str, ...] = (),
    ) -> None:
        """``quick_dispatch`` may answer calls of ``quick_methods`` on the
        listener's event loop (:meth:`quick`); it must never block."""
        self.dispatch = dispatch
        self.quick_dispatch = quick_dispatch
        self._quick_markers = tuple(
            f"<methodName>{name}</methodName>".encode() for name in quick_methods
        )
        self.limits = limits or WireLimits()
        self.fallback = fallback
        self.paths = paths
        self.noise = NoiseLog(log)

    def __call__(self, request: Request) -> Response:
        if request.path not in self.paths or request.method != "POST":
            if self.fallback is not None:
                return self.fallback(request)
            if request.path not in self.paths:
                return Response(404, (("Content-Type", "text/plain"),), b"not found\n")
            return Response(
                405, (("Allow", "POST"), ("Content-Type", "text/plain")), b"POST only\n"
            )
        host, port = request.peer
        try:
            call = parse_call(request.body, self.limits)
        except MalformedRequest as exc:
            self.noise.log(
                logging.INFO,
                "malformed request",
                "malformed XML-RPC request from %s:%d: %s",
                host,
                port,
                exc.message,
            )
            return _fault_response(exc.code, exc.message)
        try:
            result = self.dispatch(Call(call.method, call.params, request))
        except xmlrpc.client.Fault as fault:
            code = fault.faultCode
            if isinstance(code, int) and INT32[0] <= code <= INT32[1]:
                return _fault_response(code, str(fault.faultString))
            log.error(
                "%s from %s:%d: dispatcher raised a fault with code %r",
                call.method,
                host,
                port,
                shorten(code),
            )
            return _fault_response(INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE)
        except MalformedRequest as exc:
            return _fault_response(exc.code, exc.message)
        except Exception:
            log.exception("%s from %s:%d failed", call.method, host, port)
            return _fault_response(INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE)
        try:
            body = marshal_result(result)
        except AnswerError as exc:
            log.error("%s from %s:%d: %s", call.method, host, port, exc)
            return _fault_response(INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE)
        return Response(200, _XML_HEADERS, body)

    def quick(self, request: Request) -> Response | None:
        """The answer ``quick_dispatch`` gives from memory, or None: then the
        worker pool handles the request as any other (and logs what is wrong
        with it, if anything is)."""
        if (
            self.quick_dispatch is None
            or request.method != "POST"
            or request.path not in self.paths
            or not any(marker in request.body for marker in self._quick_markers)
        ):
            return None
        try:
            call = parse_call(request.body, self.limits)
            handled, result = self.quick_dispatch(Call(call.method, call.params, request))
            if not handled:
                return None
            return Response(200, _XML_HEADERS, marshal_result(result))
        except (MalformedRequest, AnswerError, xmlrpc.client.Fault):
            return None


def _fault_response(code: int, message: str) -> Response:
    return Response(200, _XML_HEADERS, marshal_fault(code, message))
