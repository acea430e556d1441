"""The XML documents of the wire: job files (server -> agent) and status reports
(agent -> server), built and parsed here only, and checked against the XSDs in
``schema/``.

Both programs use this module. Parsing is hardened: no DTDs, no entities, no
network, bounded size; a document either matches its schema or raises
``errors.DocumentError`` with the reason.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import importlib.resources
import re
import threading
from dataclasses import dataclass

from lxml import etree

from scire_schema.errors import DocumentError
from scire_schema.protocol import format_time, parse_time

JOB_NS = "urn:scire:job:1"
STATUS_NS = "urn:scire:status:1"
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024

#: The ``encoding`` attribute of a ``script`` or ``output`` carried as base64.
BASE64 = "base64"

# Characters XML 1.0 cannot carry; short texts (a reason) have them replaced.
_NOT_XML_CHAR = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

# A lone surrogate (text decoded with surrogateescape) has no UTF-8 encoding.
_SURROGATE = re.compile("[\ud800-\udfff]")


def xml_safe(text: str) -> str:
    """``text`` with every character XML 1.0 cannot carry replaced by U+FFFD."""
    return _NOT_XML_CHAR.sub("\ufffd", text)


def without_nul(text: str) -> str:
    """``text`` with U+0000 replaced by U+FFFD: PostgreSQL's text cannot hold it."""
    return text.replace("\x00", "\ufffd")


@dataclass(frozen=True)
class JobDocument:
    job_id: int
    delivery_id: str
    attempt: int
    name: str
    owner: str
    client: str
    privilege: str
    priority: int
    timeout: int
    output_limit: int
    interpreter: str
    created: dt.datetime
    script: str
    not_before: dt.datetime | None = None
    expires: dt.datetime | None = None
    rerun_on_agent_crash: bool = False
    #: The delivery count when an operator last retried this host (``job
    #: retry``), 0 when never: a spooled run of the same job with a lower one
    #: ended, and this delivery is a new run, not a repeat of it.
    retry_base: int = 0


@dataclass(frozen=True)
class StatusReport:
    job_id: int
    delivery_id: str
    state: str
    exit_code: int | None = None
    started: dt.datetime | None = None
    finished: dt.datetime | None = None
    reason: str | None = None
    output: str | None = None
    truncated: bool = False


_SCHEMA_LOCK = threading.Lock()
_THREAD = threading.local()


def _schema(name: str) -> etree.XMLSchema:
    # An XMLSchema keeps the errors of its last validation on itself, so each
    # thread validates with its own. They are compiled under a lock: libxml2
    # sets up its built-in types on the first compile, and two threads doing
    # that at once (the first reports after a start) can break every later
    # compile in the process.
    schemas: dict[str, etree.XMLSchema] = _THREAD.__dict__.setdefault("schemas", {})
    if name not in schemas:
        with _SCHEMA_LOCK:
            schemas[name] = etree.XMLSchema(etree.fromstring(_schema_source(name), _parser()))
    return schemas[name]


@functools.cache
def _schema_source(name: str) -> bytes:
    return importlib.resources.files("scire_schema").joinpath(name).read_bytes()


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        # libxml2's own cap (10 MB per text node) would refuse outputs the
        # output limit allows; MAX_DOCUMENT_BYTES bounds the size instead.
        huge_tree=True,
        remove_blank_text=False,
    )


def _parse(text: str | bytes, schema_name: str) -> etree._Element:
    try:
        data = text.encode("utf-8") if isinstance(text, str) else text
    except UnicodeEncodeError as exc:
        raise DocumentError(f"not encodable as UTF-8 at character {exc.start}") from exc
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise DocumentError("document type declarations and entities are not allowed")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise DocumentError(f"malformed XML: {exc}") from exc
    schema = _schema(schema_name)
    if not schema.validate(root):
        error = schema.error_log.last_error
        raise DocumentError(f"not valid against {schema_name}: line {error.line}: {error.message}")
    return root


def _sub(parent: etree._Element, ns: str, tag: str, text: str) -> etree._Element:
    element = etree.SubElement(parent, f"{{{ns}}}{tag}")
    element.text = text
    return element


def _sub_base64(parent: etree._Element, ns: str, tag: str, text: str) -> etree._Element:
    # XML normalises line ends (a bare \r arrives as \n) and cannot carry most
    # C0 controls at all (ESC, as in ANSI colours), so scripts and outputs
    # travel as base64 of their UTF-8 bytes and arrive byte-exact.
    data = _SURROGATE.sub("\ufffd", text).encode("utf-8")
    element = _sub(parent, ns, tag, base64.b64encode(data).decode("ascii"))
    element.set("encoding", BASE64)
    return element


def _decoded(element: etree._Element, what: str) -> str:
    """The text of ``element``, decoded when it says ``encoding="base64"``
    (the schema allows no other value); plain text is what older writers sent."""
    text = element.text or ""
    if element.get("encoding") != BASE64:
        return text
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except ValueError as exc:  # binascii.Error, or a character that is not ASCII
        raise DocumentError(f"{what} is not valid base64: {exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{what} is not UTF-8 text: {exc}") from exc


def _bool(value: bool) -> str:
    return "true" if value else "false"


def render_job(doc: JobDocument) -> str:
    root = etree.Element(f"{{{JOB_NS}}}job", nsmap={None: JOB_NS})
    root.set("id", str(doc.job_id))
    root.set("delivery", doc.delivery_id)
    root.set("attempt", str(doc.attempt))
    # Only on a retried host's delivery: an agent older than the attribute
    # refuses that document rather than answer it with the old run's result.
    if doc.retry_base:
        root.set("retryBase", str(doc.retry_base))
    for tag, value in (
        ("name", doc.name),
        ("owner", doc.owner),
        ("client", doc.client),
        ("privilege", doc.privilege),
        ("priority", str(doc.priority)),
        ("timeout", str(doc.timeout)),
        ("outputLimit", str(doc.output_limit)),
        ("interpreter", doc.interpreter),
        ("created", format_time(doc.created)),
    ):
        # No interpreter: run the script by its shebang line. Left out rather
        # than empty, so an agent older than that refuses the document (its
        # schema requires the element) instead of running the script under /bin/sh.
        if tag != "interpreter" or value:
            _sub(root, JOB_NS, tag, value)
    if doc.not_before is not None:
        _sub(root, JOB_NS, "notBefore", format_time(doc.not_before))
    if doc.expires is not None:
        _sub(root, JOB_NS, "expires", format_time(doc.expires))
    _sub(root, JOB_NS, "rerunOnAgentCrash", _bool(doc.rerun_on_agent_crash))
    _sub_base64(root, JOB_NS, "script", doc.script)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8").decode("utf-8")


def _text(root: etree._Element, ns: str, tag: str) -> str | None:
    element = root.find(f"{{{ns}}}{tag}")
    if element is None:
        return None
    return element.text or ""


def _time(value: str, tag: str) -> dt.datetime:
    """A wire time; the schema's dateTime is wider than what ``datetime`` holds."""
    try:
        return parse_time(value)
    except ValueError as exc:
        raise DocumentError(f"{tag}: {exc}") from exc


def parse_job(text: str | bytes) -> JobDocument:
    root = _parse(text, "job.xsd")

    def req(tag: str) -> str:
        value = _text(root, JOB_NS, tag)
        assert value is not None  # the schema requires it
        return value

    def opt_time(tag: str) -> dt.datetime | None:
        value = _text(root, JOB_NS, tag)
        return _time(value, tag) if value else None

    return JobDocument(
        job_id=int(root.get("id")),
        delivery_id=root.get("delivery"),
        attempt=int(root.get("attempt")),
        name=req("name"),
        owner=req("owner"),
        client=req("client"),
        privilege=req("privilege"),
        priority=int(req("priority")),
        timeout=int(req("timeout")),
        output_limit=int(req("outputLimit")),
        interpreter=_text(root, JOB_NS, "interpreter") or "",
        created=_time(req("created"), "created"),
        not_before=opt_time("notBefore"),
        expires=opt_time("expires"),
        rerun_on_agent_crash=req("rerunOnAgentCrash").strip() in ("true", "1"),
        script=_decoded(root.find(f"{{{JOB_NS}}}script"), "the script"),
        retry_base=int(root.get("retryBase", "0")),
    )


def render_status(report: StatusReport) -> str:
    root = etree.Element(f"{{{STATUS_NS}}}status", nsmap={None: STATUS_NS})
    root.set("job", str(report.job_id))
    root.set("delivery", report.delivery_id)
    _sub(root, STATUS_NS, "state", report.state)
    if report.exit_code is not None:
        _sub(root, STATUS_NS, "exitCode", str(report.exit_code))
    if report.started is not None:
        _sub(root, STATUS_NS, "started", format_time(report.started))
    if report.finished is not None:
        _sub(root, STATUS_NS, "finished", format_time(report.finished))
    if report.reason is not None:
        _sub(root, STATUS_NS, "reason", xml_safe(report.reason)[:1000])
    if report.output is not None:
        output = _sub_base64(root, STATUS_NS, "output", without_nul(report.output))
        output.set("truncated", _bool(report.truncated))
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8").decode("utf-8")


def parse_status(text: str | bytes) -> StatusReport:
    root = _parse(text, "status.xsd")
    output = root.find(f"{{{STATUS_NS}}}output")
    exit_code = _text(root, STATUS_NS, "exitCode")
    started = _text(root, STATUS_NS, "started")
    finished = _text(root, STATUS_NS, "finished")
    return StatusReport(
        job_id=int(root.get("job")),
        delivery_id=root.get("delivery"),
        state=(_text(root, STATUS_NS, "state") or "").strip(),
        exit_code=int(exit_code) if exit_code is not None else None,
        started=_time(started, "started") if started else None,
        finished=_time(finished, "finished") if finished else None,
        reason=_text(root, STATUS_NS, "reason"),
        output=without_nul(_decoded(output, "the output")) if output is not None else None,
        truncated=output is not None and output.get("truncated") in ("true", "1"),
    )
