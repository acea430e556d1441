"""Who is who: users, clients and their enrollment (with tokens), groups,
grants, and the facts the ACL needs.

Client groups nest; :func:`reachable_groups` is the one walk of that graph
(down for a submission's targets and the cycle check, up for the groups a
client is in). User groups do not nest.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session

from scire_schema import certs
from scire_schema.errors import CertificateError
from scire_schema.protocol import AgentMode
from scire_server import acl
from scire_server.exceptions import (
    Conflict,
    EnrollmentRefused,
    IllegalTransition,
    InvalidArgument,
    NotFound,
)
from scire_server.models import (
    Assignment,
    Client,
    ClientGroup,
    ClientGroupMember,
    EnrollmentToken,
    Grant,
    Job,
    User,
    UserGroup,
    UserGroupMember,
)
from scire_server.states import ClientStatus, State, UserStatus
from scire_server.store.audit import AuditTrail
from scire_server.store.database import Database, log_after_commit, row_dict, utcnow
from scire_server.store.records import Caller, Certificate, PushTarget, actor

log = logging.getLogger(__name__)

#: Actor of an acceptance by enrollment token.
TOKEN = "token"

#: What an agent said of itself on its last poll, in every client listing.
PRESENCE_FIELDS = ("agent_version", "agent_mode", "callback_address")

_ACTIVE_STATES = [State.PENDING, State.SENT, State.ACKNOWLEDGED, State.RUNNING]

_CLIENTS = cast(sa.Table, Client.__table__)
# Never moves a time back: another daemon, or a later call, may have written one.
_RECORD_LAST_SEEN = (
    sa.update(_CLIENTS)
    .where(
        _CLIENTS.c.name == sa.bindparam("seen_name"),
        sa.or_(
            _CLIENTS.c.last_seen_at.is_(None),
            _CLIENTS.c.last_seen_at < sa.bindparam("seen_at"),
        ),
    )
    .values(last_seen_at=sa.bindparam("seen_at"))
)


def token_refusal(token: EnrollmentToken | None, now: dt.datetime) -> str:
    """Why an enrollment token cannot be used, in words; "" when it can. The
    token is a long random secret, so telling "expired" from "unknown" tells a
    guesser nothing."""
    if token is None:
        return "the enrollment token is unknown (mistyped, or from another server)"
    if token.expires_at <= now:
        return f"the enrollment token expired at {token.expires_at:%Y-%m-%d %H:%M} UTC"
    if token.uses_left <= 0:
        return "the enrollment token is used up (every enrollment it allowed has happened)"
    return ""


class Directory:
    """Users, clients, groups and grants of one database."""

    def __init__(self, database: Database, audit: AuditTrail) -> None:
        self.db = database
        self.audit = audit

    # --- identities ---------------------------------------------------------

    def caller_by_fingerprint(self, fingerprint: str) -> tuple[Caller | None, str | None]:
        """Who holds this certificate, and why they are refused, if they are.

        Returns (caller, None) for an accepted client or an active user;
        (identity, why) for a known identity that is refused (a revoked client,
        a revoked user), so the refusal can be recorded under its name; and
        (None, None) for an unknown certificate. Only the first may call.
        """
        with self.db.tx(write=False) as session:
            client = session.scalars(
                select(Client).where(Client.fingerprint == fingerprint)
            ).first()
            if client is not None:
                caller = Caller("client", client.id, client.name)
                if client.status != ClientStatus.ACCEPTED:
                    return caller, f"client {client.name} is {client.status}"
                return caller, None
            user = session.scalars(select(User).where(User.fingerprint == fingerprint)).first()
            if user is not None:
                caller = Caller("user", user.id, user.name, user.is_admin)
                if user.status != UserStatus.ACTIVE:
                    return caller, f"user {user.name} is {user.status}"
                return caller, None
            return None, None

    # --- users ----------------------------------------------------------------

    def add_user(self, name: str, fingerprint: str, is_admin: bool, by: str) -> None:
        """Add an active user with this certificate fingerprint."""
        with self.db.tx() as session:
            if session.scalars(select(User).where(User.name == name)).first():
                raise Conflict(f"user {name} exists already")
            session.add(
                User(
                    name=name,
                    fingerprint=fingerprint,
                    is_admin=is_admin,
                    status=UserStatus.ACTIVE.value,
                    created_at=utcnow(),
                )
            )
            self.audit.write(session, by, "user_add", detail=f"user {name} admin={is_admin}")

    def users(self) -> list[dict[str, Any]]:
        """Every user with their groups, by name."""
        with self.db.tx(write=False) as session:
            users = session.scalars(select(User).order_by(User.name)).all()
            groups: dict[int, list[str]] = {}
            for user_id, group in session.execute(
                select(UserGroupMember.user_id, UserGroup.name)
                .join(UserGroup, UserGroup.id == UserGroupMember.group_id)
                .order_by(UserGroup.name)
            ):
                groups.setdefault(user_id, []).append(group)
            return [
                row_dict(u, "name", "is_admin", "status", "created_at", "fingerprint")
                | {"groups": groups.get(u.id, [])}
                for u in users
            ]

    def revoke_user(self, name: str, by: str) -> None:
        """Revoke a user: refused at every call, their jobs denied at dispatch."""
        with self.db.tx() as session:
            user = find_user(session, name)
            if user.status == UserStatus.REVOKED:
                return
            user.status = UserStatus.REVOKED.value
            self.audit.write(session, by, "user_revoke", detail=f"user {name}")

    # --- renewal --------------------------------------------------------------

    def renew_certificate(
        self, caller: Caller, certificate: Certificate, key_fingerprint: str
    ) -> str:
        """Make ``certificate`` the caller's one certificate from now on: the
        fingerprint on record (what identifies the caller, and what the pusher
        pins) becomes its, so the certificate the call came with is refused from
        the next call on. A client's request and certificate are kept too, so an
        agent that lost the answer fetches it with ``agent.fetch_certificate``.
        Refused when the caller was revoked since it was identified. Returns the
        fingerprint replaced."""
        with self.db.tx() as session:
            row: Client | User | None
            if caller.kind == "client":
                row = session.get(Client, caller.id)
                usable = row is not None and row.status == ClientStatus.ACCEPTED
            else:
                row = session.get(User, caller.id)
                usable = row is not None and row.status == UserStatus.ACTIVE
            if row is None or not usable:
                raise Conflict(
                    f"{caller.actor} was revoked or deleted while the certificate was "
                    "signed; nothing was renewed"
                )
            old_fingerprint = row.fingerprint or ""
            row.fingerprint = certificate.fingerprint
            if isinstance(row, Client):
                row.csr_pem = certificate.csr_pem
                row.cert_pem = certificate.cert_pem
                row.key_fingerprint = key_fingerprint
            self.audit.write(
                session,
                caller.actor,
                "certificate_renew",
                client=caller.name if caller.kind == "client" else None,
                detail=f"certificate {old_fingerprint} replaced by {certificate.fingerprint}",
            )
        return old_fingerprint

    # --- clients and enrollment -----------------------------------------------

    def add_token(self, token_hash: str, ttl: int, uses: int, by: str) -> dt.datetime:
        """Store an enrollment token (its hash) good for ``uses`` clients; returns its expiry."""
        now = utcnow()
        expires = now + dt.timedelta(seconds=ttl)
        with self.db.tx() as session:
            session.add(
                EnrollmentToken(
                    token_hash=token_hash,
                    created_by=by,
                    created_at=now,
                    expires_at=expires,
                    uses_left=uses,
                )
            )
            self.audit.write(
                session,
                by,
                "token_create",
                detail=f"enrollment token for {uses} client(s), valid until {expires:%Y-%m-%d %H:%M} UTC",
            )
        return expires

    def register_client(
        self,
        name: str,
        csr_pem: str,
        facts: dict[str, Any],
        token_hash: str | None,
        certificate: Certificate | None = None,
        *,
        key_fingerprint: str,
    ) -> str:
        """Record an enrollment request and, with a valid token, accept it; returns the status.

        ``key_fingerprint`` names the request's public key
        (``certs.key_fingerprint``). The caller signs ``csr_pem`` before the
        call when it carries a token, so spending the token and storing the
        certificate commit together: a token is never spent without an accepted
        client. A request with the key already on record is answered with its
        current status (a pending one takes the new CSR: only the key's holder
        can sign one). A request with another key is refused for a pending,
        accepted or revoked name, so nobody can slip their key under a request
        an administrator is about to accept; it replaces only a rejected one.
        """
        if certificate is not None and certificate.csr_pem != csr_pem:
            raise InvalidArgument("the certificate does not answer this enrollment request")
        now = utcnow()
        with self.db.tx() as session:
            client = session.scalars(select(Client).where(Client.name == name)).first()
            same_key = client is not None and client.key_fingerprint == key_fingerprint
            if client is not None and same_key and client.status != ClientStatus.PENDING:
                return client.status
            if client is not None and client.status in (
                ClientStatus.ACCEPTED,
                ClientStatus.REVOKED,
            ):
                raise EnrollmentRefused(
                    f"client {name} is {client.status} with another key; "
                    f"an administrator must remove it first (scire-admin client delete {name})"
                )
            if client is not None and client.status == ClientStatus.PENDING and not same_key:
                raise EnrollmentRefused(
                    f"client {name} has a pending enrollment request with another key; "
                    "an administrator must reject or delete that request first "
                    f"(scire-admin client reject {name})"
                )
            token_ok = False
            if token_hash and certificate is not None:
                token = session.scalars(
                    select(EnrollmentToken).where(EnrollmentToken.token_hash == token_hash)
                ).first()
                # A bad token is refused, not quietly turned into a request that
                # waits for an administrator nobody told.
                refusal = token_refusal(token, now)
                if refusal:
                    raise EnrollmentRefused(
                        f"{refusal}; ask an administrator for a new one (scire-admin client "
                        "token), or enroll without a token and wait to be accepted"
                    )
                assert token is not None
                token.uses_left -= 1
                token_ok = True
            if client is not None and same_key and not token_ok:
                # The same key again, still waiting: keep its newest request.
                client.csr_pem, client.facts = csr_pem, facts
                return ClientStatus.PENDING.value
            if client is None:
                client = Client(
                    name=name,
                    status=ClientStatus.PENDING.value,
                    csr_pem=csr_pem,
                    key_fingerprint=key_fingerprint,
                    facts=facts,
                    registered_at=now,
                )
                session.add(client)
            else:
                client.csr_pem, client.facts = csr_pem, facts
                client.key_fingerprint = key_fingerprint
                client.status = ClientStatus.PENDING.value
                client.registered_at, client.decided_at, client.decided_by = now, None, None
            self.audit.write(
                session,
                actor("client", name),
                "register",
                client=name,
                new=ClientStatus.PENDING.value,
                detail="with a valid enrollment token" if token_ok else None,
            )
            if token_ok:
                assert certificate is not None
                self._decide(session, client, ClientStatus.ACCEPTED, TOKEN, certificate)
            return client.status

    def enrollment(self, name: str) -> dict[str, Any]:
        """A client's enrollment: name, status, request, its key's fingerprint, certificate."""
        with self.db.tx(write=False) as session:
            return row_dict(
                find_client(session, name),
                "name",
                "status",
                "csr_pem",
                "key_fingerprint",
                "cert_pem",
            )

    def accept_client(self, name: str, certificate: Certificate, by: str) -> None:
        """Accept a pending client with the certificate signed for its request."""
        with self.db.tx() as session:
            client = find_client(session, name)
            if client.status == ClientStatus.ACCEPTED:
                return
            if client.csr_pem != certificate.csr_pem:
                raise Conflict(f"the enrollment request of {name} changed while it was signed")
            self._decide(session, client, ClientStatus.ACCEPTED, by, certificate)

    def reject_client(self, name: str, by: str) -> None:
        """Reject a pending client's request."""
        with self.db.tx() as session:
            self._decide(session, find_client(session, name), ClientStatus.REJECTED, by)

    def revoke_client(self, name: str, by: str) -> None:
        """Revoke a client: its certificate is refused from its next call on."""
        with self.db.tx() as session:
            self._decide(session, find_client(session, name), ClientStatus.REVOKED, by)

    _DECIDABLE_FROM = {
        ClientStatus.ACCEPTED: (ClientStatus.PENDING,),
        ClientStatus.REJECTED: (ClientStatus.PENDING,),
        ClientStatus.REVOKED: (ClientStatus.ACCEPTED, ClientStatus.PENDING),
    }
    _DECISION_ACTIONS = {
        ClientStatus.ACCEPTED: "client_accept",
        ClientStatus.REJECTED: "client_reject",
        ClientStatus.REVOKED: "client_revoke",
    }

    def _decide(
        self,
        session: Session,
        client: Client,
        status: ClientStatus,
        by: str,
        certificate: Certificate | None = None,
    ) -> None:
        if client.status == status:
            return
        if client.status not in self._DECIDABLE_FROM[status]:
            raise IllegalTransition(
                f"client {client.name} is {client.status}, cannot become {status.value}"
            )
        old = client.status
        client.status, client.decided_at, client.decided_by = status.value, utcnow(), by
        if certificate is not None:
            client.cert_pem, client.fingerprint = certificate.cert_pem, certificate.fingerprint
        self.audit.write(
            session,
            by,
            self._DECISION_ACTIONS[status],
            client=client.name,
            old=old,
            new=status.value,
        )
        log_after_commit(
            session,
            log,
            logging.INFO,
            "client %s: %s -> %s by %s",
            client.name,
            old,
            status.value,
            by,
        )

    def delete_client(self, name: str, by: str) -> None:
        """Delete a client that is not accepted (revoke it first)."""
        with self.db.tx() as session:
            client = find_client(session, name)
            if client.status == ClientStatus.ACCEPTED:
                raise IllegalTransition(f"client {name} is accepted; revoke it first")
            session.delete(client)
            self.audit.write(session, by, "client_delete", client=name, old=client.status)

    def clients(self, group: str | None = None) -> list[dict[str, Any]]:
        """Every client (or those in client ``group``, nested groups included)
        with its count of unfinished jobs and its presence, by name."""
        with self.db.tx(write=False) as session:
            query = select(Client).order_by(Client.name)
            if group is not None:
                query = query.where(Client.id.in_(clients_in_groups(session, [group])))
            clients = session.scalars(query).all()
            counts = dict(
                session.execute(
                    select(Assignment.client_id, sa.func.count())
                    .where(Assignment.state.in_(_ACTIVE_STATES))
                    .group_by(Assignment.client_id)
                ).all()
            )
            return [
                row_dict(
                    c,
                    "name",
                    "status",
                    "registered_at",
                    "last_seen_at",
                    "fingerprint",
                    "key_fingerprint",
                    *PRESENCE_FIELDS,
                )
                | {"active_jobs": counts.get(c.id, 0), "cert_not_after": cert_not_after(c.cert_pem)}
                for c in clients
            ]

    def client_detail(self, name: str) -> dict[str, Any]:
        """One client: enrollment, facts, the groups it is in directly, its 20 newest jobs."""
        with self.db.tx(write=False) as session:
            client = find_client(session, name)
            groups = [
                g
                for (g,) in session.execute(
                    select(ClientGroup.name)
                    .join(ClientGroupMember, ClientGroupMember.group_id == ClientGroup.id)
                    .where(ClientGroupMember.client_id == client.id)
                    .order_by(ClientGroup.name)
                )
            ]
            recent = session.execute(
                select(Assignment.job_id, Job.name, Assignment.state, Assignment.updated_at)
                .join(Job, Job.id == Assignment.job_id)
                .where(Assignment.client_id == client.id)
                .order_by(Assignment.id.desc())
                .limit(20)
            ).all()
            return row_dict(
                client,
                "name",
                "status",
                "fingerprint",
                "key_fingerprint",
                "facts",
                "registered_at",
                "decided_at",
                "decided_by",
                "last_seen_at",
                *PRESENCE_FIELDS,
            ) | {
                "cert_not_after": cert_not_after(client.cert_pem),
                "groups": groups,
                "recent_jobs": [
                    {"job_id": j, "name": n, "state": s, "updated_at": u} for j, n, s, u in recent
                ],
            }

    # --- presence ----------------------------------------------------------------

    def record_last_seen(self, seen: Mapping[str, dt.datetime]) -> int:
        """Write a batch of last-seen times (client name -> time), never moving
        one back (another daemon, or a report, may have written a later one);
        returns how many rows changed."""
        if not seen:
            return 0
        with self.db.tx() as session:
            # One executemany on the connection: an ORM UPDATE per client cost a
            # fleet of 10,000 at 60 s a tenth of a core in statement set-up alone.
            result = session.connection().execute(
                _RECORD_LAST_SEEN,
                [{"seen_name": name, "seen_at": when} for name, when in sorted(seen.items())],
            )
            return result.rowcount or 0

    def push_targets(self, names: Iterable[str]) -> dict[str, PushTarget | None]:
        """For each named client, where to push ``poll_now``: an accepted client
        whose agent last said it runs in daemon mode with a callback address;
        ``None`` for every other name (once mode, no listener, unknown)."""
        wanted = sorted(set(names))
        found: dict[str, PushTarget | None] = dict.fromkeys(wanted)
        with self.db.tx(write=False) as session:
            for name, callback, fp in session.execute(
                select(Client.name, Client.callback_address, Client.fingerprint).where(
                    Client.name.in_(wanted),
                    Client.status == ClientStatus.ACCEPTED.value,
                    Client.agent_mode == AgentMode.DAEMON.value,
                    Client.callback_address.is_not(None),
                    Client.fingerprint.is_not(None),
                )
            ):
                if callback and fp:
                    found[name] = PushTarget(name, callback, fp)
        return found

    # --- groups ----------------------------------------------------------------

    def create_group(self, kind: str, name: str, by: str) -> None:
        """Create an empty client or user group (``kind`` is "client" or "user")."""
        model = ClientGroup if kind == "client" else UserGroup
        with self.db.tx() as session:
            if session.scalars(select(model).where(model.name == name)).first():
                raise Conflict(f"{kind} group {name} exists already")
            session.add(model(name=name, created_at=utcnow()))
            self.audit.write(session, by, "group_create", detail=f"{kind} group {name}")

    def delete_group(self, kind: str, name: str, by: str) -> None:
        """Delete a group, its memberships and the grants that name it."""
        with self.db.tx() as session:
            session.delete(find_group(session, kind, name))
            self.audit.write(session, by, "group_delete", detail=f"{kind} group {name}")

    def add_member(self, kind: str, group: str, member: str, by: str) -> None:
        """Put a user, a client or (``@name``) a client group into a group."""
        with self.db.tx() as session:
            self._change_member(session, kind, group, member, True, by)

    def remove_member(self, kind: str, group: str, member: str, by: str) -> None:
        """Take a user, a client or (``@name``) a client group out of a group."""
        with self.db.tx() as session:
            self._change_member(session, kind, group, member, False, by)

    def _change_member(
        self, session: Session, kind: str, group_name: str, member: str, add: bool, by: str
    ) -> None:
        is_group = member.startswith("@")
        name = member.removeprefix("@")
        group = find_group(session, kind, group_name)
        if kind == "user":
            if is_group:
                raise InvalidArgument("user groups do not nest")
            user = find_user(session, name)
            cond = (UserGroupMember.group_id == group.id) & (UserGroupMember.user_id == user.id)
            existing = session.scalars(select(UserGroupMember).where(cond)).first()
            if add and existing is None:
                session.add(UserGroupMember(group_id=group.id, user_id=user.id))
            elif not add and existing is not None:
                session.delete(existing)
        else:
            if is_group:
                child = find_group(session, "client", name)
                below = reachable_groups(session, [child.id], up=False)[child.id]
                if child.id == group.id or group.id in below:
                    raise InvalidArgument(f"adding group {name} to {group_name} makes a cycle")
                cond = (ClientGroupMember.group_id == group.id) & (
                    ClientGroupMember.member_group_id == child.id
                )
                new = ClientGroupMember(group_id=group.id, member_group_id=child.id)
            else:
                client = find_client(session, name)
                cond = (ClientGroupMember.group_id == group.id) & (
                    ClientGroupMember.client_id == client.id
                )
                new = ClientGroupMember(group_id=group.id, client_id=client.id)
            existing_member = session.scalars(select(ClientGroupMember).where(cond)).first()
            if add and existing_member is None:
                session.add(new)
            elif not add and existing_member is not None:
                session.delete(existing_member)
        self.audit.write(
            session,
            by,
            "group_add" if add else "group_remove",
            detail=f"{kind} group {group_name}: {'group ' if is_group else ''}{name}",
        )

    def groups(self, kind: str) -> list[dict[str, Any]]:
        """Every group of this kind with its members (``@name`` for a nested group)."""
        with self.db.tx(write=False) as session:
            if kind == "user":
                out: dict[str, list[str]] = {
                    g.name: [] for g in session.scalars(select(UserGroup).order_by(UserGroup.name))
                }
                for group, user in session.execute(
                    select(UserGroup.name, User.name)
                    .join(UserGroupMember, UserGroupMember.group_id == UserGroup.id)
                    .join(User, User.id == UserGroupMember.user_id)
                    .order_by(User.name)
                ):
                    out[group].append(user)
                return [{"name": g, "members": m} for g, m in out.items()]
            names = {
                g.id: g.name
                for g in session.scalars(select(ClientGroup).order_by(ClientGroup.name))
            }
            members: dict[int, list[str]] = {gid: [] for gid in names}
            client_names = dict(session.execute(select(Client.id, Client.name)).all())
            for row in session.scalars(select(ClientGroupMember)):
                label = (
                    client_names[row.client_id]
                    if row.client_id is not None
                    else f"@{names[row.member_group_id or 0]}"
                )
                members[row.group_id].append(label)
            return [{"name": names[gid], "members": sorted(members[gid])} for gid in names]

    # --- grants ----------------------------------------------------------------

    def add_grant(self, subject: str, privilege: str, target: str, by: str) -> int:
        """Let ``subject`` (user or ``@usergroup``) use ``privilege`` on ``target``
        (client or ``@clientgroup``); returns the grant's id."""
        with self.db.tx() as session:
            grant = Grant(privilege=privilege, created_by=by, created_at=utcnow())
            if subject.startswith("@"):
                grant.user_group_id = find_group(session, "user", subject[1:]).id
            else:
                grant.user_id = find_user(session, subject).id
            if target.startswith("@"):
                grant.client_group_id = find_group(session, "client", target[1:]).id
            else:
                grant.client_id = find_client(session, target).id
            session.add(grant)
            session.flush()
            self.audit.write(
                session,
                by,
                "grant_add",
                detail=f"grant {grant.id}: {subject} may {privilege} on {target}",
            )
            return grant.id

    def remove_grant(self, grant_id: int, by: str) -> None:
        """Remove one grant by id."""
        with self.db.tx() as session:
            grant = session.get(Grant, grant_id)
            if grant is None:
                raise NotFound(f"no grant {grant_id}")
            session.delete(grant)
            self.audit.write(session, by, "grant_remove", detail=f"grant {grant_id}")

    def grants(self) -> list[dict[str, Any]]:
        """Every grant, oldest first, with names (``@name`` for a group)."""
        with self.db.tx(write=False) as session:
            users = dict(session.execute(select(User.id, User.name)).all())
            ugroups = dict(session.execute(select(UserGroup.id, UserGroup.name)).all())
            clients = dict(session.execute(select(Client.id, Client.name)).all())
            cgroups = dict(session.execute(select(ClientGroup.id, ClientGroup.name)).all())
            return [
                {
                    "id": g.id,
                    "subject": users[g.user_id]
                    if g.user_id
                    else f"@{ugroups[g.user_group_id or 0]}",
                    "privilege": g.privilege,
                    "target": clients[g.client_id]
                    if g.client_id
                    else f"@{cgroups[g.client_group_id or 0]}",
                    "created_by": g.created_by,
                    "created_at": g.created_at,
                }
                for g in session.scalars(select(Grant).order_by(Grant.id))
            ]


# Lookups and ACL facts inside another part's transaction.


def find_client(session: Session, name: str) -> Client:
    """The client of this name, or ``NotFound``."""
    client = session.scalars(select(Client).where(Client.name == name)).first()
    if client is None:
        raise NotFound(f"no client {name}")
    return client


def find_user(session: Session, name: str) -> User:
    """The user of this name, or ``NotFound``."""
    user = session.scalars(select(User).where(User.name == name)).first()
    if user is None:
        raise NotFound(f"no user {name}")
    return user


def find_group(session: Session, kind: str, name: str) -> ClientGroup | UserGroup:
    """The client or user group of this name, or ``NotFound``."""
    group: ClientGroup | UserGroup | None
    if kind == "client":
        group = session.scalars(select(ClientGroup).where(ClientGroup.name == name)).first()
    else:
        group = session.scalars(select(UserGroup).where(UserGroup.name == name)).first()
    if group is None:
        raise NotFound(f"no {kind} group {name}")
    return group


def reachable_groups(session: Session, start: Iterable[int], up: bool) -> dict[int, set[int]]:
    """For each client group in ``start``, every group reachable through nesting:
    ``up`` to the groups that contain it, else down to the groups inside it.

    One query per nesting level, on indexed columns and only the rows on the
    way, so a poll pays for its own client's groups, not for the fleet.
    """
    starts = set(start)
    edges: dict[int, set[int]] = {}
    seen: set[int] = set()
    frontier = set(starts)
    while frontier:
        seen |= frontier
        query: sa.Select[Any, Any]
        if up:
            query = select(ClientGroupMember.member_group_id, ClientGroupMember.group_id).where(
                ClientGroupMember.member_group_id.in_(frontier)
            )
        else:
            query = select(ClientGroupMember.group_id, ClientGroupMember.member_group_id).where(
                ClientGroupMember.group_id.in_(frontier),
                ClientGroupMember.member_group_id.is_not(None),
            )
        found = [(int(a), int(b)) for a, b in session.execute(query).all() if a and b]
        for source, reached in found:
            edges.setdefault(source, set()).add(reached)
        frontier = {reached for _, reached in found} - seen
    out: dict[int, set[int]] = {}
    for group_id in starts:
        reached_set: set[int] = set()
        todo = [group_id]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in reached_set:
                    reached_set.add(nxt)
                    todo.append(nxt)
        out[group_id] = reached_set
    return out


@functools.lru_cache(maxsize=65536)
def cert_not_after(cert_pem: str | None) -> dt.datetime | None:
    """When a client's current certificate expires (naive UTC, as the store's
    times), read from the certificate itself, so a renewal shows at once; None
    without one. Cached: a listing of the fleet parses each certificate once."""
    if not cert_pem:
        return None
    try:
        cert = certs.load_cert(cert_pem)
    except CertificateError:
        log.warning("a stored client certificate cannot be read; its expiry is not shown")
        return None
    return cert.not_valid_after_utc.replace(tzinfo=None)


def clients_in_groups(session: Session, names: Iterable[str]) -> set[int]:
    """The ids of every client in the named client groups, nested groups included."""
    group_ids = [find_group(session, "client", name).id for name in names]
    below = reachable_groups(session, group_ids, up=False)
    every = set(group_ids).union(*below.values())
    return {
        cid
        for (cid,) in session.execute(
            select(ClientGroupMember.client_id).where(
                ClientGroupMember.group_id.in_(every), ClientGroupMember.client_id.is_not(None)
            )
        )
        if cid is not None
    }


def acl_targets(session: Session, client_ids: Iterable[int]) -> dict[int, acl.Target]:
    """For each client, the ACL's target: the client and every group it is in, nesting resolved."""
    ids = list(client_ids)
    direct: dict[int, set[int]] = {cid: set() for cid in ids}
    for group_id, client_id in session.execute(
        select(ClientGroupMember.group_id, ClientGroupMember.client_id).where(
            ClientGroupMember.client_id.in_(ids)
        )
    ):
        direct[client_id or 0].add(group_id)
    above = reachable_groups(session, set().union(*direct.values()), up=True)
    return {
        cid: acl.Target(cid, frozenset(groups.union(*(above[g] for g in groups))))
        for cid, groups in direct.items()
    }


def acl_subject(session: Session, user_id: int) -> acl.Subject:
    """The ACL's subject for a job owner: the user, their groups, admin and active flags."""
    user = session.get(User, user_id)
    assert user is not None  # jobs.owner_id is a foreign key
    group_ids = frozenset(
        session.scalars(select(UserGroupMember.group_id).where(UserGroupMember.user_id == user_id))
    )
    active = user.status == UserStatus.ACTIVE
    return acl.Subject(user.id, group_ids, user.is_admin and active, active)


def acl_grants(session: Session, targets: Iterable[acl.Target]) -> list[acl.GrantRule]:
    """The grants that name one of ``targets`` or one of their groups."""
    targets = list(targets)
    client_ids = [t.client_id for t in targets]
    group_ids = set().union(*(t.group_ids for t in targets)) if client_ids else set()
    return [
        acl.GrantRule(g.user_id, g.user_group_id, g.privilege, g.client_id, g.client_group_id)
        for g in session.scalars(
            select(Grant).where(
                sa.or_(Grant.client_id.in_(client_ids), Grant.client_group_id.in_(group_ids))
            )
        )
    ]
