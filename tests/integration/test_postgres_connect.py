"""Connecting to a real PostgreSQL the way the daemons do: a multi-host URL
finds the server that takes writes, and migrations run under their lock."""

from __future__ import annotations

import threading

import sqlalchemy as sa
from conftest import PostgresCluster, free_port

from scire_server import migrations, store


def test_a_multi_host_url_skips_a_host_that_does_not_answer(postgres: PostgresCluster) -> None:
    url = postgres.new_database()
    name = url.rsplit("/", 1)[1]
    multi = (
        f"postgresql+psycopg://postgres@/{name}?host=127.0.0.1:{free_port()}"
        f"&host=127.0.0.1:{postgres.port}&target_session_attrs=read-write"
    )
    migrations.upgrade(multi)
    assert migrations.current(multi)[0] == migrations.current(url)[1]
    engine = store.make_engine(multi)
    try:
        with engine.connect() as connection:
            port = connection.execute(sa.text("SELECT inet_server_port()")).scalar()
        assert port == postgres.port
    finally:
        engine.dispose()


def test_daemons_starting_together_migrate_once(postgres: PostgresCluster) -> None:
    url = postgres.new_database()
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            migrations.upgrade(url)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    current, head = migrations.current(url)
    assert current == head
