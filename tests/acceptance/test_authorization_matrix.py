"""The authorization matrix against a real server: every remote method (from
``RemoteMethods.table()``) called by every kind of caller, each answer checked
against ``authorization_matrix.MATRIX``, the table ``docs/SECURITY.md`` shows.

One deployment serves the whole matrix (module scope). Each method is called
with plausible arguments, the same for every caller, chosen so that a caller
who gets past identification and the audience check sees the method run:
``ok``, or the method's own fault on the object (see the legend in
``authorization_matrix``). Methods that change something act on objects made
for them (``victim-*``), so the order of the cells does not matter.

The callers:

- no certificate: a stranger;
- foreign CA: a certificate from another CA, named like an accepted agent;
- expired certificate: signed by the deployment's CA for the accepted agent's
  key, with its validity over;
- pending agent: enrolled with ``scire-client enroll`` and waiting for an
  administrator: it holds a key and a request, but no certificate yet, so it
  calls without one (and ``agent.fetch_certificate`` names its own request);
- accepted agent, another accepted agent: enrolled with a token; the first
  holds a job, which the arguments name;
- revoked agent: accepted, then revoked;
- user, not admin: ``scire-admin user add`` without ``--admin``, with a grant
  to run jobs on the accepted agent;
- root admin: the first administrator, made by ``scire-admin init``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import sqlite3
import ssl
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from authorization_matrix import AUDIENCE_ROWS, IDENTITIES, MATRIX, documented, render
from conftest import Deployment

from scire_schema import certs, documents, files, tls
from scire_schema.documents import StatusReport
from scire_server import ca, store
from scire_server.api import RemoteMethods
from scire_server.config import ServerConfig

AGENT, OTHER_AGENT, REVOKED, PENDING = "host1", "host2", "host3", "pend1"


@dataclass
class World:
    """The deployment, the callers' credentials and the objects the calls name."""

    dep: Deployment
    credentials: dict[str, tuple[Path, Path] | None]
    job_id: int = 0
    delivery_id: str = ""
    user_job_id: int = 0
    user_schedule_id: int = 0
    grant_id: int = 0
    new_csr: str = ""
    proxies: dict[str, Any] = field(default_factory=dict)

    def proxy(self, identity: str) -> Any:
        """A keep-alive proxy for ``identity`` (a fresh one for callers the
        handshake refuses: their connection is gone after each try)."""
        if identity in self.proxies:
            return self.proxies[identity]
        pair = self.credentials[identity]
        context = tls.client_context(self.dep.state_dir / "ca.pem", *(pair or (None, None)))
        proxy = xmlrpc.client.ServerProxy(
            self.dep.url, transport=tls.TLSTransport(context, timeout=30), allow_none=True
        )
        if identity not in ("foreign CA", "expired certificate"):
            self.proxies[identity] = proxy
        return proxy


def _issue(
    world_root: Path, name: str, ca_pair: tuple[Any, Any], key: Any, days: int
) -> tuple[Path, Path]:
    cert = ca.issue_certificate(
        ca_pair[0], ca_pair[1], key.public_key(), name, ca.ROLE_CLIENT, days=days
    )
    cert_file, key_file = world_root / f"{name}-{days}.pem", world_root / f"{name}-{days}.key"
    files.write_public(cert_file, certs.cert_to_pem(cert))
    files.write_private(key_file, certs.key_to_pem(key))
    return cert_file, key_file


def _pending(dep: Deployment, name: str) -> None:
    assert dep.agent(name, "--enroll-wait", "0", "enroll").returncode == 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, xprocess: Any) -> Iterator[World]:
    root = tmp_path_factory.mktemp("matrix")
    dep = Deployment(root, xprocess)
    dep.start_server()
    for name in (AGENT, OTHER_AGENT, REVOKED, "victim-revoke"):
        dep.enroll(name)
    dep.admin("client", "revoke", REVOKED)
    for name in (PENDING, "victim-accept", "victim-reject", "victim-delete"):
        _pending(dep, name)
    alice = dep.add_user("alice")
    dep.add_user("victim-user")
    dep.admin("group", "create", "victim-group")
    dep.admin("group", "create", "matrix-group")
    dep.admin("group", "add", "matrix-group", OTHER_AGENT)
    dep.admin("grant", "add", "alice", "run", AGENT)

    agent_dir = dep.agent_dir(AGENT)
    agent_key = certs.load_key((agent_dir / "key.pem").read_bytes())
    ca_pair = (
        certs.load_key((dep.state_dir / "ca.key").read_bytes()),
        certs.load_cert((dep.state_dir / "ca.pem").read_bytes()),
    )
    expired = _issue(root, AGENT, ca_pair, agent_key, days=0)
    foreign = _issue(root, AGENT, ca.create_ca("Intruder CA"), certs.generate_key(), days=30)
    world = World(
        dep,
        {
            "no certificate": None,
            "foreign CA": foreign,
            "expired certificate": expired,
            "pending agent": None,
            "accepted agent": (agent_dir / "cert.pem", agent_dir / "key.pem"),
            "another accepted agent": (
                dep.agent_dir(OTHER_AGENT) / "cert.pem",
                dep.agent_dir(OTHER_AGENT) / "key.pem",
            ),
            "revoked agent": (
                dep.agent_dir(REVOKED) / "cert.pem",
                dep.agent_dir(REVOKED) / "key.pem",
            ),
            "user, not admin": (alice, alice),
            "root admin": (dep.bundle, dep.bundle),
        },
    )
    # A job the accepted agent holds (acknowledged), for poll, acknowledge and report.
    world.job_id = dep.submit("--command", "echo held", "--host", AGENT)
    (job_xml,) = world.proxy("accepted agent").agent.poll([], [], 10)["jobs"]
    world.delivery_id = documents.parse_job(job_xml).delivery_id
    pair = {"job_id": world.job_id, "delivery_id": world.delivery_id}
    assert world.proxy("accepted agent").agent.acknowledge([pair])["acknowledged"] == [world.job_id]
    world.user_job_id = dep.submit("--command", "echo alice", "--host", AGENT, bundle=alice)
    # A schedule of the user's far in the future: it makes no run during the test.
    world.user_schedule_id = dep.admin(
        "job",
        "submit",
        "--command",
        "echo later",
        "--host",
        AGENT,
        "--at",
        "2099-01-01 00:00",
        bundle=alice,
    )["schedule_id"]
    world.grant_id = dep.admin("grant", "add", "alice", "run", OTHER_AGENT)["id"]
    world.new_csr = certs.make_csr(certs.generate_key(), "matrix-newcomer").decode()
    # The expired certificate's validity ended when it was made; let a second pass.
    not_after = certs.load_cert(expired[0].read_bytes()).not_valid_after_utc
    while dt.datetime.now(dt.UTC) <= not_after + dt.timedelta(seconds=1):
        time.sleep(0.2)
    try:
        yield world
    finally:
        for proxy in world.proxies.values():
            proxy("close")()
        dep.stop_server()


def _arguments(w: World) -> dict[str, Callable[[], tuple[Any, ...]]]:
    """The arguments of each method; the same for every caller."""
    status = StatusReport(job_id=w.job_id, delivery_id=w.delivery_id, state="running")
    pending_csr = (w.dep.agent_dir(PENDING) / "csr.pem").read_text()
    return {
        "agent.ca_certificate": lambda: (),
        "agent.register": lambda: ("matrix-newcomer", w.new_csr, {}, ""),
        "agent.fetch_certificate": lambda: (PENDING, pending_csr),
        "agent.poll": lambda: ([w.job_id], [], 0),
        "agent.acknowledge": lambda: ([{"job_id": w.job_id, "delivery_id": w.delivery_id}],),
        "agent.report": lambda: (documents.render_status(status),),
        "agent.report_many": lambda: ([documents.render_status(status)],),
        "agent.renew_certificate": lambda: (w.new_csr,),
        "admin.renew_certificate": lambda: (w.new_csr,),
        "admin.whoami": lambda: (),
        "admin.job_submit": lambda: (
            {"script": "echo matrix", "hosts": [AGENT], "name": "matrix"},
        ),
        "admin.job_list": lambda: (50, ""),
        "admin.job_show": lambda: (w.user_job_id,),
        "admin.job_cancel": lambda: (w.user_job_id,),
        "admin.job_retry": lambda: (w.user_job_id, []),
        "admin.job_output": lambda: (w.user_job_id, AGENT),
        "admin.client_list": lambda: (),
        "admin.client_show": lambda: (AGENT,),
        "admin.client_accept": lambda: ("victim-accept",),
        "admin.client_reject": lambda: ("victim-reject",),
        "admin.client_revoke": lambda: ("victim-revoke",),
        "admin.client_delete": lambda: ("victim-delete",),
        "admin.client_token": lambda: (1, 0),
        "admin.group_create": lambda: ("client", "matrix-new-group"),
        "admin.group_delete": lambda: ("client", "victim-group"),
        "admin.group_add": lambda: ("client", "matrix-group", AGENT),
        "admin.group_remove": lambda: ("client", "matrix-group", OTHER_AGENT),
        "admin.group_list": lambda: ("client",),
        "admin.user_add": lambda: (
            "matrix-new-user",
            certs.make_csr(certs.generate_key(), "matrix-new-user").decode(),
        ),
        "admin.user_list": lambda: (),
        "admin.user_revoke": lambda: ("victim-user",),
        "admin.grant_add": lambda: ("alice", "run", "@matrix-group"),
        "admin.grant_remove": lambda: (w.grant_id,),
        "admin.grant_list": lambda: (),
        "admin.schedule_list": lambda: (False,),
        "admin.schedule_show": lambda: (w.user_schedule_id,),
        "admin.schedule_pause": lambda: (w.user_schedule_id,),
        "admin.schedule_resume": lambda: (w.user_schedule_id,),
        "admin.schedule_delete": lambda: (w.user_schedule_id,),
        "admin.audit": lambda: (0, "", 10),
        "admin.server_list": lambda: (),
    }


def answer_of(world: World, identity: str, method: str) -> str:
    """What the server answered, in the matrix's words."""
    args = _arguments(world)[method]()
    try:
        getattr(world.proxy(identity), method)(*args)
    except xmlrpc.client.Fault as fault:
        # Only identification and the audience check answer 1 or 2 for these
        # arguments; any other fault comes from the method itself.
        if fault.faultCode in (1, 2):
            return f"fault {fault.faultCode}"
        return f"ok, fault {fault.faultCode}"
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected):
        return "TLS"
    return "ok"


CELLS = [
    pytest.param(method, identity, expected, id=f"{method}-{identity.replace(' ', '_')}")
    for method, (_, answers) in MATRIX.items()
    for identity, expected in zip(IDENTITIES, answers, strict=True)
]


@pytest.mark.parametrize(("method", "identity", "expected"), CELLS)
def test_authorization_matrix(world: World, method: str, identity: str, expected: str) -> None:
    assert answer_of(world, identity, method) == expected


def test_matrix_covers_every_remote_method(world: World) -> None:
    """The matrix names every method of ``RemoteMethods.table()`` with its audience,
    and each row is the row of that audience (or differs only in ``ok, fault N``)."""
    config = ServerConfig.load(None, state_dir=world.dep.state_dir)
    engine = store.make_engine(config.database_url)
    try:
        table = RemoteMethods(config, store.Store(engine, "matrix-reader")).table()
    finally:
        engine.dispose()
    assert {m: audience for m, (audience, _) in table.items()} == {
        m: audience for m, (audience, _) in MATRIX.items()
    }
    for method, (audience, answers) in MATRIX.items():
        row = AUDIENCE_ROWS[audience]
        for cell, default in zip(answers, row, strict=True):
            assert cell == default or (default == "ok" and cell.startswith("ok, fault")), method


def test_refused_callers_changed_nothing(world: World) -> None:
    """Every administrative change in the audit trail was made by the root admin,
    and the user only submitted and cancelled jobs: a refused call left no trace
    but its refusal."""
    connection = sqlite3.connect(f"file:{world.dep.state_dir / 'scire.db'}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT actor, action FROM events").fetchall()
    finally:
        connection.close()
    for actor, action in rows:
        if action.startswith(("client_", "group_", "user_", "grant_", "token")):
            assert not actor.startswith(("client:", "anonymous", "user:alice")), (actor, action)
        if actor == "user:alice":
            assert action in ("submit", "cancel", "refused", *SCHEDULE_ACTIONS), action


#: What a user does to their own schedule in the matrix (create, then pause,
#: resume and delete it).
SCHEDULE_ACTIONS = ("schedule_created", "schedule_paused", "schedule_resumed", "schedule_deleted")


def test_security_doc_shows_the_matrix() -> None:
    """docs/SECURITY.md shows exactly this matrix (rewrite it with
    ``python tests/acceptance/authorization_matrix.py``)."""
    assert documented() == render()
