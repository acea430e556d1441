"""The access check: may this job's owner use this privilege on this client?

A pure function of plain values, so the same rule serves submission and
dispatch and is tested without a database. The store gathers the facts
(``store/directory.py``) and words its own refusals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: A grant of this privilege allows every privilege.
ANY_PRIVILEGE = "*"


@dataclass(frozen=True)
class Subject:
    user_id: int
    group_ids: frozenset[int]
    is_admin: bool = False
    active: bool = True


@dataclass(frozen=True)
class Target:
    client_id: int
    group_ids: frozenset[int]  # every client group it is in, nesting resolved


@dataclass(frozen=True)
class GrantRule:
    user_id: int | None
    user_group_id: int | None
    privilege: str
    client_id: int | None
    client_group_id: int | None


def permitted(
    subject: Subject, privilege: str, target: Target, grants: Iterable[GrantRule]
) -> bool:
    """True when the subject may use ``privilege`` on ``target``.

    A revoked user may run nothing. Administrators may run anything: they
    could grant it to themselves anyway. Anyone else needs a grant whose
    subject is them or one of their groups, whose privilege is the job's or
    ``*``, and whose target is the client or a group it is in (nested groups
    count).
    """
    if not subject.active:
        return False
    if subject.is_admin:
        return True
    for grant in grants:
        if grant.privilege not in (privilege, ANY_PRIVILEGE):
            continue
        if not (grant.user_id == subject.user_id or grant.user_group_id in subject.group_ids):
            continue
        if grant.client_id == target.client_id or grant.client_group_id in target.group_ids:
            return True
    return False
