"""Database engines, sessions and migrations.

Guarantees:
- SQLite runs in WAL mode with foreign keys on, ``synchronous=FULL`` (an accepted request survives a
  power cut) and every transaction ``BEGIN IMMEDIATE``, so writers are serialized instead of
  failing half-way with a stale snapshot. Writers queue for that lock on a ``WriterTurn`` first
  (taken on BEGIN, given back after COMMIT/ROLLBACK or close): the threads of a process on a
  lock, the processes on ``flock`` of ``<database>-writers``, waiting in the kernel rather than
  in SQLite's sleeping busy handler. The waits together stay within the engine's lock timeout;
- PostgreSQL goes through psycopg 3 at READ COMMITTED and in UTC (whatever the database's
  defaults), with every lock wait bounded by the engine's lock timeout,
  or by a shorter one a transaction asks for (``LOG_LOCK_TIMEOUT_OPTION`` on its connection, as
  SQLite's turn takes it too);
- SQL parameters never appear in exception messages (they may hold pseudonyms or ciphertexts);
- the schema is changed only by Alembic (``migrate``), never by ``create_all``; a migration waits
  up to ``MIGRATION_LOCK_TIMEOUT_SECONDS`` for locks, and a database at a revision this code does
  not know is refused (``SchemaTooNew``), never migrated;
- a database that cannot be reached or stays locked is a ``DatabaseProblem`` whose message is one
  line without credentials (commands print it instead of a traceback);
- the request owns the transaction: ``get_session`` commits after the route returns and before
  the response is sent; services only flush. A failed request rolls back, except a refusal whose
  error asks to keep what it flushed (``commit_before_raising``: a denied access and its log
  entry).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import psycopg
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from fastapi import Depends, Request
from pydantic_core import from_json
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool
from sqlmodel import Field, Session, SQLModel
from starlette.concurrency import run_in_threadpool

from alembic import command
from service.config import Settings
from service.durable import sync_folder
from service.errors import ServiceError

# Engine execution option carrying settings.log_lock_timeout_seconds, so every engine built by
# make_engine bounds the access log's lock wait (read back from the session's connection).
LOG_LOCK_TIMEOUT_OPTION = "casepackets_log_lock_timeout_seconds"
# A connection that only reads (the readiness probe) begins without the write lock on SQLite (a
# plain deferred BEGIN, no writer turn): in WAL mode it reads beside a long write instead of
# waiting for it, so a busy database is not reported as an unreachable one.
READ_ONLY_OPTION = "casepackets_read_only"

logger = logging.getLogger(__name__)

# How long a migration waits for a lock held by running work (a request, a job) before it gives
# up; requests that touch the tables being changed wait behind it meanwhile.
MIGRATION_LOCK_TIMEOUT_SECONDS = 60.0


class DatabaseProblem(Exception):
    """The database cannot be used as it is; the message is one line without credentials."""


class DatabaseUnreachable(DatabaseProblem):
    """No connection: server down, no such database or role, a SQLite file that cannot be made."""


class DatabaseBusy(DatabaseProblem):
    """A lock was held past the wait allowed; trying again later may succeed."""


class SchemaTooNew(DatabaseProblem):
    """The database is at a revision this code does not know: a newer version migrated it."""


class NoMigrations(DatabaseProblem):
    """CASEPACKETS_MIGRATIONS_DIR is not a folder of casepackets migrations: the database can be
    neither migrated nor checked against this code's schema."""


# SQLite's names (``sqlite_errorname``) for a file it cannot open, read or write.
_SQLITE_UNREACHABLE = (
    "SQLITE_CANTOPEN",
    "SQLITE_NOTADB",
    "SQLITE_IOERR",
    "SQLITE_PERM",
    "SQLITE_READONLY",
)


def _waited_too_long(error: BaseException | None) -> bool:
    if isinstance(error, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
        return True  # lock_timeout, or statement_timeout ending a wait
    return isinstance(error, sqlite3.OperationalError) and (
        getattr(error, "sqlite_errorname", "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
        or "database is locked" in str(error)  # also the writers' turn past its bound
    )


def lock_was_busy(exc: DBAPIError) -> bool:
    """Whether ``exc`` says a lock was held past the wait allowed (trying later may succeed)."""
    return _waited_too_long(exc.orig)


def _not_reached(error: BaseException | None) -> bool:
    if isinstance(error, psycopg.OperationalError):
        # No SQLSTATE: the connection itself failed; 08 connection, 28 role, 3D no such database.
        return error.sqlstate is None or error.sqlstate[:2] in ("08", "28", "3D")
    return isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorname", "").startswith(
        _SQLITE_UNREACHABLE
    )


def database_problem(exc: DBAPIError, *, url: URL | str) -> DatabaseProblem | None:
    """What ``exc`` says about reaching the database or waiting for it, with ``url``'s password
    blotted out; None for any other error (a fault to see in full)."""
    if _waited_too_long(exc.orig):
        return DatabaseBusy(
            "the database is busy: a lock was held longer than this command waits; try again"
        )
    if not _not_reached(exc.orig):
        return None
    reason = " ".join(str(exc.orig).split())
    password = (make_url(url) if isinstance(url, str) else url).password
    if password:
        reason = reason.replace(str(password), "***")
    return DatabaseUnreachable(f"cannot reach the database: {reason}")


@contextmanager
def database_problems(url: URL | str) -> Iterator[None]:
    """Turn an error about reaching the database or waiting for it into a ``DatabaseProblem``."""
    try:
        yield
    except DBAPIError as exc:
        problem = database_problem(exc, url=url)
        if problem is None:
            raise
        raise problem from exc


@contextmanager
def _sqlite_files(database: Path) -> Iterator[None]:
    """Creating the SQLite file, its folder or a file beside it; a failure is unreachable."""
    try:
        yield
    except OSError as exc:
        raise DatabaseUnreachable(
            f"cannot reach the database: cannot create {exc.filename or database} "
            f"({exc.strerror or type(exc).__name__})"
        ) from exc


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database."""
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when it does not exist yet (None otherwise, and for PostgreSQL):
    a command that needs a migrated database refuses it rather than create an empty one."""
    if not is_sqlite(url):
        return None
    database = _sqlite_file(url)
    return database if database is not None and not database.exists() else None


def backup_sqlite(url: str, target: Path) -> int:
    """Copy the SQLite database of ``url`` to the new file ``target`` with SQLite's online
    backup: one consistent snapshot, including what the ``-wal`` file holds and a plain copy of
    the database file would miss, taken while the service runs. ``target`` is readable by its
    owner only, on disk before its name appears, and never replaces a file (``FileExistsError``);
    a failure leaves nothing behind (a backup killed outright, SIGKILL or a power cut, leaves a
    hidden ``.NAME.*.partial`` file, mode 0600, that no later backup trips over: delete it).
    Returns the size in bytes.
    ``FileNotFoundError`` when the database file or the target's folder is not there (neither
    is created)."""
    source_file = _sqlite_file(url)
    if source_file is None:
        raise ValueError("an in-memory database has nothing to back up")
    if not source_file.is_file():
        raise FileNotFoundError(errno.ENOENT, "no database file", str(source_file))
    if not target.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(target.parent))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "refusing to replace it", str(target))
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    partial = Path(name)
    try:
        source = sqlite3.connect(f"{source_file.resolve().as_uri()}?mode=rw", uri=True)
        try:
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)  # in one step: one read snapshot of the whole database
                copy.execute("PRAGMA journal_mode = DELETE")  # one file, no -wal beside it
            finally:
                copy.close()
        finally:
            source.close()
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.link(partial, target)  # refuses, as the check above did, a file put there meanwhile
    finally:
        for leftover in (partial, partial.with_name(f"{partial.name}-journal")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    sync_folder(target.parent)
    return target.stat().st_size


def make_engine(
    url: str,
    *,
    lock_timeout_seconds: float = 2.0,
    pool_size: int = 20,
    sqlite_pool_size: int | None = None,
) -> Engine:
    """An engine configured as the module docstring says. ``pool_size`` is PostgreSQL's;
    ``sqlite_pool_size`` sizes a SQLite file's pool (SQLAlchemy's default when None). Waiting
    for a free connection is bounded like a lock wait (``sqlalchemy.exc.TimeoutError`` past it)."""
    if is_sqlite(url):
        database = _sqlite_file(url)
        lock_file = None
        if database is not None:
            with _sqlite_files(database):
                database.parent.mkdir(parents=True, exist_ok=True)
                # Owner-only from the start (SQLite gives its -wal and -shm files the same mode):
                # the file holds pseudonyms, ciphertexts and wrapped keys.
                made = not database.exists()
                os.close(os.open(database, os.O_RDWR | os.O_CREAT, 0o600))
                if made:
                    # Its name is an entry of the folder: on disk before anything is committed
                    # to the file, or a power cut could take the whole database with it.
                    sync_folder(database.parent)
            lock_file = database.with_name(f"{database.name}-writers")
        pool: dict[str, float] = {}
        if database is not None:
            pool = {"pool_timeout": lock_timeout_seconds}
            if sqlite_pool_size is not None:
                pool |= {"pool_size": sqlite_pool_size, "max_overflow": sqlite_pool_size}
        engine = create_engine(
            url,
            **pool,
            connect_args={
                "check_same_thread": False,
                "timeout": lock_timeout_seconds,
                "factory": _SerializedConnection,
            },
            hide_parameters=True,
            json_deserializer=from_json,
            execution_options={LOG_LOCK_TIMEOUT_OPTION: lock_timeout_seconds},
        )
        _configure_sqlite(
            engine, busy_timeout_ms=int(lock_timeout_seconds * 1000), turn=WriterTurn(lock_file)
        )
        return engine
    engine = create_engine(
        url,
        hide_parameters=True,
        json_deserializer=from_json,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=lock_timeout_seconds,
        # Whatever the database's default: the log reads its frontier after its lock is granted,
        # and only READ COMMITTED lets that read see the appends committed before.
        isolation_level="READ COMMITTED",
        # Every lock wait is bounded like the log's, not only the log's: a row or table lock
        # held elsewhere (a long job, a migration) ends a request with 503 instead of a hang.
        # Times come back in UTC, as SQLite's do, whatever the server's TimeZone (initdb takes
        # the host's): otherwise a time shows another offset when read back than when written.
        connect_args={
            "options": f"-c lock_timeout={lock_timeout_ms(lock_timeout_seconds)} -c TimeZone=UTC"
        },
        execution_options={LOG_LOCK_TIMEOUT_OPTION: lock_timeout_seconds},
    )

    @event.listens_for(engine, "begin")
    def _bound_lock_waits(connection: Any) -> None:
        # A transaction may bound its own waits below the engine's (a batch of opens whose first
        # one already waited), for the rest of the transaction only. lock_timeout starts again
        # for each lock a statement waits for (behind another waiter, then behind the holder),
        # so statement_timeout bounds the statement's whole wait.
        wait = connection.get_execution_options().get(LOG_LOCK_TIMEOUT_OPTION, lock_timeout_seconds)
        if wait < lock_timeout_seconds:
            limit_lock_waits(connection, wait)

    return engine


def lock_timeout_ms(seconds: float) -> int:
    """A lock timeout in whole milliseconds, at least 1 (0 would mean no timeout at all)."""
    return max(1, int(seconds * 1000))


def limit_lock_waits(connection: Connection, seconds: float) -> None:
    """Bound every lock wait of the rest of this transaction to ``seconds`` (PostgreSQL: a
    transaction that already waited for one lock waits only what is left for the next). SQLite
    needs nothing: a transaction holds the database's one lock from its first statement."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(
            "SELECT set_config('lock_timeout', %(wait)s, true), "
            "set_config('statement_timeout', %(wait)s, true)",
            {"wait": f"{lock_timeout_ms(seconds)}ms"},
        )


# A wait shorter than this is not worth a round trip (PostgreSQL) to shorten the waits after it:
# a transaction's later wait, for the log's lock say, may end this far past its bound.
LOCK_WAIT_SLACK_SECONDS = 0.05
# However little of its bound a transaction (or an open's batch) has left, its next lock wait
# still tries this long.
MIN_LOCK_WAIT_SECONDS = 0.01


def spend_lock_wait(connection: Connection, waited: float) -> None:
    """Take ``waited`` (what a statement of this transaction just spent waiting for a lock) off
    what its later lock waits may take, the log's lock included: a request that waited for a
    packet's row waits only the rest of its bound for the log, so it gets its 503 within the
    bound, not after two. PostgreSQL only: on SQLite a transaction holds its one lock from its
    first statement."""
    if connection.dialect.name != "postgresql" or waited < LOCK_WAIT_SLACK_SECONDS:
        return
    bound = connection.get_execution_options()[LOG_LOCK_TIMEOUT_OPTION]
    left = max(MIN_LOCK_WAIT_SECONDS, bound - waited)
    connection.execution_options(**{LOG_LOCK_TIMEOUT_OPTION: left})
    limit_lock_waits(connection, left)


@dataclass
class _Wait:
    """A process's pending claim on the lock file, waited for by a helper thread in the kernel."""

    granted: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False


class WriterTurn:
    """The turn to write to one SQLite database: first among this process's threads (a lock),
    then among processes (``flock`` on ``lock_file``; None for an in-memory database).

    SQLite's own lock stays the guarantee; the turn makes writers queue instead of poll. SQLite's
    busy handler sleeps up to 100 ms between tries, so under load a worker process could lose the
    race to its neighbour again and again, for a second or more. Here a process whose turn is
    taken waits in a helper thread blocked in ``flock``, woken the moment the holder lets go; the
    caller stops waiting at its bound, and a turn granted after that is given straight back.
    """

    def __init__(self, lock_file: Path | None) -> None:
        self._threads = threading.Lock()
        self._lock_file = lock_file
        self._fd: int | None = None
        self._fd_pid = 0
        self._mutex = threading.Lock()  # guards _wait and every flock call on _fd
        self._wait: _Wait | None = None

    def acquire(self, timeout: float) -> bool:
        """Take the turn within ``timeout`` seconds; False (nothing held) past it. A timeout of
        0 takes the turn only if it is free now, without waiting (an event loop's attempt)."""
        deadline = time.monotonic() + timeout
        taken = (
            self._threads.acquire(timeout=timeout)
            if timeout > 0
            else self._threads.acquire(blocking=False)
        )
        if not taken:
            return False
        try:
            if self._lock_file is None or self._take_file_lock(self._lock_file, deadline):
                return True
        except BaseException:
            self._threads.release()
            raise
        self._threads.release()
        return False

    def release(self) -> None:
        if self._lock_file is not None:
            with self._mutex:
                fcntl.flock(self._file(self._lock_file), fcntl.LOCK_UN)
        self._threads.release()

    def _file(self, lock_file: Path) -> int:
        """This process's descriptor of the lock file (opened again after a fork: a shared open
        file would share the lock)."""
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fd_pid = os.getpid()
            weakref.finalize(self, os.close, self._fd)
        return self._fd

    def _take_file_lock(self, lock_file: Path, deadline: float) -> bool:
        with self._mutex:
            wait = self._wait
            if wait is None:
                fd = self._file(lock_file)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    if deadline <= time.monotonic():
                        return False  # no time left to wait: no helper to start
                    wait = self._wait = _Wait()
                    threading.Thread(
                        target=self._wait_in_kernel, args=(fd, wait), daemon=True
                    ).start()
            wait.abandoned = False  # a wait an earlier thread gave up on is taken over
        if wait.granted.wait(max(0.0, deadline - time.monotonic())):
            return True
        with self._mutex:
            if wait.granted.is_set():
                return True
            wait.abandoned = True
            return False

    def _wait_in_kernel(self, fd: int, wait: _Wait) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # without the GIL, until the holder lets go
        except OSError:
            # The turn is about fairness only: SQLite's busy timeout still bounds what follows.
            logger.warning("could not wait on the SQLite writers' lock file; going on without")
            with self._mutex:
                self._wait = None
                wait.granted.set()
            return
        with self._mutex:
            self._wait = None
            if wait.abandoned:
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                wait.granted.set()


class _SerializedConnection(sqlite3.Connection):
    """A pysqlite connection that gives its engine's writer turn back as soon as
    its transaction ends (after COMMIT or ROLLBACK returns, or on close).

    SQLite's own lock stays the guarantee; the turn only makes writers queue without sleeping.
    Giving it back is idempotent, so every end of a transaction may call it.
    """

    write_lock: WriterTurn | None = None
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


def _configure_sqlite(engine: Engine, *, busy_timeout_ms: int, turn: WriterTurn) -> None:
    bound_seconds = busy_timeout_ms / 1000

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Freed space is zeroed, so a wrap or ciphertext that shredding or erasure overwrote
        # does not linger in the file's free space.
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()
        dbapi_connection.busy_timeout_ms = int(busy_timeout_ms)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            connection.exec_driver_sql("BEGIN")
            return
        dbapi_connection = connection.connection.dbapi_connection
        if not isinstance(dbapi_connection, _SerializedConnection):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            return
        # A transaction may bound its own wait (a batch of opens whose first one already waited).
        bound = min(
            bound_seconds,
            connection.get_execution_options().get(LOG_LOCK_TIMEOUT_OPTION, bound_seconds),
        )
        started = time.monotonic()
        if not turn.acquire(timeout=bound):
            raise OperationalError(
                "BEGIN IMMEDIATE",
                None,
                sqlite3.OperationalError(
                    "database is locked (other writers kept their turn past the bound)"
                ),
            )
        dbapi_connection.write_lock = turn
        try:
            # What is left of the bound is the busy timeout against other processes.
            left_ms = max(1, int(bound * 1000) - int((time.monotonic() - started) * 1000))
            if dbapi_connection.busy_timeout_ms != left_ms:
                dbapi_connection.execute(f"PRAGMA busy_timeout={left_ms}")
                dbapi_connection.busy_timeout_ms = left_ms
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            dbapi_connection.release_write_lock()
            raise


# The tables whose rows lose a wrap or a ciphertext when a packet is shredded or a subject erased,
# or, at an erasure, a text a source wrote about the subject (flags) or a keyed digest of a
# request that held them (flag_pushes, ingest_batches), against which a guess could be checked.
WRAP_TABLES = (
    "subjects",
    "packets",
    "packet_members",
    "packet_followups",
    "flags",
    "flag_pushes",
    "ingest_batches",
)


class PurgeRequest(SQLModel, table=True):
    """A purge the transaction that wrote this row asked for (``request_purge``).

    Stored with the overwrite, so that no restart, kill or scale-down between the overwrite's
    commit and its purge can forget it, and any worker or ``casepackets expire`` finishes it.
    ``horizon`` (PostgreSQL): one past the id of the transaction that overwrote and asked, so
    every version it replaced was replaced before it.
    """

    __tablename__ = "purge_requests"
    # Ids never given out twice (SQLite reuses a deleted largest rowid without it).
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    horizon: int | None = Field(default=None, sa_type=BigInteger)


_PURGE_REQUESTS = PurgeRequest.__table__  # type: ignore[attr-defined]


def request_purge(session: Session) -> None:
    """Ask, in this transaction, for a purge of the row versions it overwrote: call it after
    the overwrite, from any transaction that removes a wrap, a ciphertext or a keyed digest from
    a ``WRAP_TABLES`` row. ``Database.purge_replaced_rows`` carries it out once committed."""
    connection = session.connection()
    horizon = None
    if connection.dialect.name == "postgresql":
        # This transaction's own id (every version it replaced carries it as the replacer), plus
        # one: a snapshot taken at its start, as under REPEATABLE READ, may predate the id.
        horizon = (
            int(connection.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar_one()) + 1
        )
    connection.execute(insert(_PURGE_REQUESTS).values(horizon=horizon))


# VACUUM VERBOSE's report on one table or its TOAST table (PostgreSQL 15 and later): the
# removable cutoff (row versions that transactions older than it replaced are gone; a snapshot
# still open from before, such as pg_dump's or a report's, holds it back) and the versions it
# missed for a page it could not lock.
_VACUUMED = re.compile(r'finished vacuuming "(?:[^"]*\.)?([^".]+)"')
_REMOVABLE_CUTOFF = re.compile(r"removable cutoff: (\d+)")
_MISSED = re.compile(r"tuples missed: (\d+)")
XID_SPACE = 2**32  # VACUUM reports 32-bit transaction ids, which wrap around
# pg_advisory_lock key of the one process purging at a time: the ASCII of "cp-purge".
PURGE_LOCK_KEY = 0x63702D7075726765
# How long a purge's TRUNCATE checkpoint on SQLite waits for the write lock and for readers of
# old frames; writers wait behind it at most this long.
PURGE_CHECKPOINT_WAIT_MS = 100


def _busy_timeout_of(driver: sqlite3.Connection) -> int:
    """The busy timeout a connection of the engine was opened with (``_SerializedConnection``)."""
    return int(getattr(driver, "busy_timeout_ms", 0)) or 1


# Three VACUUM tries at most, with these pauses after each that a snapshot older than the
# overwrite held back (none after the last).
PURGE_RETRY_PAUSES_SECONDS = (0.1, 0.3, 0.0)


def _vacuum_wrap_tables(connection: Connection, *, horizon: int) -> list[str] | None:
    """VACUUM the tables with wraps; returns those (or their TOAST tables) where it could not
    remove every row version replaced before transaction ``horizon`` (a 64-bit id), and those it
    skipped (``SKIP_LOCKED``: an autovacuum, ANALYZE or index build holds them), as VACUUM
    itself reports them. Empty: what was overwritten before ``horizon`` is gone from the tables.
    None: VACUUM ran, but its report could not be read (it is read as PostgreSQL 15 and later
    word it, in English), so nothing could be checked."""
    reports: list[str] = []

    def collect(diagnostic: psycopg.errors.Diagnostic) -> None:
        reports.append(diagnostic.message_primary or "")

    driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
    driver.add_notice_handler(collect)
    try:
        connection.exec_driver_sql(f"VACUUM (VERBOSE, SKIP_LOCKED) {', '.join(WRAP_TABLES)}")
    finally:
        driver.remove_notice_handler(collect)
    finished: set[str] = set()
    held_back: set[str] = set()
    for report in reports:
        if (table := _VACUUMED.search(report)) is None:
            continue
        finished.add(table.group(1))
        cutoff, missed = _REMOVABLE_CUTOFF.search(report), _MISSED.search(report)
        behind = cutoff is None or (int(cutoff.group(1)) - horizon) % XID_SPACE >= XID_SPACE // 2
        if behind or (missed is not None and int(missed.group(1))):
            held_back.add(table.group(1))
    if not finished:
        return None
    return sorted(held_back | (set(WRAP_TABLES) - finished))


class Database:
    """One engine per process; sessions are short and owned by a request or a command."""

    def __init__(self, settings: Settings) -> None:
        self._purging = threading.Lock()  # one purge at a time per process
        self.url = settings.resolved_database_url
        # SQLite's pool as large as PostgreSQL's: each request in a thread holds a connection
        # while it waits for the write lock, so a smaller pool made the requests past it queue
        # for a connection first, and wait several times the bound before their 503.
        self.engine = make_engine(
            self.url,
            lock_timeout_seconds=settings.log_lock_timeout_seconds,
            pool_size=settings.database_pool_size,
            sqlite_pool_size=settings.database_pool_size,
        )

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads alone (``READ_ONLY_OPTION``); it never commits."""
        connection = self.engine.connect().execution_options(**{READ_ONLY_OPTION: True})
        with connection, Session(bind=connection) as session:
            try:
                yield session
            finally:
                session.rollback()

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

    @property
    def purge_pending(self) -> bool:
        """Whether a purge some transaction asked for (``request_purge``) is not done yet."""
        with self.engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as connection:
            return connection.execute(select(_PURGE_REQUESTS.c.id).limit(1)).first() is not None

    def purge_replaced_rows(self) -> bool:
        """Remove what is left of rows that crypto-shredding or erasure overwrote: every purge
        asked for (``request_purge``) and committed so far, whichever worker or command asked.
        True once none is pending; False when it could not finish (logged): it stays pending
        for the next try (the periodic job, or the next ``casepackets expire``). One process
        purges at a time; another waits for it, then looks again.

        PostgreSQL keeps an updated row's previous version, with the wrap or ciphertext it
        held, until VACUUM, which here runs at once rather than whenever autovacuum gets round
        to it. VACUUM cannot remove a version that a snapshot older than its replacement may
        still see, and skips a table that another VACUUM holds: the purge is done only once
        VACUUM reports a removable cutoff past every requested overwrite, on every table.
        SQLite zeroes freed space itself (``secure_delete``) but keeps old page images in its
        ``-wal`` file; a TRUNCATE checkpoint empties it unless a reader still needs it, and
        reports when one did. Copies outside the database (WAL archives, backups) stay: retiring
        the key version that wrapped them is what makes those undecryptable.
        """
        try:
            if not self.purge_pending:
                return True
            # Another process purging now may finish what this one found pending: it waits
            # for that purge, then looks again.
            with self._purging, _one_process_at_a_time(self.url, name="purge", key=PURGE_LOCK_KEY):
                with self.engine.connect().execution_options(
                    **{READ_ONLY_OPTION: True}
                ) as connection:
                    last, horizon = connection.execute(
                        select(func.max(_PURGE_REQUESTS.c.id), func.max(_PURGE_REQUESTS.c.horizon))
                    ).one()
                if last is None:
                    return True
                if not self._purge(horizon=horizon):
                    return False
                # Requests come in id order, but on PostgreSQL they may commit out of it: one
                # still open during VACUUM (its horizon past the one checked) stays pending.
                done = _PURGE_REQUESTS.c.id <= last
                if horizon is not None:
                    done &= (_PURGE_REQUESTS.c.horizon <= horizon) | _PURGE_REQUESTS.c.horizon.is_(
                        None
                    )
                with self.engine.begin() as connection:
                    connection.execute(delete(_PURGE_REQUESTS).where(done))
                return True
        except (OperationalError, sqlite3.Error, psycopg.Error) as exc:
            logger.warning("could not purge replaced rows (%s)", type(exc).__name__)
            return False

    def _purge(self, *, horizon: int | None) -> bool:
        if self.is_sqlite:
            raw = self.engine.raw_connection()
            driver: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
            try:
                # A TRUNCATE checkpoint holds the write lock while it waits for readers to leave
                # the old frames: with the usual busy timeout every write (an open's log entry
                # too) would wait behind a long reader for the whole bound. It waits a moment
                # instead, and the purge stays pending if that was too short.
                usual = _busy_timeout_of(driver)
                # Recorded first: should the restore below fail, the next transaction's BEGIN
                # sees the difference and sets its own timeout again.
                setattr(driver, "busy_timeout_ms", PURGE_CHECKPOINT_WAIT_MS)  # noqa: B010
                driver.execute(f"PRAGMA busy_timeout={PURGE_CHECKPOINT_WAIT_MS}")
                busy, _, _ = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                with contextlib.suppress(sqlite3.Error):
                    driver.execute(f"PRAGMA busy_timeout={usual}")
                    setattr(driver, "busy_timeout_ms", usual)  # noqa: B010
                raw.close()
            if busy:
                logger.warning(
                    "could not empty the SQLite -wal file of overwritten rows: a reader still "
                    "needs it; trying again later"
                )
                return False
            return True
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            # A request's transaction that began just before the overwrite holds the cutoff
            # back for milliseconds: a few short tries outlast it, so only a long reader
            # (pg_dump, a report) leaves the purge pending.
            for pause in PURGE_RETRY_PAUSES_SECONDS:
                held_back = _vacuum_wrap_tables(connection, horizon=horizon or 0)
                if not held_back:
                    break
                time.sleep(pause)
        if held_back is None:
            logger.warning(
                "VACUUM ran, but its report could not be read (PostgreSQL before 15, or server "
                "messages not in English): the purge counts as done without a check that every "
                "overwritten row version is gone"
            )
        if held_back:
            logger.warning(
                "could not yet remove every overwritten row version from %s: a snapshot older "
                "than the overwrite may still see them, or another VACUUM holds the table; "
                "trying again later",
                ", ".join(held_back),
            )
            return False
        return True

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str, migrations_dir: Path) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


# PostgreSQL advisory lock taken by whoever migrates (ASCII "cp-migr").
MIGRATION_LOCK_KEY = 0x63702D6D696772


@contextmanager
def _one_process_at_a_time(url: str, *, name: str, key: int) -> Iterator[None]:
    """Wait until no other process holds the database's lock ``name``, and hold it until the
    block ends. PostgreSQL: the session advisory lock ``key`` on a connection of its own;
    SQLite: ``flock`` on ``<database>-<name>``."""
    if is_sqlite(url):
        database = _sqlite_file(url)
        if database is None:
            yield
            return
        with _sqlite_files(database):
            database.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                database.with_name(f"{database.name}-{name}"), os.O_RDWR | os.O_CREAT, 0o600
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
        return
    engine = create_engine(url, poolclass=NullPool, hide_parameters=True)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("SELECT pg_advisory_lock(%(key)s)", {"key": key})
            yield  # closing the connection releases the lock
    finally:
        engine.dispose()


class Migrated(NamedTuple):
    before: str | None  # the revision found (None: an empty database)
    after: str | None


def migrate(url: str, migrations_dir: Path, revision: str = "head") -> Migrated:
    """Bring the schema to ``revision`` (creating the SQLite file and folder when needed);
    concurrent migrations of one database wait for each other. A database at a revision this
    code does not know is refused (``SchemaTooNew``); a lock held by running work past
    ``MIGRATION_LOCK_TIMEOUT_SECONDS`` ends it (``DatabaseBusy``), as does a migration that
    cannot reach the database (``DatabaseUnreachable``), and a ``migrations_dir`` without
    migrations is refused before anything is created (``NoMigrations``). Returns the revision
    found and the one left."""
    return _run_migrations(url, migrations_dir, lambda config: command.upgrade(config, revision))


def downgrade(url: str, migrations_dir: Path, revision: str = "base") -> None:
    """For tests of the migrations only: ``casepackets`` has no downgrade (restore a backup)."""
    _run_migrations(url, migrations_dir, lambda config: command.downgrade(config, revision))


def migration_scripts(migrations_dir: Path) -> ScriptDirectory:
    """The migrations in ``migrations_dir``. ``NoMigrations`` when it holds none (a mistyped,
    empty or other folder): Alembic would fail with a traceback, or find no revision at all and
    call an empty database up to date and a migrated one newer than this code."""
    try:
        script = ScriptDirectory.from_config(alembic_config("", migrations_dir))
        head = script.get_current_head()
    except CommandError:
        head = None
    if head is None or not (Path(migrations_dir) / "env.py").is_file():
        raise NoMigrations(
            f"CASEPACKETS_MIGRATIONS_DIR {migrations_dir} holds no casepackets migrations "
            "(env.py and versions/): point it at the alembic folder casepackets ships, or unset it"
        )
    return script


def _run_migrations(url: str, migrations_dir: Path, run: Callable[[Config], None]) -> Migrated:
    migration_scripts(migrations_dir)  # before anything is created or locked
    # Every replica runs ``migrate`` as it starts: two at once would both create the tables.
    with (
        database_problems(url),
        _one_process_at_a_time(url, name="migrate", key=MIGRATION_LOCK_KEY),
    ):
        engine = make_engine(url, lock_timeout_seconds=MIGRATION_LOCK_TIMEOUT_SECONDS)
        try:
            with engine.connect() as connection:
                config = alembic_config(url, migrations_dir)
                before = _known_revision(connection, ScriptDirectory.from_config(config))
                connection.commit()
                config.attributes["connection"] = connection  # alembic/env.py runs on it
                run(config)
                after = MigrationContext.configure(connection).get_current_revision()
                connection.commit()
                return Migrated(before, after)
        finally:
            engine.dispose()


def _known_revision(connection: Connection, script: ScriptDirectory) -> str | None:
    """The database's revision (None before the first migration); ``SchemaTooNew`` when this
    code does not know it."""
    current = MigrationContext.configure(connection).get_current_revision()
    if current is not None and current not in {known.revision for known in script.walk_revisions()}:
        raise SchemaTooNew(
            f"the database is at revision {current}, newer than this code's "
            f"{script.get_current_head()}: use the casepackets version that migrated it, or "
            "restore the backup taken before that migration"
        )
    return current


def schema_is_current(engine: Engine, script: ScriptDirectory) -> bool:
    """Whether the database's Alembic revision is the newest one of ``script``
    (``migration_scripts``; False: an older one, which ``migrate`` brings up to date). A
    revision this code does not know is ``SchemaTooNew``; a database that cannot be reached or
    read in time, a ``DatabaseProblem``."""
    with database_problems(engine.url), engine.connect() as connection:
        return _known_revision(connection, script) == script.get_current_head()


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's session. Opening it does no I/O (the connection is taken on first use, in
    the route's thread), so only ending a transaction still open after the route goes to the
    thread pool: a route that committed itself costs no extra hop. FastAPI shields this exit from
    cancellation, so a client that hangs up still has its transaction ended."""
    database: Database = request.app.state.database
    session = database.session()
    try:
        yield session
    except ServiceError as exc:
        await run_in_threadpool(_end, session, commit=exc.commit_before_raising)
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
