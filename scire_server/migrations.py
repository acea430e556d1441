"""Alembic, driven from code: the migrations live in ``schema/migrations``
(installed as the ``scire_schema`` package), so no alembic.ini is needed."""

from __future__ import annotations

import importlib.resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from scire_server import models
from scire_server.exceptions import Unavailable
from scire_server.store.database import make_engine


def alembic_config(url: str) -> Config:
    config = Config()
    location = importlib.resources.files("scire_schema").joinpath("migrations")
    config.set_main_option("script_location", str(location))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # The environment in scire_schema cannot import the server's models itself.
    config.attributes["target_metadata"] = models.Base.metadata
    return config


def database_failure(exc: SQLAlchemyError) -> Unavailable:
    """The driver's own words for a failed migration, without SQL or links
    (and so without the URL and its password)."""
    orig = getattr(exc, "orig", None)
    first_line = str(orig or exc.__class__.__name__).strip().splitlines()[0]
    return Unavailable(f"the database failed: {first_line}")


def upgrade(url: str, revision: str = "head") -> None:
    config = alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise database_failure(exc) from exc
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
        raise database_failure(exc) from exc
    finally:
        engine.dispose()


def known_revisions() -> frozenset[str]:
    """Every revision this code's migrations know."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return frozenset(rev.revision for rev in script.walk_revisions())
