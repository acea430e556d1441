"""Alembic, driven from code: the migrations live in ``schema/migrations``
(installed as the ``scire_schema`` package), so no alembic.ini is needed.

On PostgreSQL an upgrade runs under the store's migration lock (an advisory
lock held for the upgrade's transaction): of several daemons starting at once
one migrates, the others wait and then find the schema at head."""

from __future__ import annotations

import importlib.resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from scire_server import models
from scire_server.exceptions import Unavailable
from scire_server.store.database import driver_words, make_engine, migration_lock


def alembic_config(url: str) -> Config:
    config = Config()
    location = importlib.resources.files("scire_schema").joinpath("migrations")
    config.set_main_option("script_location", str(location))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # The environment in scire_schema cannot import the server's models itself.
    config.attributes["target_metadata"] = models.Base.metadata
    return config


def database_failure(exc: SQLAlchemyError, url: str) -> Unavailable:
    """The driver's own words for a failed migration, without SQL, links or
    the password."""
    return Unavailable(f"the database failed: {driver_words(exc, url)}")


def upgrade(url: str, revision: str = "head") -> None:
    config = alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            migration_lock(connection)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise database_failure(exc, url) from None
    finally:
        engine.dispose()


def current(url: str) -> tuple[str | None, str | None]:
    """(the database's revision, the newest revision this code knows)."""
    config = alembic_config(url)
    head = ScriptDirectory.from_config(config).get_current_head()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision(), head
    except SQLAlchemyError as exc:
        raise database_failure(exc, url) from None
    finally:
        engine.dispose()


def known_revisions() -> frozenset[str]:
    """Every revision this code's migrations know."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(rev.revision for rev in script.walk_revisions())
