"""The access rule of ``acl.permitted``, on plain values (no database)."""

from __future__ import annotations

import pytest

from scire_server import acl
from scire_server.acl import GrantRule, Subject, Target

ALICE = Subject(user_id=1, group_ids=frozenset({10}))
WEB = Target(client_id=100, group_ids=frozenset())
# web-17 is in group 200 ("web"), which is nested in 300 ("prod"): closure {200, 300}.
WEB_IN_PROD = Target(client_id=100, group_ids=frozenset({200, 300}))


def user_grant(
    privilege: str = "run", client: int | None = 100, group: int | None = None
) -> GrantRule:
    return GrantRule(1, None, privilege, client, group)


def test_user_grant_on_the_client() -> None:
    assert acl.permitted(ALICE, "run", WEB, [user_grant()])


def test_no_grant_no_access() -> None:
    assert not acl.permitted(ALICE, "run", WEB, [])


def test_grant_of_another_user_does_not_count() -> None:
    other = GrantRule(2, None, "run", 100, None)
    assert not acl.permitted(ALICE, "run", WEB, [other])


def test_grant_on_another_client_does_not_count() -> None:
    assert not acl.permitted(ALICE, "run", WEB, [user_grant(client=101)])


def test_user_group_grant() -> None:
    grant = GrantRule(None, 10, "run", 100, None)
    assert acl.permitted(ALICE, "run", WEB, [grant])


def test_grant_to_a_group_the_user_is_not_in() -> None:
    grant = GrantRule(None, 11, "run", 100, None)
    assert not acl.permitted(ALICE, "run", WEB, [grant])


@pytest.mark.parametrize("group", [200, 300], ids=["direct-group", "nested-parent-group"])
def test_client_group_grant_through_nesting(group: int) -> None:
    assert acl.permitted(ALICE, "run", WEB_IN_PROD, [user_grant(client=None, group=group)])


def test_client_group_the_client_is_not_in() -> None:
    assert not acl.permitted(ALICE, "run", WEB_IN_PROD, [user_grant(client=None, group=400)])


def test_star_grants_every_privilege() -> None:
    grant = user_grant(privilege=acl.ANY_PRIVILEGE)
    assert acl.permitted(ALICE, "run", WEB, [grant])
    assert acl.permitted(ALICE, "backup", WEB, [grant])


def test_wrong_privilege() -> None:
    assert not acl.permitted(ALICE, "reboot", WEB, [user_grant(privilege="run")])


def test_named_privilege_matches_itself() -> None:
    assert acl.permitted(ALICE, "backup", WEB, [user_grant(privilege="backup")])


def test_admin_needs_no_grant() -> None:
    admin = Subject(user_id=1, group_ids=frozenset(), is_admin=True)
    assert acl.permitted(admin, "anything", WEB, [])


@pytest.mark.parametrize("is_admin", [False, True])
def test_revoked_user_may_run_nothing(is_admin: bool) -> None:
    revoked = Subject(user_id=1, group_ids=frozenset({10}), is_admin=is_admin, active=False)
    grants = [user_grant(privilege=acl.ANY_PRIVILEGE), GrantRule(None, 10, "run", 100, None)]
    assert not acl.permitted(revoked, "run", WEB, grants)
