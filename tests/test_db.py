"""Migrations are the only source of the schema, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service.config import Settings
from service.db import Database, downgrade, make_engine, migrate
from service.schema import metadata
from tests.conftest import MIGRATIONS, Databases


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(databases: Databases) -> None:
    url = databases.empty()
    migrate(url, MIGRATIONS)
    upgraded = table_names(url)
    assert set(metadata.tables) <= upgraded
    downgrade(url, MIGRATIONS, "base")
    assert table_names(url) <= {"alembic_version"}
    migrate(url, MIGRATIONS)
    assert table_names(url) == upgraded


def test_models_and_migrations_agree(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == [], f"models and migrations differ: {differences}"


def test_sqlite_runs_in_wal_with_foreign_keys(settings: Settings, backend: str) -> None:
    database = Database(settings)
    try:
        with database.engine.connect() as connection:
            if backend == "sqlite":
                assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            else:
                assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        database.dispose()
