"""The wire's XML documents: rendering, hardened parsing and the XSDs."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import pytest

from scire_schema import documents, protocol
from scire_schema.documents import JobDocument, StatusReport
from scire_schema.errors import DocumentError
from scire_server.exceptions import from_schema_error

CREATED = dt.datetime(2026, 11, 23, 10, 0, 0, 123456)
DELIVERY = uuid.UUID(int=0x1234).hex


def make_job(**changes: object) -> JobDocument:
    values: dict[str, object] = {
        "job_id": 42,
        "delivery_id": DELIVERY,
        "attempt": 1,
        "name": "backup.sh",
        "owner": "alice",
        "client": "web-17",
        "privilege": "run",
        "priority": 5,
        "timeout": 600,
        "output_limit": 65536,
        "interpreter": "/bin/sh",
        "created": CREATED,
        "script": "#!/bin/sh\necho 'a < b && c > d'\n",
    }
    values.update(changes)
    return JobDocument(**values)  # type: ignore[arg-type]


def make_status(**changes: object) -> StatusReport:
    values: dict[str, object] = {
        "job_id": 42,
        "delivery_id": DELIVERY,
        "state": "succeeded",
        "exit_code": 0,
        "started": CREATED,
        "finished": CREATED + dt.timedelta(seconds=3),
        "reason": None,
        "output": "hello\n",
        "truncated": False,
    }
    values.update(changes)
    return StatusReport(**values)  # type: ignore[arg-type]


# --- round trips ---------------------------------------------------------------


def test_job_round_trip_minimal() -> None:
    doc = make_job()
    assert documents.parse_job(documents.render_job(doc)) == doc


def test_job_round_trip_with_every_optional_field() -> None:
    doc = make_job(
        not_before=CREATED + dt.timedelta(hours=1),
        expires=CREATED + dt.timedelta(days=1),
        rerun_on_agent_crash=True,
        priority=-1000,
        attempt=3,
    )
    assert documents.parse_job(documents.render_job(doc)) == doc


def test_a_job_without_an_interpreter_leaves_the_element_out() -> None:
    """The agent then runs the script by its shebang line; an older agent's
    schema requires the element, so it refuses the document instead of
    running the script under /bin/sh."""
    doc = make_job(interpreter="", script="#!/usr/bin/env python3\nprint(1)\n")
    text = documents.render_job(doc)
    assert "interpreter" not in text
    assert documents.parse_job(text) == doc


def test_a_retried_delivery_carries_its_retry_base() -> None:
    assert "retryBase" not in documents.render_job(make_job())
    doc = make_job(attempt=3, retry_base=2)
    text = documents.render_job(doc)
    assert 'retryBase="2"' in text
    assert documents.parse_job(text) == doc


def test_job_document_is_namespaced_with_declaration() -> None:
    xml = documents.render_job(make_job())
    assert xml.startswith("<?xml version='1.0' encoding='UTF-8'?>")
    assert f'xmlns="{documents.JOB_NS}"' in xml
    assert 'id="42"' in xml and f'delivery="{DELIVERY}"' in xml


@pytest.mark.parametrize("state", [s.value for s in protocol.ReportedState])
def test_status_round_trip_every_state(state: str) -> None:
    report = make_status(state=state)
    assert documents.parse_status(documents.render_status(report)) == report


def test_status_round_trip_minimal() -> None:
    report = StatusReport(job_id=7, delivery_id=DELIVERY, state="running")
    assert documents.parse_status(documents.render_status(report)) == report


def test_status_round_trip_truncated_output_and_reason() -> None:
    report = make_status(
        state="timed_out",
        exit_code=143,
        reason="timed out after 1 s",
        output="x" * 100,
        truncated=True,
    )
    assert documents.parse_status(documents.render_status(report)) == report


def test_status_keeps_empty_output() -> None:
    parsed = documents.parse_status(documents.render_status(make_status(output="")))
    assert parsed.output == ""


def test_times_are_utc_with_z() -> None:
    aware = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert documents.format_time(aware) == "2026-11-23T10:00:00.000000Z"
    assert documents.parse_time("2026-11-23T12:00:00+02:00") == dt.datetime(2026, 11, 23, 10)
    assert documents.parse_time("2026-11-23T10:00:00Z") == dt.datetime(2026, 11, 23, 10)


# --- invalid XML characters in output ---------------------------------------------


def test_output_arrives_exact_but_nul_and_lone_surrogates() -> None:
    # Base64 carries what XML cannot (ESC, BEL, a bare CR); NUL and a lone
    # surrogate, which no database text or UTF-8 can hold, become U+FFFD.
    raw = "ok\x00nul\x1besc\x07bell\ttab\r\nline\rcr\ud800lone-surrogate"
    xml = documents.render_status(make_status(output=raw))
    assert 'encoding="base64"' in xml
    parsed = documents.parse_status(xml)
    assert parsed.output == "ok\ufffdnul\x1besc\x07bell\ttab\r\nline\rcr\ufffdlone-surrogate"


def test_script_arrives_byte_exact() -> None:
    script = "printf '\x1b[31mred\x1b[0m'\r\necho \x01\x7f\u0085 é ✓\rend\n"
    xml = documents.render_job(make_job(script=script))
    assert 'encoding="base64"' in xml and "printf" not in xml
    assert documents.parse_job(xml).script == script


def test_a_plain_script_from_an_older_writer_still_parses() -> None:
    xml = documents.render_job(make_job())
    start = xml.index("<script")
    plain = xml[:start] + "<script>echo 'a &lt; b'&#13;\n</script></job>"
    assert documents.parse_job(plain).script == "echo 'a < b'\r\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not base64!", "the script is not valid base64"),
        ("//79", "the script is not UTF-8 text"),  # bytes ff fe fd
    ],
)
def test_a_bad_base64_script_is_refused(body: str, message: str) -> None:
    xml = documents.render_job(make_job())
    start = xml.index("<script")
    bad = xml[:start] + f'<script encoding="base64">{body}</script></job>'
    with pytest.raises(DocumentError, match=message):
        documents.parse_job(bad)


def test_an_unknown_encoding_is_invalid() -> None:
    xml = documents.render_job(make_job()).replace('encoding="base64"', 'encoding="hex"')
    with pytest.raises(DocumentError, match="not valid against job.xsd"):
        documents.parse_job(xml)


def test_invalid_xml_characters_in_reason_are_replaced() -> None:
    status = documents.parse_status(documents.render_status(make_status(reason="bad\x02")))
    assert status.reason == "bad\ufffd"


def test_xml_safe_keeps_valid_text() -> None:
    text = "tab\t nl\n cr\r é ✓ \U0001f600"
    assert documents.xml_safe(text) == text


def test_long_reason_is_cut_to_the_schema_limit() -> None:
    parsed = documents.parse_status(documents.render_status(make_status(reason="r" * 5000)))
    assert parsed.reason == "r" * 1000


# --- hostile and malformed input ---------------------------------------------------


@pytest.mark.parametrize("text", ["", "<status", "not xml at all", "<a><b></a>"])
def test_malformed_xml(text: str) -> None:
    with pytest.raises(DocumentError, match="malformed XML"):
        documents.parse_status(text)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
]>
<status xmlns="urn:scire:status:1" job="1" delivery="{d}"><state>&lol2;</state></status>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE status [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<status xmlns="urn:scire:status:1" job="1" delivery="{d}"><state>failed</state>
<reason>&xxe;</reason></status>
"""

BARE_DOCTYPE = """<?xml version="1.0"?>
<!DOCTYPE status SYSTEM "http://example.invalid/status.dtd">
<status xmlns="urn:scire:status:1" job="1" delivery="{d}"><state>failed</state></status>
"""


@pytest.mark.parametrize(
    "template", [BILLION_LAUGHS, EXTERNAL_ENTITY, BARE_DOCTYPE], ids=["laughs", "xxe", "doctype"]
)
def test_doctype_and_entities_are_rejected(template: str) -> None:
    with pytest.raises(DocumentError, match="document type declarations"):
        documents.parse_status(template.format(d=DELIVERY))


def test_doctype_rejected_in_job_documents_too() -> None:
    xml = documents.render_job(make_job()).replace("?>", '?>\n<!DOCTYPE job [<!ENTITY e "x">]>', 1)
    with pytest.raises(DocumentError, match="document type declarations"):
        documents.parse_job(xml)


def test_undeclared_entity_is_malformed() -> None:
    xml = documents.render_status(make_status(reason="PLACEHOLDER")).replace("PLACEHOLDER", "&xxe;")
    with pytest.raises(DocumentError):
        documents.parse_status(xml)


def test_size_cap() -> None:
    padding = "x" * (documents.MAX_DOCUMENT_BYTES + 1)
    xml = documents.render_status(make_status(output=padding))
    assert len(xml.encode()) > documents.MAX_DOCUMENT_BYTES
    with pytest.raises(DocumentError, match="larger than"):
        documents.parse_status(xml)
    with pytest.raises(DocumentError, match="larger than"):
        documents.parse_job(xml.encode())


def test_large_output_under_the_parser_text_limit_is_accepted() -> None:
    # libxml2 without huge_tree caps one text node at 10,000,000 characters; the
    # byte cap (16 MiB) is larger, so the text limit is the one that binds here.
    output = "x" * 10_000_000
    xml = documents.render_status(make_status(output=output, truncated=True))
    assert documents.parse_status(xml).output == output


# --- schema-invalid values -----------------------------------------------------------


def _swap(xml: str, old: str, new: str) -> str:
    assert old in xml, old
    return xml.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("<priority>5</priority>", "<priority>1001</priority>"),
        ("<priority>5</priority>", "<priority>high</priority>"),
        ("<timeout>600</timeout>", "<timeout>0</timeout>"),
        ("<outputLimit>65536</outputLimit>", "<outputLimit>-1</outputLimit>"),
        ("<name>backup.sh</name>", "<name></name>"),
        ("<created>2026-11-23T10:00:00.123456Z</created>", "<created>yesterday</created>"),
        (
            "<rerunOnAgentCrash>false</rerunOnAgentCrash>",
            "<rerunOnAgentCrash>maybe</rerunOnAgentCrash>",
        ),
        (f'delivery="{DELIVERY}"', 'delivery="NOT-HEX"'),
        ('id="42"', 'id="0"'),
        ('attempt="1"', ""),
        ("<owner>alice</owner>", ""),
        ("<script ", "<unexpected/><script "),
        (f'xmlns="{documents.JOB_NS}"', 'xmlns="urn:other"'),
    ],
)
def test_schema_invalid_job(old: str, new: str) -> None:
    xml = _swap(documents.render_job(make_job()), old, new)
    with pytest.raises(DocumentError, match="not valid against job.xsd"):
        documents.parse_job(xml)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("<state>succeeded</state>", "<state>exploded</state>"),
        ("<state>succeeded</state>", "<state>pending</state>"),
        ("<state>succeeded</state>", ""),
        ("<exitCode>0</exitCode>", "<exitCode>zero</exitCode>"),
        ('truncated="false"', ""),
        ('job="42"', 'job="-1"'),
        (f'delivery="{DELIVERY}"', 'delivery="abc"'),
    ],
)
def test_schema_invalid_status(old: str, new: str) -> None:
    xml = _swap(documents.render_status(make_status()), old, new)
    with pytest.raises(DocumentError, match="not valid against status.xsd"):
        documents.parse_status(xml)


def test_status_is_not_a_job() -> None:
    with pytest.raises(DocumentError, match="job.xsd"):
        documents.parse_job(documents.render_status(make_status()))


def test_reason_over_1000_characters_is_invalid() -> None:
    xml = documents.render_status(make_status(reason="PLACEHOLDER"))
    xml = xml.replace("PLACEHOLDER", "r" * 1001)
    with pytest.raises(DocumentError, match="status.xsd"):
        documents.parse_status(xml)


def test_invalid_document_fault_code() -> None:
    with pytest.raises(DocumentError) as info:
        documents.parse_status("<")
    fault = from_schema_error(info.value)  # how the server answers it
    assert fault.code == 5
    assert re.search(r"malformed XML: .+", fault.message)
