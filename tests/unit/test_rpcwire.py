"""Hardened XML-RPC parsing and marshalling (``scire_schema.rpcwire``): hostile
and malformed requests end in one error type with fault code 12 and a short
message, never in Python's exception text, a RecursionError or a memory blow-up."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import tracemalloc
import xmlrpc.client
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scire_schema import rpcwire
from scire_schema.listener import Request, Response
from scire_schema.rpcwire import (
    MALFORMED_REQUEST,
    AnswerError,
    Call,
    MalformedRequest,
    WireLimits,
    XMLRPCApp,
    marshal_fault,
    marshal_result,
    parse_call,
    shorten,
)

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: Peak memory a hostile request may cost the parser; the stdlib parser took
#: about 196 MiB for 200,000 nested arrays.
SMALL = 8 * 1024 * 1024
#: What Python's own exception text looks like; no message may carry it.
LEAKS = re.compile(
    r"Traceback|[A-Z][A-Za-z]*(Error|Exception)\b|<class|File \"|invalid literal|codec can't"
)


def call_xml(params: str, method: str = "agent.poll") -> bytes:
    return (
        f"<?xml version='1.0'?><methodCall><methodName>{method}</methodName>"
        f"<params>{params}</params></methodCall>"
    ).encode()


def one(value_xml: str) -> bytes:
    return call_xml(f"<param><value>{value_xml}</value></param>")


def refused(body: bytes, limits: WireLimits | None = None) -> str:
    with pytest.raises(MalformedRequest) as caught:
        parse_call(body, limits)
    assert caught.value.code == MALFORMED_REQUEST == 12
    return caught.value.message


def assert_parses_or_refuses_cleanly(body: bytes) -> None:
    """The fuzzing property: a call comes out, or one MalformedRequest with a clean message."""
    try:
        call = parse_call(body)
    except MalformedRequest as exc:
        assert exc.code == 12
        assert 0 < len(exc.message) <= rpcwire.MAX_MESSAGE
        assert not LEAKS.search(exc.message), exc.message
        assert exc.message != "request could not be parsed"  # the safety net is a bug
        return
    assert isinstance(call.method, str) and isinstance(call.params, tuple)


# Well-formed calls: the same values as the stdlib parser, within the bounds.


xml_text = st.text(
    alphabet=st.characters(
        codec="utf-8",
        exclude_categories=("Cs", "Cc"),
        exclude_characters="\ufffe\uffff",
    )
    | st.sampled_from("\n\t<>&'\""),
    max_size=30,
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(*rpcwire.INT32)
    | st.floats(allow_nan=False, allow_infinity=False)
    | xml_text
    | st.binary(max_size=40)
    | st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(9999, 12, 31)).map(
        lambda t: t.replace(microsecond=0)
    )
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(xml_text, inner, max_size=5),
    max_leaves=25,
)
method_names = st.from_regex(r"[A-Za-z0-9_.]{1,40}", fullmatch=True)


@settings(FUZZ, max_examples=300)
@given(method=method_names, params=st.lists(values, max_size=5))
def test_stdlib_calls_parse_to_the_stdlib_values(method: str, params: list[Any]) -> None:
    body = xmlrpc.client.dumps(tuple(params), method, allow_none=True).encode()
    expected_params, expected_method = xmlrpc.client.loads(body, use_builtin_types=True)
    assert parse_call(body) == (expected_method, expected_params)


def test_value_types() -> None:
    body = call_xml(
        "".join(
            f"<param><value>{v}</value></param>"
            for v in (
                "<i4> 42 </i4>",
                "<int>-2147483648</int>",
                "<i8>-9223372036854775808</i8>",
                "<ex:i8>9223372036854775807</ex:i8>",
                "<boolean>1</boolean>",
                "<double>-.5e3</double>",
                "<string><![CDATA[<x>&]]>&#13;</string>",
                "untyped",
                "",
                "<base64>aGVs\nbG8=</base64>",
                "<dateTime.iso8601>20240102T03:04:05</dateTime.iso8601>",
                "<dateTime.iso8601>2024-01-02T03:04:05</dateTime.iso8601>",
                "<nil/>",
                "<ex:nil/>",
                "<array><data/></array>",
                "<struct><member><name>a</name><value><int>1</int></value></member></struct>",
            )
        )
    )
    assert parse_call(body).params == (
        42,
        -(2**31),
        -(2**63),
        2**63 - 1,
        True,
        -500.0,
        "<x>&\r",
        "untyped",
        "",
        b"hello",
        dt.datetime(2024, 1, 2, 3, 4, 5),
        dt.datetime(2024, 1, 2, 3, 4, 5),
        None,
        None,
        [],
        {"a": 1},
    )


def test_comments_attributes_and_declarations_are_harmless() -> None:
    body = (
        b"<?xml version='1.0' encoding='iso-8859-1'?><!-- hi -->"
        b"<methodCall xmlns:ex='http://ws.apache.org/xmlrpc/namespaces/extensions'>"
        b"<methodName>agent.poll</methodName><params/></methodCall>\n"
    )
    assert parse_call(body) == ("agent.poll", ())


# Hostile documents.

BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa">'
    + b"".join(
        f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">'.encode() for i in range(9)
    )
    + b"]><methodCall><methodName>&j;</methodName></methodCall>"
)


@pytest.mark.parametrize(
    "body",
    [
        b'<!DOCTYPE m [<!ENTITY nm "agent.ca_certificate">]>'
        b"<methodCall><methodName>&nm;</methodName></methodCall>",
        b'<!DOCTYPE m SYSTEM "file:///etc/passwd"><methodCall><methodName>a</methodName></methodCall>',
        b'<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<methodCall><methodName>a</methodName><params><param><value>&x;</value></param></params></methodCall>",
        b'<!DOCTYPE m [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x"> %p;]><methodCall/>',
        b"<!DOCTYPE methodCall><methodCall><methodName>a</methodName></methodCall>",
        BILLION_LAUGHS,
    ],
)
def test_doctypes_and_entities_are_refused(body: bytes) -> None:
    assert refused(body) == "DOCTYPE declarations are not allowed"


def test_billion_laughs_costs_no_memory() -> None:
    tracemalloc.start()
    try:
        for _ in range(16):
            refused(BILLION_LAUGHS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL


def test_undeclared_entities_are_not_well_formed() -> None:
    message = refused(call_xml("<param><value>&secret;</value></param>"))
    assert message.startswith("not well-formed XML: undefined entity at line 1, column ")


@pytest.mark.parametrize("container", ["array", "struct"])
def test_200000_nested_containers_are_refused_without_recursion(container: str) -> None:
    if container == "array":
        opening, closing = b"<value><array><data>", b"</data></array></value>"
    else:
        opening = b"<value><struct><member><name>n</name>"
        closing = b"</member></struct></value>"
    body = (
        b"<methodCall><methodName>a</methodName><params><param>"
        + opening * 200_000
        + closing * 200_000
        + b"</param></params></methodCall>"
    )
    tracemalloc.start()
    try:
        message = refused(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message == f"nesting deeper than {rpcwire.MAX_DEPTH} elements"
    assert peak < SMALL


def test_element_count_and_body_size_are_bounded() -> None:
    many = call_xml(
        "<param><value><array><data>" + "<value/>" * 200 + "</data></array></value></param>"
    )
    assert refused(many, WireLimits(max_elements=100)) == "more than 100 elements"
    assert parse_call(many).params == ([""] * 200,)
    assert refused(many, WireLimits(max_body_bytes=100)) == "request body over 100 bytes"
    assert refused(b"") == "empty request body"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("<i4>2147483648</i4>", "<i4> out of the 32-bit range: '2147483648'"),
        ("<int>-2147483649</int>", "<int> out of the 32-bit range: '-2147483649'"),
        ("<i8>9223372036854775808</i8>", "<i8> out of the 64-bit range: '9223372036854775808'"),
        (
            "<int>" + "9" * 5000 + "</int>",
            "<int> is not an integer: '" + "9" * 60 + "'... (5000 characters)",
        ),
        ("<int>4_2</int>", "<int> is not an integer: '4_2'"),
        ("<int>\u0664\u0662</int>", "<int> is not an integer: '\u0664\u0662'"),
        ("<int>0x10</int>", "<int> is not an integer: '0x10'"),
        ("<int></int>", "<int> is not an integer: ''"),
        ("<boolean>true</boolean>", "<boolean> must be 0 or 1, not 'true'"),
        ("<boolean>2</boolean>", "<boolean> must be 0 or 1, not '2'"),
        ("<double>nan</double>", "<double> is not a number: 'nan'"),
        ("<double>1e999</double>", "<double> out of range: '1e999'"),
        ("<base64>%%%</base64>", "<base64> is not valid base64"),
        (
            "<dateTime.iso8601>20241340T00:00:00</dateTime.iso8601>",
            "<dateTime.iso8601> is not a time: '20241340T00:00:00'",
        ),
        ("<nil>x</nil>", "<nil> must be empty"),
        ("<i1>1</i1>", "unexpected element <i1> in <value>"),
        ("<ex:string>x</ex:string>", "unexpected element <ex:string> in <value>"),
        ("<int>1</int><int>2</int>", "more than one type in one <value>"),
        ("x<int>1</int>", "text and a type element mixed in one <value>"),
        ("<int>1</int>x", "text not allowed in <value>"),
        ("<array>x<data/></array>", "text not allowed in <array>"),
        ("<array/>", "<array> without <data>"),
        ("<array><data/><data/></array>", "more than one child in <array>"),
        ("<struct><member><value/></member></struct>", "<value> before <name> in <member>"),
        (
            "<struct><member><name>a</name></member></struct>",
            "<member> needs a <name> and a <value>",
        ),
        (
            "<struct><member><name>a</name><value/></member><member><name>a</name><value/></member></struct>",
            "struct member 'a' given twice",
        ),
    ],
)
def test_bad_values_are_refused_with_a_short_message(value: str, message: str) -> None:
    assert refused(one(value)) == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<methodResponse/>", "unexpected element <methodResponse> as the root element"),
        (b"<methodCall/>", "<methodCall> without <methodName>"),
        (
            b"<methodCall><params/><methodName>a</methodName></methodCall>",
            "<params> before <methodName>",
        ),
        (
            b"<methodCall><methodName>a</methodName><methodName>b</methodName></methodCall>",
            "more than one <methodName> in <methodCall>",
        ),
        (b"<methodCall><methodName>a b</methodName></methodCall>", "bad method name 'a b'"),
        (b"<methodCall><methodName></methodName></methodCall>", "bad method name ''"),
        (
            b"<methodCall><methodName>a</methodName><params><value/></params></methodCall>",
            "unexpected element <value> in <params>",
        ),
        (
            b"<methodCall><methodName>a</methodName><params><param/></params></methodCall>",
            "<param> without <value>",
        ),
        (
            b"<methodCall><methodName>a</methodName><?evil?></methodCall>",
            "processing instructions are not allowed",
        ),
        (
            b"<methodCall><methodName>a\xff</methodName></methodCall>",
            "request body is not valid UTF-8 (byte 25)",
        ),
        ("<methodCall/>".encode("utf-16"), "request body is not valid UTF-8 (byte 0)"),
        (
            b"<methodCall><methodName>a</methodName>",
            "not well-formed XML: no element found at line 1, column 38",
        ),
        (
            b"<methodCall><methodName>a</methodName></methodCall><x/>",
            "not well-formed XML: junk after document element at line 1, column 51",
        ),
    ],
)
def test_bad_calls_are_refused_with_a_short_message(body: bytes, message: str) -> None:
    assert refused(body) == message


def test_a_huge_method_name_is_not_echoed_whole() -> None:
    message = refused(call_xml("", method="x" * 31_000_000))
    assert message == "bad method name '" + "x" * 60 + "'... (31000000 characters)"


# Fuzzing: only MalformedRequest (code 12) ever comes out, with a clean message.

TOKENS = [
    "<methodCall>",
    "</methodCall>",
    "<methodName>",
    "</methodName>",
    "<params>",
    "</params>",
    "<param>",
    "</param>",
    "<value>",
    "</value>",
    "<array>",
    "</array>",
    "<data>",
    "</data>",
    "<struct>",
    "</struct>",
    "<member>",
    "</member>",
    "<name>",
    "</name>",
    "<int>",
    "</int>",
    "<i4>",
    "</i4>",
    "<i8>",
    "</i8>",
    "<boolean>",
    "</boolean>",
    "<double>",
    "</double>",
    "<string>",
    "</string>",
    "<base64>",
    "</base64>",
    "<dateTime.iso8601>",
    "</dateTime.iso8601>",
    "<nil/>",
    "<ex:nil/>",
    "<ex:i8>",
    "</ex:i8>",
    "<!DOCTYPE m>",
    '<!ENTITY a "b">',
    "&a;",
    "&amp;",
    "&#0;",
    "&#13;",
    "&#x110000;",
    "<![CDATA[",
    "]]>",
    "<?pi?>",
    "<!-- c -->",
    "0",
    "1",
    "-1",
    "99999999999",
    "9223372036854775808",
    "1e999",
    "nan",
    "true",
    "aGVsbG8=",
    "20240102T03:04:05",
    "agent.poll",
    " ",
    "\n",
    "\u00e9",
    "\ud7ff",
    "x",
    "'",
    '"',
    "=",
    "<",
    ">",
    "/",
]
tokens = st.sampled_from(TOKENS)


@settings(FUZZ, max_examples=1500)
@given(st.binary(max_size=3000))
def test_fuzz_arbitrary_bytes(body: bytes) -> None:
    assert_parses_or_refuses_cleanly(body)


@FUZZ
@given(st.lists(tokens, max_size=80))
def test_fuzz_token_soup(parts: list[str]) -> None:
    assert_parses_or_refuses_cleanly("".join(parts).encode("utf-8", "surrogatepass"))


@settings(FUZZ, max_examples=600)
@given(
    params=st.lists(values, max_size=3),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 40), tokens | st.binary(max_size=4)),
        min_size=1,
        max_size=4,
    ),
)
def test_fuzz_mutated_calls(params: list[Any], edits: list[tuple[int, int, Any]]) -> None:
    body = bytearray(xmlrpc.client.dumps(tuple(params), "agent.poll", allow_none=True).encode())
    for position, cut, insert in edits:
        at = position % (len(body) + 1)
        piece = insert if isinstance(insert, bytes) else insert.encode("utf-8", "surrogatepass")
        body[at : at + cut] = piece
    assert_parses_or_refuses_cleanly(bytes(body))


# Marshalling answers.


def test_results_keep_carriage_returns() -> None:
    body = marshal_result({"script": "echo a\r\necho b\r", "n": 1, "none": None})
    assert xmlrpc.client.loads(body)[0][0] == {"script": "echo a\r\necho b\r", "n": 1, "none": None}


@pytest.mark.parametrize("value", ["ansi \x1b[1m colour", 2**40, object(), "\ud800"])
def test_results_xml_cannot_carry_are_refused(value: Any) -> None:
    with pytest.raises(AnswerError):
        marshal_result(value)


def test_faults_are_cut_and_always_marshal() -> None:
    body = marshal_fault(4, "no client " + "\x1b" * 10 + "x" * 50_000)
    with pytest.raises(xmlrpc.client.Fault) as fault:
        xmlrpc.client.loads(body)
    assert fault.value.faultCode == 4
    assert len(fault.value.faultString) == rpcwire.MAX_FAULT_STRING
    assert fault.value.faultString.startswith("no client ??????????xxx")
    assert fault.value.faultString.endswith("...")


def test_shorten() -> None:
    assert shorten("abc") == "'abc'"
    assert shorten("a" * 100, 10) == "'aaaaaaaaaa'... (100 characters)"
    assert shorten(b"\x00" * 100, 2) == "'\\x00\\x00'... (100 bytes)"
    assert shorten(10**5000) == "<integer of 16610 bits>"
    assert shorten(list(range(10**5))) == "<list of 100000 items>"
    assert shorten(12) == "12"


# The adapter.


def request(body: bytes, method: str = "POST", path: str = "/RPC2") -> Request:
    return Request(
        method=method,
        path=path,
        query="",
        headers={},
        body=body,
        peer=("192.0.2.7", 40000),
        peer_cert_der=b"certificate",
    )


def answer_of(response: Response) -> Any:
    assert response.status == 200
    assert ("Content-Type", "text/xml; charset=utf-8") in response.headers
    return xmlrpc.client.loads(response.body)[0][0]


def fault_of(response: Response) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as fault:
        answer_of(response)
    return fault.value


def test_app_passes_the_call_and_the_peer() -> None:
    seen: list[Call] = []

    def dispatch(call: Call) -> Any:
        seen.append(call)
        return [call.method, list(call.params)]

    app = XMLRPCApp(dispatch)
    body = xmlrpc.client.dumps((1, "a"), "agent.poll").encode()
    assert answer_of(app(request(body))) == ["agent.poll", [1, "a"]]
    assert seen[0].peer == ("192.0.2.7", 40000)
    assert seen[0].peer_cert_der == b"certificate"
    assert seen[0].peer_fingerprint == hashlib.sha256(b"certificate").hexdigest()


def test_app_maps_faults_and_failures(caplog: pytest.LogCaptureFixture) -> None:
    def dispatch(call: Call) -> Any:
        if call.method == "refuse":
            raise xmlrpc.client.Fault(2, "name " + "n" * 40_000 + " refused")
        if call.method == "check":
            raise MalformedRequest("params must be a list")
        if call.method == "odd":
            raise xmlrpc.client.Fault("two", "x")  # type: ignore[arg-type]
        if call.method == "unmarshallable":
            return 2**40
        raise KeyError("secret internal detail")

    app = XMLRPCApp(dispatch)
    refused_fault = fault_of(app(request(xmlrpc.client.dumps((), "refuse").encode())))
    assert refused_fault.faultCode == 2
    assert len(refused_fault.faultString) == rpcwire.MAX_FAULT_STRING
    checked = fault_of(app(request(xmlrpc.client.dumps((), "check").encode())))
    assert (checked.faultCode, checked.faultString) == (12, "params must be a list")
    with caplog.at_level(logging.INFO, logger=rpcwire.log.name):
        for method in ("boom", "odd", "unmarshallable"):
            internal = fault_of(app(request(xmlrpc.client.dumps((), method).encode())))
            assert (internal.faultCode, internal.faultString) == (
                99,
                "internal error; see the server log",
            )
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 3
    assert errors[0].exc_info is not None  # the traceback goes to the log, once
    assert "boom from 192.0.2.7:40000 failed" in errors[0].getMessage()


def test_app_answers_malformed_requests_with_fault_12(caplog: pytest.LogCaptureFixture) -> None:
    app = XMLRPCApp(lambda call: pytest.fail("the dispatcher must not be called"))
    with caplog.at_level(logging.INFO, logger=rpcwire.log.name):
        fault = fault_of(app(request(BILLION_LAUGHS)))
    assert (fault.faultCode, fault.faultString) == (12, "DOCTYPE declarations are not allowed")
    assert [r.getMessage() for r in caplog.records] == [
        "malformed XML-RPC request from 192.0.2.7:40000: DOCTYPE declarations are not allowed"
    ]


def test_app_routes_other_requests() -> None:
    app = XMLRPCApp(lambda call: None)
    assert app(request(b"", method="GET")).status == 405
    assert ("Allow", "POST") in app(request(b"", method="GET")).headers
    assert app(request(b"<x/>", path="/elsewhere")).status == 404
    health = Response(200, (), b"ok")
    routed = XMLRPCApp(lambda call: None, fallback=lambda req: health)
    assert routed(request(b"", method="GET", path="/healthz")) is health
    assert routed(request(b"", method="GET", path="/RPC2")) is health


def test_a_quick_answer_is_given_only_for_its_methods_and_only_when_handled() -> None:
    asked: list[str] = []

    def quick(call: rpcwire.Call) -> tuple[bool, Any]:
        asked.append(call.method)
        return (call.params == (1,), {"jobs": []})

    app = XMLRPCApp(lambda call: None, quick_dispatch=quick, quick_methods=("agent.poll",))
    answered = app.quick(request(xmlrpc.client.dumps((1,), "agent.poll").encode()))
    assert answered is not None and answered.status == 200
    assert xmlrpc.client.loads(answered.body)[0] == ({"jobs": []},)
    # Not handled: None, and the worker pool answers as for any call.
    assert app.quick(request(xmlrpc.client.dumps((2,), "agent.poll").encode())) is None
    assert app.quick(request(xmlrpc.client.dumps((1,), "agent.report").encode())) is None
    assert app.quick(request(b"<methodCall><methodName>agent.poll</methodName><oops")) is None
    assert asked == ["agent.poll", "agent.poll"]
