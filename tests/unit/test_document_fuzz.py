"""Property-based fuzzing of the job and status document parsers: whatever the
input, ``parse_job`` and ``parse_status`` return a document or raise
``DocumentError``, never anything else."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scire_schema import documents
from scire_schema.documents import JobDocument, StatusReport
from scire_schema.errors import DocumentError

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PARSERS = [documents.parse_job, documents.parse_status]

JOB = documents.render_job(
    JobDocument(
        job_id=7,
        delivery_id="0123456789abcdef0123456789abcdef",
        attempt=1,
        name="backup",
        owner="alice",
        client="web-17",
        privilege="run",
        priority=0,
        timeout=60,
        output_limit=65536,
        interpreter="/bin/sh",
        created=dt.datetime(2024, 1, 2, 3, 4, 5),
        not_before=dt.datetime(2024, 1, 2, 3, 4, 6),
        expires=dt.datetime(2024, 1, 3),
        rerun_on_agent_crash=False,
        script="echo hello\n",
    )
)
STATUS = documents.render_status(
    StatusReport(
        job_id=7,
        delivery_id="0123456789abcdef0123456789abcdef",
        state="succeeded",
        exit_code=0,
        started=dt.datetime(2024, 1, 2, 3, 4, 5),
        finished=dt.datetime(2024, 1, 2, 3, 4, 6),
        reason="done",
        output="hello\n",
    )
)

TOKENS = [
    "<!DOCTYPE job>",
    '<!ENTITY a "b">',
    "&a;",
    "&amp;",
    "&#0;",
    "&#27;",
    '<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="/etc/passwd"/>',
    "<![CDATA[x]]>",
    "<?pi?>",
    "<!-- c -->",
    "<state>",
    "</state>",
    "<exitCode>",
    "</exitCode>",
    "<output truncated='true'>",
    "</output>",
    "<priority>",
    "</priority>",
    "<script>",
    "</script>",
    'xmlns="urn:scire:job:1"',
    'xmlns="urn:scire:status:1"',
    'job="1"',
    'id="99999999999999999999999"',
    "-1",
    "0",
    "2147483648",
    "succeeded",
    "running",
    "true",
    "\x00",
    "\x1b",
    "\u00e9",
    "<",
    ">",
    "/",
    '"',
    " ",
]


def parses_or_refuses(parser: object, data: str | bytes) -> None:
    assert callable(parser)
    try:
        parser(data)
    except DocumentError:
        pass


@pytest.mark.parametrize("parser", PARSERS, ids=["job", "status"])
@settings(FUZZ)
@given(data=st.binary(max_size=2000) | st.text(max_size=500))
def test_fuzz_arbitrary_input(parser: object, data: str | bytes) -> None:
    parses_or_refuses(parser, data)


@pytest.mark.parametrize(
    ("parser", "document"),
    [(documents.parse_job, JOB), (documents.parse_status, STATUS)],
    ids=["job", "status"],
)
@settings(FUZZ)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, 5000),
            st.integers(0, 20),
            st.sampled_from(TOKENS) | st.text(max_size=4),
        ),
        min_size=1,
        max_size=4,
    ),
    as_bytes=st.booleans(),
)
def test_fuzz_mutated_documents(
    parser: object, document: str, edits: list[tuple[int, int, str]], as_bytes: bool
) -> None:
    text = document
    for position, cut, insert in edits:
        at = position % (len(text) + 1)
        text = text[:at] + insert + text[at + cut :]
    parses_or_refuses(parser, text.encode("utf-8", "surrogatepass") if as_bytes else text)


@settings(FUZZ)
@given(
    job_id=st.integers(-(2**70), 2**70),
    state=st.text(max_size=20),
    exit_code=st.integers(-(2**40), 2**40),
    reason=st.text(max_size=50),
    output=st.text(max_size=200),
    started=st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)),
)
def test_fuzz_status_fields(
    job_id: int, state: str, exit_code: int, reason: str, output: str, started: dt.datetime
) -> None:
    """Field values the schema may or may not accept, in a well-formed document."""
    xml = (
        "<?xml version='1.0' encoding='UTF-8'?>\n"
        f'<status xmlns="urn:scire:status:1" job="{job_id}" delivery="{"0" * 32}">'
        f"<state>{documents.xml_safe(state).replace('&', '&amp;').replace('<', '&lt;')}</state>"
        f"<exitCode>{exit_code}</exitCode>"
        f"<started>{started.isoformat()}Z</started>"
        f"<reason>{documents.xml_safe(reason).replace('&', '&amp;').replace('<', '&lt;')}</reason>"
        f"<output truncated='false'>{documents.xml_safe(output).replace('&', '&amp;').replace('<', '&lt;')}</output>"
        "</status>"
    )
    parses_or_refuses(documents.parse_status, xml)


@pytest.mark.parametrize(
    "when",
    [
        "2024-01-01T24:00:00Z",
        "10000-01-01T00:00:00Z",
        "-0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:00:00-05:00",
    ],
)
@pytest.mark.parametrize("kind", ["job", "status"])
def test_times_datetime_cannot_hold_are_document_errors(kind: str, when: str) -> None:
    if kind == "job":
        text = JOB.replace("2024-01-02T03:04:05.000000Z", when)
        parser = documents.parse_job
    else:
        text = STATUS.replace("2024-01-02T03:04:05.000000Z", when)
        parser = documents.parse_status
    assert when in text
    with pytest.raises(DocumentError):
        parser(text)


@pytest.mark.parametrize("parser", PARSERS, ids=["job", "status"])
def test_a_lone_surrogate_is_a_document_error(parser: object) -> None:
    assert callable(parser)
    with pytest.raises(DocumentError):
        parser("\ud800" + STATUS)
