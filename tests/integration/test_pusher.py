"""The pusher (``scire_server.push``) in-process against a real SQLite store and
real TLS listeners standing in for daemon-mode agents: who is pushed to, the
fingerprint check, coalescing, failures counted and logged, and shutdown."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from fake_agent import FakeAgent, SilentListener, dead_address, fingerprint_of, write_identity

from scire_schema import certs
from scire_server import ca, migrations
from scire_server.config import ServerConfig
from scire_server.presence import LastSeen
from scire_server.push import Pusher, push_context
from scire_server.store import AgentPresence, Certificate, Store, make_engine


@dataclasses.dataclass
class World:
    store: Store
    root: Path
    ca_key: certs.PrivateKey
    ca_cert: x509.Certificate
    ca_file: Path
    server_cert: Path
    server_key: Path

    def issue(self, name: str, role: str = ca.ROLE_CLIENT) -> tuple[Path, Path]:
        key = certs.generate_key()
        cert = ca.issue_certificate(self.ca_key, self.ca_cert, key.public_key(), name, role)
        return write_identity(
            self.root / "identities", name, certs.cert_to_pem(cert), certs.key_to_pem(key)
        )

    def enroll(self, name: str) -> tuple[Path, Path]:
        """An accepted client whose certificate is on record; its files."""
        cert_file, key_file = self.issue(name)
        csr = f"CSR of {name}"
        self.store.directory.register_client(name, csr, {}, None, key_fingerprint="0" * 64)
        fp = fingerprint_of(cert_file)
        self.store.directory.accept_client(
            name, Certificate(csr, cert_file.read_text(), fp), "user:admin"
        )
        return cert_file, key_file

    def say(self, name: str, mode: str, callback: str) -> None:
        """The client's agent polls with this presence."""
        caller, _ = self.store.directory.caller_by_fingerprint(
            fingerprint_of(self.root / "identities" / f"{name}.pem")
        )
        assert caller is not None
        self.store.assignments.poll(caller, [], [], 0, 60, AgentPresence("1.0", mode, callback))

    def pusher(self, timeout: float = 5.0, workers: int = 4, **kwargs: object) -> Pusher:
        context = push_context(self.server_cert, self.server_key, self.ca_file)
        return Pusher(
            self.store,
            context,
            workers=workers,
            timeout=timeout,
            server_name="test-server",
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    config = ServerConfig.load(state_dir=tmp_path)
    migrations.upgrade(config.database_url)
    store = Store(make_engine(config.database_url), "test-server")
    ca_key, ca_cert = ca.create_ca()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(certs.cert_to_pem(ca_cert))
    w = World(store, tmp_path, ca_key, ca_cert, ca_file, Path(), Path())
    w.server_cert, w.server_key = w.issue("server", ca.ROLE_SERVER)
    try:
        yield w
    finally:
        store.close()


@pytest.fixture
def agents() -> Iterator[list[FakeAgent]]:
    started: list[FakeAgent] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.stop()


def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for something the pusher's threads do; fail naming it if it never happens."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def agent_for(world: World, agents: list[FakeAgent], name: str) -> FakeAgent:
    cert, key = world.enroll(name)
    agent = FakeAgent(cert, key, world.ca_file).start()
    agents.append(agent)
    world.say(name, "daemon", agent.callback)
    return agent


def test_a_push_calls_poll_now_with_the_servers_certificate(
    world: World, agents: list[FakeAgent]
) -> None:
    agent = agent_for(world, agents, "web-1")
    last_seen = LastSeen()
    pusher = world.pusher(last_seen=last_seen)
    try:
        pusher(frozenset({"web-1"}))
        assert agent.wait_for_answers(1)
        until(lambda: pusher.counters.snapshot()["succeeded"] == 1, "the push counted")
    finally:
        pusher.close()
    assert agent.callers == [fingerprint_of(world.server_cert)]
    assert pusher.counters.snapshot() | {"announced": 1} == {
        "announced": 1,
        "no_target": 0,
        "follow_ups": 0,
        "coalesced": 0,
        "sent": 1,
        "succeeded": 1,
        "failed": 0,
        "dropped": 0,
    }
    # The agent's answer is a sign of life, like a poll.
    assert last_seen.latest("web-1") is not None


def test_only_daemon_mode_agents_with_a_callback_are_pushed(
    world: World, agents: list[FakeAgent]
) -> None:
    cron_cert, cron_key = world.enroll("cron-1")
    world.say("cron-1", "once", "")
    world.enroll("natted-1")
    world.say("natted-1", "daemon", "")
    world.enroll("silent-1")  # never polled: mode unknown
    pusher = world.pusher()
    try:
        pusher(frozenset({"cron-1", "natted-1", "silent-1", "no-such-client"}))
        until(lambda: pusher.counters.snapshot()["no_target"] == 4, "the four skipped")
        # A client that switches to daemon mode is pushed to once its presence says so.
        agent = FakeAgent(cron_cert, cron_key, world.ca_file).start()
        agents.append(agent)
        world.say("cron-1", "daemon", agent.callback)
        pusher.forget("cron-1")
        pusher(frozenset({"cron-1"}))
        assert agent.wait_for_answers(1)
    finally:
        pusher.close()
    assert pusher.counters.snapshot()["sent"] == 1


def test_announcements_for_one_agent_coalesce(world: World, agents: list[FakeAgent]) -> None:
    agent = agent_for(world, agents, "web-1")
    agent.hold()  # a busy agent: the first push stays in flight
    pusher = world.pusher(timeout=30.0)
    try:
        pusher(frozenset({"web-1"}))
        assert agent.wait_for_calls(1)
        for _ in range(49):
            pusher(frozenset({"web-1"}))
        # The second becomes the one follow-up; the 48 after it are absorbed.
        until(lambda: pusher.counters.snapshot()["coalesced"] == 48, "48 coalesced")
        assert pusher.counters.snapshot()["follow_ups"] == 1
        agent.release()
        assert agent.wait_for_answers(2)
        until(lambda: pusher.counters.snapshot()["succeeded"] == 2, "two pushes done")
        pusher(frozenset({"web-1"}))  # idle again: a new announcement is a new push
        assert agent.wait_for_answers(3)
    finally:
        pusher.close()
    assert len(agent.callers) == 3
    assert pusher.counters.snapshot()["sent"] == 3


def test_a_dead_address_is_one_counted_failure_in_words(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.enroll("web-1")
    address = dead_address()
    world.say("web-1", "daemon", address)
    pusher = world.pusher()
    with caplog.at_level(logging.WARNING, logger="scire_server.push"):
        try:
            pusher(frozenset({"web-1"}))
            until(lambda: pusher.counters.snapshot()["failed"] == 1, "the failure counted")
        finally:
            pusher.close()
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "scire_server.push" and r.levelno >= logging.WARNING
    ]
    assert lines == [
        f"push from test-server to client web-1 at {address} failed: nothing listens on "
        f"{address} (connection refused); it gets its work at its next poll"
    ]


def test_an_agent_that_never_answers_costs_the_timeout(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.enroll("web-1")
    silent = SilentListener()
    world.say("web-1", "daemon", silent.callback)
    pusher = world.pusher(timeout=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="scire_server.push"):
            pusher(frozenset({"web-1"}))
            until(lambda: pusher.counters.snapshot()["failed"] == 1, "the failure counted")
    finally:
        pusher.close()
        silent.close()
    assert any(
        "did not answer within 0.5 s" in r.getMessage()
        for r in caplog.records
        if r.name == "scire_server.push"
    )


def test_an_agent_with_another_clients_certificate_gets_no_call(
    world: World, agents: list[FakeAgent], caplog: pytest.LogCaptureFixture
) -> None:
    world.enroll("web-1")
    impostor_cert, impostor_key = world.enroll("db-1")
    impostor = FakeAgent(impostor_cert, impostor_key, world.ca_file).start()
    agents.append(impostor)
    world.say("web-1", "daemon", impostor.callback)  # web-1's address now answers as db-1
    pusher = world.pusher()
    try:
        with caplog.at_level(logging.WARNING, logger="scire_server.push"):
            pusher(frozenset({"web-1"}))
            until(lambda: pusher.counters.snapshot()["failed"] == 1, "the refusal counted")
    finally:
        pusher.close()
    assert impostor.callers == []
    (line,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "scire_server.push" and r.levelno >= logging.WARNING
    ]
    assert f"presented certificate {fingerprint_of(impostor_cert)}" in line
    assert "not the one on record for web-1" in line


def test_a_listener_from_another_ca_is_refused(
    world: World, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    world.enroll("web-1")
    other_key, other_ca = ca.create_ca("Another CA")
    key = certs.generate_key()
    cert = ca.issue_certificate(other_key, other_ca, key.public_key(), "web-1", ca.ROLE_CLIENT)
    cert_file, key_file = write_identity(
        tmp_path / "other", "web-1", certs.cert_to_pem(cert), certs.key_to_pem(key)
    )
    other_ca_file = tmp_path / "other" / "ca.pem"
    other_ca_file.write_bytes(certs.cert_to_pem(other_ca))
    stranger = FakeAgent(cert_file, key_file, other_ca_file).start()
    world.say("web-1", "daemon", stranger.callback)
    pusher = world.pusher()
    try:
        with caplog.at_level(logging.WARNING, logger="scire_server.push"):
            pusher(frozenset({"web-1"}))
            until(lambda: pusher.counters.snapshot()["failed"] == 1, "the refusal counted")
    finally:
        pusher.close()
        stranger.stop()
    assert stranger.callers == []
    assert any("certificate from another CA" in r.getMessage() for r in caplog.records)


def test_shutdown_drops_queued_pushes_and_ends_those_in_flight(
    world: World, agents: list[FakeAgent]
) -> None:
    agent = agent_for(world, agents, "web-1")
    agent.hold()  # never released: the push in flight ends by its timeout
    pusher = world.pusher(timeout=1.0)
    pusher(frozenset({"web-1"}))
    assert agent.wait_for_calls(1)
    pusher(frozenset({"web-1"}))  # the follow-up, queued behind the one in flight
    until(lambda: pusher.counters.snapshot()["follow_ups"] == 1, "the follow-up queued")
    closer = threading.Thread(target=pusher.close)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "close() did not return"
    counts = pusher.counters.snapshot()
    assert counts["sent"] == 1
    assert counts["failed"] == 1
    assert counts["dropped"] == 1
    pusher(frozenset({"web-1"}))  # after close: ignored
    assert pusher.counters.snapshot()["sent"] == 1
