"""The work-due signal reaches every subscriber, once per announcement."""

from __future__ import annotations

from scire_server.work_due import WorkDue


def test_every_subscriber_hears_each_announcement() -> None:
    signal = WorkDue()
    heard: list[tuple[str, frozenset[str]]] = []
    signal.subscribe(lambda names: heard.append(("a", names)))
    signal.subscribe(lambda names: heard.append(("b", names)))
    signal.announce(["web-1", "web-2", "web-1"])
    assert heard == [("a", frozenset({"web-1", "web-2"})), ("b", frozenset({"web-1", "web-2"}))]


def test_nothing_is_announced_for_no_clients() -> None:
    signal = WorkDue()
    heard: list[frozenset[str]] = []
    signal.subscribe(heard.append)
    signal.announce([])
    assert heard == []


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    signal = WorkDue()
    heard: list[frozenset[str]] = []

    def broken(names: frozenset[str]) -> None:
        raise RuntimeError("push pool gone")

    signal.subscribe(broken)
    signal.subscribe(heard.append)
    signal.announce(["db-1"])
    assert heard == [frozenset({"db-1"})]


def test_an_unsubscribed_listener_hears_nothing_more() -> None:
    signal = WorkDue()
    heard: list[frozenset[str]] = []
    signal.subscribe(heard.append)
    signal.unsubscribe(heard.append)
    signal.announce(["db-1"])
    assert heard == []
