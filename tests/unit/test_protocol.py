"""The wire vocabulary in scire_schema.protocol agrees with the XSDs and the server."""

from __future__ import annotations

import datetime as dt
import importlib.resources

from lxml import etree

from scire_schema import protocol
from scire_schema.protocol import FaultCode
from scire_server import exceptions

XS = "{http://www.w3.org/2001/XMLSchema}"


def _status_xsd_states() -> set[str]:
    source = importlib.resources.files("scire_schema").joinpath("status.xsd").read_bytes()
    root = etree.fromstring(source)
    [state] = [e for e in root.iter(f"{XS}element") if e.get("name") == "state"]
    return {e.get("value") for e in state.iter(f"{XS}enumeration")}


def test_reported_states_are_the_enumeration_in_status_xsd() -> None:
    assert {s.value for s in protocol.ReportedState} == _status_xsd_states()


def test_every_server_error_has_its_fault_code() -> None:
    for code, name in exceptions.FAULT_NAMES.items():
        assert FaultCode(code) is not None, name
        assert type(code) is int  # xmlrpc.client cannot marshal an IntEnum member
    assert exceptions.InvalidDocument.code == FaultCode.INVALID_DOCUMENT == 5
    assert exceptions.ScireError.code == FaultCode.INTERNAL == 99
    assert FaultCode.MALFORMED_REQUEST == 12


def test_retrying_helps_only_after_unavailable_and_internal_faults() -> None:
    transient = set(FaultCode) - protocol.PERMANENT_FAULTS
    assert transient == {FaultCode.UNAVAILABLE, FaultCode.INSTANCE_CONFLICT, FaultCode.INTERNAL}


def test_wire_time_round_trip() -> None:
    now = protocol.utc_now()
    assert now.tzinfo is dt.UTC
    text = protocol.format_time(now)
    assert text.endswith("Z")
    assert protocol.parse_time(text) == now.replace(tzinfo=None)


def test_retry_after_is_read_from_a_header_and_from_a_faults_text() -> None:
    from scire_schema.protocol import parse_retry_after, retry_after_text

    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(f"database unavailable: refused; {retry_after_text(5)}") == 5.0
    assert parse_retry_after("database busy, try again") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("999999") == 3600.0
