"""Database engines, sessions and migrations.

Guarantees:
- SQLite runs in WAL mode with foreign keys on, ``synchronous=FULL`` (an accepted request survives a
  power cut) and every transaction ``BEGIN IMMEDIATE``, so writers are serialized instead of
  failing half-way with a stale snapshot. Within one process the threads of an engine queue for
  that lock on a ``threading.Lock`` first (taken on BEGIN, released after COMMIT/ROLLBACK or
  close), so SQLite's sleeping busy handler only arbitrates between processes; the two waits
  together stay within the engine's lock timeout;
- PostgreSQL goes through psycopg 3;
- SQL parameters never appear in exception messages (they may hold pseudonyms or ciphertexts);
- the schema is changed only by Alembic (``migrate``), never by ``create_all``;
- the request owns the transaction: ``get_session`` commits after the route returns and before
  the response is sent; services only flush. A failed request rolls back, except a refusal whose
  error asks to keep what it flushed (``commit_before_raising``: a denied access and its log
  entry).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from alembic.config import Config
from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from alembic import command
from service.config import Settings
from service.errors import ServiceError

# Engine execution option carrying settings.log_lock_timeout_seconds, so every engine built by
# make_engine bounds the access log's lock wait (read back from the session's connection).
LOG_LOCK_TIMEOUT_OPTION = "casepackets_log_lock_timeout_seconds"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, lock_timeout_seconds: float = 2.0, pool_size: int = 20) -> Engine:
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={
                "check_same_thread": False,
                "timeout": lock_timeout_seconds,
                "factory": _SerializedConnection,
            },
            hide_parameters=True,
            execution_options={LOG_LOCK_TIMEOUT_OPTION: lock_timeout_seconds},
        )
        _configure_sqlite(engine, busy_timeout_ms=int(lock_timeout_seconds * 1000))
        return engine
    return create_engine(
        url,
        hide_parameters=True,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        execution_options={LOG_LOCK_TIMEOUT_OPTION: lock_timeout_seconds},
    )


class _SerializedConnection(sqlite3.Connection):
    """A pysqlite connection that gives its engine's process-local write lock back as soon as
    its transaction ends (after COMMIT or ROLLBACK returns, or on close).

    SQLite's own lock stays the guarantee; this lock only makes the threads of one process queue
    without sleeping. Releasing it is idempotent, so every end of a transaction may call it.
    """

    write_lock: threading.Lock | None = None
    busy_timeout_ms: int = 0

    def release_write_lock(self) -> None:
        held, self.write_lock = self.write_lock, None
        if held is not None:
            held.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.release_write_lock()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.release_write_lock()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.release_write_lock()


def _configure_sqlite(engine: Engine, *, busy_timeout_ms: int) -> None:
    write_lock = threading.Lock()
    bound_seconds = busy_timeout_ms / 1000

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()
        dbapi_connection.busy_timeout_ms = int(busy_timeout_ms)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        dbapi_connection = connection.connection.dbapi_connection
        if not isinstance(dbapi_connection, _SerializedConnection):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            return
        started = time.monotonic()
        if not write_lock.acquire(timeout=bound_seconds):
            raise OperationalError(
                "BEGIN IMMEDIATE",
                None,
                sqlite3.OperationalError("database is locked (by this process's writers)"),
            )
        dbapi_connection.write_lock = write_lock
        try:
            # What is left of the bound is the busy timeout against other processes.
            left_ms = max(1, busy_timeout_ms - int((time.monotonic() - started) * 1000))
            if left_ms < busy_timeout_ms or dbapi_connection.busy_timeout_ms != busy_timeout_ms:
                dbapi_connection.execute(f"PRAGMA busy_timeout={left_ms}")
                dbapi_connection.busy_timeout_ms = left_ms
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            dbapi_connection.release_write_lock()
            raise


class Database:
    """One engine per process; sessions are short and owned by a request or a command."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.resolved_database_url
        self.engine = make_engine(
            self.url,
            lock_timeout_seconds=settings.log_lock_timeout_seconds,
            pool_size=settings.database_pool_size,
        )

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error (for commands and jobs)."""
        with self.session() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str, migrations_dir: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def migrate(url: str, migrations_dir: Path, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (creating the SQLite file and folder when needed)."""
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url, migrations_dir), revision)


def downgrade(url: str, migrations_dir: Path, revision: str = "base") -> None:
    command.downgrade(alembic_config(url, migrations_dir), revision)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's session. Opening it does no I/O (the connection is taken on first use, in
    the route's thread), so only ending a transaction still open after the route goes to the
    thread pool: a route that committed itself costs no extra hop."""
    database: Database = request.app.state.database
    session = database.session()
    try:
        yield session
    except ServiceError as exc:
        if exc.commit_before_raising:
            await run_in_threadpool(_end, session, commit=True)
        else:
            await run_in_threadpool(_end, session, commit=False)
        raise
    except BaseException:
        await run_in_threadpool(_end, session, commit=False)
        raise
    else:
        if session.in_transaction():
            await run_in_threadpool(_end, session, commit=True)
        else:
            session.close()


def _end(session: Session, *, commit: bool) -> None:
    """Commit (or roll back) and close: rolled back and closed whatever happens."""
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


# scope="function": the commit runs when the route returns, before the response is sent.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
