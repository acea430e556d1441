"""The counts behind /metrics and the health probe, on a real SQLite store:
scrapes share one query per refresh interval, probes one per second, and a
database that does not answer is a reason in words."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from scire_schema import certs, metrics
from scire_server import ca, migrations, monitoring
from scire_server.store import Certificate, Store, make_engine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path / 'scire.db'}"
    migrations.upgrade(url)
    db = Store(make_engine(url), "test:1")
    yield db
    db.close()


def test_scrapes_share_one_query_per_refresh_interval(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = []
    real = store.overview.counts

    def counting(online_within: int) -> object:
        queries.append(online_within)
        return real(online_within)

    monkeypatch.setattr(store.overview, "counts", counting)
    clock = Clock()
    registry = metrics.Registry()
    registry.register(monitoring.StoreCounts(store, refresh=15, online_within=300, clock=clock))
    for _ in range(20):
        text = registry.exposition().decode()
    assert queries == [300]
    assert 'scire_assignments{state="pending"} 0' in text
    assert "scire_database_up 1" in text
    clock.now += 15
    registry.exposition()
    assert queries == [300, 300]


def _accepted_client(store: Store, name: str, days: int) -> dt.datetime:
    """An accepted client whose certificate, signed by a test CA, ends in ``days``."""
    ca_key, ca_cert = ca.create_ca()
    key = certs.generate_key()
    csr_pem = certs.make_csr(key, name).decode()
    cert = ca.issue_certificate(ca_key, ca_cert, key.public_key(), name, ca.ROLE_CLIENT, days=days)
    status = store.directory.register_client(
        name, csr_pem, {}, None, key_fingerprint=certs.key_fingerprint(cert)
    )
    assert status == "pending"
    certificate = Certificate(csr_pem, certs.cert_to_pem(cert).decode(), certs.fingerprint(cert))
    store.directory.accept_client(name, certificate, "user:admin")
    return cert.not_valid_after_utc


def test_client_certificate_ends_are_counted_by_window(store: Store) -> None:
    soonest = _accepted_client(store, "web-1", days=3)
    _accepted_client(store, "web-2", days=20)
    _accepted_client(store, "web-3", days=365)
    text = metrics.render(monitoring.StoreCounts(store, 15, 300).collect()).decode()
    assert 'scire_client_certificates_ending{within_days="7"} 1' in text
    assert 'scire_client_certificates_ending{within_days="30"} 2' in text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("scire_client_certificate_earliest_expiry_time_seconds ")
    )
    assert abs(float(line.split()[1]) - soonest.timestamp()) < 1


def test_health_probes_within_a_second_share_one_answer(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = []
    real = store.overview.ping
    monkeypatch.setattr(store.overview, "ping", lambda: pings.append(1) or real())
    clock = Clock()
    health = monitoring.HealthCheck(store, clock=clock)
    assert [health.problem() for _ in range(10)] == [None] * 10
    assert len(pings) == 1
    clock.now += monitoring.HEALTH_PROBE_INTERVAL
    assert health.problem() is None
    assert len(pings) == 2
    health.draining = lambda: True
    assert health.problem() == "shutting down"


def test_a_database_that_does_not_answer_is_named_not_detailed() -> None:
    # Nothing listens on port 1: every connection is refused.
    db = Store(make_engine("postgresql+psycopg://scire@127.0.0.1:1/scire"), "test:1")
    try:
        assert monitoring.HealthCheck(db).problem() == "database not answering"
        text = metrics.render(monitoring.StoreCounts(db, 15, 300).collect()).decode()
        assert "scire_database_up 0" in text
        assert "scire_assignments" not in text  # no counts yet, none invented
    finally:
        db.close()


def test_fault_labels() -> None:
    assert monitoring.fault_label(None) == "none"
    assert monitoring.fault_label(2) == "forbidden"
    assert monitoring.fault_label(12) == "malformed_request"
    assert monitoring.fault_label(4242) == "4242"
