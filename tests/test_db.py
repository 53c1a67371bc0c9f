"""Migrations are the only source of the schema, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError

from service import db
from service.config import PROJECT_ROOT, Settings
from service.db import (
    WRAP_TABLES,
    Database,
    DatabaseBusy,
    WriterTurn,
    _vacuum_wrap_tables,
    downgrade,
    make_engine,
    migrate,
    missing_sqlite_file,
)
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


def test_replicas_migrating_at_once_all_succeed(databases: Databases) -> None:
    """Every container runs ``casepackets migrate`` as it starts; several may start together.
    (Processes, as replicas are: Alembic keeps its migration context in module state.)"""
    url = databases.empty()
    script = "import sys; from service.db import migrate; migrate(sys.argv[1], sys.argv[2])"
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", script, url, str(MIGRATIONS)],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [replica.communicate(timeout=120)[0] for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0, 0], "\n".join(outputs)
    assert set(metadata.tables) <= table_names(url)


def test_a_new_sqlite_file_s_name_is_put_on_disk_once_it_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(db, "sync_folder", synced.append)
    url = f"sqlite:///{tmp_path / 'data' / 'new.db'}"
    make_engine(url).dispose()
    assert synced == [tmp_path / "data"]
    make_engine(url).dispose()  # there already: nothing to put on disk
    assert synced == [tmp_path / "data"]


def test_only_a_sqlite_file_that_is_not_there_is_missing(tmp_path: Path) -> None:
    """What a command refuses rather than create empty: a SQLite file not there. An in-memory
    database names no file, and a PostgreSQL database's name is not a path."""
    there = tmp_path / "there.db"
    there.write_bytes(b"")
    assert missing_sqlite_file(f"sqlite:///{tmp_path / 'gone.db'}") == tmp_path / "gone.db"
    assert missing_sqlite_file(f"sqlite:///{there}") is None
    assert missing_sqlite_file("sqlite://") is None
    assert missing_sqlite_file("sqlite:///:memory:") is None
    assert missing_sqlite_file("postgresql+psycopg://127.0.0.1/not-a-file-here") is None


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'private.db'}"
    migrate(url, MIGRATIONS)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT count(*) FROM subjects"))
        modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.glob("private.db*")}
    finally:
        engine.dispose()
    assert {"private.db", "private.db-wal"} <= modes.keys()
    assert set(modes.values()) == {0o600}, modes


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


# -- SQLite writers take turns across processes -----------------------------------------------
# Each WriterTurn opens the lock file on its own, so two of them contend as two processes do.


def test_a_writer_waits_for_another_processs_turn_within_its_bound(tmp_path: Path) -> None:
    holder, waiter = WriterTurn(tmp_path / "db-writers"), WriterTurn(tmp_path / "db-writers")
    assert holder.acquire(timeout=1.0)
    started = time.monotonic()
    assert not waiter.acquire(timeout=0.2)
    assert time.monotonic() - started >= 0.19
    holder.release()
    assert waiter.acquire(timeout=5.0)
    assert not holder.acquire(timeout=0.05)
    waiter.release()
    assert holder.acquire(timeout=5.0)
    holder.release()


@pytest.mark.usefixtures("no_collector_pauses")
def test_a_turn_asked_for_without_waiting_is_taken_only_when_free(tmp_path: Path) -> None:
    """An event loop's attempt: it never blocks and starts no helper thread to wait."""
    holder, attempt = WriterTurn(tmp_path / "db-writers"), WriterTurn(tmp_path / "db-writers")
    threads_before = threading.active_count()
    assert holder.acquire(timeout=1.0)
    started = time.monotonic()
    assert not attempt.acquire(timeout=0)
    assert time.monotonic() - started < 0.05
    assert threading.active_count() == threads_before
    holder.release()
    assert attempt.acquire(timeout=0)
    assert not attempt.acquire(timeout=0)  # taken by another thread of its own process, too
    attempt.release()
    assert holder.acquire(timeout=0)
    holder.release()


def test_a_waiting_writer_is_woken_when_the_holder_lets_go(tmp_path: Path) -> None:
    holder, waiter = WriterTurn(tmp_path / "db-writers"), WriterTurn(tmp_path / "db-writers")
    assert holder.acquire(timeout=1.0)
    waited: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        if waiter.acquire(timeout=30.0):
            waited.append(time.monotonic() - started)
            waiter.release()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.1)
    holder.release()
    thread.join(timeout=30.0)
    assert len(waited) == 1
    assert waited[0] < 10.0  # woken by the release, long before its bound


def test_a_turn_given_up_on_is_given_back_or_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "db-writers"
    holder, waiter, third = WriterTurn(path), WriterTurn(path), WriterTurn(path)
    assert holder.acquire(timeout=1.0)
    assert not waiter.acquire(timeout=0.05)  # its helper thread still waits in the kernel
    holder.release()
    # The helper gets the file lock for nobody and gives it straight back.
    assert third.acquire(timeout=5.0)
    third.release()
    # A later writer of the same process takes over a wait that is still pending.
    assert holder.acquire(timeout=1.0)
    assert not waiter.acquire(timeout=0.05)
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(waiter.acquire(timeout=30.0)))
    thread.start()
    time.sleep(0.05)
    holder.release()
    thread.join(timeout=30.0)
    assert outcome == [True]
    assert not third.acquire(timeout=0.05)
    waiter.release()
    assert third.acquire(timeout=5.0)
    third.release()


def test_sqlite_engines_share_a_writers_file_next_to_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/casepackets.db"
    migrate(url, MIGRATIONS)
    first, second = make_engine(url), make_engine(url, lock_timeout_seconds=0.2)
    try:
        with first.begin() as connection:
            connection.execute(text("SELECT 1"))
            assert (tmp_path / "casepackets.db-writers").exists()
            with pytest.raises(OperationalError, match="locked"), second.begin() as other:
                other.execute(text("SELECT 1"))
        with second.begin() as other:
            other.execute(text("SELECT 1"))
    finally:
        first.dispose()
        second.dispose()


# -- migrations wait for running work, within their own bound ----------------------------------


@contextmanager
def a_lock_on_the_schema(url: str, backend: str) -> Iterator[None]:
    """Running work, as a migration sees it: a transaction holding what it needs to change."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            if backend == "postgres":
                connection.exec_driver_sql("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
            else:
                connection.exec_driver_sql("SELECT 1")  # BEGIN IMMEDIATE: the write lock
            yield
            connection.rollback()
    finally:
        engine.dispose()


def test_a_migration_waits_past_the_request_lock_timeout_for_running_work(
    databases: Databases,
) -> None:
    """Requests give up on a lock after 2 s (make_engine's default); a migration waits longer
    (MIGRATION_LOCK_TIMEOUT_SECONDS) rather than fail half-way through a deployment."""
    url = databases.fresh()
    failures: list[BaseException] = []

    def migrate_meanwhile() -> None:
        try:
            migrate(url, MIGRATIONS)
        except BaseException as exc:
            failures.append(exc)

    migrator = threading.Thread(target=migrate_meanwhile)
    with a_lock_on_the_schema(url, databases.backend):
        migrator.start()
        time.sleep(3.0)
        assert migrator.is_alive()
    migrator.join(60)
    assert failures == []


def test_a_migration_that_waits_past_its_bound_is_busy(
    databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = databases.fresh()
    monkeypatch.setattr(db, "MIGRATION_LOCK_TIMEOUT_SECONDS", 0.3)
    with (
        a_lock_on_the_schema(url, databases.backend),
        pytest.raises(DatabaseBusy, match="the database is busy"),
    ):
        migrate(url, MIGRATIONS)


class _Reporting:
    """A stand-in connection whose VACUUM reports ``reports`` as PostgreSQL notices would."""

    def __init__(self, reports: list[str]) -> None:
        self.reports = reports
        self.handlers: list[Any] = []
        self.connection = self
        self.driver_connection = self

    def add_notice_handler(self, handler: Any) -> None:
        self.handlers.append(handler)

    def remove_notice_handler(self, handler: Any) -> None:
        self.handlers.remove(handler)

    def exec_driver_sql(self, statement: str) -> None:
        assert statement.startswith("VACUUM (VERBOSE, SKIP_LOCKED)")
        for report in self.reports:
            for handler in self.handlers:
                handler(SimpleNamespace(message_primary=report))


def _finished(table: str, cutoff: int, missed: str = "") -> str:
    return (
        f'finished vacuuming "db.public.{table}": index scans: 0\n'
        "tuples: 3 removed, 7 remain, 0 are dead but not yet removable\n"
        f"{missed}removable cutoff: {cutoff}, which was 1 XIDs old when operation ended\n"
    )


def test_the_purge_reads_vacuums_report_per_table() -> None:
    horizon = 2**32 + 1000  # a 64-bit transaction id; VACUUM reports 32-bit ones
    done = [_finished(table, 1000) for table in WRAP_TABLES]
    assert _vacuum_wrap_tables(_Reporting(done), horizon=horizon) == []  # type: ignore[arg-type]
    behind = [*done[:-1], _finished(WRAP_TABLES[-1], 999)]
    assert _vacuum_wrap_tables(_Reporting(behind), horizon=horizon) == [WRAP_TABLES[-1]]  # type: ignore[arg-type]
    missed = [*done[1:], _finished(WRAP_TABLES[0], 1000, "tuples missed: 2 dead from 1 pages\n")]
    assert _vacuum_wrap_tables(_Reporting(missed), horizon=horizon) == [WRAP_TABLES[0]]  # type: ignore[arg-type]
    skipped = done[1:]  # SKIP_LOCKED: a table another VACUUM held
    assert _vacuum_wrap_tables(_Reporting(skipped), horizon=horizon) == [WRAP_TABLES[0]]  # type: ignore[arg-type]
    # PostgreSQL 14 words it otherwise (and a server may report in another language): unread,
    # which the purge says in the log instead of waiting forever for a report it cannot read.
    older = ['"packets": found 3 removable, 7 nonremovable row versions in 1 out of 1 pages']
    assert _vacuum_wrap_tables(_Reporting(older), horizon=horizon) is None  # type: ignore[arg-type]
