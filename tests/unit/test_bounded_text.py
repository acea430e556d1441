"""Bounded echoes (``exceptions.clip`` and ``bound``) and the counting of
anonymous refusals (``refusals.AnonymousRefusals``)."""

from __future__ import annotations

from scire_server import refusals
from scire_server.exceptions import MESSAGE_LIMIT, InvalidArgument, bound, clip
from scire_server.refusals import AnonymousRefusals


def test_clip_cuts_a_huge_string_and_says_how_long_it_was() -> None:
    text = clip("x" * (31 * 1024 * 1024))
    assert len(text) < 150
    assert text.startswith("'xxxx")
    assert text.endswith(f"... ({31 * 1024 * 1024} characters)")
    assert clip("web-17") == "'web-17'"


def test_clip_cuts_deep_nesting_and_big_containers() -> None:
    nested: list[object] = []
    for _ in range(200_000):
        nested = [nested]
    assert clip(nested) == "[[[[...]]]]"
    assert len(clip({str(i): list(range(1000)) for i in range(1000)})) < 150
    assert clip(10**5000) == "<integer of 16610 bits>"


def test_bound_keeps_one_line_one_line() -> None:
    assert bound("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    cut = bound("y" * 5000, 100)
    assert cut == "y" * 100 + "... (5000 characters)"


def test_every_error_message_is_bounded() -> None:
    error = InvalidArgument("z" * 10_000_000)
    assert len(error.message) < MESSAGE_LIMIT + 30


def test_the_first_refusal_per_address_is_logged_the_rest_counted() -> None:
    counter = AnonymousRefusals()
    assert counter.take() is None
    logged = [counter.note("192.0.2.1") for _ in range(5)] + [counter.note("192.0.2.2")]
    assert logged == [True, False, False, False, False, True]
    summary = counter.take()
    assert summary is not None
    assert (summary.refusals, summary.addresses, summary.logged) == (6, 2, 2)
    assert summary.top == [("192.0.2.1", 5), ("192.0.2.2", 1)]
    assert summary.text().startswith("6 anonymous refusal(s) from 2 address(es) since ")
    assert "4 not logged one by one; most from 192.0.2.1 (5), 192.0.2.2 (1)" in summary.text()
    # A new interval: each address gets one line again.
    assert counter.take() is None
    assert counter.note("192.0.2.1") is True


def test_addresses_beyond_the_cap_are_counted_not_tracked() -> None:
    counter = AnonymousRefusals()
    for i in range(refusals.MAX_ADDRESSES):
        counter.note(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert counter.note("192.0.2.9") is False
    summary = counter.take()
    assert summary is not None
    assert summary.refusals == refusals.MAX_ADDRESSES + 1
    assert f"from {refusals.MAX_ADDRESSES}+ address(es)" in summary.text()
    assert len(summary.top) == refusals.TOP_ADDRESSES
