"""Every database read and write of the server, and nothing else.

Each public method is one transaction. A state change and its audit row are
written in the same transaction. SQLAlchemy errors are mapped here: a busy
SQLite database becomes ``Unavailable`` (the caller retries), an integrity
error ``Conflict``.

Writers on SQLite take the database lock at ``BEGIN`` (``BEGIN IMMEDIATE``) so a
read-then-write transaction can never fail half-way with "database is locked";
on PostgreSQL the poll claims its rows with ``FOR UPDATE SKIP LOCKED`` so
several daemons never send the same assignment.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from scire_schema import documents
from scire_server import acl
from scire_server.exceptions import (
    Conflict,
    EnrollmentRefused,
    IllegalTransition,
    InstanceConflict,
    InvalidArgument,
    NotFound,
    NotHeld,
    Unavailable,
)
from scire_server.models import (
    Assignment,
    Client,
    ClientGroup,
    ClientGroupMember,
    EnrollmentToken,
    Event,
    Grant,
    Job,
    Server,
    User,
    UserGroup,
    UserGroupMember,
)
from scire_server.states import FINAL, State, allowed

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT = 30_000  # milliseconds a writer waits for the SQLite lock
READ_ONLY = "scire_read_only"  # execution option of the engine that read transactions use


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    """An engine with the settings Scire relies on (WAL and a busy timeout on SQLite)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling is switched off so BEGIN is ours.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Readers start deferred and never wait for a writer (WAL).
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def upgrade_database(url: str) -> None:
    """Bring the database to the newest schema (Alembic ``upgrade head``)."""
    from scire_server import migrations

    migrations.upgrade(url)


# Plain values handed out of the store, so no caller touches an ORM object
# after its session has closed.


@dataclass(frozen=True)
class Caller:
    kind: str  # "client" | "user"
    id: int
    name: str
    is_admin: bool = False


@dataclass(frozen=True)
class Delivery:
    xml: str
    job_id: int
    name: str


@dataclass
class PollResult:
    deliveries: list[Delivery] = field(default_factory=list)
    reconcile: list[dict[str, Any]] = field(default_factory=list)
    denied: int = 0


@dataclass
class SubmitResult:
    job_id: int
    accepted: list[str]
    refused: list[str]


@dataclass(frozen=True)
class JobSpec:
    name: str
    script: str
    interpreter: str
    privilege: str
    priority: int
    timeout: int
    output_limit: int
    max_attempts: int
    not_before: dt.datetime | None
    expires_at: dt.datetime | None
    rerun_on_agent_crash: bool


def _row(obj: Any, *names: str) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in names}


class Store:
    """The server's database. ``server_name`` signs every audit row it writes."""

    def __init__(self, engine: Engine, server_name: str) -> None:
        self.engine = engine
        self.server_name = server_name
        self.server_id: int | None = None
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )
        self._postgres = engine.dialect.name == "postgresql"
        self._sqlite_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    @contextlib.contextmanager
    def tx(self, write: bool = True) -> Iterator[Session]:
        """One transaction. ``write=False`` for reads: on SQLite they neither
        take the write lock nor queue behind writers."""
        try:
            # SQLite has one writer at a time; threads of this daemon queue on a
            # lock instead of in SQLite's busy handler, which sleeps and retries.
            if not write:
                with self._read_sessions.begin() as session:
                    yield session
                return
            with self._sqlite_lock, self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            if "locked" in str(exc) or "could not serialize" in str(exc):
                raise Unavailable("database busy, try again") from exc
            raise
        except IntegrityError as exc:
            raise Conflict(f"conflicts with an existing object: {exc.orig}") from exc

    def close(self) -> None:
        self.engine.dispose()

    def _locked(self, query: Any, skip_locked: bool = False) -> Any:
        """Lock the assignment rows a read-then-write transaction reads.

        On PostgreSQL (READ COMMITTED) a row read without a lock may change
        under us; ``FOR UPDATE`` re-reads it after the other writer commits.
        Sweeps skip rows another daemon holds (it is handling them). SQLite
        needs nothing: ``BEGIN IMMEDIATE`` already serializes writers.
        """
        if self._postgres:
            return query.with_for_update(of=Assignment, skip_locked=skip_locked)
        return query

    # --- audit -------------------------------------------------------------

    def _event(
        self,
        session: Session,
        actor: str,
        action: str,
        *,
        job_id: int | None = None,
        client: str | None = None,
        old: str | None = None,
        new: str | None = None,
        detail: str | None = None,
        at: dt.datetime | None = None,
    ) -> None:
        session.add(
            Event(
                at=at or utcnow(),
                actor=actor,
                action=action,
                job_id=job_id,
                client=client,
                old_state=old,
                new_state=new,
                server=self.server_name,
                detail=detail,
            )
        )

    def record(self, actor: str, action: str, **kwargs: Any) -> None:
        """An audit row on its own: a refused call, whose own transaction rolled back."""
        with self.tx() as session:
            self._event(session, actor, action, **kwargs)

    def events(
        self, job_id: int | None = None, client: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        with self.tx(write=False) as session:
            query = select(Event).order_by(Event.id.desc()).limit(limit)
            if job_id is not None:
                query = query.where(Event.job_id == job_id)
            if client is not None:
                query = query.where(Event.client == client)
            rows = session.scalars(query).all()
            return [
                _row(e, "id", "at", "actor", "action", "job_id", "client")
                | _row(e, "old_state", "new_state", "server", "detail")
                for e in reversed(rows)
            ]

    def _transition(
        self,
        session: Session,
        assignment: Assignment,
        new: State,
        actor: str,
        client_name: str,
        action: str = "transition",
        detail: str | None = None,
        now: dt.datetime | None = None,
    ) -> None:
        old = assignment.state
        if not allowed(old, new):
            raise IllegalTransition(
                f"job {assignment.job_id} on {client_name}: {old} -> {new.value} is not allowed"
            )
        now = now or utcnow()
        assignment.state = new.value
        assignment.updated_at = now
        self._event(
            session,
            actor,
            action,
            job_id=assignment.job_id,
            client=client_name,
            old=old,
            new=new.value,
            detail=detail,
            at=now,
        )
        log.info(
            "job %s on %s: %s -> %s (%s%s)",
            assignment.job_id,
            client_name,
            old,
            new.value,
            actor,
            f": {detail}" if detail else "",
            extra={"job": assignment.job_id, "client": client_name, "old": old, "new": new.value},
        )

    # --- servers -----------------------------------------------------------

    def start_server(
        self,
        instance_key: str,
        hostname: str,
        pid: int,
        url: str,
        stale_after: int,
        pid_alive: bool,
    ) -> dict[str, Any]:
        """Register this daemon, or refuse when another live one holds the key.

        ``pid_alive`` says whether the pid of the existing row still runs on
        this host: a crashed previous life on the same host need not wait for
        its heartbeat to go stale.
        """
        now = utcnow()
        with self.tx() as session:
            row = session.scalars(select(Server).where(Server.instance_key == instance_key)).first()
            if row is None:
                row = Server(
                    instance_key=instance_key,
                    hostname=hostname,
                    pid=pid,
                    url=url,
                    state="running",
                    started_at=now,
                    heartbeat_at=now,
                )
                session.add(row)
                session.flush()
                self.server_id = row.id
                return {"previous_state": None, "server_id": row.id}
            fresh = row.heartbeat_at > now - dt.timedelta(seconds=stale_after)
            same_host_dead = row.hostname == hostname and not pid_alive
            if row.state == "running" and fresh and not same_host_dead:
                raise InstanceConflict(
                    f"instance key {instance_key!r} is held by a live daemon "
                    f"(pid {row.pid} on {row.hostname}, heartbeat {row.heartbeat_at:%H:%M:%S} UTC); "
                    "give this daemon its own instance_key or stop the other one"
                )
            previous = {
                "previous_state": row.state,
                "previous_pid": row.pid,
                "previous_host": row.hostname,
            }
            row.hostname, row.pid, row.url = hostname, pid, url
            row.state, row.started_at, row.heartbeat_at = "running", now, now
            self.server_id = row.id
            return previous | {"server_id": row.id}

    def server_pid(self, instance_key: str) -> tuple[str, int] | None:
        with self.tx(write=False) as session:
            row = session.scalars(select(Server).where(Server.instance_key == instance_key)).first()
            return None if row is None else (row.hostname, row.pid)

    def heartbeat(self) -> None:
        with self.tx() as session:
            session.execute(
                update(Server).where(Server.id == self.server_id).values(heartbeat_at=utcnow())
            )

    def stop_server(self) -> None:
        with self.tx() as session:
            session.execute(
                update(Server)
                .where(Server.id == self.server_id)
                .values(state="stopped", heartbeat_at=utcnow())
            )

    def servers(self) -> list[dict[str, Any]]:
        with self.tx(write=False) as session:
            rows = session.scalars(select(Server).order_by(Server.id)).all()
            return [
                _row(
                    r,
                    "instance_key",
                    "hostname",
                    "pid",
                    "url",
                    "state",
                    "started_at",
                    "heartbeat_at",
                )
                for r in rows
            ]

    # --- identities --------------------------------------------------------

    def caller_by_fingerprint(self, fingerprint: str) -> tuple[Caller | None, str | None]:
        """The enrolled client or active user with this certificate.

        Returns (caller, None), or (None, why) for a known but revoked identity,
        or (None, None) for an unknown certificate.
        """
        with self.tx(write=False) as session:
            client = session.scalars(
                select(Client).where(Client.fingerprint == fingerprint)
            ).first()
            if client is not None:
                if client.status != "accepted":
                    return None, f"client {client.name} is {client.status}"
                return Caller("client", client.id, client.name), None
            user = session.scalars(select(User).where(User.fingerprint == fingerprint)).first()
            if user is not None:
                if user.status != "active":
                    return None, f"user {user.name} is {user.status}"
                return Caller("user", user.id, user.name, user.is_admin), None
            return None, None

    def add_user(self, name: str, fingerprint: str, is_admin: bool, actor: str) -> None:
        with self.tx() as session:
            if session.scalars(select(User).where(User.name == name)).first():
                raise Conflict(f"user {name} exists already")
            session.add(
                User(
                    name=name,
                    fingerprint=fingerprint,
                    is_admin=is_admin,
                    status="active",
                    created_at=utcnow(),
                )
            )
            self._event(session, actor, "user_add", detail=f"user {name} admin={is_admin}")

    def users(self) -> list[dict[str, Any]]:
        with self.tx(write=False) as session:
            users = session.scalars(select(User).order_by(User.name)).all()
            groups = self._user_group_names(session)
            return [
                _row(u, "name", "is_admin", "status", "created_at", "fingerprint")
                | {"groups": groups.get(u.id, [])}
                for u in users
            ]

    def revoke_user(self, name: str, actor: str) -> None:
        with self.tx() as session:
            user = self._user(session, name)
            if user.status == "revoked":
                return
            user.status = "revoked"
            self._event(session, actor, "user_revoke", detail=f"user {name}")

    def _user(self, session: Session, name: str) -> User:
        user = session.scalars(select(User).where(User.name == name)).first()
        if user is None:
            raise NotFound(f"no user {name}")
        return user

    def _user_group_names(self, session: Session) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for user_id, group in session.execute(
            select(UserGroupMember.user_id, UserGroup.name)
            .join(UserGroup, UserGroup.id == UserGroupMember.group_id)
            .order_by(UserGroup.name)
        ):
            out.setdefault(user_id, []).append(group)
        return out

    # --- clients and enrollment ---------------------------------------------

    def add_token(self, token_hash: str, ttl: int, uses: int, actor: str) -> dt.datetime:
        now = utcnow()
        expires = now + dt.timedelta(seconds=ttl)
        with self.tx() as session:
            session.add(
                EnrollmentToken(
                    token_hash=token_hash,
                    created_by=actor,
                    created_at=now,
                    expires_at=expires,
                    uses_left=uses,
                )
            )
            self._event(
                session,
                actor,
                "token_create",
                detail=f"enrollment token for {uses} client(s), valid until {expires:%Y-%m-%d %H:%M} UTC",
            )
        return expires

    def register_client(
        self, name: str, csr_pem: str, facts: dict[str, Any], token_hash: str | None
    ) -> tuple[str, bool]:
        """Record an enrollment request. Returns (status, token_was_valid).

        The same request again is answered with its current status; a new
        request for a name that is pending or rejected replaces the old one.
        An accepted or revoked name cannot be taken over.
        """
        now = utcnow()
        with self.tx() as session:
            client = session.scalars(select(Client).where(Client.name == name)).first()
            if client is not None and client.csr_pem == csr_pem and client.status != "pending":
                return client.status, False
            if client is not None and client.status in ("accepted", "revoked"):
                raise EnrollmentRefused(
                    f"client {name} is {client.status} with another key; "
                    f"an administrator must remove it first (scire-admin client delete {name})"
                )
            token_ok = False
            if token_hash:
                token = session.scalars(
                    select(EnrollmentToken).where(EnrollmentToken.token_hash == token_hash)
                ).first()
                if token is not None and token.expires_at > now and token.uses_left > 0:
                    token.uses_left -= 1
                    token_ok = True
            if client is not None and client.csr_pem == csr_pem and not token_ok:
                return "pending", False  # the same request again, still waiting
            if client is None:
                client = Client(
                    name=name, status="pending", csr_pem=csr_pem, facts=facts, registered_at=now
                )
                session.add(client)
            else:
                client.csr_pem, client.facts, client.status = csr_pem, facts, "pending"
                client.registered_at, client.decided_at, client.decided_by = now, None, None
            self._event(
                session,
                f"client:{name}",
                "register",
                client=name,
                new="pending",
                detail="with a valid enrollment token"
                if token_ok
                else ("with an invalid or used token" if token_hash else None),
            )
            return "pending", token_ok

    def client_enrollment(self, name: str) -> dict[str, Any]:
        with self.tx(write=False) as session:
            client = self._client(session, name)
            return _row(client, "name", "status", "csr_pem", "cert_pem")

    def decide_client(
        self,
        name: str,
        status: str,
        actor: str,
        cert_pem: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """accept (with the signed certificate), reject or revoke a client."""
        allowed_from = {
            "accepted": ("pending",),
            "rejected": ("pending",),
            "revoked": ("accepted", "pending"),
        }[status]
        with self.tx() as session:
            client = self._client(session, name)
            if client.status == status:
                return
            if client.status not in allowed_from:
                raise IllegalTransition(f"client {name} is {client.status}, cannot become {status}")
            old = client.status
            client.status, client.decided_at, client.decided_by = status, utcnow(), actor
            if cert_pem is not None:
                client.cert_pem, client.fingerprint = cert_pem, fingerprint
            action = {
                "accepted": "client_accept",
                "rejected": "client_reject",
                "revoked": "client_revoke",
            }[status]
            self._event(session, actor, action, client=name, old=old, new=status)
            log.info("client %s: %s -> %s by %s", name, old, status, actor)

    def delete_client(self, name: str, actor: str) -> None:
        with self.tx() as session:
            client = self._client(session, name)
            if client.status == "accepted":
                raise IllegalTransition(f"client {name} is accepted; revoke it first")
            session.delete(client)
            self._event(session, actor, "client_delete", client=name, old=client.status)

    def clients(self) -> list[dict[str, Any]]:
        with self.tx(write=False) as session:
            clients = session.scalars(select(Client).order_by(Client.name)).all()
            counts = dict(
                session.execute(
                    select(Assignment.client_id, sa.func.count())
                    .where(
                        Assignment.state.in_(
                            [State.PENDING, State.SENT, State.ACKNOWLEDGED, State.RUNNING]
                        )
                    )
                    .group_by(Assignment.client_id)
                ).all()
            )
            return [
                _row(c, "name", "status", "registered_at", "last_seen_at", "fingerprint")
                | {"active_jobs": counts.get(c.id, 0)}
                for c in clients
            ]

    def client_detail(self, name: str) -> dict[str, Any]:
        with self.tx(write=False) as session:
            client = self._client(session, name)
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
            return _row(
                client,
                "name",
                "status",
                "fingerprint",
                "facts",
                "registered_at",
                "decided_at",
                "decided_by",
                "last_seen_at",
            ) | {
                "groups": groups,
                "recent_jobs": [
                    {"job_id": j, "name": n, "state": s, "updated_at": u} for j, n, s, u in recent
                ],
            }

    def _client(self, session: Session, name: str) -> Client:
        client = session.scalars(select(Client).where(Client.name == name)).first()
        if client is None:
            raise NotFound(f"no client {name}")
        return client

    # --- groups ------------------------------------------------------------

    def create_group(self, kind: str, name: str, actor: str) -> None:
        model = ClientGroup if kind == "client" else UserGroup
        with self.tx() as session:
            if session.scalars(select(model).where(model.name == name)).first():
                raise Conflict(f"{kind} group {name} exists already")
            session.add(model(name=name, created_at=utcnow()))
            self._event(session, actor, "group_create", detail=f"{kind} group {name}")

    def delete_group(self, kind: str, name: str, actor: str) -> None:
        with self.tx() as session:
            group = self._group(session, kind, name)
            session.delete(group)
            self._event(session, actor, "group_delete", detail=f"{kind} group {name}")

    def _group(self, session: Session, kind: str, name: str) -> Any:
        model = ClientGroup if kind == "client" else UserGroup
        group = session.scalars(select(model).where(model.name == name)).first()
        if group is None:
            raise NotFound(f"no {kind} group {name}")
        return group

    def change_member(
        self, kind: str, group_name: str, member: str, member_is_group: bool, add: bool, actor: str
    ) -> None:
        with self.tx() as session:
            group = self._group(session, kind, group_name)
            if kind == "user":
                if member_is_group:
                    raise InvalidArgument("user groups do not nest")
                user = self._user(session, member)
                cond = (UserGroupMember.group_id == group.id) & (UserGroupMember.user_id == user.id)
                existing = session.scalars(select(UserGroupMember).where(cond)).first()
                if add and existing is None:
                    session.add(UserGroupMember(group_id=group.id, user_id=user.id))
                elif not add and existing is not None:
                    session.delete(existing)
            else:
                if member_is_group:
                    child = self._group(session, "client", member)
                    if child.id == group.id or group.id in self._descendant_groups(
                        session, child.id
                    ):
                        raise InvalidArgument(
                            f"adding group {member} to {group_name} makes a cycle"
                        )
                    cond = (ClientGroupMember.group_id == group.id) & (
                        ClientGroupMember.member_group_id == child.id
                    )
                    new = ClientGroupMember(group_id=group.id, member_group_id=child.id)
                else:
                    client = self._client(session, member)
                    cond = (ClientGroupMember.group_id == group.id) & (
                        ClientGroupMember.client_id == client.id
                    )
                    new = ClientGroupMember(group_id=group.id, client_id=client.id)
                existing_member = session.scalars(select(ClientGroupMember).where(cond)).first()
                if add and existing_member is None:
                    session.add(new)
                elif not add and existing_member is not None:
                    session.delete(existing_member)
            self._event(
                session,
                actor,
                "group_add" if add else "group_remove",
                detail=f"{kind} group {group_name}: {'group ' if member_is_group else ''}{member}",
            )

    def _descendant_groups(self, session: Session, group_id: int) -> set[int]:
        edges = session.execute(
            select(ClientGroupMember.group_id, ClientGroupMember.member_group_id).where(
                ClientGroupMember.member_group_id.is_not(None)
            )
        ).all()
        children: dict[int, list[int]] = {}
        for parent, child in edges:
            if child is not None:
                children.setdefault(parent, []).append(child)
        seen: set[int] = set()
        todo = [group_id]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return seen

    def groups(self, kind: str) -> list[dict[str, Any]]:
        with self.tx(write=False) as session:
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
            for member in session.scalars(select(ClientGroupMember)):
                label = (
                    client_names[member.client_id]
                    if member.client_id is not None
                    else f"@{names[member.member_group_id or 0]}"
                )
                members[member.group_id].append(label)
            return [{"name": names[gid], "members": sorted(members[gid])} for gid in names]

    # --- grants ------------------------------------------------------------

    def add_grant(self, subject: str, privilege: str, target: str, actor: str) -> int:
        """``subject`` is ``user`` or ``@usergroup``; ``target`` is ``client`` or ``@clientgroup``."""
        with self.tx() as session:
            grant = Grant(privilege=privilege, created_by=actor, created_at=utcnow())
            if subject.startswith("@"):
                grant.user_group_id = self._group(session, "user", subject[1:]).id
            else:
                grant.user_id = self._user(session, subject).id
            if target.startswith("@"):
                grant.client_group_id = self._group(session, "client", target[1:]).id
            else:
                grant.client_id = self._client(session, target).id
            session.add(grant)
            session.flush()
            self._event(
                session,
                actor,
                "grant_add",
                detail=f"grant {grant.id}: {subject} may {privilege} on {target}",
            )
            return grant.id

    def remove_grant(self, grant_id: int, actor: str) -> None:
        with self.tx() as session:
            grant = session.get(Grant, grant_id)
            if grant is None:
                raise NotFound(f"no grant {grant_id}")
            session.delete(grant)
            self._event(session, actor, "grant_remove", detail=f"grant {grant_id}")

    def grants(self) -> list[dict[str, Any]]:
        with self.tx(write=False) as session:
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

    # --- the ACL's facts ----------------------------------------------------

    def _client_group_closure(
        self, session: Session, client_ids: Iterable[int]
    ) -> dict[int, set[int]]:
        """For each client, every client group it is in, directly or through nesting.

        Walks up one nesting level per query, touching only the rows on the
        way (both columns are indexed): a poll pays for its own client's groups,
        not for the size of the fleet.
        """
        ids = list(client_ids)
        direct: dict[int, set[int]] = {cid: set() for cid in ids}
        for group_id, client_id in session.execute(
            select(ClientGroupMember.group_id, ClientGroupMember.client_id).where(
                ClientGroupMember.client_id.in_(ids)
            )
        ):
            direct[client_id or 0].add(group_id)
        parents: dict[int, set[int]] = {}
        frontier = set().union(*direct.values()) if direct else set()
        while frontier:
            found = session.execute(
                select(ClientGroupMember.member_group_id, ClientGroupMember.group_id).where(
                    ClientGroupMember.member_group_id.in_(frontier)
                )
            ).all()
            for child, parent in found:
                parents.setdefault(child or 0, set()).add(parent)
            frontier = {parent for _, parent in found} - set(parents)
        out: dict[int, set[int]] = {}
        for cid in ids:
            seen = set(direct[cid])
            todo = list(seen)
            while todo:
                for parent in parents.get(todo.pop(), ()):
                    if parent not in seen:
                        seen.add(parent)
                        todo.append(parent)
            out[cid] = seen
        return out

    def _subject(self, session: Session, user_id: int) -> acl.Subject:
        user = session.get(User, user_id)
        assert user is not None
        group_ids = frozenset(
            session.scalars(
                select(UserGroupMember.group_id).where(UserGroupMember.user_id == user_id)
            )
        )
        return acl.Subject(
            user.id, group_ids, user.is_admin and user.status == "active", user.status == "active"
        )

    def _grants(self, session: Session, targets: Iterable[acl.Target]) -> list[acl.GrantRule]:
        """The grants that name one of ``targets`` or one of their groups."""
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

    # --- jobs --------------------------------------------------------------

    def submit_job(
        self, owner: Caller, spec: JobSpec, hosts: Sequence[str], groups: Sequence[str]
    ) -> SubmitResult:
        now = utcnow()
        with self.tx() as session:
            targets: dict[int, str] = {}
            for name in hosts:
                client = self._client(session, name)
                targets[client.id] = client.name
            if groups:
                all_groups = {g.name: g.id for g in session.scalars(select(ClientGroup))}
                member_rows = session.execute(
                    select(
                        ClientGroupMember.group_id,
                        ClientGroupMember.client_id,
                        ClientGroupMember.member_group_id,
                    )
                ).all()
                for gname in groups:
                    if gname not in all_groups:
                        raise NotFound(f"no client group {gname}")
                    todo, seen = [all_groups[gname]], {all_groups[gname]}
                    while todo:
                        gid = todo.pop()
                        for group_id, client_id, member_group_id in member_rows:
                            if group_id != gid:
                                continue
                            if client_id is not None:
                                targets.setdefault(client_id, "")
                            elif member_group_id is not None and member_group_id not in seen:
                                seen.add(member_group_id)
                                todo.append(member_group_id)
                for cid, cname in session.execute(
                    select(Client.id, Client.name).where(Client.id.in_(list(targets)))
                ):
                    targets[cid] = cname
            if not targets:
                raise InvalidArgument("the job has no target clients")
            subject = self._subject(session, owner.id)
            closure = self._client_group_closure(session, targets)
            grants = self._grants(
                session, [acl.Target(cid, frozenset(groups)) for cid, groups in closure.items()]
            )
            statuses = dict(
                session.execute(
                    select(Client.id, Client.status).where(Client.id.in_(list(targets)))
                ).all()
            )
            accepted: list[tuple[int, str]] = []
            refused: list[str] = []
            for cid, cname in sorted(targets.items(), key=lambda kv: kv[1]):
                target = acl.Target(cid, frozenset(closure[cid]))
                if statuses[cid] != "accepted":
                    refused.append(f"{cname} (client is {statuses[cid]})")
                elif not acl.permitted(subject, spec.privilege, target, grants):
                    refused.append(f"{cname} (no grant: {owner.name} may not {spec.privilege})")
                else:
                    accepted.append((cid, cname))
            if not accepted:
                raise acl.denied_error(owner.name, spec.privilege, refused)
            job = Job(owner_id=owner.id, created_at=now, **vars(spec))
            session.add(job)
            session.flush()
            for cid, cname in accepted:
                session.add(
                    Assignment(
                        job_id=job.id,
                        client_id=cid,
                        state=State.PENDING.value,
                        priority=spec.priority,
                        job_created_at=now,
                        attempt=0,
                        updated_at=now,
                    )
                )
                self._event(
                    session,
                    f"user:{owner.name}",
                    "submit",
                    job_id=job.id,
                    client=cname,
                    new=State.PENDING.value,
                    at=now,
                )
            for why in refused:
                self._event(
                    session,
                    f"user:{owner.name}",
                    "submit_refused",
                    job_id=job.id,
                    client=why.split(" ", 1)[0],
                    detail=why,
                    at=now,
                )
            log.info(
                "job %s (%s) submitted by %s for %d client(s), %d refused",
                job.id,
                spec.name,
                owner.name,
                len(accepted),
                len(refused),
                extra={"job": job.id, "user": owner.name},
            )
            return SubmitResult(job.id, [c for _, c in accepted], refused)

    def _job_visible(self, session: Session, caller: Caller, job_id: int) -> Job:
        job = session.get(Job, job_id)
        if job is None or (not caller.is_admin and job.owner_id != caller.id):
            raise NotFound(f"no job {job_id}")
        return job

    def jobs(
        self, caller: Caller, limit: int = 50, state: str | None = None
    ) -> list[dict[str, Any]]:
        with self.tx(write=False) as session:
            query = (
                select(Job, User.name)
                .join(User, User.id == Job.owner_id)
                .order_by(Job.id.desc())
                .limit(limit)
            )
            if not caller.is_admin:
                query = query.where(Job.owner_id == caller.id)
            rows = session.execute(query).all()
            ids = [job.id for job, _ in rows]
            counts: dict[int, dict[str, int]] = {}
            for job_id, st, n in session.execute(
                select(Assignment.job_id, Assignment.state, sa.func.count())
                .where(Assignment.job_id.in_(ids))
                .group_by(Assignment.job_id, Assignment.state)
            ):
                counts.setdefault(job_id, {})[st] = n
            out = []
            for job, owner in reversed(rows):
                states = counts.get(job.id, {})
                summary = _job_state(states)
                if state and summary != state:
                    continue
                out.append(
                    _row(job, "id", "name", "priority", "privilege", "created_at")
                    | {
                        "owner": owner,
                        "state": summary,
                        "states": states,
                        "cancelled": job.cancelled_at is not None,
                    }
                )
            return out

    def job_detail(self, caller: Caller, job_id: int) -> dict[str, Any]:
        with self.tx(write=False) as session:
            job = self._job_visible(session, caller, job_id)
            owner = session.get(User, job.owner_id)
            rows = session.execute(
                select(Assignment, Client.name)
                .join(Client, Client.id == Assignment.client_id)
                .where(Assignment.job_id == job_id)
                .order_by(Client.name)
            ).all()
            assignments = [
                {"client": cname}
                | _row(
                    a,
                    "state",
                    "attempt",
                    "exit_code",
                    "sent_at",
                    "acknowledged_at",
                    "started_at",
                    "finished_at",
                    "output",
                    "output_truncated",
                    "reason",
                    "delivery_id",
                    "updated_at",
                )
                for a, cname in rows
            ]
            states: dict[str, int] = {}
            for a in assignments:
                states[a["state"]] = states.get(a["state"], 0) + 1
            return _row(
                job,
                "id",
                "name",
                "script",
                "interpreter",
                "privilege",
                "priority",
                "timeout",
                "output_limit",
                "max_attempts",
                "not_before",
                "expires_at",
                "rerun_on_agent_crash",
                "created_at",
                "cancelled_at",
            ) | {
                "owner": owner.name if owner else "?",
                "state": _job_state(states),
                "assignments": assignments,
            }

    def cancel_job(self, caller: Caller, job_id: int) -> int:
        now = utcnow()
        with self.tx() as session:
            job = self._job_visible(session, caller, job_id)
            job.cancelled_at = job.cancelled_at or now
            rows = session.execute(
                self._locked(
                    select(Assignment, Client.name)
                    .join(Client, Client.id == Assignment.client_id)
                    .where(Assignment.job_id == job_id, Assignment.state.not_in(list(FINAL)))
                )
            ).all()
            for assignment, cname in rows:
                self._transition(
                    session,
                    assignment,
                    State.CANCELLED,
                    f"user:{caller.name}",
                    cname,
                    action="cancel",
                    now=now,
                )
                assignment.finished_at = now
                assignment.reason = f"cancelled by {caller.name}"
            return len(rows)

    # --- the agent's calls ----------------------------------------------------

    def touch_client(self, session: Session, client_id: int, now: dt.datetime) -> None:
        session.execute(update(Client).where(Client.id == client_id).values(last_seen_at=now))

    def poll(
        self,
        client: Caller,
        held: Sequence[int],
        running: Sequence[int],
        limit: int,
        ack_timeout: int,
    ) -> PollResult:
        """Reconcile what the agent holds, then claim up to ``limit`` due jobs for it.

        Claiming, the ACL check, and marking ``sent`` happen in this one
        transaction, so a crash leaves each assignment either pending or sent
        with a lease that the sweeper will return.
        """
        now = utcnow()
        result = PollResult()
        actor = f"client:{client.name}"
        with self.tx() as session:
            self.touch_client(session, client.id, now)
            self._reconcile(session, client, set(held), set(running), now, result)
            if limit <= 0:
                return result
            claim = (
                select(Assignment, Job)
                .join(Job, Job.id == Assignment.job_id)
                .where(
                    Assignment.client_id == client.id,
                    Assignment.state == State.PENDING.value,
                    sa.or_(Job.not_before.is_(None), Job.not_before <= now),
                )
                .order_by(Assignment.priority.desc(), Assignment.job_created_at, Assignment.id)
                .limit(limit)
            )
            rows = session.execute(self._locked(claim, skip_locked=True)).all()
            if not rows:
                return result
            target = acl.Target(
                client.id, frozenset(self._client_group_closure(session, [client.id])[client.id])
            )
            grants = self._grants(session, [target])
            subjects: dict[int, acl.Subject] = {}
            owners: dict[int, str] = {}
            deadline = now + dt.timedelta(seconds=ack_timeout)
            for assignment, job in rows:
                if job.expires_at is not None and job.expires_at <= now:
                    self._transition(
                        session,
                        assignment,
                        State.EXPIRED,
                        "server",
                        client.name,
                        action="expire",
                        detail="expired before dispatch",
                        now=now,
                    )
                    continue
                if job.owner_id not in subjects:
                    subjects[job.owner_id] = self._subject(session, job.owner_id)
                    owners[job.owner_id] = session.get(User, job.owner_id).name  # type: ignore[union-attr]
                if not acl.permitted(subjects[job.owner_id], job.privilege, target, grants):
                    detail = (
                        f"{owners[job.owner_id]} may not {job.privilege} on {client.name}"
                        " at dispatch"
                    )
                    self._transition(
                        session,
                        assignment,
                        State.DENIED,
                        "server",
                        client.name,
                        action="deny",
                        detail=detail,
                        now=now,
                    )
                    log.warning(
                        "job %s (%s) on %s: denied: %s", job.id, job.name, client.name, detail
                    )
                    assignment.reason = detail
                    assignment.finished_at = now
                    result.denied += 1
                    continue
                assignment.attempt += 1
                assignment.delivery_id = uuid.uuid4().hex
                assignment.ack_deadline = deadline
                assignment.sent_at = now
                assignment.server_id = self.server_id
                self._transition(
                    session,
                    assignment,
                    State.SENT,
                    actor,
                    client.name,
                    action="send",
                    detail=f"attempt {assignment.attempt}",
                    now=now,
                )
                xml = documents.render_job(
                    documents.JobDocument(
                        job_id=job.id,
                        delivery_id=assignment.delivery_id,
                        attempt=assignment.attempt,
                        name=job.name,
                        owner=owners[job.owner_id],
                        client=client.name,
                        privilege=job.privilege,
                        priority=job.priority,
                        timeout=job.timeout,
                        output_limit=job.output_limit,
                        interpreter=job.interpreter,
                        created=job.created_at,
                        script=job.script,
                        not_before=job.not_before,
                        expires=job.expires_at,
                        rerun_on_agent_crash=job.rerun_on_agent_crash,
                    )
                )
                result.deliveries.append(Delivery(xml, job.id, job.name))
        return result

    def _reconcile(
        self,
        session: Session,
        client: Caller,
        held: set[int],
        running: set[int],
        now: dt.datetime,
        result: PollResult,
    ) -> None:
        rows = session.execute(
            self._locked(
                select(Assignment, Job)
                .join(Job, Job.id == Assignment.job_id)
                .where(
                    Assignment.client_id == client.id,
                    sa.or_(
                        Assignment.job_id.in_(held | running),
                        Assignment.state.in_(
                            [State.ACKNOWLEDGED.value, State.RUNNING.value, State.LOST.value]
                        ),
                    ),
                )
            )
        ).all()
        known = set()
        for assignment, job in rows:
            known.add(assignment.job_id)
            state = State(assignment.state)
            claimed = assignment.job_id in held or assignment.job_id in running
            if claimed and state in (State.CANCELLED, State.EXPIRED):
                result.reconcile.append({"job_id": job.id, "action": state.value})
            elif claimed and state == State.DENIED:
                result.reconcile.append({"job_id": job.id, "action": "unknown"})
            elif state == State.LOST and assignment.job_id in running:
                self._transition(
                    session,
                    assignment,
                    State.RUNNING,
                    f"client:{client.name}",
                    client.name,
                    action="reconcile",
                    detail="agent is back",
                    now=now,
                )
            elif state in (State.ACKNOWLEDGED, State.RUNNING) and not claimed:
                # The agent no longer has the job: its spool was lost or wiped.
                if job.rerun_on_agent_crash and assignment.attempt < job.max_attempts:
                    if state == State.RUNNING:
                        self._transition(
                            session,
                            assignment,
                            State.LOST,
                            "server",
                            client.name,
                            action="reconcile",
                            detail="agent no longer holds it",
                            now=now,
                        )
                    self._transition(
                        session,
                        assignment,
                        State.PENDING,
                        "server",
                        client.name,
                        action="reconcile",
                        detail="agent no longer holds it; rerun",
                        now=now,
                    )
                else:
                    self._transition(
                        session,
                        assignment,
                        State.FAILED,
                        "server",
                        client.name,
                        action="reconcile",
                        detail="agent no longer holds it",
                        now=now,
                    )
                    assignment.reason = "agent no longer holds the job"
                    assignment.finished_at = now
        for job_id in sorted((held | running) - known):
            result.reconcile.append({"job_id": job_id, "action": "unknown"})

    def acknowledge(self, client: Caller, deliveries: Sequence[tuple[int, str]]) -> list[int]:
        now = utcnow()
        acked: list[int] = []
        with self.tx() as session:
            self.touch_client(session, client.id, now)
            for job_id, delivery_id in deliveries:
                assignment = session.scalars(
                    self._locked(
                        select(Assignment).where(
                            Assignment.job_id == job_id, Assignment.client_id == client.id
                        )
                    )
                ).first()
                if assignment is None or assignment.delivery_id != delivery_id:
                    continue
                state = State(assignment.state)
                if state in (State.SENT, State.PENDING):
                    self._transition(
                        session,
                        assignment,
                        State.ACKNOWLEDGED,
                        f"client:{client.name}",
                        client.name,
                        action="acknowledge",
                        now=now,
                    )
                    assignment.acknowledged_at = now
                    acked.append(job_id)
                elif state in (State.ACKNOWLEDGED, State.RUNNING, State.LOST) or state in FINAL:
                    acked.append(job_id)  # a repeated acknowledgement changes nothing
        return acked

    def report(self, client: Caller, report: documents.StatusReport) -> str:
        """Apply a status report. Returns "applied", "duplicate" or "ignored"."""
        now = utcnow()
        actor = f"client:{client.name}"
        new = State(report.state)
        with self.tx() as session:
            self.touch_client(session, client.id, now)
            assignment = session.scalars(
                self._locked(
                    select(Assignment).where(
                        Assignment.job_id == report.job_id, Assignment.client_id == client.id
                    )
                )
            ).first()
            if assignment is None or assignment.delivery_id is None:
                raise NotHeld(
                    f"client {client.name} holds no job {report.job_id}", job_id=report.job_id
                )
            old = State(assignment.state)
            if old == new:
                return "duplicate"
            if old in (State.CANCELLED, State.EXPIRED, State.DENIED) or (
                old in FINAL and new == State.RUNNING
            ):
                self._event(
                    session,
                    actor,
                    "late_report",
                    job_id=report.job_id,
                    client=client.name,
                    old=old.value,
                    new=new.value,
                    detail=f"report of {new.value} after {old.value}; not applied",
                )
                log.info(
                    "job %s on %s: late report %s ignored, stays %s",
                    report.job_id,
                    client.name,
                    new.value,
                    old.value,
                )
                return "ignored"
            if not allowed(old, new):
                raise IllegalTransition(
                    f"job {report.job_id} on {client.name} is {old.value}; cannot become {new.value}",
                    job_id=report.job_id,
                )
            self._transition(
                session,
                assignment,
                new,
                actor,
                client.name,
                action="report",
                detail=report.reason,
                now=now,
            )
            if new == State.RUNNING:
                assignment.started_at = report.started or now
                assignment.acknowledged_at = assignment.acknowledged_at or now
            else:
                assignment.started_at = report.started or assignment.started_at
                assignment.finished_at = report.finished or now
                assignment.exit_code = report.exit_code
                assignment.output = report.output
                assignment.output_truncated = report.truncated
                assignment.reason = report.reason
            return "applied"

    # --- recovery and timed work -----------------------------------------------

    def return_leases(
        self, now: dt.datetime | None = None, own_previous_life: bool = False
    ) -> dict[str, int]:
        """Sent assignments past their ack deadline go back to pending, or fail as
        undeliverable after the job's attempts. With ``own_previous_life`` the
        leases this daemon held before a restart go back too, before their
        deadline, unless they were the job's last attempt."""
        now = now or utcnow()
        counts = {"returned": 0, "undeliverable": 0}
        with self.tx() as session:
            cond = [Assignment.state == State.SENT.value]
            if own_previous_life:
                cond.append(
                    sa.or_(Assignment.ack_deadline <= now, Assignment.server_id == self.server_id)
                )
            else:
                cond.append(Assignment.ack_deadline <= now)
            query = (
                select(Assignment, Job, Client.name)
                .join(Job, Job.id == Assignment.job_id)
                .join(Client, Client.id == Assignment.client_id)
                .where(*cond)
            )
            for assignment, job, cname in session.execute(
                self._locked(query, skip_locked=True)
            ).all():
                deadline_passed = (
                    assignment.ack_deadline is not None and assignment.ack_deadline <= now
                )
                if assignment.attempt >= job.max_attempts and not deadline_passed:
                    # A last attempt from our previous life: its agent may still
                    # acknowledge it; the lease decides when it runs out.
                    continue
                if assignment.attempt >= job.max_attempts:
                    self._transition(
                        session,
                        assignment,
                        State.FAILED,
                        "server",
                        cname,
                        action="lease_expired",
                        detail=f"undeliverable after {assignment.attempt} attempt(s)",
                        now=now,
                    )
                    assignment.reason = "undeliverable"
                    assignment.finished_at = now
                    counts["undeliverable"] += 1
                else:
                    self._transition(
                        session,
                        assignment,
                        State.PENDING,
                        "server",
                        cname,
                        action="lease_expired",
                        detail=f"no acknowledgement for attempt {assignment.attempt}",
                        now=now,
                    )
                    counts["returned"] += 1
                assignment.ack_deadline = None
        return counts

    def expire_jobs(self, now: dt.datetime | None = None) -> int:
        """Jobs past their expiry are not started any more: assignments not yet
        running become ``expired`` (a running one is left to finish)."""
        now = now or utcnow()
        with self.tx() as session:
            rows = session.execute(
                self._locked(
                    select(Assignment, Client.name)
                    .join(Job, Job.id == Assignment.job_id)
                    .join(Client, Client.id == Assignment.client_id)
                    .where(
                        Job.expires_at.is_not(None),
                        Job.expires_at <= now,
                        Assignment.state.in_(
                            [State.PENDING.value, State.SENT.value, State.ACKNOWLEDGED.value]
                        ),
                    ),
                    skip_locked=True,
                )
            ).all()
            for assignment, cname in rows:
                self._transition(
                    session, assignment, State.EXPIRED, "server", cname, action="expire", now=now
                )
                assignment.finished_at = now
                assignment.reason = "expired before it started"
            return len(rows)

    def mark_lost(self, lost_after: int, now: dt.datetime | None = None) -> dict[str, int]:
        """Running assignments whose agent has not polled for ``lost_after`` seconds
        become ``lost``; those whose job allows a rerun go back to pending."""
        now = now or utcnow()
        bound = now - dt.timedelta(seconds=lost_after)
        counts = {"lost": 0, "requeued": 0}
        with self.tx() as session:
            rows = session.execute(
                self._locked(
                    select(Assignment, Job, Client.name)
                    .join(Job, Job.id == Assignment.job_id)
                    .join(Client, Client.id == Assignment.client_id)
                    .where(
                        Assignment.state == State.RUNNING.value,
                        sa.or_(Client.last_seen_at.is_(None), Client.last_seen_at < bound),
                    ),
                    skip_locked=True,
                )
            ).all()
            for assignment, job, cname in rows:
                self._transition(
                    session,
                    assignment,
                    State.LOST,
                    "server",
                    cname,
                    action="lost",
                    detail=f"no word from the agent for {lost_after} s",
                    now=now,
                )
                counts["lost"] += 1
                if job.rerun_on_agent_crash and assignment.attempt < job.max_attempts:
                    self._transition(
                        session,
                        assignment,
                        State.PENDING,
                        "server",
                        cname,
                        action="retry",
                        detail="job allows a rerun",
                        now=now,
                    )
                    counts["requeued"] += 1
            return counts

    def purge(self, older_than_days: int) -> dict[str, int]:
        bound = utcnow() - dt.timedelta(days=older_than_days)
        with self.tx() as session:
            outputs: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(Assignment)
                .where(
                    Assignment.state.in_([s.value for s in FINAL]),
                    Assignment.finished_at < bound,
                    Assignment.output.is_not(None),
                )
                .values(output=None)
            )
            events: sa.CursorResult[Any] = session.execute(  # type: ignore[assignment]
                sa.delete(Event).where(Event.at < bound)
            )
            return {"outputs": outputs.rowcount or 0, "events": events.rowcount or 0}


def _job_state(states: dict[str, int]) -> str:
    """One word for a job from its assignments' states."""
    active = [s for s in states if State(s) not in FINAL]
    if active:
        for s in (State.RUNNING, State.ACKNOWLEDGED, State.SENT, State.LOST, State.PENDING):
            if s.value in active:
                return s.value
    if not states:
        return "empty"
    if len(states) == 1:
        return next(iter(states))
    return "mixed"
