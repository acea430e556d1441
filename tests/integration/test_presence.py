"""Presence and the work-due signal through the remote methods, on a real CA and
a real SQLite store: the poll's ``presence`` checked and written only on change,
last-seen kept in memory and written by the flush, ``client_list``'s
online/offline and its filters, and who announces work."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scire_schema import certs, documents, files
from scire_server import ca, migrations, recovery
from scire_server.api import RemoteMethods
from scire_server.config import ServerConfig
from scire_server.exceptions import Conflict, InvalidArgument, NotFound
from scire_server.store import AgentPresence, Caller, Certificate, Store, make_engine, utcnow
from scire_server.work_due import WorkDue

DAEMON = {"version": "2.1.0", "mode": "daemon", "callback": "10.0.0.5:8444"}


@dataclasses.dataclass
class Api:
    methods: RemoteMethods
    store: Store
    admin: Caller
    heard: list[frozenset[str]]

    def client(self, name: str) -> Caller:
        fp = hashlib.sha256(name.encode()).hexdigest()
        self.store.directory.register_client(name, f"CSR {name}", {}, None, key_fingerprint=fp)
        self.store.directory.accept_client(
            name, Certificate(f"CSR {name}", f"CERT {name}", fp), "user:admin"
        )
        return self.methods.identify(fp)

    def stored(self, name: str) -> dict[str, Any]:
        return self.store.directory.client_detail(name)

    def listed(self, **filters: Any) -> dict[str, dict[str, Any]]:
        rows = self.methods.client_list(
            self.admin, filters.get("group", ""), filters.get("offline", False)
        )
        return {row["name"]: row for row in rows}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    config = ServerConfig.load(state_dir=tmp_path, poll_interval=60, offline_after_polls=3)
    ca_key, ca_cert = ca.create_ca()
    files.write_private(config.ca_key_file, certs.key_to_pem(ca_key))
    files.write_public(config.ca_cert_file, certs.cert_to_pem(ca_cert))
    migrations.upgrade(config.database_url)
    store = Store(make_engine(config.database_url), "test-server")
    store.servers.start("test-server", "localhost", 1, "https://localhost/", 30, lambda _: False)
    admin_fp = hashlib.sha256(b"admin").hexdigest()
    store.directory.add_user("admin", admin_fp, True, "test")
    work_due = WorkDue()
    heard: list[frozenset[str]] = []
    work_due.subscribe(heard.append)
    methods = RemoteMethods(config, store, work_due)
    try:
        yield Api(methods, store, methods.identify(admin_fp), heard)
    finally:
        store.close()


# --- the poll's presence ------------------------------------------------------------


@pytest.mark.parametrize(
    ("presence", "words"),
    [
        ("daemon", "presence must be a struct"),
        ({"version": 2}, "presence version must be a non-empty string"),
        ({"version": ""}, "presence version must be a non-empty string"),
        ({"version": "v" * 65}, "presence version is 65 characters long; at most 64"),
        ({"version": "1.0\n"}, "must be printable ASCII"),
        ({"mode": "sometimes"}, "presence mode 'sometimes' is not one of once, daemon"),
        ({"callback": 8444}, 'presence callback must be a host:port string or ""'),
        ({"callback": "10.0.0.5"}, "is not host:port"),
        ({"callback": "10.0.0.5:0"}, "the port must be a number from 1 to 65535"),
        ({"callback": "10.0.0.5:65536"}, "the port must be a number from 1 to 65535"),
        ({"callback": "10.0.0.5:http"}, "the port must be a number from 1 to 65535"),
        ({"callback": "0.0.0.0:8444"}, "names no single host"),
        ({"callback": "[::]:8444"}, "names no single host"),
        ({"callback": "::1:8444"}, "write an IPv6 address as [address]:port"),
        ({"callback": "[fe80::zz]:8444"}, "is not an IPv6 address"),
        ({"callback": "web_1.example:8444"}, "is neither an IP address nor a host name"),
        ({"callback": "-web.example:8444"}, "is neither an IP address nor a host name"),
        ({"callback": "10.0.0.300:8444"}, "is not an IPv4 address"),
        ({"callback": "h" * 260 + ":8444"}, "longer than 255 characters"),
    ],
)
def test_a_bad_presence_is_refused_in_words(api: Api, presence: Any, words: str) -> None:
    web = api.client("web-1")
    with pytest.raises(InvalidArgument) as refused:
        api.methods.poll(web, [], [], 0, presence)
    assert words in refused.value.message
    assert api.stored("web-1")["agent_mode"] is None


@pytest.mark.parametrize(
    "callback",
    ["10.0.0.5:8444", "[2001:db8::5]:8444", "web-1.example.org:1", "web-1:65535", ""],
)
def test_good_callbacks_are_stored(api: Api, callback: str) -> None:
    web = api.client("web-1")
    api.methods.poll(web, [], [], 0, {"mode": "daemon", "callback": callback})
    assert api.stored("web-1")["callback_address"] == (callback or None)


def test_presence_is_written_when_it_changes_and_unknown_keys_are_ignored(api: Api) -> None:
    web = api.client("web-1")
    assert api.methods.poll(web, [], [], 0, DAEMON | {"colour": "blue"})["jobs"] == []
    row = api.stored("web-1")
    assert (row["agent_version"], row["agent_mode"], row["callback_address"]) == (
        "2.1.0",
        "daemon",
        "10.0.0.5:8444",
    )
    said = AgentPresence("2.1.0", "daemon", "10.0.0.5:8444")
    assert api.store.assignments.poll(web, [], [], 0, 60, said).presence_changed is False
    moved = AgentPresence(callback="10.0.0.6:8444")
    assert api.store.assignments.poll(web, [], [], 0, 60, moved).presence_changed is True
    # A key not said leaves its column alone; "" clears the callback.
    assert api.store.assignments.poll(
        web, [], [], 0, 60, AgentPresence(mode="once", callback="")
    ).presence_changed
    row = api.stored("web-1")
    assert (row["agent_version"], row["agent_mode"], row["callback_address"]) == (
        "2.1.0",
        "once",
        None,
    )
    # An older agent sends no presence at all: nothing changes.
    api.methods.poll(web, [], [], 0)
    assert api.stored("web-1")["agent_mode"] == "once"


def test_the_presence_change_is_told_to_the_pusher(api: Api) -> None:
    told: list[str] = []
    api.methods.on_presence_change = told.append
    web = api.client("web-1")
    api.methods.poll(web, [], [], 0, DAEMON)
    api.methods.poll(web, [], [], 0, DAEMON)
    api.methods.poll(web, [], [], 0, DAEMON | {"callback": "10.0.0.7:8444"})
    assert told == ["web-1", "web-1"]


# --- last seen, batched -----------------------------------------------------------------


def test_a_poll_does_not_write_last_seen_and_the_flush_does(api: Api) -> None:
    web = api.client("web-1")
    api.methods.poll(web, [], [], 0, DAEMON)
    assert api.stored("web-1")["last_seen_at"] is None
    # This daemon already knows: client list shows it online before the flush.
    listed = api.listed()["web-1"]
    assert listed["online"] is True and listed["last_seen_at"] is not None
    assert api.methods.flush_last_seen() == 1
    assert api.stored("web-1")["last_seen_at"] == listed["last_seen_at"]
    assert api.methods.flush_last_seen() == 0  # nothing new since


def test_the_flush_never_moves_last_seen_back(api: Api) -> None:
    web = api.client("web-1")
    api.methods.poll(web, [], [], 0)
    later = utcnow() + dt.timedelta(minutes=5)  # e.g. another daemon's flush
    api.store.directory.record_last_seen({"web-1": later})
    assert api.methods.flush_last_seen() == 0
    assert api.stored("web-1")["last_seen_at"] == later


# --- client list: online, offline, filters -------------------------------------------


def test_client_list_online_offline_and_its_filters(api: Api) -> None:
    web1, web2 = api.client("web-1"), api.client("web-2")
    api.client("db-1")  # enrolled, never seen
    api.store.directory.register_client("new-1", "CSR new-1", {}, None, key_fingerprint="1" * 64)
    api.methods.poll(web1, [], [], 0, DAEMON)
    api.methods.flush_last_seen()
    # web-2 last called 10 minutes ago: more than 3 polls of 60 s.
    api.store.assignments.poll(web2, [], [], 0, 60, AgentPresence("2.0.9", "once"))
    api.store.directory.record_last_seen({"web-2": utcnow() - dt.timedelta(minutes=10)})
    methods = RemoteMethods(api.methods.config, api.store)  # another daemon: nothing in memory
    rows = {r["name"]: r for r in methods.client_list(api.admin)}
    assert {
        name: (r["online"], r["agent_mode"], r["agent_version"]) for name, r in rows.items()
    } == {
        "db-1": (False, None, None),
        "new-1": (False, None, None),
        "web-1": (True, "daemon", "2.1.0"),
        "web-2": (False, "once", "2.0.9"),
    }
    assert rows["web-1"]["callback_address"] == "10.0.0.5:8444"
    assert rows["web-1"]["active_jobs"] == 0 and rows["web-1"]["status"] == "accepted"
    # --offline: accepted clients only (a pending request is not a host gone quiet).
    assert [r["name"] for r in methods.client_list(api.admin, "", True)] == ["db-1", "web-2"]

    # --group: nested groups included.
    api.store.directory.create_group("client", "web", "user:admin")
    api.store.directory.create_group("client", "all", "user:admin")
    api.store.directory.add_member("client", "web", "web-2", "user:admin")
    api.store.directory.add_member("client", "all", "@web", "user:admin")
    api.store.directory.add_member("client", "all", "web-1", "user:admin")
    assert [r["name"] for r in methods.client_list(api.admin, "all")] == ["web-1", "web-2"]
    assert [r["name"] for r in methods.client_list(api.admin, "@web")] == ["web-2"]
    assert [r["name"] for r in methods.client_list(api.admin, "all", True)] == ["web-2"]
    with pytest.raises(NotFound, match="no client group nope"):
        methods.client_list(api.admin, "nope")
    with pytest.raises(InvalidArgument, match="offline must be a boolean"):
        methods.client_list(api.admin, "", "yes")
    detail = methods.client_show(api.admin, "web-1")
    assert (detail["online"], detail["agent_mode"], detail["agent_version"]) == (
        True,
        "daemon",
        "2.1.0",
    )


# --- who announces work -------------------------------------------------------------------


def _spec(**changes: Any) -> dict[str, Any]:
    return {"script": "true", "hosts": ["web-1", "web-2"]} | changes


def test_a_submission_announces_its_accepted_clients_after_the_commit(api: Api) -> None:
    api.client("web-1")
    api.store.directory.register_client("web-2", "CSR web-2", {}, None, key_fingerprint="2" * 64)
    answer = api.methods.job_submit(api.admin, _spec(request_key="key-00000001"))
    assert answer["accepted"] == ["web-1"]
    assert api.heard == [frozenset({"web-1"})]
    # The same request again writes nothing and announces nothing.
    assert api.methods.job_submit(api.admin, _spec(request_key="key-00000001"))["repeated"]
    # Work that may not start yet is left to the polls.
    tomorrow = (utcnow() + dt.timedelta(days=1)).isoformat() + "Z"
    api.methods.job_submit(api.admin, _spec(hosts=["web-1"], not_before=tomorrow))
    assert api.heard == [frozenset({"web-1"})]


def test_sweeps_and_start_up_announce_work_due_again(api: Api) -> None:
    web = api.client("web-1")
    api.client("web-2")
    api.methods.job_submit(api.admin, _spec(hosts=["web-1"]))
    api.methods.job_submit(api.admin, _spec(hosts=["web-2"]))
    api.heard.clear()
    assert len(api.methods.poll(web, [], [], 10)["jobs"]) == 1  # web-1's job is sent, leased
    # Start-up: whoever has pending work now.
    assert recovery.announce_due_work(api.store, api.methods.work_due) == 1
    assert api.heard == [frozenset({"web-2"})]
    api.heard.clear()
    # The lease runs out: the sweep returns it, and says for whom.
    later = utcnow() + dt.timedelta(seconds=api.methods.config.ack_timeout + 1)
    returned = api.store.sweeps.return_leases(now=later)
    assert returned == {"returned": 1, "undeliverable": 0}
    assert returned.due == frozenset({"web-1"})
    assert api.store.sweeps.clients_with_due_work() == {"web-1", "web-2"}


def test_the_sweep_announces_returned_leases(api: Api) -> None:
    web = api.client("web-1")
    api.methods.job_submit(api.admin, _spec(hosts=["web-1"]))
    # Claimed with a lease that runs out at once.
    assert len(api.store.assignments.poll(web, [], [], 10, 0).deliveries) == 1
    api.heard.clear()
    counts = recovery.sweep(api.store, api.methods.config, api.methods.work_due)
    assert counts["returned"] == 1
    assert api.heard == [frozenset({"web-1"})]


def test_a_retry_announces_its_hosts_and_gives_them_the_attempts_afresh(api: Api) -> None:
    web = api.client("web-1")
    job_id = api.methods.job_submit(api.admin, _spec(hosts=["web-1"], max_attempts=2))["job_id"]
    (sent,) = (documents.parse_job(x) for x in api.methods.poll(web, [], [], 10)["jobs"])
    assert (sent.attempt, sent.retry_base) == (1, 0)
    failed = documents.StatusReport(
        job_id, sent.delivery_id, "failed", exit_code=3, output="first try\n"
    )
    api.methods.report(web, documents.render_status(failed))
    api.heard.clear()
    assert api.methods.job_retry(api.admin, job_id, []) == {
        "job_id": job_id,
        "retried": ["web-1"],
        "refused": [],
    }
    assert api.heard == [frozenset({"web-1"})]
    with pytest.raises(Conflict, match="has not finished"):
        api.methods.job_retry(api.admin, job_id, [])
    (again,) = (documents.parse_job(x) for x in api.methods.poll(web, [], [], 10)["jobs"])
    assert (again.attempt, again.retry_base) == (2, 1)
    # Its lease runs out: the second delivery since the retry is still in the
    # budget of 2, though the assignment has had two deliveries in all.
    later = utcnow() + dt.timedelta(seconds=api.methods.config.ack_timeout + 1)
    assert api.store.sweeps.return_leases(now=later) == {"returned": 1, "undeliverable": 0}
    (retry,) = [e for e in api.methods.audit(api.admin, job_id) if e["action"] == "retry"]
    assert (retry["actor"], retry["old_state"], retry["new_state"]) == (
        "user:admin",
        "failed",
        "pending",
    )
    assert retry["detail"] == "attempt 1 failed; exit code 3; output:\nfirst try\n"
