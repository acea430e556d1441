"""The remote methods (``api.RemoteMethods``) on a real CA and a real SQLite
store, without the listener: enrollment in one transaction, job files rendered
after the claim commits, and the caller's identity with its refusals."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import uuid
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import SessionTransaction

from scire_schema import certs, documents, files
from scire_server import api, ca, migrations
from scire_server.api import RemoteMethods
from scire_server.config import ServerConfig
from scire_server.exceptions import (
    AuthenticationRequired,
    Conflict,
    EnrollmentRefused,
    Forbidden,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from scire_server.store import Caller, Store, directory, make_engine
from scire_server.store.audit import AuditTrail


@dataclasses.dataclass
class Api:
    methods: RemoteMethods
    store: Store
    admin: Caller


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Api]:
    config = ServerConfig.load(state_dir=tmp_path)
    ca_key, ca_cert = ca.create_ca()
    files.write_private(config.ca_key_file, certs.key_to_pem(ca_key))
    files.write_public(config.ca_cert_file, certs.cert_to_pem(ca_cert))
    migrations.upgrade(config.database_url)
    store = Store(make_engine(config.database_url), "test-server")
    store.servers.start("test-server", "localhost", 1, "https://localhost/", 30, lambda _: False)
    admin_fingerprint = hashlib.sha256(b"admin").hexdigest()
    store.directory.add_user("admin", admin_fingerprint, True, "test")
    methods = RemoteMethods(config, store)
    try:
        yield Api(methods, store, methods.identify(admin_fingerprint))
    finally:
        store.close()


def _csr(name: str) -> str:
    return certs.make_csr(certs.generate_key(), name).decode()


def _fail_in_transaction(
    monkeypatch: pytest.MonkeyPatch, audit: AuditTrail, action: str
) -> list[str]:
    """Make the next audit row ``action`` fail as a busy database would: inside the
    store's transaction, after everything before it (the token spent) was done."""
    failures: list[str] = []
    write = audit.write

    def failing_write(session: Any, actor: str, what: str, **fields: Any) -> None:
        if what == action and not failures:
            failures.append(what)
            raise Unavailable("database busy, try again")
        write(session, actor, what, **fields)

    monkeypatch.setattr(audit, "write", failing_write)
    return failures


@pytest.mark.parametrize("failure", ["sign", "commit"])
def test_a_one_use_token_survives_a_failed_enrollment(
    server: Api, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    token = server.methods.client_token(server.admin, 1)["token"]
    csr = _csr("web-17")
    if failure == "sign":
        sign = ca.sign_csr

        def failing_sign(*args: Any) -> Any:
            monkeypatch.setattr(ca, "sign_csr", sign)
            raise OSError("the CA key could not be read")

        monkeypatch.setattr(ca, "sign_csr", failing_sign)
        with pytest.raises(OSError):
            server.methods.register(None, "web-17", csr, {}, token)
    else:
        failures = _fail_in_transaction(monkeypatch, server.store.audit, "client_accept")
        with pytest.raises(Unavailable):
            server.methods.register(None, "web-17", csr, {}, token)
        assert failures == ["client_accept"]

    # The agent asks again with the same request and the same one-use token.
    assert server.methods.register(None, "web-17", csr, {}, token)["status"] == "accepted"
    answer = server.methods.fetch_certificate(None, "web-17", csr)
    assert answer["status"] == "accepted"
    cert = certs.load_cert(answer["certificate"].encode())
    assert server.methods.identify(certs.fingerprint(cert)).name == "web-17"
    # ... and the token is spent now: the next host is refused, and told why.
    with pytest.raises(EnrollmentRefused, match="used up"):
        server.methods.register(None, "db-1", _csr("db-1"), {}, token)


def test_a_bad_token_is_refused_with_its_reason(
    server: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(EnrollmentRefused, match="unknown"):
        server.methods.register(None, "web-17", _csr("web-17"), {}, "not-a-token")
    token = server.methods.client_token(server.admin, 1, 60)["token"]
    later = directory.utcnow() + dt.timedelta(minutes=2)
    monkeypatch.setattr(directory, "utcnow", lambda: later)
    with pytest.raises(EnrollmentRefused, match="expired at"):
        server.methods.register(None, "web-17", _csr("web-17"), {}, token)
    # Nothing was recorded: no request waits for an administrator.
    with pytest.raises(NotFound):
        server.methods.client_show(server.admin, "web-17")


def test_client_accept_is_one_transaction(server: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    csr = _csr("web-17")
    assert server.methods.register(None, "web-17", csr, {}, "")["status"] == "pending"
    _fail_in_transaction(monkeypatch, server.store.audit, "client_accept")
    with pytest.raises(Unavailable):
        server.methods.client_accept(server.admin, "web-17")
    assert server.methods.fetch_certificate(None, "web-17", csr) == {
        "status": "pending",
        "certificate": "",
    }
    assert server.methods.client_accept(server.admin, "web-17")["status"] == "accepted"
    assert server.methods.fetch_certificate(None, "web-17", csr)["status"] == "accepted"


def _enroll(server: Api, name: str) -> str:
    """Enroll a client through the remote methods; returns its certificate's fingerprint."""
    csr = _csr(name)
    server.methods.register(None, name, csr, {}, "")
    server.methods.client_accept(server.admin, name)
    cert = server.methods.fetch_certificate(None, name, csr)["certificate"]
    return certs.fingerprint(certs.load_cert(cert.encode()))


def test_job_files_are_rendered_after_the_claim_commits(
    server: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = server.methods.identify(_enroll(server, "web-17"))
    submitted = [
        server.methods.job_submit(server.admin, {"script": "true", "hosts": ["web-17"]})["job_id"]
        for _ in range(3)
    ]
    render = documents.render_job
    seen: list[tuple[int, str, str | None]] = []

    def watching_render(job: documents.JobDocument) -> str:
        # Another transaction sees only what has been committed.
        (row,) = server.store.jobs.detail(server.admin, job.job_id)["assignments"]
        seen.append((job.job_id, row["state"], row["delivery_id"]))
        return render(job)

    monkeypatch.setattr(api.documents, "render_job", watching_render)
    answer = server.methods.poll(client, [], [], 10)
    jobs = [documents.parse_job(xml) for xml in answer["jobs"]]
    assert [j.job_id for j in jobs] == submitted
    assert seen == [(j.job_id, "sent", j.delivery_id) for j in jobs]


def test_identify_refuses_with_the_reason_and_records_it(server: Api) -> None:
    fingerprint = _enroll(server, "web-17")
    assert server.methods.identify(fingerprint).actor == "client:web-17"
    with pytest.raises(AuthenticationRequired, match="needs a client certificate"):
        server.methods.identify(None)
    with pytest.raises(AuthenticationRequired, match="not known to this server"):
        server.methods.identify("0" * 64)

    server.methods.client_revoke(server.admin, "web-17")
    with pytest.raises(Forbidden) as refused:
        server.methods.identify(fingerprint)
    assert refused.value.message == "certificate refused: client web-17 is revoked"
    # Recorded under the refused identity, not as an anonymous peer.
    server.methods.record_refusal("agent.poll", None, "192.0.2.7", refused.value)
    row = server.store.audit.events()[-1]
    assert (row["actor"], row["action"], row["client"]) == ("client:web-17", "refused", "web-17")
    assert row["detail"] == "agent.poll: fault 2: certificate refused: client web-17 is revoked"

    # A busy database is not recorded: the refusal would only make it busier.
    server.methods.record_refusal("agent.poll", None, "192.0.2.7", Unavailable())
    assert server.store.audit.events()[-1] == row


# --- enrollment that cannot be hijacked ---------------------------------------------


def test_fetch_certificate_answers_alike_for_no_such_client_and_another_key(
    server: Api,
) -> None:
    server.methods.register(None, "web-17", _csr("web-17"), {}, "")
    with pytest.raises(NotFound) as unknown:
        server.methods.fetch_certificate(None, "no-such-host", _csr("no-such-host"))
    with pytest.raises(NotFound) as other_key:
        server.methods.fetch_certificate(None, "web-17", _csr("web-17"))
    assert (unknown.value.code, unknown.value.message) == (
        other_key.value.code,
        other_key.value.message,
    )


def test_accept_with_a_fingerprint_accepts_only_that_key(server: Api) -> None:
    key = certs.generate_key()
    csr = certs.make_csr(key, "web-17").decode()
    server.methods.register(None, "web-17", csr, {}, "")
    (row,) = server.methods.client_list(server.admin)
    assert row["key_fingerprint"] == certs.key_fingerprint(key)
    assert server.methods.client_show(server.admin, "web-17")["key_fingerprint"] == (
        certs.key_fingerprint(key)
    )

    intruder = certs.key_fingerprint(certs.generate_key())
    with pytest.raises(Conflict, match="nothing accepted"):
        server.methods.client_accept(server.admin, "web-17", intruder)
    with pytest.raises(InvalidArgument, match="64 hex digits"):
        server.methods.client_accept(server.admin, "web-17", "not-a-fingerprint")
    assert server.methods.fetch_certificate(None, "web-17", csr)["status"] == "pending"

    # As people write fingerprints: upper case with colons.
    written = ":".join(certs.key_fingerprint(key)[i : i + 2] for i in range(0, 64, 2)).upper()
    assert server.methods.client_accept(server.admin, "web-17", written)["status"] == "accepted"
    assert server.methods.fetch_certificate(None, "web-17", csr)["status"] == "accepted"


def test_a_pending_name_refuses_another_key(server: Api) -> None:
    csr = _csr("web-17")
    server.methods.register(None, "web-17", csr, {}, "")
    with pytest.raises(EnrollmentRefused, match="reject or delete that request first"):
        server.methods.register(None, "web-17", _csr("web-17"), {}, "")
    # A valid token does not let another key take the name either.
    token = server.methods.client_token(server.admin, 1)["token"]
    with pytest.raises(EnrollmentRefused):
        server.methods.register(None, "web-17", _csr("web-17"), {}, token)
    assert server.methods.register(None, "web-17", csr, {}, token)["status"] == "accepted"


# --- bounded answers and logs, anonymous refusals counted ------------------------------


def test_a_huge_name_gets_a_short_fault_and_a_short_log_line(
    server: Api, caplog: pytest.LogCaptureFixture
) -> None:
    name = "n" * (31 * 1024 * 1024)
    with pytest.raises(InvalidArgument) as refused:
        server.methods.register(None, name, _csr("web-17"), {}, "")
    assert len(refused.value.message) < 300
    assert f"({len(name)} characters)" in refused.value.message
    with caplog.at_level("WARNING"):
        server.methods.record_refusal("agent.register", None, "192.0.2.7", refused.value)
        server.methods.record_refusal(name, None, "192.0.2.8", refused.value)
    assert len(caplog.records) == 2
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


def test_anonymous_refusals_are_counted_then_summed_up_in_one_row(
    server: Api, caplog: pytest.LogCaptureFixture
) -> None:
    before = server.store.audit.events()
    with caplog.at_level("WARNING"):
        for _ in range(20):
            try:
                server.methods.identify(None)
            except AuthenticationRequired as exc:
                server.methods.record_refusal("agent.poll", None, "192.0.2.7", exc)
        server.methods.record_refusal(
            "agent.register", None, "192.0.2.8", InvalidArgument("bad name")
        )
    assert server.store.audit.events() == before
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" ", 1)[0] for line in lines] == [
        "anonymous@192.0.2.7",
        "anonymous@192.0.2.8",
    ]

    server.methods.summarize_refusals()
    (row,) = server.store.audit.events()[len(before) :]
    assert (row["actor"], row["action"]) == ("anonymous", "anonymous_refusals")
    assert row["detail"].startswith("21 anonymous refusal(s) from 2 address(es) since ")
    assert "19 not logged one by one" in row["detail"]
    # Nothing refused since: no row.
    server.methods.summarize_refusals()
    assert len(server.store.audit.events()) == len(before) + 1


def test_a_revoked_user_is_refused_as_itself(server: Api) -> None:
    bob = hashlib.sha256(b"bob").hexdigest()
    server.store.directory.add_user("bob", bob, False, "test")
    server.methods.user_revoke(server.admin, "bob")
    with pytest.raises(Forbidden) as refused:
        server.methods.identify(bob)
    server.methods.record_refusal("admin.whoami", None, "192.0.2.7", refused.value)
    row = server.store.audit.events()[-1]
    assert (row["actor"], row["action"], row["client"]) == ("user:bob", "refused", None)


# --- idempotent submission ----------------------------------------------------------


@pytest.mark.parametrize("key", ["short", "x" * 65, "-leading-dash", "white space key", 42])
def test_a_bad_request_key_is_refused(server: Api, key: Any) -> None:
    _enroll(server, "web-17")
    with pytest.raises(InvalidArgument, match="request_key"):
        server.methods.job_submit(
            server.admin, {"script": "true", "hosts": ["web-17"], "request_key": key}
        )


def test_a_repeated_request_key_answers_with_the_first_job(server: Api) -> None:
    _enroll(server, "web-17")
    spec = {"script": "true", "hosts": ["web-17"], "request_key": str(uuid.uuid4())}
    first = server.methods.job_submit(server.admin, spec)
    again = server.methods.job_submit(server.admin, spec)
    assert first == {
        "job_id": first["job_id"],
        "accepted": ["web-17"],
        "refused": [],
        "repeated": False,
    }
    assert again == first | {"repeated": True}
    assert len(server.methods.job_list(server.admin)) == 1


@pytest.mark.parametrize(
    "script",
    [
        "echo \x1b[31mred\x1b[0m\r\n",
        xmlrpc.client.Binary(b"echo \x1b[31mred\x1b[0m\r\n"),
        b"echo \x1b[31mred\x1b[0m\r\n",
    ],
)
def test_a_script_arrives_as_text_or_binary_utf8(server: Api, script: Any) -> None:
    client = server.methods.identify(_enroll(server, "web-17"))
    job_id = server.methods.job_submit(server.admin, {"script": script, "hosts": ["web-17"]})[
        "job_id"
    ]
    shown = server.methods.job_show(server.admin, job_id)
    assert shown["script"] == "echo \ufffd[31mred\ufffd[0m\r\n"  # XML-RPC cannot carry ESC
    [xml] = server.methods.poll(client, [], [], 1)["jobs"]
    assert documents.parse_job(xml).script == "echo \x1b[31mred\x1b[0m\r\n"  # exact


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (xmlrpc.client.Binary(b"echo caf\xe9\n"), "the script is not UTF-8 text"),
        (xmlrpc.client.Binary(b"echo a\x00b\n"), "the script contains a NUL character"),
        (xmlrpc.client.Binary(b"  \n"), "the job needs a script"),
        (42, "the job needs a script"),
    ],
)
def test_a_bad_script_is_refused(server: Api, script: Any, message: str) -> None:
    _enroll(server, "web-17")
    with pytest.raises(InvalidArgument, match=message):
        server.methods.job_submit(server.admin, {"script": script, "hosts": ["web-17"]})


def test_nothing_is_logged_as_done_when_the_commit_fails(
    server: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _enroll(server, "web-17")
    commit = SessionTransaction.commit

    def full_disk(transaction: SessionTransaction, _to_root: bool = False) -> None:
        raise OperationalError("COMMIT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(SessionTransaction, "commit", full_disk)
    caplog.set_level(logging.INFO, logger="scire_server")
    with pytest.raises(Unavailable):
        server.methods.job_submit(server.admin, {"script": "true", "hosts": ["web-17"]})
    assert "submitted" not in caplog.text
    monkeypatch.setattr(SessionTransaction, "commit", commit)
    job_id = server.methods.job_submit(server.admin, {"script": "true", "hosts": ["web-17"]})[
        "job_id"
    ]
    assert f"job {job_id} (job) submitted by admin" in caplog.text


def test_report_many_answers_each_report_and_refuses_only_the_bad_ones(server: Api) -> None:
    client = server.methods.identify(_enroll(server, "web-17"))
    for _ in range(2):
        server.methods.job_submit(server.admin, {"script": "true", "hosts": ["web-17"]})
    jobs = [documents.parse_job(x) for x in server.methods.poll(client, [], [], 10)["jobs"]]
    first, second = jobs
    now = dt.datetime.now(dt.UTC).isoformat()
    acked = server.methods.acknowledge(
        client,
        [
            {"job_id": first.job_id, "delivery_id": first.delivery_id, "started": now},
            {"job_id": second.job_id, "delivery_id": second.delivery_id},
        ],
    )
    assert acked == {"acknowledged": [first.job_id, second.job_id], "started": [first.job_id]}

    def final(job: documents.JobDocument, state: str) -> str:
        return documents.render_status(
            documents.StatusReport(job.job_id, job.delivery_id, state, exit_code=0, output="")
        )

    stranger = documents.StatusReport(999_999, uuid.uuid4().hex, "running")
    answer = server.methods.report_many(
        client,
        [
            final(first, "succeeded"),
            "<status>not a report",
            documents.render_status(stranger),
            final(second, "succeeded"),
        ],
    )
    results = answer["results"]
    assert results[0] == {"job_id": first.job_id, "state": "succeeded", "result": "applied"}
    assert results[1]["fault"] == 5 and "job_id" not in results[1]
    assert (results[2]["job_id"], results[2]["fault"]) == (999_999, 6)
    assert results[3] == {"job_id": second.job_id, "state": "succeeded", "result": "applied"}
    # Each refusal is audited under the client, as a refused agent.report is.
    refused = [
        e for e in server.store.audit.events(client="web-17", limit=50) if e["action"] == "refused"
    ]
    assert len(refused) == 2
    with pytest.raises(InvalidArgument, match="at most 100 reports"):
        server.methods.report_many(client, [final(first, "succeeded")] * 101)
    with pytest.raises(InvalidArgument):
        server.methods.report_many(client, [])
