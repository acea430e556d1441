"""The relay's payloads: under PostgreSQL's limit, and nothing else accepted."""

from __future__ import annotations

import json

import pytest

from scire_server.relay import decode, encode
from scire_server.store.signals import MAX_PAYLOAD


def test_a_large_set_is_split_under_the_payload_limit_and_nothing_is_lost() -> None:
    names = {f"web-{i:05d}.example.org" for i in range(3000)}
    payloads = encode("a/1", names)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    heard: set[str] = set()
    for payload in payloads:
        sender, clients = decode(payload)
        assert sender == "a/1"
        assert not heard & clients
        heard |= clients
    assert heard == names


def test_a_small_set_is_one_payload() -> None:
    assert [decode(p) for p in encode("a/1", ["x", "y"])] == [("a/1", frozenset({"x", "y"}))]
    assert encode("a/1", []) == []


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        json.dumps(["a"]),
        json.dumps({"from": "a"}),
        json.dumps({"from": 1, "clients": []}),
        json.dumps({"from": "a", "clients": [1]}),
    ],
)
def test_a_malformed_payload_is_refused(payload: str) -> None:
    with pytest.raises(ValueError):
        decode(payload)


def test_a_change_of_standing_travels_in_the_same_payload_format() -> None:
    from scire_server.relay import encode_identities_changed, identities_changed

    payload = encode_identities_changed("a/1")
    assert decode(payload) == ("a/1", frozenset())  # an older daemon reads it as no names
    assert identities_changed(payload)
    assert not any(identities_changed(p) for p in encode("a/1", ["x"]))
