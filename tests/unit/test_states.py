"""The assignment state machine of ``states.py``."""

from __future__ import annotations

import itertools

import pytest

from scire_server.states import (
    FINAL,
    FINAL_SUMMARIES,
    REPORTED_FINAL,
    RETRYABLE,
    State,
    allowed,
    job_summary,
)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (old, new)
        for old, new in itertools.product(sorted(FINAL), list(State))
        if not (old in RETRYABLE and new == State.PENDING)
    ],
    ids=str,
)
def test_nothing_leaves_a_final_state_but_a_retry(old: State, new: State) -> None:
    assert not allowed(old, new)


def test_retry_requeues_failed_and_timed_out_only() -> None:
    assert RETRYABLE == {State.FAILED, State.TIMED_OUT}
    for state in FINAL:
        assert allowed(state, State.PENDING) == (state in RETRYABLE)


def test_final_states() -> None:
    assert FINAL == {
        State.SUCCEEDED,
        State.FAILED,
        State.TIMED_OUT,
        State.DENIED,
        State.EXPIRED,
        State.CANCELLED,
    }
    assert State.LOST not in FINAL  # a late report from the agent still lands
    assert REPORTED_FINAL <= FINAL


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("pending", "sent"),
        ("pending", "denied"),
        ("pending", "expired"),
        ("pending", "cancelled"),
        ("pending", "failed"),
        ("pending", "acknowledged"),  # ack after the lease ran out
        ("sent", "acknowledged"),
        ("sent", "pending"),  # the lease ran out
        ("sent", "failed"),  # undeliverable after max attempts
        ("sent", "running"),  # a report implies the acknowledgement
        ("sent", "succeeded"),
        ("acknowledged", "running"),
        ("acknowledged", "succeeded"),
        ("acknowledged", "pending"),  # the agent no longer holds it: rerun
        ("acknowledged", "expired"),
        ("running", "succeeded"),
        ("running", "failed"),
        ("running", "timed_out"),
        ("running", "cancelled"),
        ("running", "lost"),
        ("lost", "pending"),
        ("lost", "running"),  # the agent is back
        ("lost", "succeeded"),  # its late report lands
        ("lost", "failed"),
    ],
)
def test_allowed_transitions(old: str, new: str) -> None:
    assert allowed(old, new)
    assert allowed(State(old), State(new))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("pending", "pending"),
        ("pending", "lost"),
        ("sent", "lost"),
        ("sent", "denied"),
        ("running", "pending"),
        ("running", "acknowledged"),
        ("running", "sent"),
        ("running", "expired"),  # expiry does not stop a running job
        ("lost", "sent"),
        ("lost", "denied"),
        ("acknowledged", "sent"),
    ],
)
def test_forbidden_transitions(old: str, new: str) -> None:
    assert not allowed(old, new)


def test_unknown_state_is_an_error() -> None:
    with pytest.raises(ValueError):
        allowed("pending", "exploded")


@pytest.mark.parametrize(
    ("states", "summary"),
    [
        ({}, "empty"),
        ({"succeeded": 3}, "succeeded"),
        ({"succeeded": 2, "failed": 1}, "mixed"),
        ({"pending": 1, "running": 1, "succeeded": 4}, "running"),
        ({"pending": 2, "lost": 1}, "lost"),
        ({"sent": 1, "acknowledged": 1}, "acknowledged"),
    ],
)
def test_job_summary(states: dict[str, int], summary: str) -> None:
    assert job_summary(states) == summary


def test_final_summaries_are_the_words_that_no_longer_change() -> None:
    assert FINAL_SUMMARIES == {s.value for s in FINAL} | {"mixed", "empty"}
    assert not {s.value for s in State if s not in FINAL} & FINAL_SUMMARIES
