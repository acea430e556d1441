"""What the server remembers of its callers (``identities.KnownCallers``)."""

from __future__ import annotations

from scire_server.identities import TTL, KnownCallers
from scire_server.store.records import Caller

WEB = Caller("client", 1, "web-17")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_caller_is_remembered_until_a_standing_changes() -> None:
    known = KnownCallers()
    known.remember("f1", WEB, known.generation())
    assert known.get("f1") == WEB
    known.forget_all()
    assert known.get("f1") is None


def test_a_read_that_raced_with_a_change_is_not_remembered() -> None:
    known = KnownCallers()
    generation = known.generation()  # the database read starts
    known.forget_all()  # a revocation commits meanwhile
    known.remember("f1", WEB, generation)
    assert known.get("f1") is None


def test_an_entry_lives_at_most_the_ttl() -> None:
    clock = Clock()
    known = KnownCallers(clock)
    known.remember("f1", WEB, known.generation())
    clock.now += TTL + 1
    assert known.get("f1") is None


def test_nothing_is_used_while_the_relay_is_deaf() -> None:
    known = KnownCallers()
    known.remember("f1", WEB, known.generation())
    listening = [False]
    known.usable = lambda: listening[0]
    assert known.get("f1") is None
    listening[0] = True
    assert known.get("f1") == WEB
